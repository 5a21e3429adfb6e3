"""`rulesvc serve --workers N`: real worker processes sharing one port, a real mongod, a real receiver."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from rulesvc.store.mongod import EmbeddedMongod, live_children, pid_alive
from tests.helpers import counts_per_worker, wait_for
from tests.service import ServiceProcess
from tests.webhook_flow import Receiver, env_for, flow, settle

pytestmark = pytest.mark.slow


def all_gone(pids: set[int]) -> None:
    wait_for(lambda: not any(pid_alive(p) for p in pids), what=f"processes {sorted(pids)} gone")


def accepted_by_the_worker_reached(service: ServiceProcess) -> float:
    """What a scrape says, whichever worker it reaches: since /metrics adds up every worker, the total."""
    with urllib.request.urlopen(service.url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    found = re.search(r'^rulesvc_events_total\{outcome="accepted"\} (\S+)$', text, re.M)
    assert found is not None, text
    return float(found.group(1))


def post_concurrently(service: ServiceProcess, ids: range) -> int:
    """A connection per request from 16 threads, so the kernel spreads them over the workers."""

    def post(n: int) -> bool:
        event = {"id": f"w{n}", "type": "order", "contact_id": f"c{n % 7}", "attributes": {"n": n}}
        return service.request("POST", "/v1/events", event)[0] == 202

    with ThreadPoolExecutor(16) as pool:
        return sum(pool.map(post, ids))


def test_workers_share_the_port_and_decide_and_send_each_event_once(
    tmp_path: Path, receiver: Receiver
) -> None:
    metrics_dir = tmp_path / "metrics"
    env = {**env_for(flow(tmp_path), receiver), "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    service = ServiceProcess(tmp_path, env=env, workers=3)
    service.start()
    try:
        assert service.log().count("rsk_") == 1  # one first-start key, from the supervisor
        assert service.proc is not None
        workers = live_children(service.proc.pid) - {service.mongod_pid()}
        assert len(workers) == 3
        assert post_concurrently(service, range(420)) == 420
        with service.db() as db:
            settle(db, 420)
            assert {c["state"]["counters"]["orders"]["n"] for c in db.contacts.find({})} == {60}
            assert Counter(m["status"] for m in db.messages.find({})) == Counter({"sent": 420})
        assert len(receiver.raw) == 420 and set(receiver.raw.values()) == {1}  # none twice
        # Each worker counts the events it accepted in its own file: the requests were spread over them.
        counts = counts_per_worker(metrics_dir, "rulesvc_events_total", '"accepted"')
        assert len([n for n in counts.values() if n]) > 1 and max(counts.values()) < 420, counts
        assert {accepted_by_the_worker_reached(service) for _ in range(10)} == {420.0}  # one view

        killed = min(workers)
        os.kill(killed, signal.SIGKILL)  # a worker crashes: it is replaced, the service goes on

        def replaced() -> set[int]:
            assert service.proc is not None
            return live_children(service.proc.pid) - {service.mongod_pid()}

        def serving_again() -> set[int] | None:
            found = replaced()
            return found if killed not in found and len(found) >= 3 else None

        now_serving = wait_for(serving_again, what="the killed worker replaced")
        assert len(now_serving) == 3 and killed not in now_serving
        assert post_concurrently(service, range(420, 490)) == 70
        # The dead worker's counts stay in: no scrape goes back below what was accepted.
        assert {accepted_by_the_worker_reached(service) for _ in range(10)} == {490.0}

        mongod = service.mongod_pid()
        assert service.signal(signal.SIGTERM) == 0
        all_gone(now_serving | {mongod})
    finally:
        service.stop()


def test_killing_the_supervisor_takes_its_workers_and_mongod_with_it(
    tmp_path: Path, receiver: Receiver
) -> None:
    service = ServiceProcess(tmp_path, env=env_for(flow(tmp_path), receiver), workers=2)
    service.start()
    assert service.proc is not None
    family = live_children(service.proc.pid)
    assert len(family) == 3  # two workers and mongod
    assert post_concurrently(service, range(50)) == 50
    service.signal(signal.SIGKILL)
    all_gone(family)
    service.start()  # a fresh start on the same data: nothing acknowledged is lost
    try:
        with service.db() as db:
            settle(db, 50)
            assert sum(c["state"]["counters"]["orders"]["n"] for c in db.contacts.find({})) == 50
        assert len(receiver.raw) == 50
    finally:
        service.stop()


def test_a_taken_port_is_named_at_once_and_no_second_service_shares_it(
    tmp_path: Path, receiver: Receiver
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        refused = ServiceProcess(tmp_path).cli("serve", "--port", str(port), "--workers", "2")
    assert refused.returncode == 1
    assert f"port {port} on 127.0.0.1 is in use by another program" in refused.stderr
    assert not (tmp_path / ".rulesvc" / "mongod.pid").exists()  # refused before starting anything

    # Another rulesvc (its own data) on a serving one's port: its workers would have bound beside
    # the first one's through SO_REUSEPORT and taken half its requests.
    first = ServiceProcess(tmp_path / "first", env=env_for(flow(tmp_path), receiver), workers=2)
    first.workdir.mkdir()
    first.start()
    try:
        other = ServiceProcess(tmp_path / "other", workers=2)
        other.workdir.mkdir()
        refused = other.cli("serve", "--port", str(first.port), "--workers", "2")
        assert refused.returncode == 1
        assert f"port {first.port} on 127.0.0.1 is in use by another program" in refused.stderr
        assert first.request("GET", "/readyz")[0] == 200
    finally:
        first.stop()


def started_pids(service: ServiceProcess, worker: int) -> list[int]:
    return [x["pid"] for x in service.log_lines() if x["event"] == "worker.started" and x["worker"] == worker]


def test_a_worker_that_keeps_dying_is_restarted_with_growing_pauses_while_the_other_serves(
    tmp_path: Path, receiver: Receiver
) -> None:
    service = ServiceProcess(tmp_path, env=env_for(flow(tmp_path), receiver), workers=2)
    service.start()
    try:
        posted = 0
        for _ in range(4):  # it used to take the whole service down at the third quick death
            pids = started_pids(service, 0)
            os.kill(pids[-1], signal.SIGKILL)
            deadline = time.monotonic() + 60
            while len(started_pids(service, 0)) == len(pids):
                assert time.monotonic() < deadline, "worker 0 was not started again"
                # Meanwhile the other worker serves (a connection the dying one held may be reset).
                with contextlib.suppress(OSError):
                    posted += service.request("POST", "/v1/events", order(posted))[0] == 202
                time.sleep(0.05)
        assert service.proc is not None and service.proc.poll() is None
        assert post_concurrently(service, range(1000, 1070)) == 70
        crashed = [x for x in service.log_lines() if x["event"] == "worker.crashed"]
        assert [(x["worker"], x["why"]) for x in crashed] == [(0, "signal SIGKILL")] * 4
        assert [x["restart_in"] for x in crashed] == [0.5, 1.0, 2.0, 4.0]
        assert posted > 0
    finally:
        service.stop()


def order(n: int) -> dict[str, object]:
    return {"id": f"k{n}", "type": "order", "contact_id": f"c{n % 7}", "attributes": {"n": n}}


def test_every_worker_failing_at_start_up_stops_the_service_with_the_reason(
    tmp_path: Path, mongod: EmbeddedMongod
) -> None:
    """A fault no restart cures (here a database name MongoDB refuses, found only when a worker opens
    it): the supervisor gives up after a few tries per worker, and says why."""
    service = ServiceProcess(
        tmp_path, env={"MONGODB_URI": mongod.uri, "RULESVC_DATABASE": "no/slash"}, workers=2
    )
    with pytest.raises(RuntimeError, match="exited with 1"):
        service.start(timeout=90)
    log = service.log()
    assert "every worker failed to start 5 times in a row; stopping" in log
    assert "InvalidName" in log.splitlines()[-1]  # the last error, in the last line
    crashed = [x for x in service.log_lines() if x["event"] == "worker.crashed"]
    assert {x["worker"] for x in crashed} == {0, 1} and all(x["why"] == "exit code 1" for x in crashed)
