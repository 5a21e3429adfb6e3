"""The inbox's reads of undecided events: the queue (`inbox`, rulesvc.store.event_queue) says which and in
what order, `events` holds them."""

from __future__ import annotations

from datetime import datetime

from pymongo import ASCENDING
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.errors import BulkWriteError

from rulesvc.store.db import Doc, Store, failure_text, transient
from rulesvc.store.event_queue import DROPPED, PENDING, QUARANTINED

INBOX_ORDER = [("contact_id", ASCENDING), ("time", ASCENDING), ("_id", ASCENDING)]


def refusal(exc: BaseException) -> bool:
    """The database refused a document (a write error other than a duplicate id: `insert_queued` raises
    those only), or the data cannot be stored: the same write again would fail again."""
    return isinstance(exc, BulkWriteError) or not transient(exc)


class InboxEvents:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def contacts_waiting(self, held: list[str], limit: int) -> list[str]:
        """The contacts of the oldest pending events, not held by a batch, oldest first. Catalog events (no
        contact) are not the engine's: they wait for the interest fan-out."""
        query: Doc = {"state": PENDING, "contact_id": {"$nin": [None, *held]}}
        cursor = (
            self.store.queue.find(query, {"_id": 0, "contact_id": 1})
            .sort("received_at", ASCENDING)
            .hint("inbox_oldest")
            .limit(limit)
        )
        keys: dict[str, None] = {}
        async for doc in cursor:
            keys[doc["contact_id"]] = None
        return list(keys)

    async def pending(self, contact_ids: list[str], limit: int) -> list[Doc]:
        """These contacts' pending events in per-contact time order, at most `limit`."""
        queued = await (
            self.store.queue.find({"state": PENDING, "contact_id": {"$in": contact_ids}}, sort=INBOX_ORDER)
            .hint("inbox_pending")
            .limit(limit)
            .to_list()
        )
        return await self.store.events_of(queued)

    async def decided_since(
        self,
        contact_ids: list[str],
        types: list[str],
        since: datetime,
        session: AsyncClientSession | None = None,
    ) -> list[Doc]:
        """These contacts' decided events of these types from `since` on (what may cancel a send armed
        then): a range of the `events_by_contact` index per contact, less the events still queued."""
        if not contact_ids or not types:
            return []
        query: Doc = {"contact_id": {"$in": contact_ids}, "time": {"$gte": since}, "type": {"$in": types},
                      "state": {"$nin": [QUARANTINED, DROPPED]}}  # fmt: skip
        fields = {"type": 1, "contact_id": 1, "time": 1, "attributes": 1}
        found = (
            await self.store.events.find(query, fields, session=session).hint("events_by_contact").to_list()
        )
        if not found:
            return []
        ids = [d["_id"] for d in found]
        queued = {
            d["_id"] async for d in self.store.queue.find({"_id": {"$in": ids}}, {"_id": 1}, session=session)
        }
        return [d for d in found if d["_id"] not in queued]

    async def earliest_pending(self, contact_ids: list[str]) -> dict[str, datetime]:
        """Each of these contacts' earliest undecided event time, for those that have one: the first key
        of each contact in the pending index (a contact with a backlog is not read through)."""
        pipeline: list[Doc] = [
            {"$match": {"state": PENDING, "contact_id": {"$in": contact_ids}}},
            {"$sort": {"contact_id": 1, "time": 1}},
            {"$group": {"_id": "$contact_id", "first": {"$first": "$time"}}},
        ]
        cursor = await self.store.queue.aggregate(pipeline, hint="inbox_pending")
        return {doc["_id"]: doc["first"] async for doc in cursor}

    async def insert_internal(self, docs: list[Doc]) -> dict[int, Doc]:
        """Events the service makes itself (a wait's `else`), each under a fixed id and queued with it: one
        already there (a run that died before marking its entry done) is left as it is. The refusals by
        index: a batch the database refuses is written again one event at a time, to find them."""
        try:
            await self.store.insert_queued(docs)
            return {}
        except Exception as exc:
            if not refusal(exc):
                raise
        refused: dict[int, Doc] = {}
        for i, doc in enumerate(docs):
            try:
                await self.store.insert_queued([doc])
            except Exception as exc:
                if not refusal(exc):
                    raise
                refused[i] = {"errmsg": failure_text(exc)}
        return refused

    async def mark_done(self, ids: list[str], at: datetime, shard: str, session: AsyncClientSession) -> None:
        """These events, those still pending, are decided: out of the queue (and counted, for the
        overview's throughput). The events themselves stay as they were received."""
        result = await self.store.queue.delete_many({"_id": {"$in": ids}, "state": PENDING}, session=session)
        if result.deleted_count:
            await self.store.count_decided(at, result.deleted_count, shard, session)

    async def first_pending(self, contact_id: str) -> Doc | None:
        """The contact's next event in order."""
        queued = await self.store.queue.find_one(
            {"state": PENDING, "contact_id": contact_id}, sort=INBOX_ORDER, hint="inbox_pending"
        )
        found = await self.store.events_of([] if queued is None else [queued])
        return found[0] if found else None
