"""Backtest jobs (`backtests`): one document per job, shared by every worker process, so a job started
by one worker is read, cancelled and refused a twin by any other.

One job runs at a time per service: a running (or queued) job carries `active: true`, and a unique index
over that field, partial to `active: true`, lets MongoDB refuse a second one whichever process asks. A job
ends (done, failed, cancelled, lost) by losing the field. A job whose heartbeat stopped is `lost`: its
process died (a restart drops a running backtest); it is marked so before a new job is admitted, and when
it is read.
"""

from __future__ import annotations

import secrets
from datetime import datetime, timedelta
from typing import Any

from pymongo import ASCENDING, DESCENDING, IndexModel, MongoClient, ReturnDocument
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.collection import Collection
from pymongo.errors import DuplicateKeyError

from rulesvc.store.db import Doc, Store

KEEP = 50  # the most recent jobs kept; older ones are deleted as new ones start
ACTIVE_STATUSES = ("queued", "running")
LOST = "its process stopped answering (a restart of the service drops a running backtest)"


def new_job_id() -> str:
    return secrets.token_hex(6)


def _beat(job_id: str, now: datetime, progress: Doc | None) -> tuple[Doc, Doc]:
    fields: Doc = {"heartbeat_at": now}
    if progress is not None:
        fields["progress"] = progress
    return {"_id": job_id, "status": "running", "active": True}, {"$set": fields}


class Heartbeats:
    """`BacktestJobs.beat` with a synchronous client, for the job process's heartbeat thread: a replay
    holds its event loop for as long as a batch takes, so no asyncio task could beat meanwhile."""

    def __init__(self, client: MongoClient[Doc], database: str) -> None:
        self.client = client
        self.collection: Collection[Doc] = client[database]["backtests"]

    def close(self) -> None:
        self.client.close()

    def beat(self, job_id: str, now: datetime, progress: Doc | None) -> Doc | None:
        return self.collection.find_one_and_update(
            *_beat(job_id, now, progress),
            projection={"cancel_requested": 1},
            return_document=ReturnDocument.AFTER,
        )


class BacktestJobs:
    def __init__(self, store: Store) -> None:
        self.collection: AsyncCollection[Doc] = store.db["backtests"]

    async def ensure_indexes(self) -> None:
        """Idempotent, as `Store.ensure_schema`: every worker runs it as it starts."""
        await self.collection.create_indexes(
            [
                IndexModel(
                    [("active", ASCENDING)],
                    name="one_active_backtest",
                    unique=True,
                    partialFilterExpression={"active": True},
                ),
                IndexModel([("created_at", DESCENDING)], name="backtests_by_time"),
            ]
        )

    async def mark_lost(self, now: datetime, lost_after: timedelta) -> None:
        """Jobs whose heartbeat is older than `lost_after` end as `lost` and block nothing more."""
        await self.collection.update_many(
            {"active": True, "heartbeat_at": {"$lt": now - lost_after}},
            {"$set": {"status": "lost", "finished_at": now, "error": LOST}, "$unset": {"active": ""}},
        )

    async def create(self, doc: Doc, now: datetime, lost_after: timedelta) -> tuple[Doc | None, Doc | None]:
        """(the new job, None), or (None, the job that runs) when one runs already. `doc` has the
        request, the owner; the id, status and times are set here."""
        await self.mark_lost(now, lost_after)
        job = {**doc, "_id": new_job_id(), "status": "queued", "active": True, "created_at": now,
               "heartbeat_at": now, "cancel_requested": False}  # fmt: skip
        try:
            await self.collection.insert_one(job)
        except DuplicateKeyError:
            running = await self.collection.find_one({"active": True})
            if running is None:  # it ended between the insert and the read: the caller may try again
                return None, None
            return None, running
        await self._trim()
        return job, None

    async def _trim(self) -> None:
        old = (
            await self.collection.find({"active": {"$ne": True}}, {"_id": 1})
            .sort([("created_at", DESCENDING)])
            .skip(KEEP)
            .to_list()
        )
        if old:
            await self.collection.delete_many(
                {"_id": {"$in": [d["_id"] for d in old]}, "active": {"$ne": True}}
            )

    async def get(self, job_id: str, now: datetime, lost_after: timedelta) -> Doc | None:
        await self.mark_lost(now, lost_after)
        return await self.collection.find_one({"_id": job_id})

    async def recent(self, limit: int, now: datetime, lost_after: timedelta) -> list[Doc]:
        """Newest first, without their reports."""
        await self.mark_lost(now, lost_after)
        cursor = self.collection.find({}, {"report": 0}).sort([("created_at", DESCENDING)]).limit(limit)
        return await cursor.to_list()

    async def started(self, job_id: str, now: datetime, process: int) -> bool:
        """The job's process took it (False: it was cancelled or lost meanwhile)."""
        result = await self.collection.update_one(
            {"_id": job_id, "status": "queued", "active": True},
            {"$set": {"status": "running", "started_at": now, "heartbeat_at": now, "process": process}},
        )
        return result.modified_count == 1

    async def beat(self, job_id: str, now: datetime, progress: Doc | None) -> Doc | None:
        """Heartbeat (and progress, if given) of a running job; returns the job's `cancel_requested`
        as {"cancel_requested": bool}, or None when the job no longer runs (lost, cancelled)."""
        return await self.collection.find_one_and_update(
            *_beat(job_id, now, progress),
            projection={"cancel_requested": 1},
            return_document=ReturnDocument.AFTER,
        )

    async def finish(self, job_id: str, status: str, now: datetime, **fields: Any) -> bool:
        """Ends an active job (done with `report`, failed with `error`, cancelled); False if it had
        ended already (a job is finished once: by its process, or by the worker that watched it die)."""
        result = await self.collection.update_one(
            {"_id": job_id, "active": True},
            {"$set": {"status": status, "finished_at": now, **fields}, "$unset": {"active": ""}},
        )
        return result.modified_count == 1

    async def request_cancel(self, job_id: str, now: datetime, lost_after: timedelta) -> Doc | None:
        """Flags an active job to be cancelled (its process stops at its next progress write); a queued
        one ends at once. Returns the job as it is then, or None for an unknown id."""
        await self.mark_lost(now, lost_after)
        await self.collection.update_one(
            {"_id": job_id, "active": True, "status": "queued"},
            {"$set": {"status": "cancelled", "finished_at": now, "cancel_requested": True,
                      "error": "cancelled before it started"}, "$unset": {"active": ""}},
        )  # fmt: skip
        await self.collection.update_one(
            {"_id": job_id, "active": True}, {"$set": {"cancel_requested": True, "cancel_requested_at": now}}
        )
        return await self.collection.find_one({"_id": job_id})
