"""Segment's HTTP Tracking API (`POST /v1/batch`, `/v1/track`, ...), which RudderStack speaks too: what a
shop's existing Segment or RudderStack setup sends, stored through the one ingest path as our events."""

from __future__ import annotations

from datetime import UTC, datetime

import structlog
from aiohttp import web

from rulesvc.core.carts import cart_attributes
from rulesvc.core.contacts import FieldError
from rulesvc.core.events import EventError, EventsRejected
from rulesvc.core.privacy import TombstoneMode, contact_hash, dropped_events
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
from rulesvc.store.carts import CartContention, Carts
from rulesvc.store.db import Store
from rulesvc.store.identity import Identities
from rulesvc.web.keys import API_KEY, METRICS, SEGMENT_MAPPING, SETTINGS, STORE
from rulesvc.web.views.base import json_response, read_body
from rulesvc.web.views.events import foreign_outcomes, ingest, tombstones_of

log = structlog.get_logger(__name__)

log = structlog.get_logger(__name__)

MAX_ERRORS_SHOWN = 100  # a 500 KB batch of junk would otherwise be answered with megabytes of errors
MERGES_PER_REQUEST = 10  # links merged while the request waits; more are left to the merge loop


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
    most = request.app[SETTINGS].max_batch_events
    if len(found.events) + len(found.patches) + len(found.links) > most:
        message = (
            f"more than {most} events, identify and alias calls in one request (RULESVC_MAX_BATCH_EVENTS)"
        )
        return json_response(rejected(message, code="too_large"), 413)
    store = request.app[STORE]
    key = request.get(API_KEY)
    if key is not None and key.scope != "admin":  # before anything is written: a refused message does nothing
        _leave_out(found, await foreign_outcomes(store, found.events))
    if found.rejected:
        log.warning("segment.rejected", messages=found.rejected, paths=[e.path for e in found.errors[:10]])
        request.app[METRICS].events.labels("rejected").inc(found.rejected)
    await _resolve(store, found)
    settings = request.app[SETTINGS]
    stones = await tombstones_of(
        request,
        sorted({contact_hash(c) for c, _, _ in found.patches} | {contact_hash(k) for _, k, _ in found.links}),
    )
    # A late retry of an identify or alias sent before its contact was erased may not bring it back.
    times = [(c, sent) for c, _, sent in found.patches] + [(k, sent) for _, k, sent in found.links]
    erased = set(dropped_events(times, stones, settings.erasure_tombstone))
    fill_only = key is not None and key.scope != "admin" and settings.segment_traits == "fill-empty"
    for i, (contact_id, patch, _) in enumerate(found.patches):  # first: the rules deciding see the profile
        if i not in erased:
            await store.patch_contact(contact_id, patch, received_at, fill_only=fill_only)
    offset = len(found.patches)
    links = [x for i, x in enumerate(found.links) if offset + i not in erased]
    await _link(store, links, received_at, settings.erasure_tombstone)
    await _carts(request, found)
    result = await ingest(request, found.events)
    if isinstance(result, EventsRejected):  # (not for outcomes any more; kept for what ingest may add)
        errors = [FieldError(segment_path(e.path, found.places[e.index]), e.message) for e in result.errors]
        return json_response(rejected(result.error, errors), 400)
    request.app[METRICS].events.labels("ignored").inc(found.ignored)
    shown = found.errors[:MAX_ERRORS_SHOWN]
    return json_response(
        SegmentAccepted(True, result.accepted, result.duplicates, found.ignored, found.rejected, shown)
    )


def _leave_out(found: Translated, refused: list[EventError]) -> None:
    """Events an ingest key may not post (an outcome of a message that is not its contact's) are left out
    of the batch as its invalid messages are."""
    if not refused:
        return
    drop = {e.index for e in refused}
    found.errors += [FieldError(segment_path(e.path, found.places[e.index]), e.message) for e in refused]
    found.rejected += len(drop)
    found.events = [e for i, e in enumerate(found.events) if i not in drop]
    found.places = [p for i, p in enumerate(found.places) if i not in drop]


async def _link(
    store: Store, links: list[tuple[str, str, datetime]], now: datetime, tombstone: TombstoneMode
) -> None:
    """Link each anonymous visitor to its contact, once: those linked already are skipped (one query), the
    first few merged now, the rest recorded for the merge loop, so that a batch of thousands of identify
    calls costs one write each rather than a merge each."""
    wanted: dict[str, str] = {}
    for anonymous, known, _ in links:
        wanted.setdefault(anonymous, known)
    if not wanted:
        return
    linked = await resolve_contacts(store, list(wanted))
    new = [(a, k) for a, k in wanted.items() if a not in linked]
    for anonymous, known in new[:MERGES_PER_REQUEST]:
        await link(store, anonymous, known, now, tombstone=tombstone)
    for anonymous, known in new[MERGES_PER_REQUEST:]:
        await Identities(store).record(anonymous, known, now)


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


async def _carts(request: web.Request, found: Translated) -> None:
    """The kept carts changed by the request's cart calls, in message order, and each cart event given
    the whole cart after its change (Segment sends one product per `Product Added`; the cart rules read the
    cart). After the links: a visitor's cart call following its identify goes to the known contact's cart.
    A contact's tombstone that drops the event leaves its cart alone."""
    if not found.carts:
        return
    store, now = request.app[STORE], datetime.now(UTC)
    kept = {id(e) for e in found.events}  # (an event the request no longer stores changes nothing)
    changes = [c for c in found.carts if id(c.event) in kept and c.event.contact_id is not None]
    known = await resolve_contacts(store, [str(c.event.contact_id) for c in changes])
    for change in changes:
        change.event.contact_id = known.get(str(change.event.contact_id), change.event.contact_id)
    # The tombstones from the process's copy, once for the request (not a query per cart call).
    stones = await tombstones_of(request, sorted({contact_hash(str(c.event.contact_id)) for c in changes}))
    timed = [(c.event.contact_id, c.event.time or now) for c in changes]
    dropped = set(dropped_events(timed, stones, request.app[SETTINGS].erasure_tombstone))
    for i, change in enumerate(changes):
        event = change.event
        if i in dropped and event.time is not None:
            continue
        try:
            cart = await Carts(store).apply(change, now)
        except CartContention:
            log.warning("segment.cart_contention", contact_id=event.contact_id, event_id=event.id)
            continue
        if cart is not None:
            event.attributes.update(cart_attributes(change, cart.lines, cart.currency))


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
