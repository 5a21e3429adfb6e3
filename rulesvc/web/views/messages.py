"""Messages by status across contacts (e.g. the dead ones)."""

from __future__ import annotations

from aiohttp import web

from rulesvc.core.messages import MessageList
from rulesvc.store.db import message_from_doc
from rulesvc.web.keys import STORE
from rulesvc.web.views.base import json_response, query_int, query_time


async def get_messages(request: web.Request) -> web.Response:
    status = request.query.get("status")
    if status is None:
        raise web.HTTPBadRequest(text="query parameter `status` is required, e.g. status=dead")
    limit = query_int(request, "limit", 50, 1, 500)
    before = query_time(request, "before")
    docs = await request.app[STORE].messages_by_status(status, limit + 1, before)
    messages = [message_from_doc(d) for d in docs[:limit]]
    next_before = messages[-1].created_at if len(docs) > limit else None
    return json_response(MessageList(messages, next_before))
