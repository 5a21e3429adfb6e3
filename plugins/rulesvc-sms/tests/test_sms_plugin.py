"""The SMS channel against a local peer that checks requests as the Twilio Messages API does."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from aiohttp import web
from rulesvc_sms import SmsChannel, segments, twilio_signature

from rulesvc.config import Settings
from rulesvc.plugins import builtin_channels
from rulesvc.web.app import create_app
from tests.helpers import eventually, go, history, send, settled, setup

SID, TOKEN = "AC" + "1" * 32, "auth-token-xyz"


class FakeTwilio:
    """Validates as the provider: Basic auth, account in the path, form fields, E.164, body length."""

    def __init__(self) -> None:
        self.messages: list[dict[str, str]] = []
        self.script: list[tuple[int, dict[str, Any]]] = []

    async def create(self, request: web.Request) -> web.Response:
        expected = "Basic " + base64.b64encode(f"{SID}:{TOKEN}".encode()).decode()
        if request.headers.get("Authorization") != expected or request.match_info["sid"] != SID:
            return web.json_response({"code": 20003, "message": "Authenticate"}, status=401)
        if request.content_type != "application/x-www-form-urlencoded":
            return web.json_response({"code": 20001, "message": "form encoding required"}, status=400)
        form = {k: str(v) for k, v in (await request.post()).items()}
        if self.script:
            status, body = self.script.pop(0)
            return web.json_response(body, status=status)
        if not form.get("To", "").startswith("+") or len(form.get("Body", "")) > 1600:
            return web.json_response({"code": 21211, "message": "Invalid 'To' Phone Number"}, status=400)
        if not (form.get("From") or form.get("MessagingServiceSid")):
            return web.json_response(
                {"code": 21603, "message": "A 'From' phone number is required"}, status=400
            )
        self.messages.append(form)
        return web.json_response({"sid": f"SM{len(self.messages):032d}", "status": "queued"}, status=201)


async def fake(aiohttp_server: Any) -> tuple[FakeTwilio, str]:
    peer = FakeTwilio()
    app = web.Application()
    app.router.add_post("/2010-04-01/Accounts/{sid}/Messages.json", peer.create)
    server = await aiohttp_server(app)
    return peer, str(server.make_url("")).rstrip("/")


PROFILE = {"phone": "+4915112345678", "consent": {"sms": True}}


async def sms_client(make_client: Any, settings: Settings, base: str) -> Any:
    """The service with the SMS channel pointed at the peer, and one consenting contact."""
    channels = builtin_channels()
    channels.register(
        SmsChannel({"account_sid": SID, "auth_token": TOKEN, "from": "+15005550006", "base_url": base})
    )
    client = await make_client(create_app(setup(settings, [send("sms")]), channels))
    await client.put("/v1/contacts/c1", json=PROFILE)
    return client


async def test_sms_end_to_end_with_retry_and_status_callback(
    make_client: Any, aiohttp_server: Any, settings: Settings
) -> None:
    peer, base = await fake(aiohttp_server)
    peer.script = [(429, {"code": 20429, "message": "Too Many Requests"})]
    callback_url = "https://rulesvc.example/v1/channels/sms/callbacks"
    channel = SmsChannel({"account_sid": SID, "auth_token": TOKEN, "from": "+15005550006", "base_url": base,
                          "status_callback_url": callback_url})  # fmt: skip
    channels = builtin_channels()
    channels.register(channel)
    client = await make_client(create_app(setup(settings, [send("sms")], retry_base_seconds=0.05), channels))
    await client.put("/v1/contacts/c1", json=PROFILE)
    await go(client, code="S-9")
    [msg] = await settled(client)
    assert msg["status"] == "sent" and msg["attempt"] == 2
    [form] = peer.messages
    assert form == {"To": "+4915112345678", "Body": "Your code is S-9.", "From": "+15005550006",
                    "StatusCallback": callback_url}  # fmt: skip

    report = {"MessageSid": "SM" + "0" * 31 + "1", "MessageStatus": "delivered", "AccountSid": SID}
    forged = {"X-Twilio-Signature": "bm9wZQ=="}
    assert (await client.post("/v1/channels/sms/callbacks", data=report, headers=forged)).status == 401
    signed = {"X-Twilio-Signature": twilio_signature(TOKEN, callback_url, report)}
    resp = await client.post("/v1/channels/sms/callbacks", data=report, headers=signed)
    assert resp.status == 200 and await resp.json() == {"accepted": 1}

    async def delivered() -> bool:
        return (await history(client))[0]["status"] == "delivered"

    await eventually(delivered, 10)


async def test_carrier_block_suppresses_the_number(
    make_client: Any, aiohttp_server: Any, settings: Settings
) -> None:
    peer, base = await fake(aiohttp_server)
    client = await sms_client(make_client, settings, base)
    await go(client)
    await settled(client)
    report = {"MessageSid": "SM" + "0" * 31 + "1", "MessageStatus": "undelivered", "ErrorCode": "30007"}
    # Without status_callback_url the signed URL is the one the provider called.
    url = str(client.make_url("/v1/channels/sms/callbacks"))
    signed = {"X-Twilio-Signature": twilio_signature(TOKEN, url, report)}
    assert (await client.post("/v1/channels/sms/callbacks", data=report, headers=signed)).status == 200
    await go(client)

    async def suppressed() -> bool:
        msgs = await history(client)
        return len(msgs) == 2 and msgs[1]["status"] == "suppressed"

    await eventually(suppressed, 10)
    assert (await history(client))[0]["status"] == "blocked"
    assert len(peer.messages) == 1


async def test_invalid_number_is_a_permanent_failure(
    make_client: Any, aiohttp_server: Any, settings: Settings
) -> None:
    peer, base = await fake(aiohttp_server)
    peer.script = [(400, {"code": 21211, "message": "Invalid 'To' Phone Number"})]
    client = await sms_client(make_client, settings, base)
    await go(client)
    [msg] = await settled(client)
    assert (msg["status"], msg["reason"]) == ("failed", "provider_rejected")
    assert msg["detail"] == "HTTP 400: 21211 Invalid 'To' Phone Number"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a" * 160, ("GSM-7", 1)),
        ("a" * 161, ("GSM-7", 2)),
        ("a" * 306, ("GSM-7", 2)),
        ("a" * 307, ("GSM-7", 3)),
        ("€" * 80, ("GSM-7", 1)),  # extension characters count twice: 160 units
        ("€" * 81, ("GSM-7", 2)),
        ("ż" * 70, ("UCS-2", 1)),
        ("ż" * 71, ("UCS-2", 2)),
        ("😀" * 35, ("UCS-2", 1)),  # outside the BMP: two units each
        ("😀" * 36, ("UCS-2", 2)),
        ("Grüße aus Köln", ("GSM-7", 1)),  # ü, ß and ö are in the GSM-7 alphabet
        ("Zażółć gęślą jaźń", ("UCS-2", 1)),  # Polish letters are not
    ],
)
def test_segment_counting(text: str, expected: tuple[str, int]) -> None:
    assert segments(text) == expected
