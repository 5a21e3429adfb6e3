"""Queries on `messages` made outside the store's own message methods."""

from __future__ import annotations

from rulesvc.store.db import Doc, Store


class Messages:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def owners(self, ids: list[str]) -> dict[str, str]:
        """The contact of each of these messages that exists, by message id."""
        found = await self.store.messages.find({"_id": {"$in": ids}}, {"contact_id": 1}).to_list()
        return {d["_id"]: d["contact_id"] for d in found}

    async def by_id(self, ids: list[str]) -> dict[str, Doc]:
        """These messages (those that exist), by id."""
        return {m["_id"]: m async for m in self.store.messages.find({"_id": {"$in": ids}})}
