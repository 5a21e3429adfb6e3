"""Segment's HTTP Tracking API (`POST /v1/batch`, `/v1/track`, ...), which RudderStack speaks too: what a
shop's existing Segment or RudderStack setup sends, stored through the one ingest path as our events."""

from __future__ import annotations

from datetime import UTC, datetime

from aiohttp import web

from rulesvc.core.contacts import FieldError
from rulesvc.core.events import EventsRejected
from rulesvc.core.segment import (
    Kind,
    Malformed,
    Refused,
    SegmentAccepted,
    TooLarge,
    Translated,
    rejected,
    segment_path,
    translate,
)
from rulesvc.runtime.identity import link, resolve_contacts
from rulesvc.runtime.privacy import tombstone_drops
from rulesvc.store.db import Store
from rulesvc.web.keys import METRICS, SEGMENT_MAPPING, SETTINGS, STORE
from rulesvc.web.views.base import json_response, read_body
from rulesvc.web.views.events import ingest

MAX_ERRORS_SHOWN = 100  # a 500 KB batch of junk would otherwise be answered with megabytes of errors


async def _post(request: web.Request, kind: Kind) -> web.Response:
    received_at = datetime.now(UTC)
    body = await read_body(request)
    try:
        found = translate(body, kind, request.app[SEGMENT_MAPPING], received_at)
    except TooLarge as exc:
        return json_response(rejected(str(exc), code="too_large"), 413)
    except Malformed as exc:
        return json_response(rejected(str(exc), code="malformed_json"), 400)
    except Refused as exc:
        request.app[METRICS].events.labels("rejected").inc(len(exc.errors))
        shown = exc.errors[:MAX_ERRORS_SHOWN]
        more = f" (the first {len(shown)} listed)" if len(shown) < len(exc.errors) else ""
        return json_response(rejected(f"{len(exc.errors)} problem(s){more}; nothing stored", shown), 400)
    store = request.app[STORE]
    await _resolve(store, found)
    # A late retry of an identify sent before its contact was erased may not bring the profile back.
    mode = request.app[SETTINGS].erasure_tombstone
    erased = {c for c, _, sent in found.patches if await tombstone_drops(store, c, sent, mode)}
    for contact_id, patch, _ in found.patches:  # before the events, so rules deciding on them see the profile
        if contact_id not in erased:
            await store.patch_contact(contact_id, patch, received_at)
    for anonymous, known in found.links:
        if known not in erased:
            await link(store, anonymous, known, received_at, tombstone=mode)
    result = await ingest(request, found.events)
    if isinstance(result, EventsRejected):
        errors = [FieldError(segment_path(e.path, found.places[e.index]), e.message) for e in result.errors]
        return json_response(rejected(result.error, errors), 400)
    request.app[METRICS].events.labels("ignored").inc(found.ignored)
    return json_response(SegmentAccepted(True, result.accepted, result.duplicates, found.ignored))


async def _resolve(store: Store, found: Translated) -> None:
    """Events and profile changes of a visitor known only by an anonymous id go to the known contact the
    anonymous one is linked to, once there is one."""
    if not found.anonymous:  # (the events themselves are resolved again by `ingest`, as every source's)
        return
    known = await resolve_contacts(store, sorted(found.anonymous))
    if not known:
        return
    for event in found.events:
        if event.contact_id in known:
            event.contact_id = known[event.contact_id]
    found.patches = [(known.get(c, c), patch, sent) for c, patch, sent in found.patches]


async def post_batch(request: web.Request) -> web.Response:
    return await _post(request, "batch")


async def post_track(request: web.Request) -> web.Response:
    return await _post(request, "track")


async def post_identify(request: web.Request) -> web.Response:
    return await _post(request, "identify")


async def post_page(request: web.Request) -> web.Response:
    return await _post(request, "page")


async def post_screen(request: web.Request) -> web.Response:
    return await _post(request, "screen")


async def post_alias(request: web.Request) -> web.Response:
    return await _post(request, "alias")


async def post_group(request: web.Request) -> web.Response:
    return await _post(request, "group")
