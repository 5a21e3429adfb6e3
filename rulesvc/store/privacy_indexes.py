"""The indexes of the privacy requests' collections (rulesvc.store.privacy), apart from its queries so
that `Store.ensure_schema` can create them without importing the module that imports the store."""

from __future__ import annotations

from typing import Any

import structlog
from pymongo import ASCENDING, DESCENDING, IndexModel
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import OperationFailure

log = structlog.get_logger(__name__)

ERASED_EVENTS = "erased_events"
ERASED_EVENTS_TTL = "erased_events_ttl"
INDEX_CONFLICTS = (85, 86)  # IndexOptionsConflict / IndexKeySpecsConflict


async def ensure_privacy_indexes(
    db: AsyncDatabase[dict[str, Any]], event_retention_seconds: int, change_ttl: bool = False
) -> None:
    """The request log newest first (`GET /v1/privacy/requests`), the identity links by contact (an
    erasure takes the anonymous ids linked to its contact); tombstones and erased event ids are found by
    `_id`. An erased event id is kept as long as events are (RULESVC_EVENT_RETENTION_DAYS, counted from
    the erasure): after that a retry of it would not be recognised as a duplicate either. As for the
    events' TTL, only the service (`change_ttl`) changes an existing index's seconds."""
    erased = db[ERASED_EVENTS]
    try:
        await erased.create_index(
            [("erased_at", ASCENDING)], name=ERASED_EVENTS_TTL, expireAfterSeconds=event_retention_seconds
        )
    except OperationFailure as exc:
        if exc.code not in INDEX_CONFLICTS:
            raise
        if change_ttl:
            await db.command(
                "collMod",
                ERASED_EVENTS,
                index={"name": ERASED_EVENTS_TTL, "expireAfterSeconds": event_retention_seconds},
            )
            log.info("store.ttl_changed", collection=ERASED_EVENTS, seconds=event_retention_seconds)
    await db["privacy_requests"].create_indexes(
        [IndexModel([("requested_at", DESCENDING), ("_id", DESCENDING)], name="privacy_requests_by_time")]
    )
    await db["identities"].create_indexes(
        [IndexModel([("contact_id", ASCENDING)], name="privacy_identities_by_contact")]
    )
    # Each process keeps a copy of the tombstones and reads only those changed since its last look.
    await db["tombstones"].create_indexes(
        [IndexModel([("changed_at", ASCENDING)], name="tombstones_changed")]
    )
