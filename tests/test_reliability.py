"""Crashes and several processes, with real processes, a real mongod and a real HTTP receiver:
every acknowledged event is evaluated exactly once and every message is delivered exactly once."""

from __future__ import annotations

import random
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from pymongo import MongoClient

from rulesvc.store.mongod import EmbeddedMongod
from tests.helpers import wait_for
from tests.service import ServiceProcess
from tests.webhook_flow import Receiver, env_for, flow, post_orders, settle

pytestmark = pytest.mark.slow


def test_kill_9_again_and_again_loses_nothing_and_sends_nothing_twice(
    tmp_path: Path, receiver: Receiver
) -> None:
    rulesets = flow(tmp_path)
    service = ServiceProcess(tmp_path, env=env_for(rulesets, receiver))
    rng = random.Random(7)
    acked: list[dict[str, Any]] = []
    kills = 0
    for _ in range(10):
        service.start()
        acked += post_orders(service, len(acked) * 10 + kills * 1000, rng.randint(5, 25))
        time.sleep(rng.uniform(0.0, 1.6))  # sometimes before the sends are due, sometimes mid-send
        service.signal(signal.SIGKILL)
        kills += 1
    service.start()
    try:
        with service.db() as db:
            settle(db, len(acked))
            counts = {c["_id"]: c["state"]["counters"]["orders"]["n"] for c in db.contacts.find({})}
            expected = Counter(e["contact_id"] for e in acked)
            assert counts == dict(expected)  # every acknowledged event evaluated exactly once
            statuses = {m["_id"]: m["status"] for m in db.messages.find({})}
        assert len(statuses) == len(acked) and set(statuses.values()) <= {"sent", "uncertain"}
        # The webhook channel de-duplicates: a send a kill interrupted (before its outcome was written)
        # is made once more with the same Idempotency-Key, which the receiver ignores; interrupted again,
        # it is `uncertain` and not made a third time. So every message is sent or reported, none is
        # posted more than twice, and every one sent arrived.
        assert max(receiver.raw.values()) <= 2
        assert all(receiver.raw[m] >= 1 for m, status in statuses.items() if status == "sent")
        repeats = {k: n for k, n in receiver.raw.items() if n > 1}
        uncertain = sum(status == "uncertain" for status in statuses.values())
        print(f"kills={kills} events={len(acked)} keys_repeated={len(repeats)} uncertain={uncertain}")
    finally:
        service.stop()


def test_three_processes_on_one_database(mongod: EmbeddedMongod, tmp_path: Path, receiver: Receiver) -> None:
    rulesets = flow(tmp_path)
    services = [
        ServiceProcess(
            tmp_path / f"p{i}",
            env=env_for(rulesets, receiver, MONGODB_URI=mongod.uri, RULESVC_DATABASE="multi"),
        )
        for i in range(3)
    ]
    for s in services:
        s.workdir.mkdir()
    services[0].start()
    key = services[0].cli("keys", "create", "--scope", "ingest").stdout.splitlines()[-1]
    for s in services[1:]:
        s.start()
    for s in services:
        s.key = key
    try:
        acked = 0
        for n in range(210):  # the same seven contacts' events, spread over three processes
            event = {"id": f"m{n}", "type": "order", "contact_id": f"c{n % 7}", "attributes": {"n": n}}
            acked += services[n % 3].request("POST", "/v1/events", event)[0] == 202
        assert acked == 210
        with MongoClient(mongod.uri) as client:
            db = client["multi"]
            settle(db, 210)
            assert {c["state"]["counters"]["orders"]["n"] for c in db.contacts.find({})} == {30}
            assert db.schedule.count_documents({"status": "done"}) == 210
        assert len(receiver.raw) == 210 and set(receiver.raw.values()) == {1}  # none twice
    finally:
        for s in services:
            s.stop()


def test_sigterm_lets_the_send_in_flight_finish(tmp_path: Path) -> None:
    slow = Receiver(delay=2.0)
    try:
        # A lease of 6 s lets a send take 4 s: the slow provider answers within it.
        service = ServiceProcess(tmp_path, env=env_for(flow(tmp_path), slow, RULESVC_LEASE_SECONDS="6"))
        service.start()
        event = {"id": "g1", "type": "order", "contact_id": "c1", "attributes": {"n": 1}}
        assert service.request("POST", "/v1/events", event)[0] == 202
        assert slow.started.wait(15)  # the provider has the request and is slow to answer
        assert service.signal(signal.SIGTERM) == 0  # waits for the send, then exits cleanly
        assert sum(slow.raw.values()) == 1
        service.start()  # nothing is repeated after a clean stop
        _, history = service.request("GET", "/v1/contacts/c1/messages")
        assert [m["status"] for m in history["messages"]] == ["sent"]
        with service.db() as db:
            busy = {"status": {"$in": ["pending", "running"]}}  # what could still send
            wait_for(lambda: db.schedule.count_documents(busy) == 0, what="nothing left to send")
        assert sum(slow.raw.values()) == 1
        service.stop()
    finally:
        slow.server.shutdown()
