"""The contact pages: search by id, email or phone; one contact with its profile, reachability, state,
pending sends (cancel), in-app inbox, timeline, and per ruleset why it got or did not get a message.
Everything comes from the operations behind `GET /v1/contacts...` (rulesvc.web.views)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from aiohttp import web

from rulesvc.core.ids import id_problem
from rulesvc.core.messages import Message
from rulesvc.web.console.base import ConsoleRoute, error_page, render
from rulesvc.web.console.why import PENDING, answers, as_json, event_state, sentence, too_old, will_not_send
from rulesvc.web.contact_schemas import ContactSearchQuery, ContactState
from rulesvc.web.schemas import ContactMessagesQuery, EventRecord, InboxQuery, PagingQuery
from rulesvc.web.views import contacts, inbox
from rulesvc.web.views.base import QueryRejected, parse_query

HISTORY = 200  # the newest messages and events the page reads


@dataclass
class Entry:
    """One line of the timeline: an event the contact sent, or a message decided for it."""

    at: datetime
    kind: str  # "event" or "message"
    event: EventRecord | None = None
    message: Message | None = None
    why: str = ""
    notes: list[str] = field(default_factory=list)  # an event not decided, or too old for a ruleset


async def search(request: web.Request) -> web.StreamResponse:
    q = request.query.get("q", "")
    if not q.strip():
        return render(request, "contacts.html", nav="contacts", q="", results=None, error=None)
    try:
        query = parse_query(request, ContactSearchQuery)
    except QueryRejected as exc:
        return render(request, "contacts.html", status=422, nav="contacts", q=q, results=None,
                      error=exc.message)  # fmt: skip
    found = await contacts.search_contacts(request.app, query)
    return render(request, "contacts.html", nav="contacts", q=q, results=found.contacts, error=None)


async def contact(request: web.Request) -> web.StreamResponse:
    contact_id = request.match_info["contact_id"]
    problem = id_problem(contact_id, "contact id")
    if problem is not None:
        return error_page(request, 400, problem)
    app = request.app
    state = await contacts.contact_state(app, contact_id)
    if state is None:
        return error_page(
            request,
            404,
            f"No contact `{contact_id}`: no profile and no event of it yet. Search by email on the "
            "Contacts page, or post an event with this contact_id.",
        )
    profile = await contacts.get_contact_op(app, contact_id)
    history = await contacts.contact_messages(app, contact_id, ContactMessagesQuery(limit=HISTORY))
    pending_page = await contacts.contact_messages(
        app, contact_id, ContactMessagesQuery(limit=HISTORY, status="scheduled")
    )
    events = await contacts.contact_events(app, contact_id, PagingQuery(limit=HISTORY))
    inbox_list = await inbox.inbox_of(app, contact_id, InboxQuery(limit=20))
    holdouts = {r.ruleset: r.holdout for r in state.rulesets}
    pending = sorted(
        {
            m.message_id: m for m in [*pending_page.messages, *history.messages] if m.status in PENDING
        }.values(),
        key=lambda m: m.due_at or m.created_at,
    )
    timeline = [Entry(e.time, "event", event=e, notes=_event_notes(e, state)) for e in events.events] + [
        Entry(m.created_at, "message", message=m, why=sentence(m, holdouts.get(m.ruleset)))
        for m in history.messages
        if m.status not in PENDING
    ]
    timeline.sort(key=lambda e: e.at, reverse=True)
    why = {m.message_id: sentence(m, holdouts.get(m.ruleset)) for m in history.messages}
    blocked = {m.message_id: b for m in pending if (b := will_not_send(m, state.channels)) is not None}
    return render(
        request,
        "contact.html",
        nav="contacts",
        contact_id=contact_id,
        profile=profile,
        state=state,
        pending=pending,
        timeline=timeline,
        inbox=inbox_list.messages,
        answers=answers(state.rulesets, history.messages, history.next_before is None, events.events),
        why=why,
        blocked=blocked,
        more_history=history.next_before is not None,
        attributes=[
            (k, as_json(v) if isinstance(v, dict | list) else v)
            for k, v in _pairs((profile.attributes if profile else {}) or {})
        ],
        as_json=as_json,
    )


def _event_notes(event: EventRecord, state: ContactState) -> list[str]:
    """What the timeline says of an event: not decided yet (or set aside), or too old for a ruleset."""
    undecided = event_state(event)
    if undecided is not None:
        return [undecided]
    listening = [r for r in state.rulesets if event.type in {s.type for s in r.listens_to}]
    return [f"{r.ruleset}: {old}" for r in listening if (old := too_old(event, r)) is not None]


def _pairs(values: dict[str, Any]) -> list[tuple[str, Any]]:
    return sorted(values.items())


ROUTES = [
    ConsoleRoute("GET", "/contacts", search, title="Contacts"),
    ConsoleRoute("GET", "/contacts/{contact_id}", contact, title="Contact"),
]
