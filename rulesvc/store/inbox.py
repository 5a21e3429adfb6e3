"""The inbox's reads of pending events (`events`)."""

from __future__ import annotations

from pymongo import ASCENDING

from rulesvc.store.db import PENDING, Doc, Store


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
