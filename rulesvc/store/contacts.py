"""Queries on `contacts` made outside the store's own contact methods."""

from __future__ import annotations

from rulesvc.store.db import Doc, Store


class Contacts:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def by_id(self, ids: list[str]) -> dict[str, Doc]:
        """These contacts' profiles and state (those that exist), by id."""
        return {c["_id"]: c async for c in self.store.contacts.find({"_id": {"$in": ids}})}
