"""Leases on periods of work (`leases`): one process at a time runs a plugin's job each period."""

from __future__ import annotations

from datetime import datetime, timedelta

from pymongo.errors import DuplicateKeyError

from rulesvc.store.db import Store
from rulesvc.store.event_queue import drop_index_if_present

# Indexes earlier releases made that no query reads (issue 19's index audit): `leases_until`, on a
# collection read only by `_id` (a job's key).
UNUSED_INDEXES = {"leases": ["leases_until"]}


async def drop_unused_indexes(store: Store) -> None:
    """A migration: drops `UNUSED_INDEXES`. Idempotent: an index (or collection) already gone is fine."""
    for collection, names in UNUSED_INDEXES.items():
        for name in names:
            await drop_index_if_present(store.db[collection], name)


class Leases:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def take_period(self, key: str, owner: str, now: datetime, period: timedelta) -> bool:
        """Holds `key` for `period` from `now` unless another holder's period is still running (False)."""
        leases = self.store.leases
        try:
            await leases.delete_many({"_id": key, "until": {"$lt": now}})
            await leases.insert_one({"_id": key, "owner": owner, "until": now + period})
        except DuplicateKeyError:
            return False
        return True


class ContactLeases:
    """Which process works on which contacts now (`contact_leases`: one document per inbox batch, whose
    unique index on `contacts` keeps any contact in at most one lease)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def held(self) -> list[str]:
        """Every contact some batch holds."""
        return [c async for d in self.store.contact_leases.find({}, {"contacts": 1}) for c in d["contacts"]]

    async def release_expired(self, now: datetime) -> None:
        await self.store.contact_leases.delete_many({"until": {"$lt": now}})

    async def take(self, token: str, owner: str, contacts: list[str], until: datetime) -> bool:
        """False if another batch holds one of the contacts."""
        try:
            await self.store.contact_leases.insert_one(
                {"_id": token, "owner": owner, "contacts": contacts, "until": until}
            )
        except DuplicateKeyError:
            return False
        return True

    async def renew(self, token: str, until: datetime) -> None:
        await self.store.contact_leases.update_one({"_id": token}, {"$set": {"until": until}})

    async def release(self, token: str) -> None:
        await self.store.contact_leases.delete_one({"_id": token})
