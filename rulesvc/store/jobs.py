"""What plugins' periodic jobs may read and write: named queries, never the collections themselves."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pymongo.asynchronous.collection import AsyncCollection

from rulesvc.store.audiences import Audiences
from rulesvc.store.contacts import Contacts
from rulesvc.store.db import Doc, Store


class JobData:
    """Handed to `Job.run`: a plugin's job works through these methods, so the collections and their
    indexes can change without breaking plugins."""

    def __init__(self, store: Store) -> None:
        self._audiences = Audiences(store)
        self._contacts = Contacts(store)

    async def unsynced_audience_changes(self, limit: int, audiences: list[str] | None = None) -> list[Doc]:
        """Adds to and removals from ads audiences not synced yet, oldest first; only of `audiences` when
        given (those a sync can send: changes it leaves queued then never crowd out the others)."""
        return await self._audiences.unsynced_changes(limit, audiences)

    async def unsynced_audience_counts(self, excluding: list[str]) -> dict[str, int]:
        """Per audience not in `excluding`, how many of its changes are not synced yet."""
        return await self._audiences.unsynced_counts(excluding)

    async def mark_audience_changes_synced(self, ids: list[Any], now: datetime) -> None:
        await self._audiences.mark_synced(ids, now)

    async def contacts(self, ids: list[str]) -> dict[str, Doc]:
        """These contacts' profiles (those that exist), by id."""
        return await self._contacts.by_id(ids)


class JobRuns:
    """Each job's last run and last error (`job_runs`, one document per job name). A job runs in any worker
    process under a lease, so listings read them here, not from the process that answers."""

    def __init__(self, collection: AsyncCollection[Doc]) -> None:
        self.collection = collection

    @classmethod
    def of(cls, store: Store) -> JobRuns:
        return cls(store.job_runs)

    async def ran(self, job: str, at: datetime, seconds: float) -> None:
        run = {"at": at, "duration_seconds": round(seconds, 3)}
        await self.collection.update_one({"_id": job}, {"$set": {"last_run": run}}, upsert=True)

    async def failed(self, job: str, at: datetime, seconds: float, message: str) -> None:
        error = {"at": at, "duration_seconds": round(seconds, 3), "message": message[:1000]}
        await self.collection.update_one({"_id": job}, {"$set": {"last_error": error}}, upsert=True)

    async def all(self) -> dict[str, Doc]:
        """By job name: `last_run` {at, duration_seconds} and `last_error` {at, duration_seconds, message}."""
        return {d["_id"]: d async for d in self.collection.find({})}
