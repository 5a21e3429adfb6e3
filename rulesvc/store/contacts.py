"""Queries on `contacts` made outside the store's own contact methods."""

from __future__ import annotations

from typing import Any

from pymongo import UpdateOne
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.errors import BulkWriteError

from rulesvc.store.db import Doc, Store


class Contacts:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def by_id(self, ids: list[str]) -> dict[str, Doc]:
        """These contacts' profiles and state (those that exist), by id."""
        return {c["_id"]: c async for c in self.store.contacts.find({"_id": {"$in": ids}})}

    async def forget_unreachable(self, removals: list[tuple[str, str, Any]]) -> list[Doc] | None:
        """Removes each (contact, field path, value) a channel found unreachable (a dead push token). The
        write errors if the database refused some (the others are still made), else None."""
        if not removals:
            return None
        ops = [UpdateOne({"_id": cid}, {"$pull": {path: value}}) for cid, path, value in removals]
        try:
            await self.store.contacts.bulk_write(ops, ordered=False)
        except BulkWriteError as exc:
            return list(exc.details.get("writeErrors", []))
        return None

    async def write_states(self, ops: list[Any], session: AsyncClientSession) -> bool:
        """The contacts' new state, each write checked against the version it was read at: False if any
        contact changed meanwhile (another process decided for it)."""
        try:
            result = await self.store.contacts.bulk_write(ops, ordered=False, session=session)
        except BulkWriteError:
            return False
        return result.matched_count + result.upserted_count == len(ops)
