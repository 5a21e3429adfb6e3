"""The messages pages: the list with the API's filters (its own query struct and parser: the page refuses
what `GET /v1/messages` refuses, with the same words), dead letters and uncertain sends with Retry and
Cancel (give up on it: never retried), one message with every field, and the Retry and Cancel actions
(`POST /v1/messages/{id}/retry|cancel`)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from urllib.parse import quote, urlencode

from aiohttp import web

from rulesvc.core.messages import MessageStatus
from rulesvc.core.reasons import REASONS
from rulesvc.web.console.base import (
    ConsoleRoute,
    error_page,
    form_of,
    render,
    safe_next,
    see_other,
)
from rulesvc.web.console.why import as_json, sentence
from rulesvc.web.schemas import MessageConflict, MessagesQuery, enum_values
from rulesvc.web.views import messages
from rulesvc.web.views.base import QueryRejected, parse_query

STATUSES = enum_values(MessageStatus) or []
TABS = [("All", {}), ("Dead letters", {"status": "dead"}), ("Uncertain", {"status": "uncertain"}),
        ("Failed", {"status": "failed"}), ("Suppressed", {"status": "suppressed"}),
        ("Waiting", {"status": "scheduled"})]  # fmt: skip
RETRYABLE = frozenset({"dead", "failed", "uncertain"})
CANCELLABLE = frozenset({"scheduled", "dead", "uncertain"})


def cancel_question(status: str) -> str:
    """The confirm() before a cancel: a waiting send is stopped; a dead or uncertain one given up on."""
    if status == "scheduled":
        return "Cancel this send? It will never go out."
    return f"Give up on this {status} message? It will never be retried."


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


async def message_list(request: web.Request) -> web.StreamResponse:
    # A form sends every field, blank ones too: a blank field is no filter, as if it were not given.
    given = {k: v for k, v in request.query.items() if v.strip()}
    clean = request.clone(rel_url=request.rel_url.with_query(given))
    filters = {k: v for k, v in given.items() if k not in ("before", "before_id")}
    try:
        query = parse_query(clean, MessagesQuery)
        found = await messages.find_messages(request.app, query)
    except QueryRejected as exc:
        return render(request, "messages.html", status=422, nav="messages", error=exc.message,
                      field=exc.field, **_page_context(filters, [], None))  # fmt: skip
    next_url = None
    if found.next_before is not None:
        more = {**filters, "before": _iso_exact(found.next_before), "before_id": found.next_before_id or ""}
        next_url = "/console/messages?" + urlencode(more)
    rows = [(m, sentence(m)) for m in found.messages]
    return render(request, "messages.html", nav="messages", error=None, field=None,
                  **_page_context(filters, rows, next_url))  # fmt: skip


def _iso_exact(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _page_context(filters: dict[str, str], rows: list[Any], next_url: str | None) -> dict[str, Any]:
    now = datetime.now(UTC).replace(microsecond=0)
    windows = [(label, {**filters, "from": _iso(now - span)}) for label, span in
               (("Last hour", timedelta(hours=1)), ("Last 24 hours", timedelta(days=1)),
                ("Last 7 days", timedelta(days=7)))]  # fmt: skip
    return {
        "filters": filters,
        "rows": rows,
        "next_url": next_url,
        "statuses": STATUSES,
        "reasons": sorted(REASONS),
        "tabs": [
            (label, "/console/messages?" + urlencode(q), q.get("status") == filters.get("status"))
            for label, q in TABS
        ],
        "windows": [(label, "/console/messages?" + urlencode(q)) for label, q in windows],
        "retryable": RETRYABLE,
        "cancellable": CANCELLABLE,
        "cancel_question": cancel_question,
    }


async def message_detail(request: web.Request) -> web.StreamResponse:
    message_id = request.match_info["message_id"]
    message = await messages.message_of(request.app, message_id)
    if message is None:
        return error_page(request, 404, f"No message `{message_id}`.")
    return render(request, "message.html", nav="messages", m=message, why=sentence(message),
                  retryable=RETRYABLE, cancellable=CANCELLABLE, cancel_question=cancel_question,
                  as_json=as_json)  # fmt: skip


async def message_action(request: web.Request) -> web.StreamResponse:
    message_id = request.match_info["message_id"]
    action: Literal["retry", "cancel"] = "retry" if request.match_info["action"] == "retry" else "cancel"
    back = safe_next(form_of(request).get("back") or f"/console/messages/{_quoted(message_id)}")
    result = await messages.act_on_message(request.app, message_id, action)
    if result is None:
        return error_page(request, 404, f"No message `{message_id}`.")
    if isinstance(result, MessageConflict):
        return error_page(request, 409, f"Nothing changed: {result.error}.")
    done = "sent again now" if action == "retry" else "cancelled: it will never be sent"
    return await see_other(
        request, back, f"Message {result.ruleset} / {result.rule} to {result.contact_id} {done}."
    )


def _quoted(message_id: str) -> str:
    return quote(message_id, safe="")


ROUTES = [
    ConsoleRoute("GET", "/messages", message_list, title="Messages"),
    ConsoleRoute("POST", "/messages/{message_id:.+}/{action:retry|cancel}", message_action, change=True),
    ConsoleRoute("GET", "/messages/{message_id:.+}", message_detail, title="Message"),
]
