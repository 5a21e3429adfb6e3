"""The send pipeline and the outbox, live: consent, reachability, fallback, caps, quiet hours, retries,
dead letters, crash recovery, outcomes feeding back, the in-app inbox, and sandboxed templates."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
from rulesvc_email import EmailChannel

from rulesvc.channels import Delivery
from rulesvc.config import Settings
from rulesvc.runtime.templates import FRESH_SECONDS
from rulesvc.web.app import create_app
from tests.helpers import PROFILE, Provider, eventually, go, history, registry, send, settled, setup
from tests.smtp_server import smtp_server


async def test_consent_is_needed_for_marketing_not_for_transactional(
    make_client: Any, settings: Settings
) -> None:
    push = Provider("push", needs="push_tokens")
    client = await make_client(
        create_app(setup(settings, [send("push"), send("push", transactional=True)]), registry(push))
    )
    await client.put("/v1/contacts/c1", json=PROFILE)
    await go(client)
    msgs = await settled(client, count=2)
    assert [(m["status"], m.get("reason"), m.get("detail")) for m in msgs] == [
        ("suppressed", "no_consent", "push: no marketing consent"),
        ("sent", None, None),
    ]
    assert len(push.delivered) == 1
    assert push.delivered[0].content["title"] == "Hello" and push.delivered[0].content["body"] == "Code X1"

    await client.put("/v1/contacts/c1", json={**PROFILE, "consent": {"push": True}})
    await go(client)
    msgs = await settled(client, count=4)
    assert [m["status"] for m in msgs[2:]] == ["sent", "sent"]


async def test_unreachable_falls_back_then_suppresses(make_client: Any, settings: Settings) -> None:
    push, email = Provider("push", needs="push_tokens"), Provider("email", needs="email")
    client = await make_client(
        create_app(setup(settings, [send("push", fallback=["email"])]), registry(push, email))
    )
    await client.put(
        "/v1/contacts/c1", json={"email": "ann@example.com", "consent": {"push": True, "email": True}}
    )
    await go(client)
    [msg] = await settled(client)
    assert msg["status"] == "sent" and msg["channel"] == "push"
    assert [m.channel for m in email.delivered] == ["email"] and push.delivered == []
    assert email.delivered[0].content["subject"] == "Hello there"

    await client.put("/v1/contacts/c2", json={"consent": {"push": True, "email": True}})
    await go(client, contact="c2")
    [msg] = await settled(client, contact="c2")
    assert msg["status"] == "suppressed"
    assert msg["reason"] == "unreachable"  # the code of the channel the rule named
    assert msg["detail"] == "push: no push_tokens; email: no valid email address"


async def test_frequency_cap_per_channel_per_local_day(make_client: Any, settings: Settings) -> None:
    push = Provider("push", needs="push_tokens")
    app = create_app(setup(settings, [send("push")], frequency_caps={"push": 2}), registry(push))
    client = await make_client(app)
    await client.put(
        "/v1/contacts/c1", json={**PROFILE, "consent": {"push": True}, "timezone": "Pacific/Auckland"}
    )
    for _ in range(3):
        await go(client)
        await settled(client, count=len(await history(client)))
    msgs = await settled(client, count=3)
    assert [m["status"] for m in msgs] == ["sent", "sent", "suppressed"]
    assert msgs[2]["reason"] == "frequency_cap"
    assert msgs[2]["detail"] == "frequency cap: 2 push message(s) a day reached"
    assert len(push.delivered) == 2


async def test_quiet_hours_postpone_to_the_end_of_the_window(make_client: Any, settings: Settings) -> None:
    now = datetime.now(UTC)
    zone = "Asia/Kolkata"  # +05:30, so the window is not UTC's
    local = now.astimezone(__import__("zoneinfo").ZoneInfo(zone))
    start, end = (
        (local - timedelta(hours=1)).strftime("%H:%M"),
        (local + timedelta(hours=2)).strftime("%H:%M"),
    )
    push = Provider("push", needs="push_tokens")
    quiet = setup(settings, [send("push"), send("push", transactional=True)], quiet_hours=f"{start}-{end}")
    app = create_app(quiet, registry(push))
    client = await make_client(app)
    await client.put("/v1/contacts/c1", json={**PROFILE, "consent": {"push": True}, "timezone": zone})
    await go(client)

    async def postponed() -> bool:
        msgs = await history(client)
        return len(msgs) == 2 and msgs[0].get("reason") == "quiet_hours"

    await eventually(postponed)
    marketing, transactional = await history(client)
    assert marketing["status"] == "scheduled"  # postponed, never dropped
    due = datetime.fromisoformat(marketing["due_at"])
    expected = (local + timedelta(hours=2)).replace(second=0, microsecond=0)
    assert abs((due - expected).total_seconds()) < 61
    assert transactional["status"] == "sent"  # transactional messages are not held back
    assert len(push.delivered) == 1


async def test_retries_then_success_honours_retry_after(make_client: Any, settings: Settings) -> None:
    push = Provider("push", needs="push_tokens")
    push.script = [Delivery("retry", "HTTP 503"), Delivery("retry", "HTTP 429", retry_after=1.0)]
    app = create_app(
        setup(settings, [send("push", transactional=True)], retry_base_seconds=0.2), registry(push)
    )
    client = await make_client(app)
    await client.put("/v1/contacts/c1", json=PROFILE)
    started = asyncio.get_running_loop().time()
    await go(client)
    [msg] = await settled(client)
    assert msg["status"] == "sent"
    assert push.keys_seen == [msg["message_id"]] * 3  # the same key on every attempt
    assert asyncio.get_running_loop().time() - started >= 1.0  # waited at least the Retry-After
    assert len(push.delivered) == 1


async def test_dead_letter_after_max_attempts(make_client: Any, settings: Settings) -> None:
    push = Provider("push", needs="push_tokens")
    push.script = [Delivery("retry", "HTTP 500")] * 10
    app = create_app(
        setup(settings, [send("push", transactional=True)], retry_base_seconds=0.05, max_attempts=3),
        registry(push),
    )
    client = await make_client(app)
    await client.put("/v1/contacts/c1", json=PROFILE)
    await go(client)
    [msg] = await settled(client)
    assert (msg["status"], msg["reason"]) == ("dead", "provider_error")
    assert msg["detail"] == "gave up after 3 attempts: HTTP 500"
    dead = await (await client.get("/v1/messages", params={"status": "dead"})).json()
    assert [m["message_id"] for m in dead["messages"]] == [msg["message_id"]]
    assert len(push.keys_seen) == 3


async def test_permanent_failure_keeps_the_providers_reason(make_client: Any, settings: Settings) -> None:
    push = Provider("push", needs="push_tokens")
    push.script = [
        Delivery("failed", "HTTP 400: invalid registration", unreachable=[("push_tokens", "tok-1")])
    ]
    client = await make_client(
        create_app(setup(settings, [send("push", transactional=True)]), registry(push))
    )
    await client.put("/v1/contacts/c1", json={**PROFILE, "push_tokens": ["tok-1", "tok-2"]})
    await go(client)
    [msg] = await settled(client)
    assert (msg["status"], msg["reason"]) == ("failed", "provider_rejected")
    assert msg["detail"] == "HTTP 400: invalid registration"
    contact = await (await client.get("/v1/contacts/c1")).json()
    assert contact["push_tokens"] == ["tok-2"]  # the dead token was removed


async def test_crash_between_provider_call_and_status_write(
    make_client: Any, settings: Settings, db: Any
) -> None:
    """Each channel kind delivers at most once: a de-duplicating provider gets the same key once more;
    any other is not called again and the message is `uncertain`, saying why."""
    for dedup in (True, False):
        push = Provider("push", needs="push_tokens", deduplicates=dedup)
        push.hanging = True
        quick = msgspec.structs.replace(
            settings,
            database=f"{settings.database}_{dedup}",
            lease_seconds=3,  # the send may take 2 s: longer than the test takes to kill it
            shutdown_grace_seconds=0.5,
        )
        first = await make_client(
            create_app(setup(quick, [send("push", transactional=True)]), registry(push))
        )
        await first.put("/v1/contacts/c1", json=PROFILE)
        await go(first)
        await eventually(lambda client=first, p=push: _mid_send(client, p))
        await first.close()  # the process goes away mid-call; the provider already has the message
        push.hanging = False
        second = await make_client(
            create_app(setup(quick, [send("push", transactional=True)]), registry(push))
        )
        [msg] = await settled(second)
        assert len(push.delivered) == 1, dedup
        if dedup:
            assert msg["status"] == "sent" and len(push.keys_seen) == 2  # asked again, with the same key
            assert push.keys_seen[0] == push.keys_seen[1] == msg["message_id"]
        else:
            assert msg["status"] == "uncertain" and len(push.keys_seen) == 1
            assert msg["reason"] == "interrupted"
            assert msg["detail"] == (
                "interrupted during the provider call, so it may have arrived; not sent again: "
                "`push` cannot recognise a repeat"
            )
            listed = await (await second.get("/v1/messages", params={"status": "uncertain"})).json()
            assert [m["message_id"] for m in listed["messages"]] == [msg["message_id"]]
        await second.close()
        push.hang.set()


async def _mid_send(client: Any, provider: Provider) -> bool:
    """The provider has the message and has not answered; the send is marked `sending`."""
    if not provider.delivered:
        return False
    msgs = await history(client)
    return bool(msgs) and msgs[0]["status"] == "sending"


async def test_bounce_marks_email_invalid_and_block_suppresses(make_client: Any, settings: Settings) -> None:
    """The real email channel, against a real SMTP server: after a bounce its own `reachable` keeps the
    next mail from being sent at all, judged by what the server receives."""
    sms = Provider("sms", needs="phone")
    with smtp_server() as (mailbox, port):
        channels = registry(sms)
        channels.register(EmailChannel({"host": "127.0.0.1", "port": port, "security": "none",
                                        "from": "news@shop.example"}))  # fmt: skip
        sends = [send("email", transactional=True), send("sms", transactional=True)]
        client = await make_client(create_app(setup(settings, sends), channels))
        await client.put("/v1/contacts/c1", json={**PROFILE, "phone": "+4915112345678"})
        await go(client)
        first_email, first_sms = await settled(client, count=2)
        assert (first_email["status"], first_sms["status"]) == ("sent", "sent")
        assert [(sender, rcpts) for sender, rcpts, _ in mailbox.messages] == [
            ("news@shop.example", ["ann@example.com"])
        ]
        outcomes = [
            {"id": "b1", "type": "message_bounced", "contact_id": "c1",
             "attributes": {"message_id": first_email["message_id"]}},
            {"id": "b2", "type": "message_blocked", "contact_id": "c1",
             "attributes": {"message_id": first_sms["message_id"]}},
        ]  # fmt: skip
        assert (await client.post("/v1/events", json=outcomes)).status == 202

        async def invalid() -> bool:
            return bool((await (await client.get("/v1/contacts/c1")).json())["email_invalid"])

        await eventually(invalid)
        statuses = {m["message_id"]: m["status"] for m in await history(client)}
        assert statuses[first_email["message_id"]] == "bounced"
        assert statuses[first_sms["message_id"]] == "blocked"
        await go(client)
        msgs = await settled(client, count=4)
        assert [(m["status"], m["reason"], m["detail"]) for m in msgs[2:]] == [
            ("suppressed", "unreachable", "email: email address marked invalid (bounced)"),
            ("suppressed", "suppression_list", "sms: contact is on the suppression list"),
        ]
        assert len(mailbox.raw) == 1 and len(sms.delivered) == 1  # nothing more reached the SMTP server
        # A new address clears the mark (the contacts API's rule) and mail flows again.
        await client.put("/v1/contacts/c1", json={**PROFILE, "email": "ann@new.example"})
        await go(client)
        msgs = await settled(client, count=6)
        assert msgs[4]["status"] == "sent", msgs[4]
        assert [rcpts for _, rcpts, _ in mailbox.messages] == [["ann@example.com"], ["ann@new.example"]]


async def test_provider_callbacks_are_authenticated(make_client: Any, settings: Settings) -> None:
    push = Provider("push", needs="push_tokens")
    client = await make_client(
        create_app(setup(settings, [send("push", transactional=True)]), registry(push))
    )
    await client.put("/v1/contacts/c1", json=PROFILE)
    await go(client)
    [msg] = await settled(client)
    report = {"id": f"p-{msg['message_id']}", "status": "delivered"}
    assert (await client.post("/v1/channels/push/callbacks", json=report)).status == 401
    resp = await client.post(
        "/v1/channels/push/callbacks", json=report, headers={"X-Provider-Token": "s3cret"}
    )
    assert resp.status == 200 and await resp.json() == {"accepted": 1}

    async def delivered() -> bool:
        return (await history(client))[0]["status"] == "delivered"

    await eventually(delivered)
    assert (await client.post("/v1/channels/log/callbacks", json=report)).status == 404
    channels = await (await client.get("/v1/channels")).json()
    by_name = {c["name"]: c for c in channels["channels"]}
    assert by_name["push"]["callbacks"] is True and by_name["log"]["callbacks"] is False
    assert by_name["sms"]["configured"] is False


async def test_inapp_inbox(make_client: Any, settings: Settings) -> None:
    client = await make_client(create_app(setup(settings, [send("inapp")])))
    await go(client)
    await settled(client)
    inbox = (await (await client.get("/v1/contacts/c1/inbox")).json())["messages"]
    assert [m["content"] for m in inbox] == [{"title": "Hello", "body": "Code X1"}]  # what a page shows
    mid = inbox[0]["message_id"]
    assert (await client.post(f"/v1/contacts/c1/inbox/{mid}", json={"action": "shown"})).status == 204

    async def opened() -> bool:
        return (await history(client))[0]["status"] == "opened"

    await eventually(opened)
    assert (await client.post(f"/v1/contacts/c1/inbox/{mid}", json={"action": "dismissed"})).status == 204
    assert (await (await client.get("/v1/contacts/c1/inbox")).json())["messages"] == []
    assert (await client.post(f"/v1/contacts/c2/inbox/{mid}", json={"action": "shown"})).status == 404
    assert (await client.post(f"/v1/contacts/c1/inbox/{mid}", json={"action": "eaten"})).status == 422


async def test_templates_are_sandboxed_and_errors_fail_only_their_message(
    make_client: Any, settings: Settings
) -> None:
    configured = setup(
        settings, [send("log", "evil"), send("log", "broken"), send("log", "missing"), send("log")]
    )
    missing_template = Path(configured.rulesets_dir) / "templates" / "missing.body"
    missing_template.write_text("here when the ruleset loads")  # a ruleset naming no template is refused
    client = await make_client(create_app(configured))
    missing_template.unlink()  # deleted afterwards: its messages fail, the others go
    await go(client)
    evil, broken, missing, fine = await settled(client, count=4)
    assert {m["reason"] for m in (evil, broken, missing)} == {"template_error"}
    assert evil["status"] == "failed" and "unsafe" in evil["detail"]
    assert broken["status"] == "failed" and "template `broken.body`" in broken["detail"]
    assert missing["status"] == "failed" and "template `missing` not found" in missing["detail"]
    assert fine["status"] == "sent"


async def test_edited_template_is_used_for_the_next_message(make_client: Any, settings: Settings) -> None:
    push = Provider("push", needs="push_tokens")
    configured = setup(settings, [send("push", transactional=True)])
    client = await make_client(create_app(configured, registry(push)))
    await client.put("/v1/contacts/c1", json=PROFILE)
    await go(client, code="A")
    await settled(client)
    template = Path(configured.rulesets_dir) / "templates" / "hello.body"
    template.write_text("New wording, code {{ params.code }}")
    await asyncio.sleep(FRESH_SECONDS)  # an edit shows within a second
    await go(client, code="B")
    await settled(client, count=2)
    assert [m.content["body"] for m in push.delivered] == ["Code A", "New wording, code B"]
