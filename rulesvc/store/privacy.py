"""Privacy requests' queries: every place a contact id is stored (`CONTACT_FIELDS`), the erasure's deletes,
the export's reads, the tombstones (`tombstones`) and the request log (`privacy_requests`)."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from typing import Any

from pymongo import DESCENDING, UpdateOne
from pymongo.asynchronous.collection import AsyncCollection

from rulesvc.core.privacy import contact_hash, event_hash, scrub
from rulesvc.store.db import Doc, Store
from rulesvc.store.privacy_indexes import ERASED_EVENTS

# Every stored field that holds a contact id, as (collection, field); `*` is anywhere in the document
# (a backtest report's example rows). Erasure (rulesvc.runtime.privacy) and the identity merge both go
# by this list, and tests/test_privacy.py fails when a collection holding a contact id is missing here:
# a new collection that keeps contact ids is added to this list and to `erase_pass`.
CONTACT_FIELDS: list[tuple[str, str]] = [
    ("contacts", "_id"),  # profile and state
    ("events", "contact_id"),  # pending, decided, quarantined, dropped; outcome, timer and fan-out copies
    ("inbox", "contact_id"),  # the undecided events' queue (rulesvc.store.event_queue)
    ("messages", "contact_id"),  # history with outcomes, in-app inbox included
    ("schedule", "contact_id"),  # sends and timers to come
    ("interests", "contact_id"),  # the catalog fan-out's index (its `_id` is `<contact>|<product>`)
    ("audience_changes", "contact_id"),  # ads audience adds and removals
    ("contact_leases", "contacts"),  # held by the erasure itself while it runs, released at its end
    ("identities", "_id"),  # an anonymous id's link ...
    ("identities", "contact_id"),  # ... to the known contact
    ("backtests", "*"),  # a job's `contacts` and its report's example and skipped rows
    ("privacy_requests", "contact_id"),  # an export's entry, until the contact is erased
    ("shopify_privacy_requests", "contact_ids"),  # what Shopify asked: the ids become their SHA-256
    ("segment_carts", "contact_id"),  # the carts kept from Segment's cart calls (`_id` holds it too)
]

IDENTITIES = "identities"
TOMBSTONES = "tombstones"
REQUESTS = "privacy_requests"


class Privacy:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.tombstones: AsyncCollection[Doc] = store.db[TOMBSTONES]
        self.requests: AsyncCollection[Doc] = store.db[REQUESTS]
        self.identities: AsyncCollection[Doc] = store.db[IDENTITIES]
        self.backtests: AsyncCollection[Doc] = store.db["backtests"]
        self.erased_events: AsyncCollection[Doc] = store.db[ERASED_EVENTS]

    # --- tombstones ---------------------------------------------------------------------------------

    async def bury(self, hashes: list[str], now: datetime) -> None:
        """Tombstones for these contact hashes (an erasure again moves its time on)."""
        for h in hashes:
            await self.tombstones.update_one(
                {"_id": h},
                {"$set": {"erased_at": now, "changed_at": now}, "$unset": {"recreated_at": ""}},
                upsert=True,
            )

    async def tombstones_of(self, hashes: list[str]) -> dict[str, Doc]:
        """One query for a batch: the tombstones among these contact hashes."""
        if not hashes:
            return {}
        return {d["_id"]: d async for d in self.tombstones.find({"_id": {"$in": hashes}})}

    async def tombstones_changed(self, since: datetime | None, limit: int) -> list[Doc]:
        """Tombstones written or changed from `since` on (all, without it), oldest change first."""
        query: Doc = {} if since is None else {"changed_at": {"$gte": since}}
        cursor = self.tombstones.find(query).sort([("changed_at", 1)]).limit(limit)
        return await cursor.hint("tombstones_changed").to_list()

    async def erased_event_ids(self, hashes: list[str]) -> set[str]:
        """Which of these event id digests belonged to an erased contact (by `_id`: one indexed query)."""
        if not hashes:
            return set()
        return {d["_id"] async for d in self.erased_events.find({"_id": {"$in": hashes}}, {"_id": 1})}

    async def recreated(self, h: str, now: datetime) -> None:
        """A profile `PUT` re-created an erased contact: mode `all` takes its new events again."""
        await self.tombstones.update_one(
            {"_id": h, "recreated_at": {"$exists": False}}, {"$set": {"recreated_at": now, "changed_at": now}}
        )

    # --- the erasure --------------------------------------------------------------------------------

    async def linked_ids(self, contact_id: str) -> list[str]:
        """The anonymous ids linked to this contact (the identity links): erased with it."""
        return [d["_id"] async for d in self.identities.find({"contact_id": contact_id}, {"_id": 1})]

    async def stop_sends(self, ids: list[str]) -> tuple[int, int]:
        """Deletes the contacts' schedule entries no scheduler runs now; (deleted, still running)."""
        deleted = await self.store.schedule.delete_many(
            {"contact_id": {"$in": ids}, "status": {"$ne": "running"}}
        )
        running = await self.store.schedule.count_documents({"contact_id": {"$in": ids}, "status": "running"})
        return deleted.deleted_count, running

    async def audience_memberships(self, ids: list[str]) -> list[str]:
        """The audiences the contacts are in: those whose latest change is an `add`, and those their state
        lists without a later `remove`."""
        pipeline: list[Doc] = [
            {"$match": {"contact_id": {"$in": ids}}},
            {"$sort": {"at": 1}},
            {"$group": {"_id": "$audience", "op": {"$last": "$op"}}},
        ]
        latest = {d["_id"]: d["op"] async for d in await self.store.audience_changes.aggregate(pipeline)}
        in_state: set[str] = set()
        async for doc in self.store.contacts.find({"_id": {"$in": ids}}, {"state.audiences": 1}):
            audiences = (doc.get("state") or {}).get("audiences")
            if isinstance(audiences, dict):
                in_state.update(a for a in audiences if isinstance(a, str))
        members = {a for a, op in latest.items() if op == "add"} | {
            a for a in in_state if latest.get(a) != "remove"
        }
        return sorted(a for a in members if isinstance(a, str))

    async def queue_removals(self, removals: list[Doc]) -> int:
        if removals:
            await self.store.audience_changes.insert_many(removals)
        return len(removals)

    async def erase_pass(self, ids: list[str], now: datetime) -> dict[str, int]:
        """Deletes what these contacts left in every collection of `CONTACT_FIELDS` (the lease is the
        caller's; an audience removal queued under `erased/<hash>` stays). Counts per collection. Each
        deleted event's id is kept as its SHA-256 in `erased_events` (ingest drops a retry of it)."""
        among = {"$in": ids}
        db = self.store.db
        counts: dict[str, int] = {}
        await _delete_in_batches(self.store.queue, {"contact_id": among})  # counted as their events
        counts["events"] = await _delete_in_batches(db["events"], {"contact_id": among}, self._keep_ids(now))
        for name in ("messages", "schedule", "interests", "audience_changes", "segment_carts"):
            counts[name] = await _delete_in_batches(db[name], {"contact_id": among})
        counts["contacts"] = (await self.store.contacts.delete_many({"_id": among})).deleted_count
        found = {"$or": [{"_id": among}, {"contact_id": among}]}
        counts["identities"] = (await self.identities.delete_many(found)).deleted_count
        scrubbed = await self.requests.update_many({"contact_id": among}, {"$unset": {"contact_id": ""}})
        counts["privacy_requests"] = scrubbed.modified_count
        asked = await db["shopify_privacy_requests"].update_many(
            {"contact_ids": among},
            {
                "$pull": {"contact_ids": among},
                "$addToSet": {"contact_sha256s": {"$each": [contact_hash(i) for i in ids]}},
            },
        )
        counts["shopify_privacy_requests"] = asked.modified_count
        counts["backtests"] = await self._scrub_backtests(frozenset(ids))
        return counts

    def _keep_ids(self, now: datetime) -> Callable[[list[Any]], Awaitable[None]]:
        async def keep(event_ids: list[Any]) -> None:
            await self.erased_events.bulk_write(
                [UpdateOne({"_id": event_hash(str(i))}, {"$set": {"erased_at": now}}, upsert=True)
                 for i in event_ids],
                ordered=False,
            )  # fmt: skip

        return keep

    async def _scrub_backtests(self, ids: frozenset[str]) -> int:
        """The stored backtest jobs lose the contacts' rows (at most `KEEP` jobs are kept: read through)."""
        changed = 0
        async for doc in self.backtests.find({}):
            clean = scrub(doc, ids)
            fields = {k: v for k, v in clean.items() if k != "_id" and v != doc.get(k)}
            if fields:
                await self.backtests.update_one({"_id": doc["_id"]}, {"$set": fields})
                changed += 1
        return changed

    # --- the export ---------------------------------------------------------------------------------

    async def known(self, contact_id: str) -> bool:
        """Anything stored of the contact: a profile, an event, a message or an identity link."""
        if await self.store.contacts.find_one({"_id": contact_id}, {"_id": 1}) is not None:
            return True
        for coll in (self.store.events, self.store.messages, self.identities):
            if await coll.find_one({"contact_id": contact_id}, {"_id": 1}) is not None:
                return True
        return await self.identities.find_one({"_id": contact_id}, {"_id": 1}) is not None

    def contact_docs(
        self, collection: str, contact_id: str, sort: list[tuple[str, int]]
    ) -> AsyncIterator[Doc]:
        """Every document of the contact in one collection, in `sort` order, read in batches."""
        return aiter(self.store.db[collection].find({"contact_id": contact_id}, sort=sort, batch_size=500))

    async def identity_links(self, contact_id: str) -> list[Doc]:
        found = {"$or": [{"_id": contact_id}, {"contact_id": contact_id}]}
        return await self.identities.find(found).to_list()

    # --- the request log ----------------------------------------------------------------------------

    async def open_request(self, fields: Doc) -> str:
        request_id = secrets.token_hex(8)
        await self.requests.insert_one({"_id": request_id, **fields})
        return request_id

    async def close_request(self, request_id: str, done_at: datetime, counts: dict[str, Any]) -> None:
        await self.requests.update_one({"_id": request_id}, {"$set": {"done_at": done_at, "counts": counts}})

    async def list_requests(self, limit: int, before: datetime | None) -> list[Doc]:
        query: Doc = {} if before is None else {"requested_at": {"$lt": before}}
        cursor = self.requests.find(query).sort([("requested_at", DESCENDING), ("_id", DESCENDING)])
        return await cursor.limit(limit).to_list()


DELETE_BATCH = 5000  # documents per delete: each write stays well within RULESVC_MONGODB_TIMEOUT_SECONDS


async def _delete_in_batches(
    collection: AsyncCollection[Doc], query: Doc, before: Callable[[list[Any]], Awaitable[None]] | None = None
) -> int:
    """Deletes what `query` finds a batch at a time: a history of millions of events is no single write
    that runs into the operation deadline. `before` sees each batch's ids before they are deleted."""
    deleted = 0
    while True:
        ids = [d["_id"] async for d in collection.find(query, {"_id": 1}).limit(DELETE_BATCH)]
        if not ids:
            return deleted
        if before is not None:
            await before(ids)
        deleted += (await collection.delete_many({"_id": {"$in": ids}, **query})).deleted_count
