"""One backtest job's process: `python -m rulesvc.runtime.backtest_job PARENT_PID`, the job on stdin
(`runtime.backtests.Handoff`, msgpack). It compiles both versions, replays the window (`run_backtest`)
and writes progress and heartbeat to the job's document as it goes, then the report or the error. A
cancel request is seen at the next progress write. Exits with the parent (a worker killed with SIGKILL
takes its backtest along); the job then shows as `lost` once its heartbeat is old."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import structlog
from pymongo import AsyncMongoClient, MongoClient
from pymongo.errors import DocumentTooLarge, PyMongoError

from rulesvc.channels import ChannelRegistry
from rulesvc.config import Settings
from rulesvc.core.engine import CompiledRuleset
from rulesvc.core.sendpolicy import SendPolicy
from rulesvc.replay.backtest import Progress, Version, run_backtest
from rulesvc.replay.simulate import LiveRuleset
from rulesvc.runtime.backtests import HANDOFF_DECODER, WRITE_EVERY, Handoff
from rulesvc.store.backtest_jobs import BacktestJobs, Heartbeats
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


class Reporter(threading.Thread):
    """`run_backtest`'s progress callback, and the thread that writes the latest progress with a
    heartbeat every WRITE_EVERY seconds, reading back the cancel flag; the callback raises at its next
    call once the job is to stop. A thread with a synchronous client, not an asyncio task: the replay
    of a batch never awaits, and a task would not beat until it ended (a batch over LOST_AFTER got the
    job taken as lost, and a second job admitted beside it)."""

    def __init__(self, heartbeats: Heartbeats, job_id: str) -> None:
        super().__init__(name="backtest-heartbeat", daemon=True)
        self.heartbeats = heartbeats
        self.job_id = job_id
        self.latest: Progress | None = None  # set by the loop's thread, read by this one
        self.cancelled = False
        self.gone = False
        self._stopping = threading.Event()

    def __call__(self, progress: Progress) -> None:
        if self.cancelled:
            raise Cancelled
        if self.gone:
            raise Gone
        self.latest = progress

    def run(self) -> None:
        while not self._stopping.wait(WRITE_EVERY):
            self.write()

    def write(self) -> None:
        latest = self.latest
        try:
            doc = self.heartbeats.beat(
                self.job_id, datetime.now(UTC), progress_doc(latest) if latest else None
            )
        except PyMongoError as exc:  # the next write may get through; the heartbeat's age tells
            log.warning("backtest.progress_not_written", job=self.job_id, error=repr(exc))
            return
        if doc is None:
            self.gone = True
        elif doc.get("cancel_requested"):
            self.cancelled = True

    def stop(self) -> None:
        self._stopping.set()
        if self.is_alive():
            self.join()


def _version(label: str, sources: list[LiveRuleset], compiled: list[CompiledRuleset]) -> Version:
    """Compiled here (the process shares no C state with the worker); each kept in `compiled` to free."""
    mine: list[CompiledRuleset] = []
    for r in sources:
        mine.append(CompiledRuleset.compile(r.name, r.version, r.source))
        compiled.append(mine[-1])
    return Version(label, mine)


def _send_rules(settings: Settings) -> tuple[ChannelRegistry, SendPolicy]:
    from rulesvc.web.lifecycle import load_channels, send_policy

    return load_channels(settings)[0], send_policy(settings)


def _connect(handoff: Handoff) -> tuple[Store, Reporter]:
    """The clients, made in a frame of their own: the URI holds the MongoDB password."""
    settings = handoff.settings
    selection_ms = int(settings.mongodb_timeout_seconds * 1000)
    # No overall deadline per operation: the window's cursor lives as long as the replay.
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
        handoff.mongo_uri, tz_aware=True, serverSelectionTimeoutMS=selection_ms, appname="rulesvc-backtest"
    )
    store = Store(client, settings.database, timedelta(days=settings.event_retention_days))
    # Each heartbeat has a deadline: a paused server must not hold the thread (nor the job's end) long.
    beating: MongoClient[dict[str, Any]] = MongoClient(
        handoff.mongo_uri, tz_aware=True, serverSelectionTimeoutMS=selection_ms, timeoutMS=selection_ms,
        appname="rulesvc-backtest-heartbeat",
    )  # fmt: skip
    return store, Reporter(Heartbeats(beating, settings.database), handoff.job_id)


async def run(handoff: Handoff) -> int:
    """The settings (channel secrets) and the URI live in `handoff` only until the work starts."""
    store, reporter = _connect(handoff)
    jobs = BacktestJobs(store)
    job_id = handoff.job_id
    compiled: list[CompiledRuleset] = []
    try:
        if not await jobs.started(job_id, datetime.now(UTC), os.getpid()):
            log.info("backtest.not_started", job=job_id, reason="cancelled or lost before it started")
            return 0
        reporter.start()
        baseline = _version(handoff.baseline_label, handoff.baseline, compiled)
        candidate = _version(handoff.candidate_label, handoff.candidate, compiled)
        channels, policy = _send_rules(handoff.settings)
        options = handoff.options
        del handoff
        report = await run_backtest(store, baseline, candidate, channels, policy, options, reporter)
        reporter.stop()  # no heartbeat after the end
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
    except Exception as exc:  # a plain message on the job; the traceback (never with locals) to the log
        log.exception("backtest.failed", job=job_id)
        await jobs.finish(job_id, "failed", datetime.now(UTC), error=f"{type(exc).__name__}: {exc}"[:2000])
    finally:
        reporter.stop()
        reporter.heartbeats.close()
        for c in compiled:
            c.free()
        await store.client.close()
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
    job = run(handoff)
    del handoff  # `run` drops it once read: no frame keeps the secrets for the replay's length
    return asyncio.run(job)


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1])))
