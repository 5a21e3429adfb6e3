"""A contact's profile, message history and events."""

from __future__ import annotations

import msgspec
from aiohttp import web

from rulesvc.core.contacts import ContactRejected, decode_contact
from rulesvc.core.messages import MessageList
from rulesvc.store.db import contact_from_doc, message_from_doc
from rulesvc.web.keys import STORE
from rulesvc.web.schemas import ContactMessagesQuery, EventList, EventRecord, PagingQuery
from rulesvc.web.views.base import (
    JSON_TYPES,
    contact_id_of,
    error_response,
    json_response,
    query_of,
    read_body,
)


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
    created = doc["created_at"] == doc["updated_at"]
    return json_response(contact_from_doc(doc), 201 if created else 200)


async def get_contact(request: web.Request) -> web.Response:
    doc = await request.app[STORE].get_contact(contact_id_of(request))
    if doc is None:
        return error_response(404, "no such contact")
    return json_response(contact_from_doc(doc))


async def get_contact_messages(request: web.Request) -> web.Response:
    query = query_of(request, ContactMessagesQuery)
    docs = await request.app[STORE].contact_messages(
        contact_id_of(request), query.limit + 1, query.before, query.status, query.before_id
    )
    messages = [message_from_doc(d) for d in docs[: query.limit]]
    return json_response(MessageList.page(messages, len(docs) > query.limit))


async def get_contact_events(request: web.Request) -> web.Response:
    query = query_of(request, PagingQuery)
    docs = await request.app[STORE].contact_events(contact_id_of(request), query.limit, query.before)
    records = [msgspec.convert({"id": d.pop("_id"), **d}, EventRecord) for d in docs]
    return json_response(EventList(records))
