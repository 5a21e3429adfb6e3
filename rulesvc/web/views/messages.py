"""Messages across contacts (e.g. the dead ones), one message, and an operator's retry or cancel.

Operations (`find_messages`, `message_of`, `act_on_message`: what the console calls too) behind thin
HTTP adapters."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from aiohttp import web

from rulesvc.core.messages import Message, MessageList
from rulesvc.runtime.fate import Refusal, cancel_message, retry_message
from rulesvc.store.db import message_from_doc
from rulesvc.store.messages import Messages
from rulesvc.web.keys import METRICS, SCHEDULER, STORE
from rulesvc.web.schemas import MessageConflict, MessagesQuery
from rulesvc.web.views.base import QueryRejected, error_response, json_response, query_of

FILTERS = ("channel", "contact_id", "ruleset", "rule", "reason")

# --- operations ------------------------------------------------------------------------------------------


async def find_messages(app: web.Application, query: MessagesQuery) -> MessageList:
    """Newest first, filtered; QueryRejected for a combination the struct cannot refuse by itself."""
    if query.rule is not None and query.ruleset is None:
        raise QueryRejected("query parameter `rule` needs `ruleset`: rule names are a ruleset's own", "rule")
    if query.from_ is not None and query.to is not None and query.from_ >= query.to:
        raise QueryRejected("query parameter `from` must be before `to`", "from")
    filters = {name: getattr(query, name) for name in FILTERS if getattr(query, name) is not None}
    docs = await Messages(app[STORE]).find(
        query.limit + 1,
        before=query.before,
        before_id=query.before_id,
        status=query.status,
        since=query.from_,
        until=query.to,
        **filters,
    )
    messages = [message_from_doc(d) for d in docs[: query.limit]]
    return MessageList.page(messages, len(docs) > query.limit)


async def message_of(app: web.Application, message_id: str) -> Message | None:
    doc = await Messages(app[STORE]).get(message_id)
    return None if doc is None else message_from_doc(doc)


async def act_on_message(
    app: web.Application, message_id: str, action: Literal["retry", "cancel"]
) -> Message | MessageConflict | None:
    """`retry`: a dead, failed or uncertain message goes out again now; `cancel`: a scheduled, dead or
    uncertain one never.
    None: no such message; MessageConflict: its status does not allow the action."""
    store, now = app[STORE], datetime.now(UTC)
    if action == "retry":
        result = await retry_message(store, message_id, now)
    else:
        metrics = app[METRICS]
        result = await cancel_message(store, message_id, now, metrics.count_fate, metrics.count_flow)
    if result is None:
        return None
    if isinstance(result, Refusal):
        allowed = ", ".join(result.allowed)
        error = f"the message is {result.status}; {action} applies to a message that is {allowed}"
        return MessageConflict(error, result.status, list(result.allowed))
    if action == "retry" and SCHEDULER in app:
        app[SCHEDULER].wake.set()  # due now
    return message_from_doc(result)


# --- HTTP adapters ---------------------------------------------------------------------------------------


async def get_messages(request: web.Request) -> web.Response:
    return json_response(await find_messages(request.app, query_of(request, MessagesQuery)))


async def get_message(request: web.Request) -> web.Response:
    message = await message_of(request.app, request.match_info["message_id"])
    if message is None:
        return error_response(404, "no such message")
    return json_response(message)


async def post_message_action(request: web.Request) -> web.Response:
    # The route's pattern admits only these two.
    action: Literal["retry", "cancel"] = "retry" if request.match_info["action"] == "retry" else "cancel"
    result = await act_on_message(request.app, request.match_info["message_id"], action)
    if result is None:
        return error_response(404, "no such message")
    if isinstance(result, MessageConflict):
        return json_response(result, 409)
    return json_response(result)
