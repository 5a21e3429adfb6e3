"""The inbox's reads of pending events (`events`)."""

from __future__ import annotations

from datetime import datetime

from pymongo import ASCENDING
from pymongo.asynchronous.client_session import AsyncClientSession

from rulesvc.store.db import PENDING, Doc, Store, insert_new

DONE = "done"  # an event the inbox decided


class InboxEvents:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def contacts_waiting(self, held: list[str], limit: int) -> list[str]:
        """The contacts of the oldest pending events, not held by a batch, oldest first. Catalog events (no
        contact) are not the engine's: they wait for the interest fan-out."""
        query: Doc = {"state": PENDING, "contact_id": {"$nin": [None, *held]}}
        cursor = (
            self.store.events.find(query, {"_id": 0, "contact_id": 1})
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
        return await (
            self.store.events.find(
                {"state": PENDING, "contact_id": {"$in": contact_ids}},
                sort=[("contact_id", ASCENDING), ("time", ASCENDING), ("_id", ASCENDING)],
            )
            .hint("inbox_pending")
            .limit(limit)
            .to_list()
        )

    async def decided_since(
        self,
        contact_ids: list[str],
        types: list[str],
        since: datetime,
        session: AsyncClientSession | None = None,
    ) -> list[Doc]:
        """These contacts' decided events of these types from `since` on (what may cancel a send armed
        then): a range of the `events_by_contact` index per contact."""
        if not contact_ids or not types:
            return []
        query: Doc = {"contact_id": {"$in": contact_ids}, "time": {"$gte": since}, "type": {"$in": types},
                      "state": DONE}  # fmt: skip
        fields = {"type": 1, "contact_id": 1, "time": 1, "attributes": 1}
        return (
            await self.store.events.find(query, fields, session=session).hint("events_by_contact").to_list()
        )

    async def earliest_pending(self, contact_ids: list[str]) -> dict[str, datetime]:
        """Each of these contacts' earliest undecided event time, for those that have one: the first key
        of each contact in the pending index (a contact with a backlog is not read through)."""
        pipeline: list[Doc] = [
            {"$match": {"state": PENDING, "contact_id": {"$in": contact_ids}}},
            {"$sort": {"contact_id": 1, "time": 1}},
            {"$group": {"_id": "$contact_id", "first": {"$first": "$time"}}},
        ]
        cursor = await self.store.events.aggregate(pipeline, hint="inbox_pending")
        return {doc["_id"]: doc["first"] async for doc in cursor}

    async def insert_internal(self, docs: list[Doc]) -> dict[int, Doc]:
        """Events the service makes itself (a wait's `else`), each under a fixed id: one already there (a
        run that died before marking its entry done) is left as it is. The other refusals, by index."""
        _, refused = await insert_new(self.store.events, docs, raise_refused=False)
        return refused

    async def mark_done(self, ids: list[str], at: datetime, shard: str, session: AsyncClientSession) -> None:
        """These events, those still pending, are decided (and counted, for the overview's throughput)."""
        result = await self.store.events.update_many(
            {"_id": {"$in": ids}, "state": PENDING},
            {"$set": {"state": DONE, "processed_at": at}},
            session=session,
        )
        if result.modified_count:
            await self.store.count_decided(at, result.modified_count, shard, session)

    async def first_pending(self, contact_id: str) -> Doc | None:
        """The contact's next event in order."""
        return await self.store.events.find_one(
            {"state": PENDING, "contact_id": contact_id},
            sort=[("contact_id", ASCENDING), ("time", ASCENDING), ("_id", ASCENDING)],
            hint="inbox_pending",
        )
