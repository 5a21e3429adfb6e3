"""Plugins' background jobs: each runs every `interval`, in one process at a time (a lease per period)."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime, timedelta

import structlog
from pymongo.errors import PyMongoError

from rulesvc.channels import Job, status_of
from rulesvc.runtime.waiting import wait_any
from rulesvc.store.db import Store
from rulesvc.store.jobs import JobData, JobRuns
from rulesvc.store.leases import Leases

log = structlog.get_logger(__name__)


async def run_job(job: Job, store: Store, stop: asyncio.Event) -> None:
    """Every `interval`, in one process at a time: the lease lasts the interval, so others skip it. A job
    not configured is not run. Each run's end (or error) is stored, for `rulesvc plugins` and the API."""
    key = f"job:{job.name}"
    owner = uuid.uuid4().hex
    leases = Leases(store)
    runs = JobRuns.of(store)
    while not stop.is_set():
        now = datetime.now(UTC)
        configured, detail = status_of(job)
        taken = False
        if not configured:
            log.debug("job.skipped", job=job.name, reason=f"not configured: {detail}")
        else:
            try:
                taken = await leases.take_period(key, owner, now, timedelta(seconds=job.interval))
                if not taken:
                    log.debug("job.skipped", job=job.name, reason="another process has this period")
            except PyMongoError as exc:
                log.warning("job.storage_error", job=job.name, error=type(exc).__name__)
        if taken:
            await _run_once(job, store, runs)
        await wait_any(stop, seconds=job.interval)


async def _run_once(job: Job, store: Store, runs: JobRuns) -> None:
    started, clock = datetime.now(UTC), time.monotonic()
    error: str | None = None
    try:
        await job.run(JobData(store))
    except Exception as exc:
        log.exception("job.failed", job=job.name)
        error = f"{type(exc).__name__}: {exc}"
    seconds = time.monotonic() - clock
    try:
        if error is None:
            await runs.ran(job.name, started, seconds)
        else:
            await runs.failed(job.name, started, seconds, error)
    except PyMongoError as exc:
        log.warning("job.storage_error", job=job.name, error=type(exc).__name__)
