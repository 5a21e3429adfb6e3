"""Ads audience changes (`audience_changes`), written by the inbox, synced by a plugin's job."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pymongo.asynchronous.client_session import AsyncClientSession

from rulesvc.store.db import Doc, Store


class Audiences:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def unsynced_changes(self, limit: int) -> list[Doc]:
        """The changes not synced yet, oldest first."""
        return await self.store.audience_changes.find({"synced": False}).sort("at", 1).limit(limit).to_list()

    async def mark_synced(self, ids: list[Any], now: datetime) -> None:
        await self.store.audience_changes.update_many(
            {"_id": {"$in": ids}}, {"$set": {"synced": True, "synced_at": now}}
        )

    async def record(self, changes: list[Doc], session: AsyncClientSession) -> None:
        """Adds to and removals from ads audiences, for the sync job to send."""
        await self.store.audience_changes.insert_many(changes, session=session)
