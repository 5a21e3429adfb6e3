"""`POST /v1/events`: validate, de-duplicate and store events; acknowledged means stored."""

from __future__ import annotations

from datetime import UTC, datetime

from aiohttp import web

from rulesvc.core.events import (
    MESSAGE_EVENT_TYPES,
    Event,
    EventError,
    EventsAccepted,
    EventsRejected,
    MalformedBody,
    TooManyEvents,
    decode_json_body,
    decode_ndjson_body,
    event_time,
)
from rulesvc.core.privacy import contact_hash, dropped_events, event_hash
from rulesvc.runtime.identity import merge_late, to_known
from rulesvc.store.db import Doc, Store
from rulesvc.store.messages import Messages
from rulesvc.store.privacy import Privacy
from rulesvc.web.keys import API_KEY, FANOUT, INBOX, METRICS, SETTINGS, STORE, TOMBSTONES
from rulesvc.web.views.base import JSON_TYPES, NDJSON_TYPES, error_response, json_response, read_body


async def foreign_outcomes(store: Store, events: list[Event]) -> list[EventError]:
    """An outcome event from an ingest key must name a message of its own contact: a bounce or block
    report marks an address invalid or suppresses a channel for good, so it may not be made up for anyone.
    (Providers report through their signed callbacks; admin keys are trusted.) One query per batch."""
    outcomes = [(i, e) for i, e in enumerate(events) if e.type in MESSAGE_EVENT_TYPES]
    if not outcomes:
        return []
    named = {e.attributes.get("message_id") for _, e in outcomes}
    wanted = [m for m in named if isinstance(m, str)]
    owners = await Messages(store).owners(wanted)
    errors: list[EventError] = []
    for index, event in outcomes:
        message_id = event.attributes.get("message_id")
        if not isinstance(message_id, str):
            reason = f"required for `{event.type}` from an ingest key: the id of the message it reports on"
        elif owners.get(message_id) != event.contact_id:
            reason = f"contact `{event.contact_id}` has no message `{message_id}`"
        else:
            continue
        errors.append(EventError(index, "$.attributes.message_id", reason))
    return errors


async def post_events(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    metrics = request.app[METRICS]
    if request.content_type in JSON_TYPES:
        decode = decode_json_body
    elif request.content_type in NDJSON_TYPES:
        decode = decode_ndjson_body
    else:
        return error_response(
            415,
            f"unsupported content type `{request.content_type}`; "
            "use application/json or application/x-ndjson",
        )
    body = await read_body(request)
    try:
        events, errors = decode(body, settings.max_batch_events)
    except MalformedBody as exc:
        return error_response(400, f"malformed JSON: {exc}")
    except TooManyEvents as exc:
        return error_response(413, str(exc))
    if not events and not errors:  # `[]`, or NDJSON of blank lines: the same body as any refused batch
        return json_response(EventsRejected("no events in the request body", []), 422)
    if errors:
        metrics.events.labels("rejected").inc(len({e.index for e in errors}))
        return json_response(
            EventsRejected(f"{len({e.index for e in errors})} invalid event(s); none stored", errors), 422
        )
    result = await ingest(request, events)
    return json_response(result, 202 if isinstance(result, EventsAccepted) else 422)


async def ingest(request: web.Request, events: list[Event]) -> EventsAccepted | EventsRejected:
    """Store valid events and wake the loops: the one path for every source (our format, Segment,
    Shopify), so that de-duplication, the outcome check and what counts as accepted are the same."""
    metrics = request.app[METRICS]
    key = request.get(API_KEY)
    errors = []
    events = await to_known(request.app[STORE], events)  # a linked anonymous id: its known contact's
    if key is not None and key.scope != "admin":
        errors = await foreign_outcomes(request.app[STORE], events)
    if errors:
        metrics.events.labels("rejected").inc(len({e.index for e in errors}))
        return EventsRejected(f"{len({e.index for e in errors})} invalid event(s); none stored", errors)
    events, erased = await without_erased(request, events)
    if not events:
        return EventsAccepted(0, 0, erased)
    result = await request.app[STORE].insert_events(events)
    # Linked while these were stored: moved now (unless the known contact was erased meanwhile).
    await merge_late(request.app[STORE], events, tombstone=request.app[SETTINGS].erasure_tombstone)
    if INBOX in request.app and result.accepted:
        request.app[INBOX].wake.set()
        if any(e.contact_id is None for e in events):
            request.app[FANOUT].wake.set()
    metrics.events.labels("accepted").inc(result.accepted)
    metrics.events.labels("duplicate").inc(result.duplicates)
    return EventsAccepted(result.accepted, result.duplicates, erased)


async def tombstones_of(request: web.Request, hashes: list[str]) -> dict[str, Doc]:
    """From the process's copy of the tombstones (no query per request), or MongoDB without one."""
    if TOMBSTONES in request.app:
        return await request.app[TOMBSTONES].of(hashes)
    return await Privacy(request.app[STORE]).tombstones_of(hashes)


async def without_erased(request: web.Request, events: list[Event]) -> tuple[list[Event], int]:
    """The events a tombstone does not drop (rulesvc.core.privacy.dropped_events) nor an erased event id,
    and how many were dropped: the tombstones from the process's copy (no query), the erased event ids
    with one query only when a contact of the batch is tombstoned; nothing with
    RULESVC_ERASURE_TOMBSTONE=off."""
    mode = request.app[SETTINGS].erasure_tombstone
    contacts = {e.contact_id for e in events if e.contact_id is not None}
    if mode == "off" or not contacts:
        return events, 0
    stones = await tombstones_of(request, [contact_hash(c) for c in contacts])
    if not stones:
        return events, 0
    now = datetime.now(UTC)
    drop = set(dropped_events([(e.contact_id, event_time(e, now)) for e in events], stones, mode))
    # An event posted without `time` is stamped now, after any erasure: a retry of it is known by its id
    # (kept hashed at the erasure). Asked only here, with a tombstoned contact in the batch.
    candidates = {
        i: event_hash(e.id)
        for i, e in enumerate(events)
        if i not in drop and e.contact_id is not None and contact_hash(e.contact_id) in stones
    }
    if candidates:
        known = await Privacy(request.app[STORE]).erased_event_ids(list(set(candidates.values())))
        drop.update(i for i, h in candidates.items() if h in known)
    if drop:
        request.app[METRICS].events.labels("erased").inc(len(drop))
    return [e for i, e in enumerate(events) if i not in drop], len(drop)
