"""MongoDB: the collections, their indexes, and the store's core queries (events, contacts, messages);
the sibling modules hold the named queries of each collection group (schedule, leases, catalog, ...)."""

from __future__ import annotations

import asyncio
import functools
import os
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import msgspec
import structlog
from bson.errors import InvalidBSON, InvalidDocument
from pymongo import ASCENDING, DESCENDING, AsyncMongoClient, IndexModel, ReturnDocument, UpdateOne
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import BulkWriteError, DocumentTooLarge, DuplicateKeyError, OperationFailure, PyMongoError
from pymongo.write_concern import WriteConcern

from rulesvc.core import reasons
from rulesvc.core.contacts import Contact, ContactIn, ContactPatch
from rulesvc.core.events import Event, event_time
from rulesvc.core.funnel import Increment, message_increment, tally, upsert_of
from rulesvc.core.messages import Fate, Message, fate_of
from rulesvc.store.event_queue import DROPPED, PENDING, QUARANTINED, QUEUE, ensure_queue_indexes, queue_doc
from rulesvc.store.keys import InboxTokens, Keys
from rulesvc.store.privacy_indexes import ensure_privacy_indexes
from rulesvc.store.retention import MESSAGE_RETENTION, ensure_retention
from rulesvc.store.transactions import in_transaction

T = TypeVar("T")

log = structlog.get_logger(__name__)

Doc = dict[str, Any]

# Acknowledged means on disk on a majority: a 202 is never given for an event that could be lost.
DURABLE = WriteConcern(w="majority", j=True)
DUPLICATE_KEY = 11000

# An undecided event's queue document is `pending`, or `quarantined`: set aside after failing evaluation
# `MAX_ATTEMPTS` times, kept with its error until an admin retries or drops it (the event then `dropped`),
# while every other event goes on (rulesvc.store.event_queue).
MAX_ATTEMPTS = 3
INSERT_TRIES = 5  # group commits that met an id another writer stored meanwhile, before giving up
RELEASE_BATCH = 1000  # quarantined events retried or dropped per transaction

# Errors of the data rather than of the database: retrying the same event cannot cure them.
_DATA_ERROR_CODES = frozenset({2, 9, 14, 52, 55, 10334, 17280, 17419})

# How contact search compares emails: case-blind (strength 2), as people type them; the index
# `contacts_by_email` is built with it, and a query uses that index only when it names the same collation.
EMAIL_COLLATION: dict[str, Any] = {"locale": "en", "strength": 2}

# The funnel counters' shard of this process for writes outside the inbox and scheduler loops (an API
# request, a CLI command): its own documents, so it never conflicts with another process's.
PROCESS_SHARD = f"api:{os.getpid()}-{uuid.uuid4().hex[:8]}"
OnCounts = Callable[[list[Increment]], None]


def transient(exc: BaseException) -> bool:
    """True for what a retry may cure (connection loss, timeouts, elections, write conflicts): such an
    error is never held against an event. Anything else, a bug or bad data, counts as the event's."""
    if isinstance(exc, InvalidDocument | DocumentTooLarge | InvalidBSON):
        return False
    if isinstance(exc, OperationFailure) and exc.code in _DATA_ERROR_CODES:
        return False
    return isinstance(exc, PyMongoError)


def failure_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:1000]


@dataclass(frozen=True)
class InsertResult:
    accepted: int
    duplicates: int


@dataclass
class _Waiting:
    docs: list[Doc]
    result: asyncio.Future[InsertResult]


def older_than(before: datetime | None, before_id: str | None = None) -> Doc:
    """Messages after the last one of a page, newest first: the messages of one batch share their
    `created_at`, so the time alone would skip the rest of a batch cut by the page's end; the id breaks
    the tie (`next_before` and `next_before_id` of the previous page)."""
    if before is None:
        return {}
    if before_id is None:
        return {"created_at": {"$lt": before}}
    return {"$or": [{"created_at": {"$lt": before}}, {"created_at": before, "_id": {"$lt": before_id}}]}


THROUGHPUT_KEPT = 2 * 24 * 3600  # seconds a throughput counter is kept: the overview shows 24 hours


class Store:
    def __init__(
        self,
        client: AsyncMongoClient[Doc],
        database: str,
        event_retention: timedelta,
        *,
        count_stats: bool = True,
        message_retention: timedelta = MESSAGE_RETENTION,
    ) -> None:
        self.client = client
        self.count_stats = count_stats  # RULESVC_STATS: off, nothing is written to `stats`
        self.db: AsyncDatabase[Doc] = client.get_database(database, write_concern=DURABLE)
        self.event_retention = event_retention
        self.message_retention = message_retention  # RULESVC_MESSAGE_RETENTION_DAYS (rulesvc.store.retention)
        self.events: AsyncCollection[Doc] = self.db["events"]  # as received, never rewritten once decided
        self.queue: AsyncCollection[Doc] = self.db[QUEUE]  # the undecided ones (rulesvc.store.event_queue)
        self.contacts: AsyncCollection[Doc] = self.db["contacts"]
        self.messages: AsyncCollection[Doc] = self.db["messages"]
        self.schedule: AsyncCollection[Doc] = self.db["schedule"]
        # Leases only say who works on what now; after a crash they would run out anyway, and the
        # version check on contacts catches a lost one. So they skip the journal wait of durable writes.
        self.leases: AsyncCollection[Doc] = self.db.get_collection("leases", write_concern=WriteConcern(w=1))
        self.contact_leases: AsyncCollection[Doc] = self.db.get_collection(
            "contact_leases", write_concern=WriteConcern(w=1)
        )
        self.audience_changes: AsyncCollection[Doc] = self.db["audience_changes"]
        self.job_runs: AsyncCollection[Doc] = self.db["job_runs"]
        self.api_keys: AsyncCollection[Doc] = self.db["api_keys"]
        self.interests: AsyncCollection[Doc] = self.db["interests"]
        # A large catalog fan-out's parts, each claimed and decided by one worker (rulesvc.store.catalog).
        self.fanout_parts: AsyncCollection[Doc] = self.db["fanout_parts"]
        self._waiting: list[_Waiting] = []
        self._writer: asyncio.Task[None] | None = None
        self.products: AsyncCollection[Doc] = self.db["products"]
        self.stats: AsyncCollection[Doc] = self.db["stats"]
        # Events decided per minute and process (the overview's throughput): one upsert per inbox batch,
        # in its transaction, rather than an index over every event's decision time.
        self.throughput: AsyncCollection[Doc] = self.db["throughput"]

    def keys(self) -> Keys:
        return Keys(self.api_keys)

    def inbox_tokens(self) -> InboxTokens:
        return InboxTokens(self.db["secrets"])

    async def ping(self) -> None:
        await self.client.admin.command("ping")

    async def ensure_schema(self, change_ttl: bool = False) -> None:
        """Idempotent: safe on every start, and on every process of a multi-process deployment.
        Only the service passes `change_ttl`: a CLI run from a shell without the service's
        RULESVC_EVENT_RETENTION_DAYS would otherwise cut the retention, and MongoDB then deletes the
        older events within a minute. Without it an existing TTL is left as it is."""
        ttl = int(self.event_retention.total_seconds())
        await self._ensure_ttl(self.events, "received_at", ttl, "events_ttl", change_ttl)
        await self.events.create_indexes(
            [
                IndexModel([("contact_id", ASCENDING), ("time", DESCENDING)], name="events_by_contact"),
            ]
        )
        await ensure_queue_indexes(self.queue)  # the inbox's (rulesvc.store.event_queue)
        await self.schedule.create_indexes(
            [
                IndexModel([("status", ASCENDING), ("due_at", ASCENDING)], name="schedule_due"),
                IndexModel([("contact_id", ASCENDING), ("status", ASCENDING)], name="schedule_by_contact"),
                IndexModel([("owner", ASCENDING)], name="schedule_owner", sparse=True),
                IndexModel(
                    [("contact_id", ASCENDING)],
                    name="schedule_held",
                    partialFilterExpression={"held_due": {"$exists": True}},
                ),
            ]
        )
        await self.contact_leases.create_indexes(
            [
                IndexModel([("contacts", ASCENDING)], name="one_lease_per_contact", unique=True),
                IndexModel([("until", ASCENDING)], name="contact_leases_until"),
            ]
        )
        await self.interests.create_indexes(
            [
                IndexModel([("product_id", ASCENDING), ("_id", ASCENDING)], name="interests_by_product"),
                IndexModel([("contact_id", ASCENDING)], name="interests_by_contact"),
            ]
        )
        await self.fanout_parts.create_indexes(
            [IndexModel([("event_id", ASCENDING), ("n", ASCENDING)], name="fanout_parts_by_event")]
        )
        # Contact search (`GET /v1/contacts?q=`) by email, case-insensitively: the store keeps an email as
        # the contact gave it, so the index compares with a case-blind collation (`EMAIL_COLLATION`, which
        # the query must name to use it). By phone: E.164 as given. Neither slows the hot write: the
        # inbox's state writes `$set` other fields, and MongoDB leaves untouched index keys alone.
        await self.contacts.create_indexes(
            [
                IndexModel([("email", ASCENDING)], name="contacts_by_email", collation=EMAIL_COLLATION),
                IndexModel([("phone", ASCENDING)], name="contacts_by_phone"),
            ]
        )
        await self.audience_changes.create_indexes(
            [
                IndexModel([("synced", ASCENDING), ("at", ASCENDING)], name="audience_unsynced"),
                # The ads sync reads the changes of the audiences it can send (rulesvc.store.audiences).
                IndexModel(
                    [("synced", ASCENDING), ("audience", ASCENDING), ("at", ASCENDING)],
                    name="audience_unsynced_by_audience",
                ),
            ]
        )
        await self.messages.create_indexes(
            [
                IndexModel(
                    [("contact_id", ASCENDING), ("created_at", DESCENDING)], name="messages_by_contact"
                ),
                IndexModel([("status", ASCENDING), ("created_at", DESCENDING)], name="messages_by_status"),
                # `GET /v1/messages` and `rulesvc messages list` without a status: newest first.
                IndexModel([("created_at", DESCENDING)], name="messages_by_time"),
                # `GET /v1/messages?ruleset=` (the console's filter): a ruleset's messages newest first,
                # in index order, without reading every other ruleset's. `rule` is only taken with
                # `ruleset` and filters these (a ruleset has a few rules), as `from`/`to` bound them.
                # `_id` last: the pages' tie-break, so a page is read in index order, never sorted.
                IndexModel(
                    [("ruleset", ASCENDING), ("created_at", DESCENDING), ("_id", DESCENDING)],
                    name="messages_by_ruleset",
                ),
            ]
        )
        await self.stats.create_indexes(
            [IndexModel([("ruleset", ASCENDING), ("hour", ASCENDING)], name="stats_by_ruleset")]
        )
        await self._ensure_overview_indexes()
        await ensure_privacy_indexes(self.db, ttl, change_ttl)  # erased event ids: kept as long as events
        from rulesvc.store.carts import Carts  # (as ShopifyStore: no cycle)
        from rulesvc.store.shopify import ShopifyStore  # it names Store only for type checking: no cycle

        await ShopifyStore(self).ensure_indexes()
        await Carts(self).ensure_indexes()  # Segment's kept carts: rulesvc.store.carts
        await ensure_retention(self, change_ttl)  # messages and schedule: rulesvc.store.retention

    async def _ensure_overview_indexes(self) -> None:
        """What the overview (`GET /v1/overview`, rulesvc.store.overview) reads by time, each written at
        most once per document: a throughput counter's `minute` when it is created (and kept two days); a
        funnel counter's `hour` when it is created (once per hour and key, not per increment); a message's
        `sent_at` when it is sent (partial: only sent messages). Without them, events decided per quarter
        hour, messages per channel across rulesets and a channel's last send would each be a collection
        scan. (An index on events' decision time cost the inbox's mark of each decided event 15 %,
        measured: the counters cost one upsert per batch.)"""
        await self.throughput.create_indexes(
            [IndexModel([("minute", ASCENDING)], name="throughput_ttl", expireAfterSeconds=THROUGHPUT_KEPT)]
        )
        await self.stats.create_indexes([IndexModel([("hour", ASCENDING)], name="stats_by_hour")])
        await self.messages.create_indexes(
            [
                IndexModel(
                    [("sent_channel", ASCENDING), ("sent_at", DESCENDING)],
                    name="messages_last_sent",
                    partialFilterExpression={"sent_at": {"$type": "date"}},
                )
            ]
        )
        # Identity links (rulesvc/store/identity.py): those to merge; a merge moves audience changes.
        await self.db["identities"].create_indexes(
            [IndexModel([("merged", ASCENDING), ("merged_at", ASCENDING)], name="identities_to_merge")]
        )
        await self.audience_changes.create_indexes(
            [IndexModel([("contact_id", ASCENDING)], name="audience_changes_by_contact")]
        )

    async def missing_indexes(self, wanted: dict[str, str]) -> list[str]:
        """Which of the indexes named by collection (`{"events": "events_by_contact"}`) do not exist,
        as `collection.index`: read without creating anything (a missing collection has none)."""
        missing = []
        for collection, index in wanted.items():
            if index not in await self.db[collection].index_information():
                missing.append(f"{collection}.{index}")
        return missing

    async def _ensure_ttl(
        self, coll: AsyncCollection[Doc], field: str, seconds: int, name: str, change: bool
    ) -> None:
        try:
            await coll.create_index([(field, ASCENDING)], name=name, expireAfterSeconds=seconds)
        except OperationFailure as exc:
            if exc.code not in (85, 86):  # IndexOptionsConflict / IndexKeySpecsConflict
                raise
            if not change:  # the service's retention stands
                return
            # The retention setting changed: update the TTL in place instead of rebuilding the index.
            await self.db.command("collMod", coll.name, index={"name": name, "expireAfterSeconds": seconds})
            log.info("store.ttl_changed", collection=coll.name, seconds=seconds)

    # --- events -------------------------------------------------------------------------------------

    async def insert_events(self, events: list[Event], now: datetime | None = None) -> InsertResult:
        """Store new events, queued for the inbox; an `id` seen before is a duplicate, changing nothing.

        Requests that arrive while a write is in flight share the next one: one durable insert for many
        requests, each answered from its own part of the result (group commit). Nothing waits on purpose,
        so a lone request is written at once."""
        if not events:
            return InsertResult(0, 0)
        now = now or datetime.now(UTC)
        docs = [
            {
                "_id": ev.id,
                "type": ev.type,
                "contact_id": ev.contact_id,
                "time": event_time(ev, now),
                "attributes": ev.attributes,
                "received_at": now,
            }
            for ev in events
        ]
        waiting = _Waiting(docs, asyncio.get_running_loop().create_future())
        self._waiting.append(waiting)
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_waiting(), name="events-writer")
        return await waiting.result

    async def _write_waiting(self) -> None:
        while self._waiting:
            group, self._waiting = self._waiting, []
            docs = [doc for w in group for doc in w.docs]
            try:
                duplicates = await self.insert_queued(docs)
            except Exception as exc:  # every request of the group gets the error; none was acknowledged
                for w in group:
                    if not w.result.done():
                        w.result.set_exception(exc)
                continue
            start = 0
            for w in group:
                found = sum(start <= i < start + len(w.docs) for i in duplicates)
                start += len(w.docs)
                if not w.result.done():
                    w.result.set_result(InsertResult(len(w.docs) - found, found))

    async def insert_queued(self, docs: list[Doc]) -> list[int]:
        """New events and their queue documents in one durable transaction, so an event is stored and
        queued or neither (a crash between two writes would lose it from the inbox, and a client's retry
        could not queue it again without queueing a decided one too). Ids already stored, or repeated
        among `docs`, are left alone: their positions are returned. A repeat is rare (a client's retry):
        the first try inserts without reading; a duplicate id aborts it, and the next tries read the ids
        stored first (one more read, and another writer may store one in between: tried again)."""
        return await self.retry_duplicates(functools.partial(self.queue_new, docs))

    async def retry_duplicates(self, write: Callable[[AsyncClientSession, bool], Awaitable[T]]) -> T:
        """`write` in a transaction, first without reading (`read` False); if an id was already there, again
        with `read` True (and once more: another writer may store one in between)."""
        for attempt in range(INSERT_TRIES):

            async def attempt_write(session: AsyncClientSession, read: bool = attempt > 0) -> T:
                return await write(session, read)

            try:
                return await in_transaction(self.client, attempt_write)
            except (DuplicateKeyError, BulkWriteError) as exc:
                errors = exc.details.get("writeErrors", []) if isinstance(exc, BulkWriteError) else []
                if any(e.get("code") != DUPLICATE_KEY for e in errors) or attempt == INSERT_TRIES - 1:
                    raise
        raise AssertionError("unreachable")

    async def queue_new(self, docs: list[Doc], session: AsyncClientSession, read: bool) -> list[int]:
        """`docs` stored and queued in the caller's transaction, except ids already stored or repeated
        among them (their positions are returned). Without `read` every id is taken to be new (a duplicate
        aborts the transaction: `retry_duplicates`)."""
        ids = list({d["_id"]: None for d in docs})
        seen: set[Any] = set()
        if read:
            seen = {
                d["_id"] async for d in self.events.find({"_id": {"$in": ids}}, {"_id": 1}, session=session)
            }
            # A queue document whose event expired (the events' TTL) or went is no event any more: an
            # event under its id is a new one, and the stale document must not refuse it for ever.
            stale = [
                d["_id"]
                async for d in self.queue.find({"_id": {"$in": ids}}, {"_id": 1}, session=session)
                if d["_id"] not in seen
            ]
            if stale:
                await self.queue.delete_many({"_id": {"$in": stale}}, session=session)
                await self.fanout_parts.delete_many({"event_id": {"$in": stale}}, session=session)
        new: list[Doc] = []
        duplicates: list[int] = []
        for i, doc in enumerate(docs):
            if doc["_id"] in seen:
                duplicates.append(i)
            else:
                seen.add(doc["_id"])
                new.append(doc)
        await self.queue_in(new, session)
        return duplicates

    async def queue_in(self, docs: list[Doc], session: AsyncClientSession) -> None:
        """New events and their queue documents, inside the caller's transaction (ids not stored yet)."""
        if docs:
            await self.events.insert_many(docs, session=session)
            await self.queue.insert_many([queue_doc(d) for d in docs], session=session)

    async def contact_events(self, contact_id: str, limit: int, before: datetime | None = None) -> list[Doc]:
        """Newest first, each with its `state` (`pending`, `quarantined` with `attempts` and `error`,
        `dropped`, else `done`): an event's queue document holds what it has of these."""
        query: Doc = {"contact_id": contact_id}
        if before is not None:
            query["time"] = {"$lt": before}
        cursor = self.events.find(query).sort([("time", DESCENDING)]).limit(limit)
        docs = await cursor.to_list()
        fields = {"state": 1, "attempts": 1, "error": 1, "stage": 1, "quarantined_at": 1}
        queued = {
            d["_id"]: d async for d in self.queue.find({"_id": {"$in": [e["_id"] for e in docs]}}, fields)
        }
        for doc in docs:
            found = queued.get(doc["_id"])
            if found is not None:
                doc.update(found)
            else:  # an event of the release before keeps its old `state` (pending, if decided since)
                doc["state"] = DROPPED if doc.get("state") == DROPPED else "done"
        return docs

    async def pending_count(self) -> int:
        # The partial index holds exactly the pending events; without the hint the count scans them all.
        return await self.queue.count_documents({"state": PENDING}, hint="inbox_oldest")

    async def oldest_pending(self) -> datetime | None:
        """When the longest-waiting unprocessed event arrived: the inbox's lag."""
        doc = await self.queue.find_one(
            {"state": PENDING}, {"received_at": 1}, sort=[("received_at", ASCENDING)], hint="inbox_oldest"
        )
        return None if doc is None else doc["received_at"]

    async def events_of(self, queued: list[Doc], session: AsyncClientSession | None = None) -> list[Doc]:
        """The events of these queue documents, in their order, each with the queue's fields of it. A
        queue document whose event is gone (past the retention, or erased) is deleted: nothing to decide."""
        ids = [q["_id"] for q in queued]
        found = {d["_id"]: d async for d in self.events.find({"_id": {"$in": ids}}, session=session)}
        gone = [i for i in ids if i not in found]
        if gone:
            await self.queue.delete_many({"_id": {"$in": gone}}, session=session)
            await self.fanout_parts.delete_many({"event_id": {"$in": gone}}, session=session)
            log.warning("inbox.events_gone", events=len(gone))
        return [
            {**found[q["_id"]], **{k: v for k, v in q.items() if k != "_id"}}
            for q in queued
            if q["_id"] in found
        ]

    # --- quarantine ---------------------------------------------------------------------------------

    async def event_failed(
        self,
        event_id: str,
        error: str,
        stage: str,
        now: datetime,
        session: AsyncClientSession | None = None,
        retry_at: datetime | None = None,
    ) -> bool:
        """Counts a failed evaluation of a pending event; at `MAX_ATTEMPTS` it is quarantined (True), and
        the event itself says so (a backtest leaves it out). Without `session`: a transaction of its own."""
        if session is None:
            return await in_transaction(
                self.client, lambda s: self.event_failed(event_id, error, stage, now, s, retry_at)
            )
        attempts = {"$add": [{"$ifNull": ["$attempts", 0]}, 1]}
        give_up = {"$gte": [attempts, MAX_ATTEMPTS]}
        doc = await self.queue.find_one_and_update(
            {"_id": event_id, "state": PENDING},
            [
                {
                    "$set": {
                        "attempts": attempts,
                        "error": error,
                        "stage": stage,
                        "state": {"$cond": [give_up, QUARANTINED, "$state"]},
                        "quarantined_at": {"$cond": [give_up, now, "$$REMOVE"]},
                        **({"fanout.until": retry_at, "fanout.owner": None} if retry_at else {}),
                    }
                }
            ],
            projection={"state": 1},
            return_document=ReturnDocument.AFTER,
            session=session,
        )
        quarantined = doc is not None and doc["state"] == QUARANTINED
        if quarantined:
            await self.events.update_one({"_id": event_id}, {"$set": {"state": QUARANTINED}}, session=session)
        return quarantined

    async def quarantined(self, limit: int, before: datetime | None = None) -> list[Doc]:
        """The quarantined events, latest first, each with its failures (`attempts`, `error`, `stage`)."""
        query: Doc = {"state": QUARANTINED}
        if before is not None:
            query["quarantined_at"] = {"$lt": before}
        cursor = self.queue.find(query).sort([("quarantined_at", DESCENDING)]).hint("quarantine")
        return await self.events_of(await cursor.limit(limit).to_list())

    async def quarantine_size(self) -> int:
        return await self.queue.count_documents({"state": QUARANTINED}, hint="quarantine")

    async def quarantine_summary(self, since: datetime) -> tuple[int, int]:
        """(events in quarantine, of which quarantined since `since`)."""
        total = await self.quarantine_size()
        recent = await self.queue.count_documents(
            {"state": QUARANTINED, "quarantined_at": {"$gte": since}}, hint="quarantine"
        )
        return total, recent

    async def release_quarantined(self, ids: list[str] | None, action: str, now: datetime) -> int:
        """`retry`: back to the inbox with a clean slate; `drop`: kept in history, never evaluated (the
        event keeps its failures, the queue lets it go). `ids` None: every quarantined event. A batch of
        events at a time, each in one transaction with their events."""
        query: Doc = {"state": QUARANTINED}
        if ids is not None:
            query["_id"] = {"$in": ids}
        released = 0
        while True:
            found = await self.queue.find(query).limit(RELEASE_BATCH).to_list()
            if not found:
                return released

            async def release(session: AsyncClientSession, found: list[Doc] = found) -> int:
                return await self._release(found, action, now, session)

            released += await in_transaction(self.client, release)

    async def _release(
        self, found: list[Doc], action: str, now: datetime, session: AsyncClientSession
    ) -> int:
        batch = {"_id": {"$in": [d["_id"] for d in found]}, "state": QUARANTINED}
        if action == "retry":
            result = await self.queue.update_many(
                batch,
                {
                    "$set": {"state": PENDING, "retried_at": now},
                    "$unset": {"attempts": "", "quarantined_at": "", "fanout.until": "", "fanout.owner": ""},
                },
                session=session,
            )
            await self.events.update_many(
                {"_id": batch["_id"], "state": QUARANTINED}, {"$unset": {"state": ""}}, session=session
            )
            return result.modified_count
        kept = ("attempts", "error", "stage", "quarantined_at")
        await self.events.bulk_write(
            [UpdateOne({"_id": d["_id"]},
                       {"$set": {"state": DROPPED, "dropped_at": now, **{k: d[k] for k in kept if k in d}}})
             for d in found],
            session=session,
        )  # fmt: skip
        await self.fanout_parts.delete_many({"event_id": batch["_id"]}, session=session)  # a dropped fan-out
        return (await self.queue.delete_many(batch, session=session)).deleted_count

    # --- contacts -----------------------------------------------------------------------------------

    async def put_contact(self, contact_id: str, contact: ContactIn, now: datetime | None = None) -> Doc:
        """Replace the profile; keep what the service itself knows (state, created_at, invalid email)."""
        now = now or datetime.now(UTC)
        profile = {
            "email": contact.email,
            "phone": contact.phone,
            "push_tokens": contact.push_tokens,
            "webpush_subscriptions": [
                {"endpoint": s.endpoint, "keys": {"p256dh": s.keys.p256dh, "auth": s.keys.auth}}
                | ({"expirationTime": s.expirationTime} if s.expirationTime is not None else {})
                for s in contact.webpush_subscriptions
            ],
            "consent": contact.consent,
            "timezone": contact.timezone,
            "attributes": contact.attributes,
        }
        doc = await self.contacts.find_one_and_update(
            {"_id": contact_id},
            [
                # A new address is not known to bounce: the invalid mark stays only on the same email.
                {
                    "$set": {
                        "email_invalid": {
                            "$and": [
                                {"$eq": [{"$ifNull": ["$email", None]}, contact.email]},
                                {"$ifNull": ["$email_invalid", False]},
                            ]
                        },
                        "created_at": {"$ifNull": ["$created_at", now]},
                    }
                },
                {"$set": {**{k: {"$literal": v} for k, v in profile.items()}, "updated_at": now}},
            ],
            upsert=True,
            return_document=ReturnDocument.AFTER,
        )
        assert doc is not None
        return doc

    async def patch_contact(
        self, contact_id: str, patch: ContactPatch, now: datetime | None = None, *, fill_only: bool = False
    ) -> Doc:
        """Merge part of a profile into the contact (created if new): given fields replace, `consent`
        and `attributes` merge key by key; as `put_contact`, a changed email drops the invalid mark.

        `fill_only`, for a source anyone may hold the key of (a browser's Segment write key): email,
        phone and timezone only where the contact has none, consent only granted where none was given
        (a withdrawal always counts), so nobody can redirect or opt in somebody else."""
        now = now or datetime.now(UTC)
        given: Doc = {}
        for name in ("email", "phone", "timezone"):
            value = getattr(patch, name)
            if value is not None:
                given[name] = (
                    {"$ifNull": [f"${name}", {"$literal": value}]} if fill_only else {"$literal": value}
                )
        if fill_only:
            grants = {k: v for k, v in patch.consent.items() if v}
            withdrawals = {k: v for k, v in patch.consent.items() if not v}
            consent = [{"$literal": grants}, {"$ifNull": ["$consent", {}]}, {"$literal": withdrawals}]
        else:
            consent = [{"$ifNull": ["$consent", {}]}, {"$literal": patch.consent}]
        merged = {
            "consent": {"$mergeObjects": consent},
            "attributes": {
                "$mergeObjects": [{"$ifNull": ["$attributes", {}]}, {"$literal": patch.attributes}]
            },
        }
        first: Doc = {"created_at": {"$ifNull": ["$created_at", now]}}
        if patch.email is not None and not fill_only:
            first["email_invalid"] = {
                "$and": [
                    {"$eq": [{"$ifNull": ["$email", None]}, patch.email]},
                    {"$ifNull": ["$email_invalid", False]},
                ]
            }
        doc = await self.contacts.find_one_and_update(
            {"_id": contact_id},
            [{"$set": first}, {"$set": {**given, **merged, "updated_at": now}}],
            upsert=True,
            return_document=ReturnDocument.AFTER,
        )
        assert doc is not None
        return doc

    async def get_contact(self, contact_id: str) -> Doc | None:
        return await self.contacts.find_one({"_id": contact_id})

    # --- messages -----------------------------------------------------------------------------------

    async def contact_messages(
        self,
        contact_id: str,
        limit: int,
        before: datetime | None = None,
        status: str | None = None,
        before_id: str | None = None,
    ) -> list[Doc]:
        query: Doc = {"contact_id": contact_id, **older_than(before, before_id)}
        if status is not None:
            query["status"] = status
        cursor = (
            self.messages.find(query).sort([("created_at", DESCENDING), ("_id", DESCENDING)]).limit(limit)
        )
        return await cursor.to_list()

    async def inapp_messages(self, contact_id: str, limit: int) -> list[Doc]:
        """What the shop's page shows now: delivered in-app messages not dismissed, newest first."""
        query = {
            "contact_id": contact_id,
            "sent_channel": "inapp",
            "status": {"$in": ["sent", "delivered", "opened", "clicked"]},
            "dismissed_at": {"$exists": False},
        }
        return await self.messages.find(query).sort([("created_at", DESCENDING)]).limit(limit).to_list()

    async def inapp_action(
        self, contact_id: str, message_id: str, action: str, now: datetime | None = None
    ) -> bool:
        """Shown and clicked become message_opened / message_clicked events for the rules."""
        now = now or datetime.now(UTC)
        field = {"shown": "shown_at", "clicked": "clicked_at", "dismissed": "dismissed_at"}[action]
        result = await self.messages.update_one(
            {"_id": message_id, "contact_id": contact_id, "sent_channel": "inapp"}, {"$set": {field: now}}
        )
        if result.matched_count == 0:
            return False
        if action != "dismissed":
            kind = "opened" if action == "shown" else "clicked"
            attributes = {"message_id": message_id, "channel": "inapp"}
            event = (f"inapp:{message_id}:{kind}", f"message_{kind}", contact_id, attributes)
            await self._insert_outcome_events([event], now)
        return True

    # --- funnel counters (rulesvc.store.stats reads them) ---------------------------------------------

    async def count_decided(
        self, at: datetime, n: int, shard: str, session: AsyncClientSession | None = None
    ) -> None:
        """`n` events decided at `at` by the process `shard` names: its counter of that minute."""
        minute = at.astimezone(UTC).replace(second=0, microsecond=0)
        await self.throughput.update_one(
            {"_id": f"{minute:%Y-%m-%dT%H:%M}|{shard}"},
            {"$inc": {"decided": n}, "$setOnInsert": {"minute": minute, "shard": shard}},
            upsert=True,
            session=session,
        )

    async def add_counts(
        self, increments: Iterable[Increment], shard: str, session: AsyncClientSession | None
    ) -> None:
        """One upsert per counter document the increments fall in, in the caller's transaction (its
        `session`), so the counts commit or abort with the decision they count. Nothing with
        RULESVC_STATS off."""
        if not self.count_stats:
            return
        ops = [UpdateOne(*upsert_of(t, shard), upsert=True) for t in tally(increments)]
        if ops:
            await self.stats.bulk_write(ops, ordered=True, session=session)

    async def record_outcomes(
        self,
        channel: str,
        outcomes: list[Any],
        now: datetime | None = None,
        on_counts: OnCounts | None = None,
    ) -> tuple[int, list[Fate]]:
        """Provider callbacks: find each message (by our id or the provider's) and queue its outcome event.
        Returns how many were queued, and the fates of the messages a `failed` report failed (the others
        are told when the inbox records their event); a failure is counted with its write (`on_counts`:
        each count once committed)."""
        now = now or datetime.now(UTC)
        events = []
        fates: list[Fate] = []
        for outcome in outcomes:
            query: Doc = (
                {"_id": outcome.message_id} if outcome.message_id else {"provider_id": outcome.provider_id}
            )
            fields = {"contact_id": 1, "ruleset": 1, "rule": 1, "channel": 1, "sent_channel": 1, "attempt": 1,
                      "variant": 1, "held_out": 1}  # fmt: skip
            message = await self.messages.find_one(query, fields)
            if message is None:
                continue
            if outcome.status == "failed":
                if await self._delivery_failed(message, outcome.reason, now, on_counts):
                    fates.append(fate_of(message, "failed", reasons.DELIVERY_FAILED))
                continue
            attributes = {"message_id": message["_id"], "channel": channel, **outcome.attributes}
            if outcome.reason:
                attributes["reason"] = outcome.reason
            event_id = f"{channel}:{message['_id']}:{outcome.status}"
            events.append((event_id, f"message_{outcome.status}", message["contact_id"], attributes))
        await self._insert_outcome_events(events, now)
        return len(events), fates

    async def _delivery_failed(
        self, message: Doc, detail: str | None, now: datetime, on_counts: OnCounts | None
    ) -> bool:
        """A sent message `failed` on the provider's report, and counted, in one transaction."""
        count = [message_increment(message, "failed", now, reasons.DELIVERY_FAILED)]

        async def write(session: AsyncClientSession) -> bool:
            result = await self.messages.update_one(
                {"_id": message["_id"], "status": {"$in": ["sent", "delivered"]}},
                {"$set": {"status": "failed", "reason": reasons.DELIVERY_FAILED, "detail": detail}},
                session=session,
            )
            if result.modified_count:
                await self.add_counts(count, PROCESS_SHARD, session)
            return bool(result.modified_count)

        failed = await in_transaction(self.client, write)
        if failed and on_counts is not None:
            on_counts(count)
        return failed

    async def _insert_outcome_events(self, events: list[tuple[str, str, str, Doc]], now: datetime) -> None:
        if not events:
            return
        docs = [
            {
                "_id": i,
                "type": t,
                "contact_id": c,
                "time": now,
                "attributes": a,
                "received_at": now,
            }
            for i, t, c, a in events
        ]
        await self.insert_queued(docs)  # a provider repeating a callback: the first one counts

    async def insert_message(self, message: Message) -> None:
        doc = {"_id": message.message_id, **_message_fields(message)}
        await self.messages.insert_one(doc)


def _message_fields(message: Message) -> Doc:
    fields = msgspec.to_builtins(message, builtin_types=(datetime,))
    fields.pop("message_id")
    assert isinstance(fields, dict)
    return fields


def contact_from_doc(doc: Doc) -> Contact:
    fields = {k: v for k, v in doc.items() if k not in ("_id", "state", "version")}
    fields = {k: v for k, v in fields.items() if v is not None}
    return msgspec.convert({"contact_id": doc["_id"], **fields}, Contact, from_attributes=False)


def message_from_doc(doc: Doc) -> Message:
    fields = {"message_id": doc["_id"], **{k: v for k, v in doc.items() if k != "_id"}}
    try:
        return msgspec.convert(fields, Message)
    except msgspec.ValidationError:
        pass
    # A record written by hand, or damaged: the history shows what it can (the scheduler sets such a
    # message aside with the error as its reason) instead of failing the whole page.
    kept: Doc = {}
    for info in msgspec.structs.fields(Message):
        try:
            kept[info.name] = msgspec.convert(fields[info.name], info.type)
        except (KeyError, msgspec.ValidationError):
            if info.required:
                value = fields.get(info.name)
                kept[info.name] = {"created_at": datetime(1970, 1, 1, tzinfo=UTC), "status": "failed"}.get(
                    info.name, "" if value is None else str(value)
                )
    return Message(**kept)
