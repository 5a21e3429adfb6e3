"""Ads audience changes (`audience_changes`), written by the inbox, synced by a plugin's job."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pymongo.asynchronous.client_session import AsyncClientSession

from rulesvc.store.db import Doc, Store


class Audiences:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def unsynced_changes(self, limit: int, audiences: list[str] | None = None) -> list[Doc]:
        """The changes not synced yet, oldest first; of these `audiences` only, when given (index
        `audience_unsynced_by_audience`: one index range per audience, merged in time order, so changes
        of other audiences, however many, are never read)."""
        if audiences is None:
            found = self.store.audience_changes.find({"synced": False})
        else:
            query = {"synced": False, "audience": {"$in": audiences}}
            found = self.store.audience_changes.find(query, hint="audience_unsynced_by_audience")
        return await found.sort("at", 1).limit(limit).to_list()

    async def unsynced_counts(self, excluding: list[str]) -> dict[str, int]:
        """How many changes wait per audience, of the audiences not in `excluding` (those a sync cannot
        send: its status names them)."""
        pipeline: list[Doc] = [
            {"$match": {"synced": False, "audience": {"$nin": excluding}}},
            {"$group": {"_id": "$audience", "n": {"$sum": 1}}},
        ]
        cursor = await self.store.audience_changes.aggregate(pipeline)
        return {str(d["_id"]): int(d["n"]) async for d in cursor}

    async def mark_synced(self, ids: list[Any], now: datetime) -> None:
        await self.store.audience_changes.update_many(
            {"_id": {"$in": ids}}, {"$set": {"synced": True, "synced_at": now}}
        )

    async def record(self, changes: list[Doc], session: AsyncClientSession) -> None:
        """Adds to and removals from ads audiences, for the sync job to send."""
        await self.store.audience_changes.insert_many(changes, session=session)
