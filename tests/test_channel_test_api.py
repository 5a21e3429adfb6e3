"""`POST /v1/channels/{name}/test`: the real plugin sends the built-in test message, judged by what a
real SMTP server (aiosmtpd) and a webhook receiver on 127.0.0.1 get; refusals are the documented ones
(404, 409, 422, 502 with the provider's words); nothing of the contact data, history or counters is
written."""

from __future__ import annotations

from typing import Any

from rulesvc_email import EmailChannel
from rulesvc_webhook import WebhookChannel

from rulesvc.config import Settings
from rulesvc.plugins import builtin_channels
from rulesvc.web.app import create_app
from tests.helpers import Provider, registry
from tests.smtp_server import smtp_server
from tests.test_api_contract import check_against_document
from tests.webhook_flow import SECRET, Receiver

PATH = "/v1/channels/{name}/test"


async def try_send(client: Any, name: str, body: Any = None, status: int = 200) -> dict[str, Any]:
    resp = await client.post(f"/v1/channels/{name}/test", json=body)
    got: dict[str, Any] = await resp.json()
    assert resp.status == status, got
    check_against_document("POST", PATH, status, got)
    return got


async def nothing_written(db: Any) -> None:
    for collection in ("contacts", "messages", "events", "stats", "schedule"):
        assert await db[collection].count_documents({}) == 0, collection


async def test_email_test_send_arrives_at_the_smtp_server(
    make_client: Any, settings: Settings, db: Any
) -> None:
    with smtp_server() as (mailbox, port):
        channels = builtin_channels()
        channels.register(EmailChannel({"host": "127.0.0.1", "port": port, "security": "none",
                                        "from": "Shop <news@shop.example>"}))  # fmt: skip
        client = await make_client(create_app(settings, channels))
        got = await try_send(client, "email", {"to": "ops@example.com"})
        assert len(mailbox.messages) == 1
        sender, recipients, mail = mailbox.messages[0]
        assert (sender, recipients) == ("news@shop.example", ["ops@example.com"])
        assert mail["Subject"] == "rulesvc test message (email)"
        assert "the `email` channel works" in mail.get_body(("plain",)).get_content()
        assert "List-Unsubscribe" not in mail  # a test is no marketing mail
        assert (got["channel"], got["status"], got["provider_id"]) == ("email", "sent", mail["Message-ID"])
        assert got["message_id"].startswith("test:email:") and got["seconds"] >= 0

        # The provider refuses the recipient: 502 with its words, as a send would have failed.
        refused = await try_send(client, "email", {"to": "nobody@example.com"}, 502)
        assert refused["status"] == "failed"
        assert refused["provider_said"] == "recipient refused: 550 5.1.1 no such user"
        assert "550 5.1.1 no such user" in refused["error"]
        assert len(mailbox.messages) == 1

        # Addresses the channel cannot use: 422 with the field, and nothing sent.
        bad = await try_send(client, "email", {"to": "not-an-address"}, 422)
        assert (bad["field"], bad["error"]) == ("$.to", "`not-an-address` is not an email address")
        missing = await try_send(client, "email", {}, 422)
        assert missing["field"] == "$.to" and "needs `to`" in missing["error"]
        wrong_type = await try_send(client, "email", {"to": 5}, 422)
        assert wrong_type["field"] == "$.to"
        unknown_field = await try_send(client, "email", {"to": "a@b.example", "cc": "x"}, 422)
        assert unknown_field["field"] == "$"
        assert len(mailbox.messages) == 1
    # The SMTP server is gone: the connection error is the provider failure.
    gone = await try_send(client, "email", {"to": "ops@example.com"}, 502)
    assert gone["status"] == "retry" and "Error" in gone["provider_said"]
    await nothing_written(db)


async def test_unknown_and_unconfigured_channels(client: Any, db: Any) -> None:
    unknown = await try_send(client, "fax", {"to": "+4915112345678"}, 404)
    assert unknown["error"].startswith("no channel `fax`; the channels are ")
    # `sms` is named by rulesets before its plugin is set up: a placeholder, not configured.
    unconfigured = await try_send(client, "sms", {"to": "+4915112345678"}, 409)
    assert unconfigured["error"].startswith("channel `sms` is not configured: ")
    broken = await client.post(
        "/v1/channels/log/test", data=b"{", headers={"Content-Type": "application/json"}
    )
    assert broken.status == 400
    # The log channel sends nowhere: the test "sends" and says nothing more.
    logged = await try_send(client, "log")
    assert logged["status"] == "sent"
    await nothing_written(db)


async def test_webhook_test_send_reaches_the_receiver(
    make_client: Any, settings: Settings, receiver: Receiver, db: Any
) -> None:
    channels = builtin_channels()
    channels.register(WebhookChannel({"url": receiver.url, "secret": SECRET}))
    client = await make_client(create_app(settings, channels))
    got = await try_send(client, "webhook")  # a webhook's address is its URL: no `to`
    assert receiver.received(got["message_id"]) == [204]  # its signature verified (else 401, not counted)
    receiver.status = 500
    failed = await try_send(client, "webhook", {}, 502)
    assert (failed["status"], failed["provider_said"]) == ("retry", "HTTP 500: ")
    assert receiver.received(failed["message_id"]) == [500]
    await nothing_written(db)


async def test_test_sends_are_limited_per_channel(client: Any) -> None:
    """Ten a minute per channel: enough to check a provider, too few to spam from the shop's domain."""
    for _ in range(10):
        assert (await try_send(client, "log"))["status"] == "sent"
    refused = await client.post("/v1/channels/log/test", json={})
    body = await refused.json()
    assert refused.status == 429 and "at most 10 test sends a minute" in body["error"]
    assert (await try_send(client, "inapp", {"to": "c-1"}))["status"] == "sent"  # another channel's own ten


async def test_a_web_push_test_never_calls_into_the_services_network(
    make_client: Any, settings: Settings
) -> None:
    """The endpoint's name is resolved and every address must be public: spellings of loopback that no
    address parser takes (`127.1`, `0x7f000001`, `2130706433`) and `localhost` are refused with 422."""
    push = Provider("webpush", needs="webpush_subscriptions")
    client = await make_client(create_app(settings, registry(push)))
    p256dh = "BNcRdreALRFXTkOOUHK1EtK2wtaz5Ry4YfYCA_0QTpQtUbVlUls0VJXg7A8u-Ts1XbjhazAkj7I99e8QcYP7DkM"
    keys = {"p256dh": p256dh, "auth": "tBHItJI5svbpez7KI4CCXg"}
    for host in ("127.1", "0x7f000001", "2130706433", "localhost", "[::1]", "10.0.0.7"):
        body = {"webpush_subscription": {"endpoint": f"https://{host}/push/x", "keys": keys}}
        refused = await try_send(client, "webpush", body, 422)
        assert refused["field"] == "$.webpush_subscription.endpoint", refused
        assert "not a public push service" in refused["error"] or "does not resolve" in refused["error"]
    assert push.delivered == []
