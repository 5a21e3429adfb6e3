"""Slow receivers and workers killed mid-send, all real: `rulesvc serve --workers 2`, its mongod, a slow
webhook receiver and a slow SMTP server on 127.0.0.1, and kill -9 of the very worker that holds the
connection. A message goes out at most twice, the second time only after the first call is over and
only on a channel whose receiver de-duplicates; on any other, an interrupted message is `uncertain` and
went out once. (The report: 84 deliveries of one message, one per lease expiry.)"""

from __future__ import annotations

import asyncio
import email
import email.policy
import hashlib
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from rulesvc.runtime import workers as supervisor
from rulesvc.store.mongod import free_port, live_children, pid_alive
from tests.helpers import order_flow
from tests.service import ServiceProcess
from tests.webhook_flow import Receiver, env_for, flow, post_orders

pytestmark = pytest.mark.slow

LEASE = "4"  # a send is cut off after 2.7 s
DELAY = 1.0  # both receivers answer after a second
FINAL = ("sent", "uncertain", "failed", "dead")
# A worker that dies sooner after its start counts as a failed start for the supervisor, and three in a
# row stop the service: before a third kill, the workers are left to grow older than this.
GROWN = getattr(supervisor, "EARLY_EXIT_SECONDS", 10.0) + 0.5


class Requests:
    """What a receiver has in flight: the sender's port -> message, and every request's (arrived,
    answered) per message on the monotonic clock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.open: dict[int, str] = {}
        self.spans: dict[str, list[tuple[float, float]]] = {}

    def in_flight(self) -> dict[int, str]:
        with self.lock:
            return dict(self.open)


class SlowMailbox(Requests):
    """An SMTP server's DATA handler that takes its time before saying 250."""

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        mail = email.message_from_bytes(envelope.content, policy=email.policy.default)
        key, port, arrived = str(mail["Message-ID"]), session.peer[1], time.monotonic()
        with self.lock:
            self.open[port] = key
        try:
            await asyncio.sleep(DELAY)
        finally:  # also when the sender is gone mid-wait: the server has the message all the same
            with self.lock:
                self.spans.setdefault(key, []).append((arrived, time.monotonic()))
                del self.open[port]
        return "250 Message accepted"


def webhook_requests(receiver: Receiver) -> Requests:
    """The webhook receiver's own records, seen the same way."""
    view = Requests()
    view.lock, view.open, view.spans = receiver.lock, receiver.open, receiver.spans
    return view


def started_ago(pid: int) -> float:
    ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    return uptime - ticks / os.sysconf("SC_CLK_TCK")


def workers(service: ServiceProcess) -> set[int]:
    assert service.proc is not None
    return live_children(service.proc.pid) - {service.mongod_pid()}


def wait_for_workers(service: ServiceProcess, older_than: float = 0.0, count: int = 2) -> set[int]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        pids = workers(service)
        try:
            if len(pids) == count and min(started_ago(p) for p in pids) > older_than:
                return pids
        except OSError:
            pass  # a process went away while we looked
        time.sleep(0.1)
    raise AssertionError(f"{count} workers did not come up:\n{service.log()[-3000:]}")


def socket_owner(port: int, pids: set[int]) -> int | None:
    """The process whose TCP socket on 127.0.0.1 has the local `port`: the sender of that request."""
    inodes = {
        fields[9]
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]
        if int((fields := line.split())[1].rsplit(":", 1)[1], 16) == port
    }
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}").removeprefix("socket:[").rstrip("]") in inodes:
                    return pid
        except OSError:
            continue
    return None


def kill_a_sender(service: ServiceProcess, requests: Requests, wanted: Callable[[str], bool]) -> set[str]:
    """Waits for a request in flight that `wanted` accepts, kill -9s the worker making it, and returns
    the messages of every request that worker had in flight."""
    pid, held = signal_a_sender(service, requests, wanted, signal.SIGKILL)
    while pid_alive(pid):
        time.sleep(0.02)
    return held


def signal_a_sender(
    service: ServiceProcess,
    requests: Requests,
    wanted: Callable[[str], bool],
    sig: signal.Signals,
    spare: frozenset[int] = frozenset(),
) -> tuple[int, set[str]]:
    """Sends `sig` to the worker making a request that `wanted` accepts (not one of `spare`): its pid
    and the messages of every request it had in flight."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        pids = workers(service) - spare
        in_flight = requests.in_flight()
        for port, key in in_flight.items():
            pid = socket_owner(port, pids) if wanted(key) else None
            if pid is not None:
                held = {k for p, k in in_flight.items() if socket_owner(p, {pid}) == pid}
                os.kill(pid, sig)
                return pid, held
        time.sleep(0.02)
    raise AssertionError(f"no request in flight to interrupt:\n{service.log()[-3000:]}")


def settled(db: Any, ns: range, timeout: float = 60) -> dict[str, dict[str, Any]]:
    """The messages of orders `ns` once each has a final status, by message id."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        docs = {d["_id"]: d for d in db.messages.find({"params.n": {"$in": list(ns)}})}
        if len(docs) == len(ns) and all(d["status"] in FINAL for d in docs.values()):
            return docs
        time.sleep(0.1)
    raise AssertionError(f"not settled: {Counter(d['status'] for d in docs.values())}")


def assert_never_overlapping(requests: Requests) -> None:
    """A message's second request came only after its first one was answered."""
    for key, spans in requests.spans.items():
        assert len(spans) <= 2, (key, spans)
        if len(spans) == 2:
            (_, first_answered), (second_arrived, _) = sorted(spans)
            assert second_arrived >= first_answered, key


Wave = dict[str, dict[str, Any]]


def waves(
    service: ServiceProcess, db: Any, requests: Requests
) -> tuple[Wave, Wave, set[str], set[str], set[str]]:
    """Two rounds of six orders. In the first, the worker sending is killed, then the worker that took
    over is killed while it makes the repeat; in the second, the worker sending is killed once."""
    wait_for_workers(service)
    assert len(post_orders(service, 0, 6)) == 6
    first = kill_a_sender(service, requests, lambda key: True)
    again = kill_a_sender(service, requests, lambda key: key in first)
    wave1 = settled(db, range(0, 6))
    wait_for_workers(service, older_than=GROWN)
    assert len(post_orders(service, 100, 6)) == 6
    once = kill_a_sender(service, requests, lambda key: True)
    wave2 = settled(db, range(100, 106))
    return wave1, wave2, first, again, once


def test_a_slow_webhook_receiver_gets_a_message_at_most_twice_never_while_the_first_is_in_flight(
    tmp_path: Path,
) -> None:
    receiver = Receiver(delay=DELAY)
    requests = webhook_requests(receiver)
    service = ServiceProcess(tmp_path, env=env_for(flow(tmp_path), receiver, RULESVC_LEASE_SECONDS=LEASE),
                             workers=2)  # fmt: skip
    service.start()
    try:
        with service.db() as db:
            wave1, wave2, first, again, once = waves(service, db, requests)
        twice = first & again
        assert twice
        for key in twice:
            assert (wave1[key]["status"], wave1[key]["reason"]) == ("uncertain", "interrupted"), wave1[key]
            assert wave1[key]["detail"] == (
                "interrupted during the provider call, so it may have arrived; not sent again: "
                "it was sent once more with the same key already"
            )
            assert receiver.raw[key] == 2  # the first call and one repeat, no third
        assert {m["status"] for m in wave1.values()} <= {"sent", "uncertain"}
        assert once and {m["status"] for m in wave2.values()} == {"sent"}
        assert all(receiver.raw[key] == 2 for key in once)
        assert all(receiver.raw[key] >= 1 for key in wave2)
        assert_never_overlapping(requests)
        assert max(receiver.raw.values()) <= 2
    finally:
        service.stop()
        receiver.server.shutdown()


def test_a_stalled_worker_loses_its_claim_and_its_messages_still_go_out_at_most_twice(tmp_path: Path) -> None:
    """A worker whose event loop is held (a long simulation did it; here SIGSTOP) renews no claim, so its
    lease runs out while its call is in flight: how the report got a delivery per lease expiry from live
    workers. Another worker repeats such a message once; stalled again, a third leaves it `uncertain`."""
    receiver = Receiver(delay=DELAY)
    requests = webhook_requests(receiver)
    service = ServiceProcess(tmp_path, env=env_for(flow(tmp_path), receiver, RULESVC_LEASE_SECONDS=LEASE),
                             workers=3)  # fmt: skip
    service.start()
    stalled: list[int] = []
    try:
        with service.db() as db:
            wait_for_workers(service, count=3)
            assert len(post_orders(service, 0, 6)) == 6
            pid, first = signal_a_sender(service, requests, lambda key: True, signal.SIGSTOP)
            stalled.append(pid)
            pid, again = signal_a_sender(
                service, requests, lambda key: key in first, signal.SIGSTOP, spare=frozenset(stalled)
            )
            stalled.append(pid)
            twice = first & again
            assert twice
            messages = settled(db, range(0, 6))  # by the one worker left
        assert {messages[key]["status"] for key in twice} == {"uncertain"}
    finally:
        for pid in stalled:
            os.kill(pid, signal.SIGCONT)  # their late answers land and change nothing on the wire
        service.stop()
        receiver.server.shutdown()
    assert all(receiver.raw[key] == 2 for key in twice)
    assert {m["status"] for m in messages.values()} <= {"sent", "uncertain"}
    assert_never_overlapping(requests)
    assert max(receiver.raw.values()) <= 2


def email_flow(folder: Path) -> Path:
    texts = {"order.subject": "Order {{ params.n }}", "order.text": "Thank you for order {{ params.n }}."}
    return order_flow(folder, "email", texts)


def test_a_slow_smtp_server_gets_an_interrupted_message_once_and_it_is_uncertain(tmp_path: Path) -> None:
    mailbox = SlowMailbox()
    smtp = Controller(mailbox, hostname="127.0.0.1", port=free_port())
    smtp.start()
    env = {"RULESVC_RULESETS_DIR": str(email_flow(tmp_path)), "RULESVC_LEASE_SECONDS": LEASE,
           "RULESVC_CHANNEL_EMAIL_HOST": "127.0.0.1", "RULESVC_CHANNEL_EMAIL_PORT": str(smtp.port),
           "RULESVC_CHANNEL_EMAIL_SECURITY": "none", "RULESVC_CHANNEL_EMAIL_FROM": "shop@shop.example",
           "RULESVC_RETRY_BASE_SECONDS": "0.2", "RULESVC_RATE_LIMIT": "0"}  # fmt: skip
    service = ServiceProcess(tmp_path, env=env, workers=2)
    service.start()
    try:
        for c in range(6):
            status, _ = service.request("PUT", f"/v1/contacts/c{c}", {"email": f"c{c}@example.com"})
            assert status == 201
        with service.db() as db:
            wait_for_workers(service)
            assert len(post_orders(service, 0, 6)) == 6
            held = kill_a_sender(service, mailbox, lambda key: True)
            messages = settled(db, range(0, 6))
        uncertain = service.request("GET", "/v1/messages?status=uncertain")[1]["messages"]
    finally:
        service.stop()
        smtp.stop()
    by_mail_id = {f"<{hashlib.sha256(mid.encode()).hexdigest()[:32]}@shop.example>": m
                  for mid, m in messages.items()}  # fmt: skip
    received = Counter({key: len(spans) for key, spans in mailbox.spans.items()})
    assert held and max(received.values()) == 1  # nothing arrived twice
    for key, message in by_mail_id.items():
        if key in held:  # the server had it and was about to say 250
            assert (message["status"], received[key], message["reason"]) == ("uncertain", 1, "interrupted")
            assert message["detail"] == (
                "interrupted during the provider call, so it may have arrived; not sent again: "
                "`email` cannot recognise a repeat"
            )
        else:  # sent; or interrupted before its data reached the server: uncertain all the same
            assert (message["status"], received[key]) in {("sent", 1), ("uncertain", 0)}, message
    assert {m["message_id"] for m in uncertain} == {
        m["_id"] for m in messages.values() if m["status"] == "uncertain"
    }
