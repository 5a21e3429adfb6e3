"""Events quarantined after failing too often: list them, retry or drop them."""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec
import structlog
from aiohttp import web

from rulesvc.core.events import split_validation_error
from rulesvc.store.db import Doc
from rulesvc.web.keys import FANOUT, INBOX, STORE
from rulesvc.web.schemas import (
    QuarantineActed,
    QuarantineAction,
    QuarantinedEvent,
    QuarantineList,
    QuarantineQuery,
)
from rulesvc.web.views.base import json_response, query_of, read_body

log = structlog.get_logger(__name__)


def quarantined_from_doc(doc: Doc) -> QuarantinedEvent:
    return QuarantinedEvent(
        id=doc["_id"],
        type=doc["type"],
        time=doc["time"],
        received_at=doc["received_at"],
        quarantined_at=doc["quarantined_at"],
        stage=doc.get("stage", "inbox"),
        attempts=doc.get("attempts", 0),
        error=doc.get("error", ""),
        contact_id=doc.get("contact_id"),
        attributes=doc.get("attributes") or {},
    )


async def get_quarantine(request: web.Request) -> web.Response:
    query = query_of(request, QuarantineQuery)
    docs = await request.app[STORE].quarantined(query.limit + 1, query.before)
    events = [quarantined_from_doc(d) for d in docs[: query.limit]]
    next_before = events[-1].quarantined_at if len(docs) > query.limit else None
    return json_response(QuarantineList(events, next_before))


async def post_quarantine_action(request: web.Request) -> web.Response:
    action = request.match_info["action"]
    try:
        body = msgspec.json.decode(await read_body(request) or b"{}", type=QuarantineAction)
    except msgspec.ValidationError as exc:
        path, message = split_validation_error(exc)
        raise web.HTTPUnprocessableEntity(text=f"{path}: {message}") from None
    except msgspec.DecodeError as exc:
        raise web.HTTPBadRequest(text=f"malformed JSON: {exc}") from None
    if (body.ids is None) == (not body.all):
        raise web.HTTPUnprocessableEntity(text='give either "ids": [...] or "all": true')
    count = await request.app[STORE].release_quarantined(body.ids, action, datetime.now(UTC))
    log.info("quarantine.released", action=action, count=count, all=body.all)
    if action == "retry":
        if INBOX in request.app:
            request.app[INBOX].wake.set()
        if FANOUT in request.app:
            request.app[FANOUT].wake.set()
        return json_response(QuarantineActed(retried=count))
    return json_response(QuarantineActed(dropped=count))
