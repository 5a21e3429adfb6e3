"""`rulesvc serve --workers N`: real worker processes sharing one port, a real mongod, a real receiver."""

from __future__ import annotations

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
from pymongo import MongoClient

from rulesvc.mongod import EmbeddedMongod, live_children, pid_alive
from tests.service import ServiceProcess
from tests.webhook_flow import Receiver, env_for, flow, settle

pytestmark = pytest.mark.slow


def gone_within(pids: set[int], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not any(pid_alive(p) for p in pids):
            return True
        time.sleep(0.1)
    return False


def accepted_by_the_worker_reached(service: ServiceProcess) -> float:
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
    service = ServiceProcess(tmp_path, env=env_for(flow(tmp_path), receiver), workers=3)
    service.start()
    try:
        assert service.log().count("rsk_") == 1  # one first-start key, from the supervisor
        assert service.proc is not None
        workers = live_children(service.proc.pid) - {service.mongod_pid()}
        assert len(workers) == 3
        assert post_concurrently(service, range(420)) == 420
        with MongoClient(EmbeddedMongod(tmp_path / ".rulesvc").running_uri()) as client:
            db = client["rulesvc"]
            settle(db, 420)
            assert {c["state"]["counters"]["orders"]["n"] for c in db.contacts.find({})} == {60}
            assert Counter(m["status"] for m in db.messages.find({})) == Counter({"sent": 420})
        assert len(receiver.raw) == 420 and set(receiver.raw.values()) == {1}  # none twice
        # Each worker counts the events it accepted (/metrics is per worker; each scrape is a new
        # connection the kernel hands to any of them): the requests were spread over the workers.
        counts = {accepted_by_the_worker_reached(service) for _ in range(20)}
        assert len(counts) > 1 and max(counts) < 420, "the requests were not shared by the workers"

        killed = min(workers)
        os.kill(killed, signal.SIGKILL)  # a worker crashes: it is replaced, the service goes on

        def replaced() -> set[int]:
            assert service.proc is not None
            return live_children(service.proc.pid) - {service.mongod_pid()}

        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and (killed in replaced() or len(replaced()) < 3):
            time.sleep(0.1)
        now_serving = replaced()
        assert len(now_serving) == 3 and killed not in now_serving
        assert post_concurrently(service, range(420, 490)) == 70

        mongod = service.mongod_pid()
        assert service.signal(signal.SIGTERM) == 0
        assert gone_within(now_serving | {mongod}, 5)
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
    assert gone_within(family, 10)
    service.start()  # a fresh start on the same data: nothing acknowledged is lost
    try:
        with MongoClient(EmbeddedMongod(tmp_path / ".rulesvc").running_uri()) as client:
            settle(client["rulesvc"], 50)
            assert (
                sum(c["state"]["counters"]["orders"]["n"] for c in client["rulesvc"].contacts.find({})) == 50
            )
        assert len(receiver.raw) == 50
    finally:
        service.stop()


def test_a_taken_port_stops_the_supervisor_with_a_clear_error(tmp_path: Path, receiver: Receiver) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        service = ServiceProcess(tmp_path, env=env_for(flow(tmp_path), receiver), workers=2)
        service.port = taken.getsockname()[1]
        with pytest.raises(RuntimeError, match="exited with 1"):
            service.start(timeout=60)
    assert "failed to start 3 times; stopping" in service.log()
    assert not (tmp_path / ".rulesvc" / "mongod.pid").exists() or not pid_alive(service.mongod_pid())
