"""One backtest job's process: `python -m rulesvc.runtime.backtest_job PARENT_PID`, the job on stdin
(`runtime.backtests.Handoff`, msgpack). It compiles both versions, replays the window (`run_backtest`)
and writes progress and heartbeat to the job's document as it goes, then the report or the error. A
cancel request is seen at the next progress write. Exits with the parent (a worker killed with SIGKILL
takes its backtest along); the job then shows as `lost` once its heartbeat is old."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import structlog
from pymongo import AsyncMongoClient
from pymongo.errors import DocumentTooLarge, PyMongoError

from rulesvc.core.engine import CompiledRuleset
from rulesvc.replay.backtest import Progress, Version, run_backtest
from rulesvc.replay.simulate import LiveRuleset
from rulesvc.runtime.backtests import BEAT_EVERY, HANDOFF_DECODER, WRITE_EVERY, Handoff
from rulesvc.store.backtest_jobs import BacktestJobs
from rulesvc.store.db import Store

log = structlog.get_logger(__name__)


class Cancelled(Exception):
    """An operator asked to cancel the job."""


class Gone(Exception):
    """The job no longer runs (taken as lost, or ended by another process): nothing more to write."""


def progress_doc(p: Progress) -> dict[str, Any]:
    percent = 100.0 if p.total == 0 else round(min(p.replayed / p.total, 1.0) * 100, 1)
    eta = None if p.eta_seconds is None else round(p.eta_seconds, 1)
    return {"replayed": p.replayed, "total": p.total, "contacts": p.contacts, "percent": percent,
            "elapsed_seconds": round(p.elapsed_seconds, 1), "eta_seconds": eta}  # fmt: skip


class Reporter:
    """`run_backtest`'s progress callback: records the latest progress and writes it (with a heartbeat)
    at most once a second, reading back the cancel flag; raises at the next call once the job is to stop.
    `beat` writes a heartbeat every few seconds even when no progress comes (a slow read)."""

    def __init__(self, jobs: BacktestJobs, job_id: str) -> None:
        self.jobs = jobs
        self.job_id = job_id
        self.latest: Progress | None = None
        self.cancelled = False
        self.gone = False
        self._written = float("-inf")  # the first progress is written at once
        self._writing: asyncio.Task[None] | None = None

    def __call__(self, progress: Progress) -> None:
        if self.cancelled:
            raise Cancelled
        if self.gone:
            raise Gone
        self.latest = progress
        if time.monotonic() - self._written >= WRITE_EVERY and (
            self._writing is None or self._writing.done()
        ):
            self._written = time.monotonic()
            self._writing = asyncio.get_running_loop().create_task(self.write())

    async def write(self) -> None:
        try:
            doc = await self.jobs.beat(
                self.job_id, datetime.now(UTC), progress_doc(self.latest) if self.latest else None
            )
        except PyMongoError as exc:  # the next write may get through; the heartbeat's age tells
            log.warning("backtest.progress_not_written", job=self.job_id, error=repr(exc))
            return
        if doc is None:
            self.gone = True
        elif doc.get("cancel_requested"):
            self.cancelled = True

    async def beat(self) -> None:
        while True:
            await asyncio.sleep(BEAT_EVERY / 5)
            if time.monotonic() - self._written >= BEAT_EVERY:
                self._written = time.monotonic()
                await self.write()


def _version(label: str, sources: list[LiveRuleset], compiled: list[CompiledRuleset]) -> Version:
    """Compiled here (the process shares no C state with the worker); each kept in `compiled` to free."""
    mine: list[CompiledRuleset] = []
    for r in sources:
        mine.append(CompiledRuleset.compile(r.name, r.version, r.source))
        compiled.append(mine[-1])
    return Version(label, mine)


async def run(handoff: Handoff) -> int:
    from rulesvc.web.lifecycle import load_channels, send_policy

    settings = handoff.settings
    selection_ms = int(settings.mongodb_timeout_seconds * 1000)
    # No overall deadline per operation: the window's cursor lives as long as the replay.
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
        handoff.mongo_uri, tz_aware=True, serverSelectionTimeoutMS=selection_ms, appname="rulesvc-backtest"
    )
    store = Store(client, settings.database, timedelta(days=settings.event_retention_days))
    jobs = BacktestJobs(store)
    job_id = handoff.job_id
    compiled: list[CompiledRuleset] = []
    reporter = Reporter(jobs, job_id)
    beating: asyncio.Task[None] | None = None
    try:
        if not await jobs.started(job_id, datetime.now(UTC), os.getpid()):
            log.info("backtest.not_started", job=job_id, reason="cancelled or lost before it started")
            return 0
        beating = asyncio.create_task(reporter.beat())
        baseline = _version(handoff.baseline_label, handoff.baseline, compiled)
        candidate = _version(handoff.candidate_label, handoff.candidate, compiled)
        channels, _ = load_channels(settings)
        report = await run_backtest(
            store, baseline, candidate, channels, send_policy(settings), handoff.options, reporter
        )
        final = progress_doc(reporter.latest) if reporter.latest else None
        fields: dict[str, Any] = {"report": msgspec.to_builtins(report, builtin_types=(datetime,))}
        if final is not None:
            fields["progress"] = final
        try:
            await jobs.finish(job_id, "done", datetime.now(UTC), **fields)
        except DocumentTooLarge:
            error = "the report is over MongoDB's 16 MB document limit: ask for fewer examples"
            await jobs.finish(job_id, "failed", datetime.now(UTC), error=error)
        log.info("backtest.done", job=job_id, events=report.events, seconds=report.seconds)
    except Cancelled:
        await jobs.finish(job_id, "cancelled", datetime.now(UTC), error="cancelled by an operator")
        log.info("backtest.cancelled", job=job_id)
    except Gone:
        log.warning("backtest.gone", job=job_id, reason="the job was taken as lost or ended elsewhere")
    except Exception as exc:  # a plain message on the job; the traceback to the service log only
        log.exception("backtest.failed", job=job_id)
        await jobs.finish(job_id, "failed", datetime.now(UTC), error=f"{type(exc).__name__}: {exc}"[:2000])
    finally:
        if beating is not None:
            beating.cancel()
        for c in compiled:
            c.free()
        await client.close()
    return 0


def main(parent_pid: int) -> int:
    from rulesvc import logs
    from rulesvc.store.mongod import die_with_parent

    die_with_parent()  # a worker killed with SIGKILL takes its backtest along
    if os.getppid() != parent_pid:
        return 0  # the worker died before that took effect
    handoff = HANDOFF_DECODER.decode(sys.stdin.buffer.read())
    logs.configure(handoff.settings.log_format, handoff.settings.log_level)
    structlog.contextvars.bind_contextvars(backtest=handoff.job_id)
    return asyncio.run(run(handoff))


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1])))
