"""Plugins' background jobs: each runs every `interval`, in one process at a time (a lease per period)."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import structlog
from pymongo.errors import PyMongoError

from rulesvc.channels import Job
from rulesvc.runtime.waiting import wait_any
from rulesvc.store.db import Store
from rulesvc.store.jobs import JobData
from rulesvc.store.leases import Leases

log = structlog.get_logger(__name__)


async def run_job(job: Job, store: Store, stop: asyncio.Event) -> None:
    """Every `interval`, in one process at a time: the lease lasts the interval, so others skip it."""
    key = f"job:{job.name}"
    owner = uuid.uuid4().hex
    leases = Leases(store)
    while not stop.is_set():
        now = datetime.now(UTC)
        try:
            taken = await leases.take_period(key, owner, now, timedelta(seconds=job.interval))
            if not taken:
                log.debug("job.skipped", job=job.name, reason="another process has this period")
        except PyMongoError as exc:
            log.warning("job.storage_error", job=job.name, error=type(exc).__name__)
            taken = False
        if taken:
            try:
                await job.run(JobData(store))
            except Exception:
                log.exception("job.failed", job=job.name)
        await wait_any(stop, seconds=job.interval)
