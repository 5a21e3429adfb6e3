"""How long the message history and the schedule are kept (RULESVC_MESSAGE_RETENTION_DAYS): TTL indexes
that MongoDB's TTL monitor applies once a minute, never touching what may still be sent.

- `messages_ttl`: a message is removed `message_retention` after its `created_at`, but only while its
  status is final (a partial TTL index: MongoDB deletes only documents in the index). One still
  `scheduled` or `sending` is not in the index, whatever its age; a final one an operator sends again
  becomes `scheduled` and leaves it. A status not named here (a new one) is kept: the safe side.
- `schedule_ttl`: a schedule entry is removed `message_retention` after its `done_at`, which the store
  sets when the entry is done, cancelled or failed and unsets when it is pending again; a pending or
  running entry has none, and MongoDB's TTL never removes a document without a date in the field.

Partial filters with `$in` need MongoDB 6.0 or later (the embedded mongod is 6.0.5); on an older server
the messages' index cannot be built, which is logged and leaves the history kept, not the service down.
"""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING, Any, get_args

import structlog
from pymongo import ASCENDING
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import OperationFailure

from rulesvc.core.messages import MessageStatus

if TYPE_CHECKING:
    from rulesvc.store.db import Store

log = structlog.get_logger(__name__)

MESSAGE_RETENTION = timedelta(days=365)
# A message in these may still be sent: never removed, however old.
WAITING = ("scheduled", "sending")
FINAL_STATUSES = sorted(s for s in get_args(MessageStatus) if s not in WAITING)
MESSAGES_TTL = "messages_ttl"
SCHEDULE_TTL = "schedule_ttl"
CANNOT_CREATE_INDEX = 67
INDEX_CONFLICTS = (85, 86)  # IndexOptionsConflict / IndexKeySpecsConflict


async def ensure_retention(store: Store, change_ttl: bool) -> None:
    """Both TTL indexes; as for the events' TTL, only the service (`change_ttl`) changes an existing one's
    seconds, so a CLI run from a shell with another setting leaves the service's retention alone."""
    seconds = int(store.message_retention.total_seconds())
    final = {"status": {"$in": FINAL_STATUSES}}
    await _ensure_ttl(store.messages, "created_at", seconds, MESSAGES_TTL, change_ttl, final)
    await _ensure_ttl(store.schedule, "done_at", seconds, SCHEDULE_TTL, change_ttl, None)


async def _ensure_ttl(
    coll: AsyncCollection[dict[str, Any]],
    field: str,
    seconds: int,
    name: str,
    change: bool,
    partial: dict[str, Any] | None,
) -> None:
    options: dict[str, Any] = {"name": name, "expireAfterSeconds": seconds}
    if partial is not None:
        options["partialFilterExpression"] = partial
    try:
        await coll.create_index([(field, ASCENDING)], **options)
    except OperationFailure as exc:
        if exc.code == CANNOT_CREATE_INDEX:
            log.error("store.ttl_unsupported", collection=coll.name, index=name, error=str(exc)[:300])
            return
        if exc.code not in INDEX_CONFLICTS:
            raise
        if not change:
            return
        await coll.database.command("collMod", coll.name, index={"name": name, "expireAfterSeconds": seconds})
        log.info("store.ttl_changed", collection=coll.name, seconds=seconds)
