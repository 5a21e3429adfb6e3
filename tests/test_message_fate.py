"""Every message's fate, visible: reason codes in the history, one `message.outcome` log line per
outcome, Prometheus counters and gauges, dead letters retried or cancelled over HTTP and from the shell,
and a contact's timeline with its pending sends.

One `rulesvc serve` process (JSON logs, the test's mongod) sends on the webhook channel to a receiver on
127.0.0.1 that the test can make fail (HTTP 500) or slow; `sms` has no settings: not configured.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from pymongo import MongoClient

from rulesvc.store.mongod import EmbeddedMongod
from tests.helpers import message_doc, wait_for
from tests.service import ServiceProcess
from tests.webhook_flow import SECRET, Receiver

ANN = {"email": "ann.private@example.com", "phone": "+4915199887766", "consent": {"sms": True}}


def ruleset(folder: Path) -> Path:
    rulesets = folder / "rulesets"
    (rulesets / "templates").mkdir(parents=True)
    (rulesets / "templates" / "note.body").write_text("order {{ params.n }}")
    (rulesets / "templates" / "note.text").write_text("order {{ params.n }}")

    def rule(name: str, channel: str, **send: Any) -> dict[str, Any]:
        params = {"n": "$attributes.n"}
        message = {"channel": channel, "template": "note", "transactional": True, "params": params, **send}
        return {"name": name, "when": {"event": name}, "then": [{"send": message}]}

    rules = [
        rule("order", "webhook"),  # at once
        rule("text", "sms"),  # sms has no settings here
        rule("remind", "webhook", after="1h", cancel_on=["purchased"]),
        rule("later", "webhook", after="2h"),
    ]
    (rulesets / "fate.json").write_text(json.dumps({"rules": rules}))
    return rulesets


@pytest.fixture(scope="module")
def shop() -> Iterator[Receiver]:
    s = Receiver()
    yield s
    s.server.shutdown()


@pytest.fixture(scope="module")
def service(
    mongod: EmbeddedMongod, tmp_path_factory: pytest.TempPathFactory, shop: Receiver
) -> Iterator[ServiceProcess]:
    folder = tmp_path_factory.mktemp("fate")
    env = {"MONGODB_URI": mongod.uri, "RULESVC_DATABASE": f"fate_{uuid.uuid4().hex[:10]}",
           "RULESVC_RULESETS_DIR": str(ruleset(folder)), "RULESVC_CHANNEL_WEBHOOK_URL": shop.url,
           "RULESVC_CHANNEL_WEBHOOK_SECRET": SECRET, "RULESVC_MAX_ATTEMPTS": "2",
           "RULESVC_RETRY_BASE_SECONDS": "0.1", "RULESVC_RETRY_MAX_SECONDS": "0.2", "RULESVC_QUIET_HOURS": "",
           "RULESVC_RATE_LIMIT": "0", "RULESVC_LOG_LEVEL": "info"}  # fmt: skip
    svc = ServiceProcess(folder, env=env)
    svc.start()
    created = svc.cli("keys", "create", "--scope", "admin")
    assert created.returncode == 0, created.stderr
    svc.key = created.stdout.strip().splitlines()[-1]
    yield svc
    svc.stop()


def post(service: ServiceProcess, kind: str, contact: str, at: datetime | None = None, n: int = 1) -> None:
    event: dict[str, Any] = {"id": f"{kind}-{contact}-{uuid.uuid4().hex[:6]}", "type": kind,
                             "contact_id": contact, "attributes": {"n": n}}  # fmt: skip
    if at is not None:
        event["time"] = at.isoformat().replace("+00:00", "Z")
    assert service.request("POST", "/v1/events", event)[0] == 202


def messages(service: ServiceProcess, contact: str) -> list[dict[str, Any]]:
    status, body = service.request("GET", f"/v1/contacts/{contact}/messages")
    assert status == 200, body
    return list(body["messages"])


def one_message(service: ServiceProcess, contact: str, *statuses: str) -> dict[str, Any]:
    def found() -> dict[str, Any] | None:
        msgs = messages(service, contact)
        return msgs[0] if len(msgs) == 1 and msgs[0]["status"] in statuses else None

    return wait_for(found)  # type: ignore[no-any-return]


def metrics(service: ServiceProcess) -> dict[str, float]:
    """The Prometheus text as {series with its labels sorted: value}."""
    import urllib.request

    with urllib.request.urlopen(service.url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        m = re.fullmatch(r"(\w+)(?:\{(.*)\})? (\S+)", line)
        if m and not line.startswith("#"):
            labels = ",".join(sorted(re.findall(r'\w+="[^"]*"', m.group(2) or "")))
            values[f"{m.group(1)}{{{labels}}}"] = float(m.group(3))
    return values


def series(name: str, **labels: str) -> str:
    return name + "{" + ",".join(sorted(f'{k}="{v}"' for k, v in labels.items())) + "}"


def outcome_lines(service: ServiceProcess) -> list[dict[str, Any]]:
    return [line for line in service.log_lines() if line.get("event") == "message.outcome"]


def path(message_id: str, action: str = "") -> str:
    return f"/v1/messages/{quote(message_id, safe='/')}" + (f"/{action}" if action else "")


def test_a_send_on_a_channel_not_configured_is_suppressed_with_its_code(service: ServiceProcess) -> None:
    before = metrics(service)
    post(service, "text", "nc1")
    msg = one_message(service, "nc1", "suppressed")
    assert (msg["status"], msg["reason"]) == ("suppressed", "channel_not_configured")
    assert msg["detail"].startswith("sms: not configured: missing setting(s): account_sid, auth_token")
    [line] = wait_for(lambda: [x for x in outcome_lines(service) if x["message_id"] == msg["message_id"]])
    assert (line["status"], line["reason"], line["channel"], line["rule"]) == (
        "suppressed",
        "channel_not_configured",
        "sms",
        "text",
    )
    key = series(
        "rulesvc_messages_total", channel="sms", status="suppressed", reason="channel_not_configured"
    )
    assert metrics(service)[key] == before.get(key, 0) + 1


def test_the_outcome_line_of_a_sent_message_has_ids_and_codes_and_no_personal_data(
    service: ServiceProcess, shop: Receiver
) -> None:
    assert service.request("PUT", "/v1/contacts/ann", ANN)[0] in (200, 201)
    shop.delay = 0.05
    try:
        post(service, "order", "ann")
        msg = one_message(service, "ann", "sent")
    finally:
        shop.delay = 0.0
    [line] = wait_for(lambda: [x for x in outcome_lines(service) if x["message_id"] == msg["message_id"]])
    assert line["level"] == "info"
    assert {
        k: line[k] for k in ("contact_id", "ruleset", "rule", "channel", "status", "reason", "attempt")
    } == {
        "contact_id": "ann",
        "ruleset": "fate",
        "rule": "order",
        "channel": "webhook",
        "status": "sent",
        "reason": None,
        "attempt": 1,
    }
    assert line["latency_ms"] >= 50  # the receiver took 50 ms to answer
    allowed = {"event", "level", "timestamp", "logger", "message_id", "contact_id", "ruleset", "rule",
               "channel", "status", "reason", "attempt", "latency_ms", "worker", "request_id"}  # fmt: skip
    assert set(line) <= allowed
    text = "\n".join(json.dumps(x) for x in outcome_lines(service))
    assert ANN["email"] not in text and ANN["phone"] not in text  # type: ignore[operator]


def test_counters_and_the_send_histogram_move_by_the_sends_made(
    service: ServiceProcess, shop: Receiver
) -> None:
    before = metrics(service)
    sends = 3
    for i in range(sends):
        post(service, "order", f"count{i}")
    for i in range(sends):
        one_message(service, f"count{i}", "sent")
    sent = series("rulesvc_messages_total", channel="webhook", status="sent", reason="")
    count = series("rulesvc_send_duration_seconds_count", channel="webhook")
    # Counted just after the message is written: wait for the count, then check it went no further.
    after = wait_for(lambda: (m := metrics(service)).get(sent, 0) - before.get(sent, 0) >= sends and m, 60)
    assert after[sent] - before.get(sent, 0) == sends
    assert after[count] - before.get(count, 0) == sends
    # Every provider call is in a bucket no larger than +Inf, and the sum grew by positive durations.
    total = series("rulesvc_send_duration_seconds_sum", channel="webhook")
    assert after[total] > before.get(total, 0)
    for gauge in ("rulesvc_due_messages", "rulesvc_due_oldest_age_seconds", "rulesvc_inbox_lag_seconds",
                  "rulesvc_events_quarantine_size", "rulesvc_dead_letters"):  # fmt: skip
        assert f"{gauge}{{}}" in after


def test_a_dead_letter_is_retried_over_http_and_from_the_shell(
    service: ServiceProcess, shop: Receiver
) -> None:
    before = metrics(service)
    shop.status = 500
    try:
        post(service, "order", "dl1")
        post(service, "order", "dl2")
        dead1 = one_message(service, "dl1", "dead")
        dead2 = one_message(service, "dl2", "dead")
    finally:
        shop.status = 204
    for dead in (dead1, dead2):
        assert (dead["reason"], dead["attempt"]) == ("provider_error", 2)  # RULESVC_MAX_ATTEMPTS
        assert dead["detail"].startswith("gave up after 2 attempts: HTTP 500")
        assert shop.received(dead["message_id"]) == [500, 500]
    dead_key = series("rulesvc_messages_total", channel="webhook", status="dead", reason="provider_error")
    now = wait_for(lambda: (m := metrics(service)).get(dead_key, 0) - before.get(dead_key, 0) >= 2 and m, 60)
    assert now["rulesvc_dead_letters{}"] == before.get("rulesvc_dead_letters{}", 0) + 2
    retry_key = series("rulesvc_messages_total", channel="webhook", status="retry", reason="provider_error")
    assert now[dead_key] - before.get(dead_key, 0) == 2
    assert now[retry_key] - before.get(retry_key, 0) == 2

    listed = service.cli("messages", "list", "--status", "dead", "--channel", "webhook", "--json")
    assert listed.returncode == 0, listed.stderr
    dead_now = {m["message_id"]: m["reason"] for m in json.loads(listed.stdout)}
    assert dead_now == {dead1["message_id"]: "provider_error", dead2["message_id"]: "provider_error"}
    status, body = service.request("POST", path(dead1["message_id"], "retry"))
    assert status == 200, body
    assert (body["status"], body["retries"], body.get("attempt", 0)) == ("scheduled", 1, 0)
    assert "reason" not in body and body["retried_at"]
    sent = one_message(service, "dl1", "sent")
    assert (sent["retries"], sent["attempt"]) == (1, 1)
    assert shop.received(dead1["message_id"]) == [500, 500, 204]

    shell = service.cli("messages", "retry", dead2["message_id"])
    assert shell.returncode == 0, shell.stderr
    assert shell.stdout.strip() == f"{dead2['message_id']}: scheduled again, due now (retry 1)"
    one_message(service, "dl2", "sent")
    assert shop.received(dead2["message_id"]) == [500, 500, 204]
    assert metrics(service)["rulesvc_dead_letters{}"] == before.get("rulesvc_dead_letters{}", 0)

    # Sent now: neither action applies.
    status, body = service.request("POST", path(dead1["message_id"], "retry"))
    assert status == 409
    assert (body["status"], body["allowed"]) == ("sent", ["dead", "failed", "uncertain"])
    assert body["error"] == "the message is sent; retry applies to a message that is dead, failed, uncertain"
    status, body = service.request("POST", path(dead1["message_id"], "cancel"))
    assert (status, body["status"], body["allowed"]) == (409, "sent", ["scheduled", "dead", "uncertain"])
    again = service.cli("messages", "retry", dead1["message_id"])
    assert again.returncode == 1 and f"{dead1['message_id']} is sent; retry applies" in again.stderr


def test_a_cancelled_send_never_reaches_the_receiver(
    service: ServiceProcess, shop: Receiver, mongod: EmbeddedMongod
) -> None:
    post(service, "later", "cx1")  # due in two hours: no race with the cancels on a slow machine
    post(service, "later", "cx2")
    first = one_message(service, "cx1", "scheduled")
    second = one_message(service, "cx2", "scheduled")
    status, body = service.request("POST", path(first["message_id"], "cancel"))
    assert status == 200, body
    assert (body["status"], body["reason"]) == ("cancelled", "cancelled_by_operator")
    shell = service.cli("messages", "cancel", second["message_id"])
    assert shell.returncode == 0 and shell.stdout.strip() == f"{second['message_id']}: cancelled"
    # Their time comes; then a send due after them goes out: the scheduler has passed the cancelled two.
    with MongoClient(mongod.uri) as client:
        database = client[service.env["RULESVC_DATABASE"]]
        ids = [first["message_id"], second["message_id"]]
        database.schedule.update_many({"_id": {"$in": ids}}, {"$set": {"due_at": datetime.now(UTC)}})
    post(service, "order", "cx3")
    third = one_message(service, "cx3", "sent")
    assert shop.received(third["message_id"]) != []  # it reached the receiver
    for msg in (first, second):
        status, body = service.request("GET", path(msg["message_id"]))
        assert (status, body["status"], body["reason"]) == (200, "cancelled", "cancelled_by_operator")
        assert shop.received(msg["message_id"]) == []
    # The service logged the cancel it made (the shell's own cancel is the command's output above).
    lines = [x for x in outcome_lines(service) if x["message_id"] == first["message_id"]]
    assert [(x["status"], x["reason"], x["channel"]) for x in lines] == [
        ("cancelled", "cancelled_by_operator", "webhook")
    ]
    status, body = service.request("POST", path(first["message_id"], "retry"))
    assert (status, body["status"]) == (409, "cancelled")


def cancelled_by_operator(database: Any, rule: str, status: str = "dismissed") -> int:
    """The funnel's count of operator cancels (`cancelled`) or give-ups (`dismissed`: a dead or uncertain
    message, counted there already) of this rule of `fate`, read from its documents."""
    docs = list(database.stats.find({"ruleset": "fate", "rule": rule}))
    assert not any(d.get("counts", {}).get("cancelled") for d in docs)  # not one message counted twice
    return sum(d.get("reasons", {}).get(status, {}).get("cancelled_by_operator", 0) for d in docs)


def test_a_dead_letter_and_an_uncertain_send_are_given_up_on_never_retried(
    service: ServiceProcess, shop: Receiver, mongod: EmbeddedMongod
) -> None:
    shop.status = 500
    try:
        post(service, "order", "gu1")
        dead = one_message(service, "gu1", "dead")
    finally:
        shop.status = 204
    with MongoClient(mongod.uri) as client:
        database = client[service.env["RULESVC_DATABASE"]]
        # An uncertain send, planted as a cut-off call leaves it (tests/test_interrupted_sends.py).
        doubt = "fate/text/gu2/planted"
        said = "cut off after 10s without an answer, so it may have arrived; not sent again"
        now = datetime.now(UTC)
        planted = message_doc(doubt, "gu2", "webhook", now, ruleset="fate", rule="text", status="uncertain",
                              reason="timeout", detail=said, attempt=1, sent_channel="webhook")  # fmt: skip
        database.messages.insert_one(planted)
        before = {rule: cancelled_by_operator(database, rule) for rule in ("order", "text")}
        given_up = [
            (dead["message_id"], f"dead: {dead['detail']}", "order"),
            (doubt, f"uncertain: {said}", "text"),
        ]
        for message_id, was, rule in given_up:
            status, body = service.request("POST", path(message_id, "cancel"))
            assert status == 200, body
            assert (body["status"], body["reason"]) == ("cancelled", "cancelled_by_operator")
            assert body["detail"] == f"dismissed by an operator; it was {was}"
            assert cancelled_by_operator(database, rule) == before[rule] + 1  # counted with the cancel
            assert database.schedule.count_documents({"_id": message_id, "status": "pending"}) == 0
            # Given up on: neither a retry nor a second cancel applies now.
            status, body = service.request("POST", path(message_id, "retry"))
            assert (status, body["status"]) == (409, "cancelled")
            status, body = service.request("POST", path(message_id, "cancel"))
            assert (status, body["allowed"]) == (409, ["scheduled", "dead", "uncertain"])
    assert shop.received(dead["message_id"]) == [500, 500]  # never sent again
    listed = service.cli("messages", "list", "--status", "dead", "--contact", "gu1", "--json")
    assert listed.returncode == 0 and json.loads(listed.stdout) == []


def test_unknown_messages_are_404_and_an_ingest_key_gets_403(service: ServiceProcess) -> None:
    for action in ("", "retry", "cancel"):
        status, body = service.request("POST" if action else "GET", path("no/such/message", action))
        assert (status, body) == (404, {"error": "no such message"})
    shell = service.cli("messages", "show", "no/such/message")
    assert shell.returncode == 1 and "no message no/such/message" in shell.stderr
    created = service.cli("keys", "create", "--scope", "ingest")
    admin, service.key = service.key, created.stdout.strip().splitlines()[-1]
    try:
        for action in ("retry", "cancel"):
            assert service.request("POST", path("any/id", action))[0] == 403
        assert service.request("GET", path("any/id"))[0] == 403
    finally:
        service.key = admin


def test_a_cancellation_by_an_event_is_logged_with_its_code(service: ServiceProcess) -> None:
    post(service, "remind", "ev1")
    msg = one_message(service, "ev1", "scheduled")
    post(service, "purchased", "ev1")
    cancelled = one_message(service, "ev1", "cancelled")
    assert (cancelled["reason"], cancelled["detail"]) == ("cancelled_by_event", "cancelled by purchased")
    [line] = wait_for(lambda: [x for x in outcome_lines(service) if x["message_id"] == msg["message_id"]])
    assert (line["status"], line["reason"], line["channel"]) == ("cancelled", "cancelled_by_event", "webhook")


def test_contacts_show_lists_a_pending_send_with_its_due_time(service: ServiceProcess) -> None:
    assert service.request("PUT", "/v1/contacts/tl1", ANN)[0] in (200, 201)
    at = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=5)
    post(service, "order", "tl1", at=at)
    post(service, "remind", "tl1", at=at + timedelta(minutes=1))  # its send is due one hour later
    wait_for(lambda: {m["status"] for m in messages(service, "tl1")} == {"sent", "scheduled"})
    due = at + timedelta(minutes=1) + timedelta(hours=1)
    shown = service.cli("contacts", "show", "tl1")
    assert shown.returncode == 0, shown.stderr
    out = shown.stdout
    assert "consent: sms=yes" in out
    pending = out[out.index("pending sends") :]
    assert re.search(
        rf"due {due:%Y-%m-%dT%H:%M:%SZ} \(in 5[4-6]m \d+s\)  fate/remind  webhook:note  scheduled", pending
    ), pending
    timeline = out[out.index("timeline") : out.index("pending sends")]
    assert f"{at:%Y-%m-%dT%H:%M:%SZ}  event    order" in timeline
    assert "message  fate/order  webhook:note  sent" in timeline
    as_json = json.loads(service.cli("contacts", "show", "tl1", "--json").stdout)
    [entry] = as_json["pending"]
    assert datetime.fromisoformat(entry["due_at"]) == due
    # The sent message was decided when the service read the events (now), after both event times.
    assert [x["kind"] for x in as_json["timeline"]] == ["event", "event", "message"]


async def test_a_providers_callback_is_an_outcome_line_and_a_count(make_client: Any, settings: Any) -> None:
    """In process, with a provider that calls back (tests/test_delivery.py): `delivered` is told too."""
    from structlog.testing import capture_logs

    from rulesvc.web.app import create_app
    from tests.helpers import PROFILE, Provider, eventually, go, registry, settled, setup
    from tests.helpers import send as send_on

    push = Provider("push", needs="push_tokens")
    client = await make_client(
        create_app(setup(settings, [send_on("push", transactional=True)]), registry(push))
    )
    await client.put("/v1/contacts/c1", json=PROFILE)
    await go(client)
    [msg] = await settled(client)
    report = {"id": f"p-{msg['message_id']}", "status": "delivered"}
    failed = {"id": f"p-{msg['message_id']}", "status": "failed"}  # a carrier's later refusal
    with capture_logs() as logs:
        for body in (report, failed):
            headers = {"X-Provider-Token": "s3cret"}
            assert (
                await client.post("/v1/channels/push/callbacks", json=body, headers=headers)
            ).status == 200

        # The send's own `sent` line is told once its record is committed, which the API shows first:
        # it may land inside this capture too. It is not what the callbacks tell.
        def told() -> list[Any]:
            return [x for x in logs if x["event"] == "message.outcome" and x["status"] != "sent"]

        async def both_told() -> bool:
            return len(told()) == 2

        await eventually(both_told)
    lines = told()
    assert sorted(
        (x["message_id"], x["status"], x["reason"], x["channel"], x["contact_id"]) for x in lines
    ) == [
        (msg["message_id"], "delivered", None, "push", "c1"),  # recorded by the inbox from the event
        (msg["message_id"], "failed", "delivery_failed", "push", "c1"),  # recorded by the callback itself
    ]
    text = await (await client.get("/metrics")).text()
    for status, reason in (("sent", ""), ("delivered", ""), ("failed", "delivery_failed")):
        assert f'rulesvc_messages_total{{channel="push",reason="{reason}",status="{status}"}} 1.0' in text


@pytest.mark.parametrize("junk", ["%ED%A0%80", "%00", "%FF%FE", "x" * 5000, "a%2Fb", "%20"])
async def test_junk_message_ids_are_404_never_a_server_error(client: Any, junk: str) -> None:
    for method, suffix in (("GET", ""), ("POST", "/retry"), ("POST", "/cancel")):
        resp = await client.request(method, f"/v1/messages/{junk}{suffix}")
        assert resp.status == 404, (method, junk, await resp.text())
