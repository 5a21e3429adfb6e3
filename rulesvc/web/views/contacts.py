"""A contact's profile, state, message history and events; contact search.

Each route is an operation (`async def op(app, ...) -> body struct`, what the console calls too) behind
a thin HTTP adapter (parse, operation, `json_response`)."""

from __future__ import annotations

import copy
import re
from datetime import UTC, datetime
from typing import Any

import msgspec
from aiohttp import web

from rulesvc.core import reasons
from rulesvc.core.contacts import E164_PATTERN, Contact, ContactRejected, decode_contact
from rulesvc.core.engine import counter_value, flag_active, from_ts, remembered
from rulesvc.core.ids import id_problem
from rulesvc.core.messages import MessageList
from rulesvc.core.privacy import contact_hash
from rulesvc.core.ruleformat import HOLDOUT_GROUP
from rulesvc.core.sendpolicy import NO_CONSENT_NEEDED, ask, choose, day_start, suppressed_on
from rulesvc.store.contacts import Contacts
from rulesvc.store.db import Doc, contact_from_doc, message_from_doc
from rulesvc.store.messages import Messages
from rulesvc.store.privacy import Privacy
from rulesvc.web.contact_schemas import (
    AudienceMembership,
    ChannelState,
    ContactSearchQuery,
    ContactSearchResult,
    ContactState,
    ContactSummary,
    CounterState,
    EventSeen,
    FlagState,
    OnceMark,
    RememberedValue,
    RulesetState,
    SessionState,
    Suppression,
)
from rulesvc.web.keys import CHANNELS, RULESETS, SEND_POLICY, STORE, TOMBSTONES
from rulesvc.web.schemas import ContactMessagesQuery, EventList, EventRecord, PagingQuery
from rulesvc.web.views.base import (
    JSON_TYPES,
    contact_id_of,
    error_response,
    json_response,
    query_of,
    read_body,
)

# What a search term is taken as: `+` and digits a phone number (E.164), an `@` an email, else an id.
_PHONE = re.compile(E164_PATTERN)

# --- operations ------------------------------------------------------------------------------------------


async def get_contact_op(app: web.Application, contact_id: str) -> Contact | None:
    doc = await app[STORE].get_contact(contact_id)
    return None if doc is None else contact_from_doc(doc)


async def search_contacts(app: web.Application, query: ContactSearchQuery) -> ContactSearchResult:
    """By exact id first (an id may look like anything), then by email in any letter case or by phone."""
    contacts = Contacts(app[STORE])
    term = query.q.strip()
    found: list[ContactSummary] = []
    if term and id_problem(term, "q") is None:
        doc = await contacts.summary(term)
        if doc is not None:
            found.append(_summary(doc, "id"))
    if "@" in term:
        found += [_summary(d, "email") for d in await contacts.with_email(term, query.limit)]
    elif _PHONE.match(term):
        found += [_summary(d, "phone") for d in await contacts.with_phone(term, query.limit)]
    unique = {c.contact_id: c for c in reversed(found)}  # an id match wins over the same contact by email
    return ContactSearchResult(
        sorted(unique.values(), key=lambda c: (c.matched != "id", c.contact_id))[: query.limit]
    )


def _summary(doc: Doc, matched: str) -> ContactSummary:
    stored = "created_at" in doc
    return msgspec.convert(
        {"contact_id": doc["_id"], "matched": matched, "stored": stored,
         **{k: doc.get(k) for k in ("email", "phone", "created_at", "updated_at")}},
        ContactSummary,
    )  # fmt: skip


async def contact_messages(app: web.Application, contact_id: str, query: ContactMessagesQuery) -> MessageList:
    docs = await app[STORE].contact_messages(
        contact_id, query.limit + 1, query.before, query.status, query.before_id
    )
    messages = [message_from_doc(d) for d in docs[: query.limit]]
    return MessageList.page(messages, len(docs) > query.limit)


async def contact_events(app: web.Application, contact_id: str, query: PagingQuery) -> EventList:
    docs = await app[STORE].contact_events(contact_id, query.limit, query.before)
    return EventList([msgspec.convert({"id": d.pop("_id"), **d}, EventRecord) for d in docs])


async def contact_state(
    app: web.Application, contact_id: str, now: datetime | None = None
) -> ContactState | None:
    """Flags, counters, remembered values, suppressions, each channel's verdict for a marketing message,
    today's capped sends, and the contact in each loaded ruleset; None if the service knows nothing of
    the contact (no stored contact, no event)."""
    now = now or datetime.now(UTC)
    store = app[STORE]
    doc = await store.get_contact(contact_id)
    contacts = Contacts(store)
    if doc is None and await contacts.summary(contact_id) is None:
        return None
    contact: Doc = doc or {"_id": contact_id}
    state: dict[str, Any] = dict(contact.get("state") or {})
    channels = await _channel_states(app, contact, now)
    live = app[RULESETS].live
    listened = sorted({e for rs in live.values() for rule in rs.rules for e in rule.events})
    seen = await contacts.events_seen(contact_id, listened)
    rulesets = []
    for name, compiled in sorted(live.items()):
        group = compiled.groups.group_of(contact_id, copy.deepcopy(state))  # reading draws no arm for keeps
        journey = (state.get("journeys") or {}).get(name) or {}
        types = sorted({e for rule in compiled.rules for e in rule.events})
        once = [
            OnceMark(key.split("/")[1], key, _time(mark.get("at")))
            for key, mark in sorted((state.get("once") or {}).items())
            if key.split("/")[0] == name and isinstance(mark, dict) and key.count("/") >= 1
        ]
        rulesets.append(
            RulesetState(
                name, group, group == HOLDOUT_GROUP, compiled.source.holdout,
                [EventSeen(t, *seen.get(t, (0, None))) for t in types], once,
                _time(journey.get("at")), _time(journey.get("until")), journey.get("rule"),
                compiled.source.timeout,
            )
        )  # fmt: skip
    return ContactState(
        contact_id,
        doc is not None,
        bool(contact.get("email_invalid")),
        dict(contact.get("consent") or {}),
        channels,
        _suppressions(state, now),
        [FlagState(n, flag_active(state, n, now), _time(f.get("until")))
         for n, f in sorted((state.get("flags") or {}).items())],
        [CounterState(n, counter_value(state, n, now), c.get("window"), "keys" in c)
         for n, c in sorted((state.get("counters") or {}).items())],
        [RememberedValue(n, remembered(state, n, now) is not None, v.get("v"), _time(v.get("until")))
         for n, v in sorted((state.get("values") or {}).items())],
        [AudienceMembership(n, _time((a or {}).get("since")))
         for n, a in sorted((state.get("audiences") or {}).items())],
        _session(state.get("session")),
        rulesets,
        now,
    )  # fmt: skip


async def _channel_states(app: web.Application, contact: Doc, now: datetime) -> list[ChannelState]:
    """Each installed channel (and any the contact consented to), judged for a marketing message now."""
    registry, policy = app[CHANNELS], app[SEND_POLICY]
    messages = Messages(app[STORE])
    since = day_start(contact, now, policy)
    consent: dict[str, Any] = contact.get("consent") or {}
    names = sorted(registry.names() | set(consent) | set(policy.frequency_caps))
    states = []
    for name in names:
        channel = registry.get(name)
        facts = {} if channel is None else {name: ask(channel, contact)}
        _, code, why = choose({"channel": name}, contact, facts, now)
        cap = policy.frequency_caps.get(name)
        sent = await messages.sent_since(contact["_id"], name, since) if cap is not None else None
        if code is None and cap is not None and sent is not None and sent >= cap:
            code, why = reasons.FREQUENCY_CAP, f"{name}: frequency cap: {cap} {name} message(s) a day reached"
        given = consent.get(name)
        states.append(
            ChannelState(
                name, bool(facts) and facts[name].configured and facts[name].error is None,
                given if isinstance(given, bool) else None, name not in NO_CONSENT_NEEDED,
                suppressed_on(contact, name, now),
                bool(facts) and facts[name].unreachable is None and facts[name].error is None,
                facts[name].unreachable if facts else None, cap, sent, code, why,
            )
        )  # fmt: skip
    return states


def _suppressions(state: dict[str, Any], now: datetime) -> list[Suppression]:
    found = []
    for channel, entry in sorted((state.get("suppressed") or {}).items()):
        entry = entry if isinstance(entry, dict) else {}
        until = entry.get("until")
        active = until is None or (isinstance(until, int | float) and until > now.timestamp())
        found.append(
            Suppression(channel, active, _time(entry.get("since")), _time(until), entry.get("reason"))
        )
    return found


def _session(session: Any) -> SessionState | None:
    if not isinstance(session, dict) or not session.get("n"):
        return None
    return SessionState(
        int(session["n"]),
        _time(session.get("started")),
        _time(session.get("last")),
        bool(session.get("ended")),
    )


def _time(value: Any) -> datetime | None:
    """A state timestamp (Unix seconds) as a time; None for none or a value no time can hold."""
    if isinstance(value, datetime):
        return value
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    try:
        return from_ts(float(value))
    except (OverflowError, OSError, ValueError):
        return None


# --- HTTP adapters ---------------------------------------------------------------------------------------


async def put_contact(request: web.Request) -> web.Response:
    if request.content_type not in JSON_TYPES:
        return error_response(415, f"unsupported content type `{request.content_type}`; use application/json")
    contact_id = contact_id_of(request)
    body = await read_body(request)
    try:
        contact, errors = decode_contact(body)
    except msgspec.DecodeError as exc:
        return error_response(400, f"malformed JSON: {exc}")
    if errors or contact is None:
        return json_response(ContactRejected("invalid contact; nothing changed", errors), 422)
    store = request.app[STORE]
    doc = await store.put_contact(contact_id, contact)
    await Privacy(store).recreated(contact_hash(contact_id), doc["updated_at"])  # an explicit re-creation
    if TOMBSTONES in request.app:
        request.app[TOMBSTONES].stale()
    created = doc["created_at"] == doc["updated_at"]
    return json_response(contact_from_doc(doc), 201 if created else 200)


async def get_contact(request: web.Request) -> web.Response:
    contact = await get_contact_op(request.app, contact_id_of(request))
    if contact is None:
        return error_response(404, "no such contact")
    return json_response(contact)


async def get_contacts(request: web.Request) -> web.Response:
    return json_response(await search_contacts(request.app, query_of(request, ContactSearchQuery)))


async def get_contact_state(request: web.Request) -> web.Response:
    state = await contact_state(request.app, contact_id_of(request))
    if state is None:
        return error_response(404, "no such contact: no stored contact and no event of it")
    return json_response(state)


async def get_contact_messages(request: web.Request) -> web.Response:
    query = query_of(request, ContactMessagesQuery)
    return json_response(await contact_messages(request.app, contact_id_of(request), query))


async def get_contact_events(request: web.Request) -> web.Response:
    query = query_of(request, PagingQuery)
    return json_response(await contact_events(request.app, contact_id_of(request), query))
