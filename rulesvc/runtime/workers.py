"""`rulesvc serve --workers N`: N processes share the port, one supervisor keeps them running.

Python runs one core per process, so a multi-core machine needs several processes to use its cores.
Each worker is a whole service (HTTP, inbox, scheduler, fan-out): they already work correctly side by
side on one database (contact leases, claimed schedule entries), so they need no coordination here.
The kernel spreads connections over the workers (SO_REUSEPORT). In the embedded mode the supervisor
runs the one mongod and hands its address to the workers, and starts it again if it dies.

Metrics are one view of the service: the workers write their values to files in a directory the
supervisor makes fresh at each start (PROMETHEUS_MULTIPROC_DIR, prometheus_client's multiprocess mode), and
a scrape, whichever worker it reaches, reads them all. A dead worker's counts stay in (counters never go
back); its files are marked dead.

A worker that dies is started again after a pause that doubles while it keeps dying, and the others
serve meanwhile. The supervisor gives up only on a fault that no restart cures: every worker failing
at start-up several times in a row.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any

import structlog
from prometheus_client.multiprocess import mark_process_dead

from rulesvc.config import GIVEN_METRICS_DIR, Settings
from rulesvc.metrics import MULTIPROC_ENV, WORKER_ENV
from rulesvc.store.mongod import (
    Backoff,
    EmbeddedMongod,
    MongodError,
    describe_exit,
    die_with_parent,
    pid_alive,
)

log = structlog.get_logger(__name__)

# A worker that exits this soon after its start did not start (database unreachable, a broken plugin...).
EARLY_EXIT_SECONDS = 10.0
# Every worker failing at start-up this many times in a row is a fault no restart cures: stop.
GIVE_UP_AFTER_FAILED_STARTS = 5


class PortInUse(RuntimeError):
    """The port is taken by another program (or another rulesvc)."""


def reserve_port(host: str, port: int, keep: bool) -> socket.socket | None:
    """Fail at once, naming the port, when another program listens there; else the workers would die
    one by one at start-up. The check is a plain bind (no SO_REUSEPORT), which fails beside any
    listener, another rulesvc's workers included. With `keep`, a socket then stays bound (SO_REUSEPORT,
    never listening, so it takes no connections): the supervisor's workers bind beside it, while any
    other program's plain bind, another rulesvc's check included, fails until this process exits."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    for reuse_port in (False, True) if keep else (False,):
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as aiohttp: TIME_WAIT is no obstacle
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            sock.close()
            raise PortInUse(f"port {port} on {host} is in use by another program ({exc.strerror})") from None
        if reuse_port:
            return sock
        sock.close()
    return None


def last_error(lines: Iterable[str]) -> str | None:
    """The most recent error a worker wrote to stderr: an error log line, the command's own sentence
    (`rulesvc: ...`), or the exception line that ends a traceback (`pymongo.errors.InvalidName: ...`)."""
    found: str | None = None
    in_traceback = False
    for line in lines:
        text = line.rstrip()
        if text.startswith("Traceback (most recent call last)"):
            in_traceback = True
        elif in_traceback and text and not text[0].isspace() and not text.startswith("During handling"):
            found, in_traceback = text, False
        elif text.startswith("{"):
            try:
                record = json.loads(text)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("level") in ("error", "critical"):
                detail = str(record.get("exception") or record.get("error") or "").strip().splitlines()
                found = f"{record.get('event')}: {detail[-1]}" if detail else str(record.get("event"))
        elif "[error" in text or "[critical" in text or text.startswith("rulesvc: "):  # console format
            found = text
    return found


@dataclass
class Worker:
    index: int
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    restart_at: float | None = None  # set while it waits to be started again
    failed_starts: int = 0  # deaths in a row, each within EARLY_EXIT_SECONDS of its start
    last_error: str | None = None
    backoff: Backoff = field(default_factory=lambda: Backoff(first=0.5, cap=30.0, stable=EARLY_EXIT_SECONDS))
    stderr: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=50))
    reader: threading.Thread | None = None


async def first_start(uri: str, settings: Settings, *, embedded: bool) -> None:
    """Once, before any worker starts: the schema checked and upgraded (a newer one stops the service
    here, with one clear message, rather than a crash loop of every worker), and with the embedded
    mongod the first API key handed out. An external MongoDB that does not answer yet is left to the
    workers, which wait for it as they always did."""
    from datetime import timedelta

    from pymongo import AsyncMongoClient
    from pymongo.errors import PyMongoError

    from rulesvc.store.db import Store
    from rulesvc.store.keys import Keys, hand_out_first_key
    from rulesvc.store.migrations import prepare

    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
        uri, tz_aware=True, serverSelectionTimeoutMS=3000 if embedded else 1000
    )
    days = timedelta(days=1)
    try:
        store = Store(
            client,
            settings.database,
            settings.event_retention_days * days,
            message_retention=settings.message_retention_days * days,
            count_stats=settings.stats,
        )
        await prepare(store, change_ttl=True)  # index builds within 120 s, a migration as long as it takes
        if embedded:
            await hand_out_first_key(Keys(client[settings.database]["api_keys"]))
    except PyMongoError as exc:
        if embedded:
            raise
        log.warning("mongodb.not_ready", error=f"{type(exc).__name__}: {exc}"[:500])
    finally:
        await client.close()


class Supervisor:
    def __init__(self, settings: Settings, workers: int, config_file: str | None) -> None:
        self.settings = settings
        self.count = workers
        self.config_file = config_file
        self.stopping = False
        self.env: dict[str, str] = {}
        self.metrics_dir: Path | None = None
        self._own_metrics_dir = False
        self._write_lock = threading.Lock()
        if settings.log_format == "auto" and sys.stderr.isatty():
            # Workers write through the supervisor's pipe: keep the terminal's readable format.
            self.env["RULESVC_LOG_FORMAT"] = "console"

    def _command(self) -> list[str]:
        command = [sys.executable, "-m", "rulesvc", "serve", "--workers", "1", "--reuse-port",
                   "--host", self.settings.host, "--port", str(self.settings.port)]  # fmt: skip
        if self.config_file:
            command += ["--config", self.config_file]
        return command

    def _metrics_dir(self) -> None:
        """A directory for the workers' metric files, empty at each start: a directory of your own
        (PROMETHEUS_MULTIPROC_DIR set) is emptied of its metric files; else a new temporary one, removed
        at the end. Files of an earlier run would add its counts to this one's."""
        given = os.environ.get(GIVEN_METRICS_DIR) or os.environ.get(MULTIPROC_ENV)
        if given:
            self.metrics_dir = Path(given)
            self.metrics_dir.mkdir(parents=True, exist_ok=True)
            for old in self.metrics_dir.glob("*.db"):
                old.unlink()
        else:  # of this supervisor's pid; those of supervisors killed before they removed theirs go now
            base = Path(tempfile.gettempdir())
            for old in base.glob("rulesvc-metrics-*"):
                owner = old.name.rpartition("-")[2]
                if owner.isdigit() and not pid_alive(int(owner)):
                    shutil.rmtree(old, ignore_errors=True)
            self.metrics_dir = base / f"rulesvc-metrics-{os.getpid()}"
            shutil.rmtree(self.metrics_dir, ignore_errors=True)
            self.metrics_dir.mkdir()
            self._own_metrics_dir = True
        self.env[MULTIPROC_ENV] = str(self.metrics_dir)

    def _spawn(self, worker: Worker) -> None:
        env = {**os.environ, **self.env, WORKER_ENV: str(worker.index)}
        # Started from the main thread, whose exit the parent-death signal is tied to. A worker whose
        # supervisor was killed goes at once, as after a crash: its leases run out and others take over
        # (a graceful stop is pointless with the embedded mongod going down beside it).
        worker.proc = subprocess.Popen(
            self._command(),
            env=env,
            stderr=subprocess.PIPE,
            preexec_fn=functools.partial(die_with_parent, signal.SIGKILL),
        )
        worker.started = time.monotonic()
        worker.restart_at = None
        worker.stderr.clear()
        assert worker.proc.stderr is not None
        worker.reader = threading.Thread(
            target=self._forward, args=(worker.proc.stderr, worker.stderr), daemon=True
        )
        worker.reader.start()
        log.info("worker.started", worker=worker.index, pid=worker.proc.pid)

    def _forward(self, pipe: IO[bytes], tail: collections.deque[str]) -> None:
        """A worker's log lines go on to the supervisor's stderr; the last ones are kept to say why it
        died, should it die."""
        for raw in pipe:
            with self._write_lock:
                sys.stderr.buffer.write(raw)
                sys.stderr.buffer.flush()
            tail.append(raw.decode(errors="replace"))
        pipe.close()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stopping = True

    def run(self) -> int:
        mongod: EmbeddedMongod | None = None
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        self._metrics_dir()
        try:
            if not self.settings.mongodb_uri:
                mongod = EmbeddedMongod(
                    self.settings.data_dir, self.settings.mongod_bin, cache_gb=self.settings.mongod_cache_gb
                )
                mongod.start()
                self.env["MONGODB_URI"] = mongod.uri
            uri = mongod.uri if mongod is not None else self.settings.mongodb_uri
            assert uri is not None
            asyncio.run(first_start(uri, self.settings, embedded=mongod is not None))
            return self._supervise(mongod)
        finally:
            if mongod is not None:
                mongod.stop()
            if self._own_metrics_dir and self.metrics_dir is not None:
                shutil.rmtree(self.metrics_dir, ignore_errors=True)

    def _supervise(self, mongod: EmbeddedMongod | None) -> int:
        workers = [Worker(i) for i in range(self.count)]
        for worker in workers:
            self._spawn(worker)
        log.info("workers.serving", workers=self.count, host=self.settings.host, port=self.settings.port)
        mongod_backoff = Backoff()
        mongod_restart_at: float | None = None
        failed = False
        while not self.stopping:
            time.sleep(0.1)
            now = time.monotonic()
            if mongod is not None:
                if mongod_restart_at is None and (code := mongod.exited()) is not None:
                    pause = mongod_backoff.after(now - mongod.started_at)
                    log.error("mongod.exited", why=describe_exit(code), restart_in=pause)
                    mongod_restart_at = now + pause
                if mongod_restart_at is not None and now >= mongod_restart_at and not self.stopping:
                    mongod_restart_at = self._restart_mongod(mongod, mongod_backoff)
            for worker in workers:
                if self.stopping:
                    break
                if worker.restart_at is not None:
                    if now >= worker.restart_at:
                        self._spawn(worker)
                    continue
                assert worker.proc is not None
                code = worker.proc.poll()
                if code is not None:
                    self._crashed(worker, code, now)
            if all(w.failed_starts >= GIVE_UP_AFTER_FAILED_STARTS and w.restart_at for w in workers):
                failed = self.stopping = True
        self._stop(workers)
        if failed:  # the last line an operator reads
            last = workers[-1]
            if last.reader is not None:
                last.reader.join(5.0)  # on a loaded machine its last words may still be on their way
            why = last_error(last.stderr) or last.last_error or "none written"
            print(
                f"rulesvc: every worker failed to start {GIVE_UP_AFTER_FAILED_STARTS} times in a row; "
                f"stopping. Last error: {why}",
                file=sys.stderr,
                flush=True,
            )
        return 1 if failed else 0

    def _restart_mongod(self, mongod: EmbeddedMongod, backoff: Backoff) -> float | None:
        """Start the dead mongod again (same port: the workers' clients reconnect by themselves)."""
        try:
            mongod.restart()
        except (MongodError, OSError) as exc:
            pause = backoff.after(0.0)
            log.error("mongod.restart_failed", error=str(exc)[:500], retry_in=pause)
            return time.monotonic() + pause
        log.info("mongod.restarted", port=mongod.port)
        return None

    def _crashed(self, worker: Worker, code: int, now: float) -> None:
        """Say which worker died and why, then schedule its restart after a growing pause."""
        assert worker.proc is not None
        if worker.reader is not None:
            worker.reader.join(5.0)  # its last words are still in the pipe (slow on a loaded machine)
        ran = now - worker.started
        worker.failed_starts = worker.failed_starts + 1 if ran < EARLY_EXIT_SECONDS else 0
        worker.last_error = last_error(worker.stderr)
        if self.metrics_dir is not None:
            # Its counters stay in the sum (a restart is no reset); its live-only gauges go.
            mark_process_dead(worker.proc.pid, str(self.metrics_dir))  # type: ignore[no-untyped-call]
        pause = worker.backoff.after(ran)
        log.error(
            "worker.crashed",
            worker=worker.index,
            pid=worker.proc.pid,
            why=describe_exit(code),
            last_error=worker.last_error,
            ran_seconds=round(ran, 1),
            restart_in=pause,
        )
        worker.restart_at = now + pause

    def _stop(self, workers: list[Worker]) -> None:
        """Each worker finishes its batch and sends in hand (shutdown grace), as a single process does."""
        running = [w.proc for w in workers if w.proc is not None and w.proc.poll() is None]
        for proc in running:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.settings.shutdown_grace_seconds + 30
        for worker in workers:
            if worker.proc is None:
                continue
            try:
                worker.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker.killed", worker=worker.index, reason="did not stop within the grace")
                worker.proc.kill()
                worker.proc.wait()
            if worker.reader is not None:
                worker.reader.join(2.0)
        log.info("workers.stopped")
