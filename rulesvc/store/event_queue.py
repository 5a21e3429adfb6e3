"""The inbox's queue (`inbox`): one small document per event not decided yet, so a stored event is never
rewritten to mark it decided (that rewrite, and the removal from two partial indexes of `events`, was a
third of mongod's time per decided event). An event and its queue document are written in one
transaction (`Store.insert_queued`); a decision deletes the queue document in the decision's transaction.

A queue document: `{_id: event id, contact_id, time, received_at, state}`, `state` `pending` or
`quarantined` (then with `attempts`, `error`, `stage`, `quarantined_at` as the failures left them); a
catalog event's (no `contact_id`) also holds the fan-out's claim and position (`fanout`). An event without
one is decided, or dropped from quarantine (its own `state: dropped`). A quarantined or dropped event also
carries that `state` itself: a backtest, which reads only `events`, leaves such events out."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

import structlog
from pymongo import ASCENDING, DESCENDING, IndexModel, UpdateOne
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import OperationFailure

from rulesvc.store.transactions import in_transaction

if TYPE_CHECKING:  # Store imports this module for its indexes
    from rulesvc.store.db import Store

log = structlog.get_logger(__name__)

Doc = dict[str, Any]

QUEUE = "inbox"
PENDING = "pending"
QUARANTINED = "quarantined"
DROPPED = "dropped"

# What the queue document of an event repeats of it: the inbox's order and the lag need nothing more.
QUEUED_FIELDS = ("contact_id", "time", "received_at")
# The partial indexes over `events` of the release before (fcbb0cb), now over the queue.
OLD_EVENT_INDEXES = ("inbox_pending", "inbox_oldest", "catalog_pending", "quarantine")
MIGRATE_BATCH = 1000


def queue_doc(event: Doc) -> Doc:
    return {"_id": event["_id"], **{k: event.get(k) for k in QUEUED_FIELDS}, "state": PENDING}


async def ensure_queue_indexes(queue: AsyncCollection[Doc]) -> None:
    """As the partial indexes `events` had; the queue holds only undecided events, so each stays small."""
    await queue.create_indexes(
        [
            # A batch's contacts' events in time order; its `contact_id: null` range is the catalog's.
            IndexModel(
                [("contact_id", ASCENDING), ("time", ASCENDING), ("_id", ASCENDING)],
                name="inbox_pending",
                partialFilterExpression={"state": PENDING},
            ),
            # Which contacts next: those whose events have waited longest, so none starves.
            IndexModel(
                [("received_at", ASCENDING), ("contact_id", ASCENDING)],
                name="inbox_oldest",
                partialFilterExpression={"state": PENDING},
            ),
            IndexModel(
                [("quarantined_at", DESCENDING)],
                name="quarantine",
                partialFilterExpression={"state": QUARANTINED},
            ),
        ]
    )


NAMESPACE_NOT_FOUND, INDEX_NOT_FOUND = 26, 27


async def drop_index_if_present(collection: AsyncCollection[Doc], name: str) -> None:
    """Idempotent, and safe against another process dropping it at the same time."""
    try:
        await collection.drop_index(name)
    except OperationFailure as exc:
        if exc.code not in (NAMESPACE_NOT_FOUND, INDEX_NOT_FOUND):
            raise


def without_id(doc: Doc) -> Doc:
    return {k: v for k, v in doc.items() if k != "_id"}


async def _queue_page(store: Store, ids: list[Any], fields: Doc, session: AsyncClientSession) -> Counter[str]:
    """One page, in one transaction that reads the events again: another process that queued and decided
    one of them meanwhile (a migration that lost its lock) has taken its `pending` away, so it is never
    queued a second time."""
    docs = await store.events.find(
        {"_id": {"$in": ids}, "state": {"$in": [PENDING, QUARANTINED]}}, fields, session=session
    ).to_list()
    if not docs:
        return Counter()
    ops = [
        UpdateOne(
            {"_id": d["_id"]}, {"$setOnInsert": {k: v for k, v in d.items() if k != "_id"}}, upsert=True
        )
        for d in docs
    ]
    written = await store.queue.bulk_write(ops, ordered=False, session=session)
    # Those queued now, by state (a quarantined one may have had its document).
    queued_now = Counter(str(docs[i].get("state")) for i in written.upserted_ids or {})
    # Queued: the event's own `pending` goes, so a run again cannot queue it once more after the new code
    # decided it (a quarantined one keeps its state, as the new code writes it).
    queued = [d["_id"] for d in docs if d.get("state") == PENDING]
    await store.events.update_many(
        {"_id": {"$in": queued}, "state": PENDING}, {"$unset": {"state": ""}}, session=session
    )
    return queued_now


async def older_release_indexes(store: Store) -> list[str]:
    """The release before creates its partial indexes over `events` at every start: once an upgrade
    dropped them, one of them back means such a process has started on this database since."""
    present = await store.events.index_information()
    return [name for name in OLD_EVENT_INDEXES if name in present]


async def migrate_event_queue(store: Store) -> Counter[str]:
    """A database of the release before kept the undecided events' state on the events themselves: each
    pending or quarantined one gets its queue document (inserted if absent, a batch at a time, so a run
    cut short and run again finishes the job; a queued event loses its `pending`), then the old partial
    indexes go. Old events keep their `state: done` and `processed_at`: nothing reads them any more.
    Returns how many were queued, by state (`pending`, `quarantined`)."""
    fields = {k: 1 for k in (*QUEUED_FIELDS, "state", "attempts", "error", "stage", "quarantined_at",
                             "retried_at", "fanout")}  # fmt: skip
    query: Doc = {"state": {"$in": [PENDING, QUARANTINED]}}
    after: Any = None
    moved: Counter[str] = Counter()
    while True:
        page = query if after is None else {**query, "_id": {"$gt": after}}
        docs = await store.events.find(page, fields).sort("_id", ASCENDING).limit(MIGRATE_BATCH).to_list()
        if not docs:
            break
        after = docs[-1]["_id"]
        page_ids = [d["_id"] for d in docs]

        async def write(session: AsyncClientSession, ids: list[Any] = page_ids) -> Counter[str]:
            return await _queue_page(store, ids, fields, session)

        moved += await in_transaction(store.client, write)
    for name in OLD_EVENT_INDEXES:
        await drop_index_if_present(store.events, name)
    log.info("store.event_queue_migrated", queued=dict(moved))
    return moved
