"""Messages by status across contacts (e.g. the dead ones)."""

from __future__ import annotations

from aiohttp import web

from rulesvc.core.messages import MessageList
from rulesvc.store.db import message_from_doc
from rulesvc.web.keys import STORE
from rulesvc.web.schemas import MessagesQuery
from rulesvc.web.views.base import json_response, query_of


async def get_messages(request: web.Request) -> web.Response:
    query = query_of(request, MessagesQuery)
    docs = await request.app[STORE].messages_by_status(query.status, query.limit + 1, query.before)
    messages = [message_from_doc(d) for d in docs[: query.limit]]
    next_before = messages[-1].created_at if len(docs) > query.limit else None
    return json_response(MessageList(messages, next_before))
