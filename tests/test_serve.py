"""`rulesvc serve` as a real process on the embedded mongod: the README's run command."""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path

import pytest

from rulesvc.store.mongod import free_port
from tests.helpers import wait_for
from tests.service import ServiceProcess

pytestmark = pytest.mark.slow


def process_gone(pid: int, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return True
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return True
        time.sleep(0.05)
    return False


def test_serve_accepts_and_keeps_data_across_restarts(tmp_path: Path) -> None:
    service = ServiceProcess(tmp_path)
    ready_in = service.start()
    assert ready_in < 30
    assert service.key is not None  # the embedded default hands out an admin key at first start
    try:
        event = {"id": "e1", "type": "cart_updated", "contact_id": "c1", "attributes": {"value": 20}}
        assert service.request("POST", "/v1/events", event) == (202, {"accepted": 1, "duplicates": 0})
        status, _ = service.request("PUT", "/v1/contacts/c1", {"email": "ann@example.com"})
        assert status == 201
        mongod_pid = service.mongod_pid()
        assert service.signal(signal.SIGTERM) == 0
        assert process_gone(mongod_pid)  # mongod stopped with the service

        service.start()
        status, body = service.request("GET", "/v1/contacts/c1/events")
        assert status == 200 and [e["id"] for e in body["events"]] == ["e1"]
        assert service.request("GET", "/v1/contacts/c1")[1]["email"] == "ann@example.com"
        assert service.request("POST", "/v1/events", event)[1] == {"accepted": 0, "duplicates": 1}
        assert service.signal(signal.SIGINT) == 0
    finally:
        service.stop()
    logs = service.log()
    assert "ann@example.com" not in logs  # no personal data in the logs
    assert "mongod.stopped" in logs


def test_serve_recovers_after_kill_9(tmp_path: Path) -> None:
    service = ServiceProcess(tmp_path)
    service.start()
    try:
        event = {"id": "k1", "type": "purchased", "contact_id": "c7"}
        assert service.request("POST", "/v1/events", event)[0] == 202
        mongod_pid = service.mongod_pid()
        service.signal(signal.SIGKILL)
        assert process_gone(mongod_pid)  # the kernel told mongod its parent died
        service.start()  # and the stale lock does not prevent the next start
        _, body = service.request("GET", "/v1/contacts/c7/events")
        assert [e["id"] for e in body["events"]] == ["k1"]
    finally:
        service.stop()


def test_serve_with_mongodb_uri_uses_that_server(tmp_path: Path, mongod: object) -> None:
    from rulesvc.store.mongod import EmbeddedMongod

    assert isinstance(mongod, EmbeddedMongod)
    service = ServiceProcess(tmp_path, env={"MONGODB_URI": mongod.uri, "RULESVC_DATABASE": "serve_uri"})
    service.start()
    assert service.key is None  # with a real server, keys are created on purpose
    created = service.cli("keys", "create", "--scope", "ingest", "--name", "shop backend")
    assert created.returncode == 0, created.stderr
    service.key = created.stdout.splitlines()[-1]  # the key, alone on the last line
    try:
        assert service.request("POST", "/v1/events", {"id": "u1", "type": "x", "contact_id": "c"})[0] == 202
        assert service.request("GET", "/v1/rulesets")[0] == 403  # ingest keys do not administer
        key_id = service.key.split("_")[1]
        listed = service.cli("keys", "list").stdout
        assert key_id in listed and "shop backend" in listed and service.key not in listed
        assert service.cli("keys", "revoke", key_id).returncode == 0
        # Keys are cached for up to five seconds in each process; then the revoked one is refused.
        event = {"id": "u2", "type": "x", "contact_id": "c"}
        wait_for(
            lambda: service.request("POST", "/v1/events", event)[0] == 401, what="the revoked key refused"
        )
    finally:
        service.stop()
    assert not (tmp_path / ".rulesvc").exists()  # no embedded mongod was started


def test_bad_configuration_fails_fast(tmp_path: Path) -> None:
    service = ServiceProcess(tmp_path, env={"RULESVC_PORT": "not-a-port"})
    with pytest.raises(RuntimeError, match="configuration error"):
        service.start()


def test_a_second_instance_on_the_same_data_directory_is_refused(tmp_path: Path) -> None:
    first = ServiceProcess(tmp_path)
    first.start()
    try:
        assert first.proc is not None
        mongod_pid = first.mongod_pid()
        holder = f"(pid {first.proc.pid}, port {first.port})"
        message = f"rulesvc is already running on this data directory {holder}"
        for port in (free_port(), first.port):  # another port, and the same one (make run twice)
            second = first.cli("serve", "--port", str(port), "--workers", "1")
            assert (second.returncode, message in second.stderr) == (1, True), second.stderr
        # The first one's mongod was left alone (it used to be stopped as an "orphan"), and it serves.
        assert first.mongod_pid() == mongod_pid and not process_gone(mongod_pid, timeout=0)
        event = {"id": "s1", "type": "purchased", "contact_id": "c1"}
        assert first.request("POST", "/v1/events", event)[0] == 202
        assert first.request("GET", "/readyz")[0] == 200
    finally:
        first.stop()
    first.start()  # the lock went with the process that held it
    first.stop()


def test_a_port_taken_by_another_program_is_named(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        refused = ServiceProcess(tmp_path).cli("serve", "--port", str(port), "--workers", "1")
    assert refused.returncode == 1
    assert f"port {port} on 127.0.0.1 is in use by another program" in refused.stderr
    assert not (tmp_path / ".rulesvc" / "mongod.pid").exists()  # refused before starting a mongod
