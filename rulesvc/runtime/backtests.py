"""Backtest jobs of the service: each runs in a process of its own (`rulesvc.runtime.backtest_job`), never
on a worker's event loop. A replay is minutes of CPU work: on the loop it would stop the worker's inbox,
schedule and lease renewals for as long as it ran.

The worker hands the process everything over stdin (msgpack): the settings, the MongoDB URI, both ruleset
versions as sources (the process compiles its own: it shares no C state with the worker), and the
options. The process writes its progress, heartbeat, report or error to the job's document; the worker
only watches it exit (a process that died without finishing fails its job with the exit code) and kills
it when the app stops (the job is then `cancelled`).

Also here, for the API and the CLI alike: the window's checks and a folder's rulesets, compiled by the
one validator (`compile_source`).
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
import structlog

from rulesvc.config import Settings
from rulesvc.core.engine import CompiledRuleset
from rulesvc.core.ruleformat import InvalidRuleset, RulesetError
from rulesvc.replay.backtest import Options, Window, window_of
from rulesvc.replay.simulate import LiveRuleset
from rulesvc.runtime.rulesets import compile_source, folder_problem, read_source, ruleset_files
from rulesvc.runtime.templates import Templates
from rulesvc.store.backtest_jobs import BacktestJobs

log = structlog.get_logger(__name__)

LOST_AFTER = timedelta(seconds=30)  # a job without a heartbeat this long is lost: its process died
WRITE_EVERY = 1.0  # seconds: the job's thread writes its heartbeat (with the progress) this often
FUTURE_SLACK = timedelta(minutes=1)  # clocks differ: `until` a little ahead of now is now


class Handoff(msgspec.Struct):
    """What a worker hands a job's process over stdin."""

    job_id: str
    settings: Settings
    mongo_uri: str
    baseline_label: str
    baseline: list[LiveRuleset]
    candidate_label: str
    candidate: list[LiveRuleset]
    options: Options


HANDOFF_ENCODER = msgspec.msgpack.Encoder()
HANDOFF_DECODER = msgspec.msgpack.Decoder(Handoff)


def owner() -> str:
    """Which worker started a job: host and process id."""
    return f"{socket.gethostname()}:{os.getpid()}"


# --- what is asked ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WindowProblem:
    field: str  # since, from or until
    message: str


def backtest_window(
    since: str | None,
    start: datetime | None,
    until: datetime | None,
    now: datetime,
    retention: timedelta,
) -> Window | WindowProblem:
    """The window asked, or what is wrong with it: both a duration and a start, a start after the end,
    an end in the future, a start beyond the event retention (those events are gone)."""
    if since is not None and start is not None:
        return WindowProblem("from", "give either a duration (`since`) or a start time (`from`), not both")
    if start is not None and start > now + FUTURE_SLACK:
        return WindowProblem("from", "is in the future: there are no events to replay yet")
    if until is not None and until > now + FUTURE_SLACK:
        return WindowProblem("until", "is in the future: a backtest replays events that happened")
    try:
        window = window_of(since, start, min(until, now) if until is not None else None, now)
    except OverflowError:  # the year 1, less a duration or an offset
        field = "from" if start is not None else "until" if until is not None else "since"
        return WindowProblem(field, "reaches back before the first date a window can hold")
    except ValueError as exc:
        text = str(exc)
        if text.startswith("since: "):
            return WindowProblem("since", text.removeprefix("since: "))
        return WindowProblem("until" if until is not None else "from" if start is not None else "since", text)
    if window.start < now - retention:
        days = f"{retention.total_seconds() / 86400:g}"
        return WindowProblem(
            "from" if start is not None else "since",
            f"the window starts {window.start:%Y-%m-%dT%H:%M:%SZ}, beyond the event retention of {days} "
            "days (RULESVC_EVENT_RETENTION_DAYS): older events are deleted",
        )
    return window


def usable_folder(directory: Path) -> str | None:
    """Why a folder gives no rulesets (`folder_problem`), a path the system refuses (a NUL byte, a name
    too long) included, as a sentence."""
    try:
        return folder_problem(directory)
    except (OSError, ValueError) as exc:
        why = getattr(exc, "strerror", None) or str(exc)
        return f"cannot read the folder `{str(directory)[:200]}`: {why}"


def compile_folder(
    directory: Path, channels: frozenset[str], templates: Templates | None
) -> tuple[list[CompiledRuleset], list[RulesetError]]:
    """Every ruleset of a folder through the one validator, as `rulesvc check` and the loader take them:
    the compiled ones, and every error of the others (the caller frees the compiled ones)."""
    compiled: list[CompiledRuleset] = []
    errors: list[RulesetError] = []
    for path in ruleset_files(directory).values():
        try:
            compiled.append(compile_source(path, read_source(path), channels, templates))
        except InvalidRuleset as exc:
            errors.extend(exc.errors)
    return compiled, errors


# --- the worker's side -------------------------------------------------------------------------------------


class BacktestRunner:
    """The backtest processes a worker started: at most one at a time per service (the job documents see
    to that), watched until they exit."""

    def __init__(self, jobs: BacktestJobs) -> None:
        self.jobs = jobs
        self._running: dict[str, asyncio.subprocess.Process] = {}
        self._watchers: set[asyncio.Task[None]] = set()

    def pid(self, job_id: str) -> int | None:
        proc = self._running.get(job_id)
        return proc.pid if proc is not None and proc.returncode is None else None

    async def start(self, handoff: Handoff) -> None:
        """Starts the job's process and hands it the job; raises OSError if it cannot be started (the
        job is then failed)."""
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "rulesvc.runtime.backtest_job",
                str(os.getpid()),
                stdin=asyncio.subprocess.PIPE,
            )
            assert proc.stdin is not None
            proc.stdin.write(HANDOFF_ENCODER.encode(handoff))
            await proc.stdin.drain()
            proc.stdin.close()
        except (OSError, ConnectionError) as exc:
            await self.jobs.finish(handoff.job_id, "failed", datetime.now(UTC),
                                   error=f"the backtest process could not be started: {exc}")  # fmt: skip
            raise
        log.info("backtest.started", job=handoff.job_id, pid=proc.pid)
        self._running[handoff.job_id] = proc
        watcher = asyncio.create_task(self._watch(handoff.job_id, proc), name=f"backtest-{handoff.job_id}")
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watchers.discard)

    async def _watch(self, job_id: str, proc: asyncio.subprocess.Process) -> None:
        code = await proc.wait()
        self._running.pop(job_id, None)
        # The process finishes its job itself; one that died before (killed, out of memory) could not.
        error = f"the backtest process stopped without a result (exit code {code})"
        if await self.jobs.finish(job_id, "failed", datetime.now(UTC), error=error):
            log.error("backtest.process_died", job=job_id, returncode=code)
        else:
            log.info("backtest.process_ended", job=job_id, returncode=code)

    async def close(self) -> None:
        """The app stops: running backtests are killed and their jobs cancelled."""
        for watcher in list(self._watchers):
            watcher.cancel()
        for job_id, proc in list(self._running.items()):
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            await self.jobs.finish(job_id, "cancelled", datetime.now(UTC), error="the service stopped")
            log.warning("backtest.cancelled_by_shutdown", job=job_id)
        self._running.clear()
