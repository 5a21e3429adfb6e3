"""Messages across contacts (e.g. the dead ones), one message, and an operator's retry or cancel."""

from __future__ import annotations

from datetime import UTC, datetime

from aiohttp import web

from rulesvc.core.messages import MessageList
from rulesvc.runtime.fate import Refusal, cancel_message, retry_message
from rulesvc.store.db import message_from_doc
from rulesvc.store.messages import Messages
from rulesvc.web.keys import METRICS, SCHEDULER, STORE
from rulesvc.web.schemas import MessageConflict, MessagesQuery
from rulesvc.web.views.base import error_response, json_response, query_of

FILTERS = ("channel", "contact_id", "ruleset", "reason")


async def get_messages(request: web.Request) -> web.Response:
    query = query_of(request, MessagesQuery)
    filters = {name: getattr(query, name) for name in FILTERS if getattr(query, name) is not None}
    docs = await Messages(request.app[STORE]).find(
        query.limit + 1, before=query.before, before_id=query.before_id, status=query.status, **filters
    )
    messages = [message_from_doc(d) for d in docs[: query.limit]]
    return json_response(MessageList.page(messages, len(docs) > query.limit))


async def get_message(request: web.Request) -> web.Response:
    doc = await Messages(request.app[STORE]).get(request.match_info["message_id"])
    if doc is None:
        return error_response(404, "no such message")
    return json_response(message_from_doc(doc))


async def post_message_action(request: web.Request) -> web.Response:
    """`retry`: a dead, failed or uncertain message goes out again now; `cancel`: a scheduled one never."""
    message_id, action = request.match_info["message_id"], request.match_info["action"]
    store, now = request.app[STORE], datetime.now(UTC)
    if action == "retry":
        result = await retry_message(store, message_id, now)
    else:
        metrics = request.app[METRICS]
        result = await cancel_message(store, message_id, now, metrics.count_fate, metrics.count_flow)
    if result is None:
        return error_response(404, "no such message")
    if isinstance(result, Refusal):
        allowed = ", ".join(result.allowed)
        error = f"the message is {result.status}; {action} applies to a message that is {allowed}"
        return json_response(MessageConflict(error, result.status, list(result.allowed)), 409)
    if action == "retry" and SCHEDULER in request.app:
        request.app[SCHEDULER].wake.set()  # due now
    return json_response(message_from_doc(result))
