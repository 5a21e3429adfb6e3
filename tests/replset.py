"""A three-member MongoDB replica set on loopback, from the binary the embedded mongod uses: for the
scale-out test (tests/test_scale_out.py) and its benchmark (bench/scale_bench.py), which kill and
restart members of it as a real deployment's operators or failures would."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from pymongo import MongoClient
from pymongo.errors import PyMongoError

from rulesvc.store.mongod import die_with_parent, find_mongod, free_port

# An election takes about `electionTimeoutMillis` after the primary stops answering heartbeats; mongod's
# 10 s default would make every failover in a test a long wait.
ELECTION_TIMEOUT_MS = 2000
HEARTBEAT_MS = 500


class Member:
    """One mongod of the set: its own port and data, restartable on both after a kill."""

    def __init__(self, index: int, folder: Path, binary: str, replset: str, cache_gb: float) -> None:
        self.index = index
        self.folder = folder
        self.dbpath = folder / "db"
        self.port = free_port()
        self.binary = binary
        self.replset = replset
        self.cache_gb = cache_gb
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def spawn(self) -> None:
        self.dbpath.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                self.binary,
                "--replSet", self.replset,
                "--bind_ip", "127.0.0.1",
                "--port", str(self.port),
                "--dbpath", str(self.dbpath),
                "--wiredTigerCacheSizeGB", str(self.cache_gb),
                "--wiredTigerEngineConfigString", "log=(prealloc=false,file_max=20MB)",
                "--logpath", str(self.folder / "mongod.log"),
                "--logappend",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=die_with_parent,  # a killed test leaves no mongod behind
        )  # fmt: skip

    def client(self) -> MongoClient[dict[str, Any]]:
        return MongoClient(
            f"mongodb://{self.host}/?directConnection=true",
            serverSelectionTimeoutMS=1000,
            connectTimeoutMS=1000,
        )

    def wait_answering(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        with self.client() as client:
            while True:
                assert self.process is not None
                if self.process.poll() is not None:
                    log = (self.folder / "mongod.log").read_text(errors="replace").splitlines()[-5:]
                    raise RuntimeError(f"mongod {self.host} exited with {self.process.returncode}: {log}")
                with contextlib.suppress(PyMongoError):
                    client.admin.command("ping")
                    return
                if time.monotonic() > deadline:
                    raise TimeoutError(f"mongod {self.host} did not answer within {timeout:.0f} s")
                time.sleep(0.05)

    def state(self) -> str:
        """PRIMARY, SECONDARY, RECOVERING, ... as this member sees itself; DOWN when it does not answer."""
        if self.process is None or self.process.poll() is not None:
            return "DOWN"
        with self.client() as client:
            try:
                status = client.admin.command("replSetGetStatus")
            except PyMongoError:
                return "DOWN"
        return str(next(m["stateStr"] for m in status["members"] if m.get("self")))

    def writable(self) -> bool:
        with self.client() as client:
            try:
                return bool(client.admin.command("hello").get("isWritablePrimary"))
            except PyMongoError:
                return False

    def kill(self) -> None:
        """SIGKILL: a machine that loses power; the journal is all that survives."""
        assert self.process is not None
        self.process.kill()
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class ReplicaSet:
    """Three mongods on loopback ports, each with its own data folder under `folder`.

    Member 0 is initiated with the highest priority so that it is the first primary, then every priority
    is set equal: a killed member 0 that comes back rejoins as a secondary instead of taking the primary
    back (a second election the test did not ask for)."""

    def __init__(
        self, folder: Path, name: str = "rs-scale", members: int = 3, cache_gb: float = 0.25
    ) -> None:
        binary = find_mongod(None)
        self.name = name
        self.members = [Member(i, folder / f"m{i}", binary, name, cache_gb) for i in range(members)]

    @property
    def uri(self) -> str:
        """What a deployment gives each rulesvc: every member, so the driver follows the primary."""
        return f"mongodb://{','.join(m.host for m in self.members)}/?replicaSet={self.name}"

    def start(self, timeout: float = 90.0) -> float:
        """Starts every member and initiates the set; the seconds until it had a primary and secondaries."""
        t0 = time.monotonic()
        try:
            for member in self.members:
                member.spawn()
            for member in self.members:
                member.wait_answering(timeout)
            first = self.members[0]
            config = {
                "_id": self.name,
                "members": [
                    {"_id": m.index, "host": m.host, "priority": 2 if m.index == 0 else 1}
                    for m in self.members
                ],
                "settings": {
                    "electionTimeoutMillis": ELECTION_TIMEOUT_MS,
                    "heartbeatIntervalMillis": HEARTBEAT_MS,
                },
            }
            with first.client() as client:
                client.admin.command("replSetInitiate", config)
            # PRIMARY is said before the member takes writes (it drains what it replicated first).
            self.wait_for(first.writable, timeout, "member 0 writable primary")
            with first.client() as client:
                config = client.admin.command("replSetGetConfig")["config"]
                for m in config["members"]:
                    m["priority"] = 1
                config["version"] += 1
                client.admin.command("replSetReconfig", config)
            self.wait_healthy(timeout)
        except BaseException:
            self.stop()
            raise
        return time.monotonic() - t0

    def states(self) -> list[str]:
        return [m.state() for m in self.members]

    def primary(self) -> Member | None:
        return next((m for m in self.members if m.state() == "PRIMARY"), None)

    def wait_healthy(self, timeout: float = 90.0) -> None:
        """One primary, every other member a secondary."""
        self.wait_for(
            lambda: sorted(self.states()) == ["PRIMARY"] + ["SECONDARY"] * (len(self.members) - 1),
            timeout,
            "one primary and secondaries",
        )

    def wait_for(self, check: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                raise TimeoutError(f"replica set: no {what} within {timeout:.0f} s: {self.states()}")
            time.sleep(0.1)

    def stop(self) -> None:
        for member in self.members:
            member.stop()

    def __enter__(self) -> ReplicaSet:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
