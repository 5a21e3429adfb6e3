"""What plugins' periodic jobs may read and write: named queries, never the collections themselves."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from rulesvc.store.audiences import Audiences
from rulesvc.store.contacts import Contacts
from rulesvc.store.db import Doc, Store


class JobData:
    """Handed to `Job.run`: a plugin's job works through these methods, so the collections and their
    indexes can change without breaking plugins."""

    def __init__(self, store: Store) -> None:
        self._audiences = Audiences(store)
        self._contacts = Contacts(store)

    async def unsynced_audience_changes(self, limit: int) -> list[Doc]:
        """Adds to and removals from ads audiences not synced yet, oldest first."""
        return await self._audiences.unsynced_changes(limit)

    async def mark_audience_changes_synced(self, ids: list[Any], now: datetime) -> None:
        await self._audiences.mark_synced(ids, now)

    async def contacts(self, ids: list[str]) -> dict[str, Doc]:
        """These contacts' profiles (those that exist), by id."""
        return await self._contacts.by_id(ids)
