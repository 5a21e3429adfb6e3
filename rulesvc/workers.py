"""`rulesvc serve --workers N`: N processes share the port, one supervisor keeps them running.

Python runs one core per process, so a multi-core machine needs several processes to use its cores.
Each worker is a whole service (HTTP, inbox, scheduler, fan-out): they already work correctly side by
side on one database (contact leases, claimed schedule entries), so they need no coordination here.
The kernel spreads connections over the workers (SO_REUSEPORT). In the embedded mode the supervisor
runs the one mongod and hands its address to the workers.
"""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import structlog

from rulesvc.config import Settings
from rulesvc.mongod import EmbeddedMongod, die_with_parent

log = structlog.get_logger(__name__)

# A worker that exits this soon after its start did not start (port taken, database unreachable...).
EARLY_EXIT_SECONDS = 10.0
GIVE_UP_AFTER_EARLY_EXITS = 3


@dataclass
class Worker:
    index: int
    proc: subprocess.Popen[bytes]
    started: float = field(default_factory=time.monotonic)
    early_exits: int = 0


async def first_start(uri: str, settings: Settings) -> None:
    from pymongo import AsyncMongoClient

    from rulesvc.auth import Keys, hand_out_first_key

    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(uri, tz_aware=True)
    try:
        await hand_out_first_key(Keys(client[settings.database]["api_keys"]))
    finally:
        await client.close()


class Supervisor:
    def __init__(self, settings: Settings, workers: int, config_file: str | None) -> None:
        self.settings = settings
        self.count = workers
        self.config_file = config_file
        self.stopping = False
        self.env: dict[str, str] = {}

    def _command(self) -> list[str]:
        command = [sys.executable, "-m", "rulesvc", "serve", "--workers", "1", "--reuse-port",
                   "--host", self.settings.host, "--port", str(self.settings.port)]  # fmt: skip
        if self.config_file:
            command += ["--config", self.config_file]
        return command

    def _spawn(self, index: int, early_exits: int = 0) -> Worker:
        env = {**os.environ, **self.env, "RULESVC_WORKER_INDEX": str(index)}
        # Started from the main thread, whose exit the parent-death signal is tied to. A worker whose
        # supervisor was killed goes at once, as after a crash: its leases run out and others take over
        # (a graceful stop is pointless with the embedded mongod going down beside it).
        proc = subprocess.Popen(
            self._command(), env=env, preexec_fn=functools.partial(die_with_parent, signal.SIGKILL)
        )
        log.info("worker.started", worker=index, pid=proc.pid)
        return Worker(index, proc, early_exits=early_exits)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stopping = True

    def run(self) -> int:
        mongod: EmbeddedMongod | None = None
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        try:
            if not self.settings.mongodb_uri:
                mongod = EmbeddedMongod(
                    self.settings.data_dir, self.settings.mongod_bin, cache_gb=self.settings.mongod_cache_gb
                )
                mongod.start()
                self.env["MONGODB_URI"] = mongod.uri
                asyncio.run(first_start(mongod.uri, self.settings))
            return self._supervise()
        finally:
            if mongod is not None:
                mongod.stop()

    def _supervise(self) -> int:
        workers = [self._spawn(i) for i in range(self.count)]
        log.info("workers.serving", workers=self.count, host=self.settings.host, port=self.settings.port)
        failed = False
        while not self.stopping:
            time.sleep(0.1)
            for n, worker in enumerate(workers):
                code = worker.proc.poll()
                if code is None or self.stopping:
                    continue
                early = time.monotonic() - worker.started < EARLY_EXIT_SECONDS
                early_exits = worker.early_exits + 1 if early else 0
                log.error("worker.exited", worker=worker.index, pid=worker.proc.pid, code=code)
                if early_exits >= GIVE_UP_AFTER_EARLY_EXITS:
                    print(f"rulesvc: worker {worker.index} failed to start {early_exits} times; stopping",
                          file=sys.stderr)  # fmt: skip
                    failed = self.stopping = True
                    break
                time.sleep(min(2.0**early_exits * 0.25, 5.0))
                workers[n] = self._spawn(worker.index, early_exits)
        self._stop(workers)
        return 1 if failed else 0

    def _stop(self, workers: list[Worker]) -> None:
        """Each worker finishes its batch and sends in hand (shutdown grace), as a single process does."""
        for worker in workers:
            if worker.proc.poll() is None:
                worker.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.settings.shutdown_grace_seconds + 30
        for worker in workers:
            try:
                worker.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker.killed", worker=worker.index, reason="did not stop within the grace")
                worker.proc.kill()
                worker.proc.wait()
        log.info("workers.stopped")
