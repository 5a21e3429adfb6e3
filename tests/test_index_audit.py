"""Indexes no query reads are not made any more, and the migration drops those an earlier release made."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from pymongo import ASCENDING

from rulesvc.config import Settings
from rulesvc.store.db import Store
from rulesvc.store.leases import drop_unused_indexes


async def test_unused_indexes_dropped_and_not_made_again(settings: Settings, db: Any) -> None:
    store = Store(db.client, settings.database, timedelta(days=1))
    await drop_unused_indexes(store)  # a fresh database: nothing to drop, no collection even
    await store.ensure_schema()
    await db.leases.create_index([("until", ASCENDING)], name="leases_until")  # as the release before did
    await drop_unused_indexes(store)
    await drop_unused_indexes(store)  # again, as after a crash half-way: nothing left to do
    assert set(await db.leases.index_information()) == {"_id_"}
    await store.ensure_schema()
    assert "leases_until" not in await db.leases.index_information()
    assert "contact_leases_until" in await db.contact_leases.index_information()  # still read: kept
