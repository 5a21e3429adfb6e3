"""Promises the README and docs make, each checked against a real service and a real mongod, judged by
what a user sees (a status, a header, a log line, the database) and a computation of the test's own."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import msgspec
import pytest

from rulesvc.config import Settings
from rulesvc.web.app import create_app
from tests.helpers import (
    PROFILE,
    Provider,
    eventually,
    go,
    history,
    message_doc,
    registry,
    send,
    settled,
    setup,
    wait_for,
    write_ruleset,
)
from tests.service import ServiceProcess

# --- a service reachable from outside this machine's loopback ---------------------------------------------


def outside_address() -> str:
    """An IPv4 address of this machine that is not loopback: requests to it do not come from 127.*."""
    found = subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()
    addresses = [a for a in found if re.fullmatch(r"\d+\.\d+\.\d+\.\d+", a) and not a.startswith("127.")]
    if not addresses:
        pytest.skip("this machine has no non-loopback IPv4 address to call itself on")
    return addresses[0]


def call(url: str, key: str | None = None, headers: dict[str, str] | None = None,
         method: str = "GET", body: Any = None) -> tuple[int, dict[str, str], Any]:  # fmt: skip
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, dict(resp.headers), decoded(resp.headers, resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), decoded(exc.headers, exc.read())


def decoded(headers: Any, body: bytes) -> Any:
    return json.loads(body or b"null") if "json" in headers.get("Content-Type", "") else body.decode()


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """One service listening on every address, with its first admin key."""
    svc = ServiceProcess(tmp_path_factory.mktemp("promises"), env={"RULESVC_HOST": "0.0.0.0"})
    svc.start()
    assert svc.key, svc.log()
    yield svc
    svc.stop()


def test_api_keys_are_stored_only_as_digests(service: ServiceProcess) -> None:
    created = service.cli("keys", "create", "--scope", "ingest", "--name", "shop backend")
    assert created.returncode == 0, created.stderr
    keys = [service.key, created.stdout.split()[-1]]
    with service.db() as db:
        stored = {d["_id"]: d for d in db["api_keys"].find({})}
    for key in keys:
        assert key is not None
        match = re.fullmatch(r"rsk_([0-9a-f]{12})_(\S+)", key)
        assert match, key
        key_id, secret = match.groups()
        event = {"id": f"k-{key_id}", "type": "key_used", "contact_id": "c1"}
        assert call(f"{service.url}/v1/events", key, method="POST", body=event)[0] == 202  # the key works
        doc = stored[key_id]
        assert doc["hash"] == hashlib.sha256(secret.encode()).hexdigest()
        text = json.dumps(doc, default=str)
        assert key not in text and secret[:8] not in text  # neither the key nor a piece of its secret


def test_ops_endpoints_need_a_key_off_loopback(service: ServiceProcess) -> None:
    outside = f"http://{outside_address()}:{service.port}"
    created = service.cli("keys", "create", "--scope", "ingest")
    ingest = created.stdout.split()[-1]
    for path in ("/metrics", "/readyz"):
        assert call(service.url + path)[0] == 200, path  # loopback: open
        assert call(outside + path)[0] == 401, path
        assert call(outside + path, ingest)[0] == 403, path
        assert call(outside + path, service.key)[0] == 200, path


def test_open_ops_serves_them_to_any_address(tmp_path: Path) -> None:
    svc = ServiceProcess(tmp_path, env={"RULESVC_HOST": "0.0.0.0", "RULESVC_OPEN_OPS": "true"})
    svc.start()
    try:
        outside = f"http://{outside_address()}:{svc.port}"
        assert call(outside + "/metrics")[0] == 200 and call(outside + "/readyz")[0] == 200
        assert call(outside + "/v1/rulesets")[0] == 401  # only the ops endpoints
    finally:
        svc.stop()


def test_x_request_id_is_echoed_and_on_the_log_lines_of_its_request(service: ServiceProcess) -> None:
    def released(request_id: str) -> list[dict[str, Any]]:
        return [e for e in service.log_lines()
                if e.get("event") == "quarantine.released" and e.get("request_id") == request_id]  # fmt: skip

    drop = f"{service.url}/v1/events/quarantine/drop"
    status, headers, _ = call(drop, service.key, {"X-Request-ID": "abc"}, "POST", {"all": True})
    assert status == 200 and headers["X-Request-ID"] == "abc"
    wait_for(lambda: released("abc"), what="a log line with request_id=abc")
    for given in ({}, {"X-Request-ID": "not a valid id!"}):  # none, or one that is not safe to log
        status, headers, _ = call(drop, service.key, given, "POST", {"all": True})
        generated = headers["X-Request-ID"]
        assert status == 200 and re.fullmatch(r"[0-9a-f]{32}", generated), generated
        wait_for(lambda: released(generated), what=f"a log line with request_id={generated}")  # noqa: B023


# --- in-process: the app on the test's mongod ---------------------------------------------------------------


async def test_the_event_retention_ttl_follows_its_setting(
    make_client: Any, settings: Settings, db: Any
) -> None:
    async def ttl() -> int:
        return int((await db.events.index_information())["events_ttl"]["expireAfterSeconds"])

    first = await make_client(create_app(msgspec.structs.replace(settings, event_retention_days=3)))
    assert await ttl() == 3 * 86400
    await first.close()
    await make_client(create_app(msgspec.structs.replace(settings, event_retention_days=0.5)))  # restarted
    assert await ttl() == 12 * 3600
    index = (await db.events.index_information())["events_ttl"]
    assert index["key"] == [("received_at", 1)]  # events expire counted from when they came in


async def test_a_frequency_cap_day_starts_at_the_contacts_local_midnight(
    make_client: Any, settings: Settings, db: Any
) -> None:
    """One push a day. A push sent a minute before the contact's local midnight is yesterday's; one sent
    after it is today's. The zone is one whose midnight fell on today's UTC date where one exists, so
    that counting by the UTC day would give the other answer."""
    now = datetime.now(UTC)
    zones = [
        "Pacific/Auckland",
        "America/Los_Angeles",
        "Asia/Kolkata",
        "America/New_York",
        "Pacific/Kiritimati",
    ]

    def midnight(zone: str) -> datetime:
        local = now.astimezone(ZoneInfo(zone))
        return datetime.combine(local.date(), datetime.min.time(), ZoneInfo(zone)).astimezone(UTC)

    zone = next((z for z in zones if (midnight(z) - timedelta(minutes=1)).date() == now.date()), zones[0])
    start = midnight(zone)
    push = Provider("push", needs="push_tokens")
    client = await make_client(
        create_app(setup(settings, [send("push")], frequency_caps={"push": 1}), registry(push))
    )
    for contact, sent_at in (("before", start - timedelta(minutes=1)), ("after", start + (now - start) / 2)):
        profile = {**PROFILE, "consent": {"push": True}, "timezone": zone}
        assert (await client.put(f"/v1/contacts/{contact}", json=profile)).status in (200, 201)
        earlier = message_doc(f"earlier-{contact}", contact, "push", sent_at, status="sent",
                              sent_at=sent_at, sent_channel="push", transactional=False)  # fmt: skip
        await db.messages.insert_one(earlier)
        await go(client, contact)
    [before] = [m for m in await settled(client, "before", 2) if m["message_id"] != "earlier-before"]
    [after] = [m for m in await settled(client, "after", 2) if m["message_id"] != "earlier-after"]
    assert (before["status"], before.get("reason")) == ("sent", None), zone
    assert (after["status"], after.get("reason")) == ("suppressed", "frequency_cap"), zone


async def test_a_message_status_never_moves_back(make_client: Any, settings: Settings, db: Any) -> None:
    """Documented order: sent -> delivered -> opened -> clicked; bad news (bounced, blocked, a provider's
    `failed`) is final. A late report is kept in `outcomes` but does not move the status back."""
    push = Provider("push", needs="push_tokens")
    client = await make_client(
        create_app(setup(settings, [send("push", transactional=True)]), registry(push))
    )
    await client.put("/v1/contacts/c1", json=PROFILE)
    await go(client, n=2)
    opened, failed = await settled(client, count=2)
    reports: list[dict[str, Any]] = []

    async def report(message: dict[str, Any], outcome: str) -> None:
        event = {"id": f"{outcome}-{len(reports)}", "type": f"message_{outcome}", "contact_id": "c1",
                 "attributes": {"message_id": message["message_id"]}}  # fmt: skip
        reports.append(event)
        assert (await client.post("/v1/events", json=event)).status == 202

        async def recorded() -> bool:
            doc = await db.messages.find_one({"_id": message["message_id"]})
            return outcome in (doc.get("outcomes") or {})

        await eventually(recorded)

    async def status(message: dict[str, Any]) -> str:
        return str(
            next(m for m in await history(client) if m["message_id"] == message["message_id"])["status"]
        )

    await report(opened, "opened")
    await report(opened, "delivered")  # late
    assert await status(opened) == "opened"

    callback = {"id": f"p-{failed['message_id']}", "status": "failed"}
    signed = {"X-Provider-Token": "s3cret"}
    assert (await client.post("/v1/channels/push/callbacks", json=callback, headers=signed)).status == 200
    assert await status(failed) == "failed"
    await report(failed, "delivered")  # late, after the provider said it failed
    assert await status(failed) == "failed"


async def test_suppress_and_unsuppress_actions(make_client: Any, settings: Settings) -> None:
    push = Provider("push", needs="push_tokens")
    configured = setup(settings, [send("push", transactional=True)])
    rules = [{"name": "stop", "when": {"event": "stop"}, "then": [{"suppress": "push"}]},
             {"name": "start", "when": {"event": "start"}, "then": [{"unsuppress": "push"}]}]  # fmt: skip
    write_ruleset(Path(configured.rulesets_dir), "consent", {"rules": rules})
    client = await make_client(create_app(configured, registry(push)))
    await client.put("/v1/contacts/c1", json=PROFILE)

    async def post(kind: str) -> None:
        event = {"id": f"{kind}-{datetime.now().timestamp()}", "type": kind, "contact_id": "c1"}
        assert (await client.post("/v1/events", json=event)).status == 202

    await post("stop")
    await go(client)
    [suppressed] = await settled(client)
    assert (suppressed["status"], suppressed["reason"]) == ("suppressed", "suppression_list")
    assert suppressed["detail"] == "push: contact is on the suppression list"
    await post("start")
    await go(client)
    assert [m["status"] for m in await settled(client, count=2)] == ["suppressed", "sent"]
    assert len(push.delivered) == 1
