"""A contact's in-app inbox, and the tokens a page opens it with."""

from __future__ import annotations

import msgspec
from aiohttp import web

from rulesvc.core.events import split_validation_error
from rulesvc.replay.simulate import SimulateRejected
from rulesvc.store.keys import DEFAULT_INBOX_TOKEN_TTL, TTL_RULE, inbox_token_ttl
from rulesvc.web.keys import INBOX, INBOX_TOKENS, STORE
from rulesvc.web.schemas import InboxAction, InboxItem, InboxList, InboxQuery, InboxToken, InboxTokenRequest
from rulesvc.web.views.base import (
    JSON_TYPES,
    contact_id_of,
    error_response,
    json_response,
    query_of,
    read_body,
)

_INBOX_TOKEN_REQUEST = msgspec.json.Decoder(InboxTokenRequest)


async def post_inbox_token(request: web.Request) -> web.Response:
    """The shop's backend mints a token for the signed-in customer and hands it to the page."""
    contact_id = contact_id_of(request)
    body = await read_body(request)
    ttl = DEFAULT_INBOX_TOKEN_TTL
    if body:  # a body, even of blanks, is JSON as declared; none at all takes the default
        if request.content_type not in JSON_TYPES:
            return error_response(
                415, f"unsupported content type `{request.content_type}`; use application/json"
            )
        try:
            asked = inbox_token_ttl(_INBOX_TOKEN_REQUEST.decode(body).ttl)
        except msgspec.ValidationError as exc:
            path, message = split_validation_error(exc)
            return json_response(SimulateRejected(message, path), 422)
        except msgspec.DecodeError as exc:
            return error_response(400, f"malformed JSON: {exc}")
        if asked is None:
            return json_response(SimulateRejected(TTL_RULE, "$.ttl"), 422)
        ttl = asked
    token, expires_at = await request.app[INBOX_TOKENS].mint(contact_id, ttl)
    return json_response(InboxToken(token, contact_id, expires_at))


async def inbox_of(app: web.Application, contact_id: str, query: InboxQuery) -> InboxList:
    """The operation behind `GET /v1/contacts/{contact_id}/inbox` (the console shows it too)."""
    docs = await app[STORE].inapp_messages(contact_id, query.limit)
    items = [
        InboxItem(
            d["_id"],
            d["template"],
            d.get("content", {}),
            d.get("sent_at"),
            d.get("shown_at"),
            d.get("params", {}),
        )
        for d in docs
    ]
    return InboxList(items)


async def get_inbox(request: web.Request) -> web.Response:
    return json_response(await inbox_of(request.app, contact_id_of(request), query_of(request, InboxQuery)))


_INBOX_ACTION = msgspec.json.Decoder(InboxAction)


async def post_inbox_action(request: web.Request) -> web.Response:
    contact_id = contact_id_of(request)
    try:
        action = _INBOX_ACTION.decode(await read_body(request))
    except msgspec.ValidationError as exc:
        path, message = split_validation_error(exc)
        return json_response(SimulateRejected(message, path), 422)
    except msgspec.DecodeError as exc:
        return error_response(400, f"malformed JSON: {exc}")
    found = await request.app[STORE].inapp_action(contact_id, request.match_info["message_id"], action.action)
    if not found:
        return error_response(404, "no such in-app message for this contact")
    request.app[INBOX].wake.set()
    return web.Response(status=204)
