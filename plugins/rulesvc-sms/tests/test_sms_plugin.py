"""The SMS channel against a local peer that checks requests as the Twilio Messages API does; callbacks
signed and requests compared with the `twilio` library itself, the provider's own code as the judge."""

from __future__ import annotations

import base64
import json
import logging
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
from aiohttp import web
from rulesvc_sms import SmsChannel, segments, twilio_signature
from twilio.http import HttpClient
from twilio.http.response import Response
from twilio.request_validator import RequestValidator
from twilio.rest import Client

from rulesvc.channels import ChannelSettingsError
from rulesvc.config import Settings
from rulesvc.plugins import builtin_channels
from rulesvc.web.app import create_app
from tests.helpers import entry_doc, eventually, go, history, message_doc, send, settled, setup

SID, TOKEN = "AC" + "1" * 32, "auth-token-xyz"
CALLBACKS = "/v1/channels/sms/callbacks"


def twilio_signs(url: str, params: dict[str, str], token: str = TOKEN) -> dict[str, str]:
    """The X-Twilio-Signature header, as Twilio's own library computes it."""
    return {"X-Twilio-Signature": RequestValidator(token).compute_signature(url, params)}


class Captured(HttpClient):
    """An HTTP client for the twilio SDK that records the request instead of making it."""

    def __init__(self) -> None:
        super().__init__(logging.getLogger(__name__), is_async=False)
        self.requests: list[tuple[str, str, dict[str, Any], Any]] = []

    def request(
        self,
        method: str,
        uri: str,
        params: Any = None,
        data: Any = None,
        headers: Any = None,
        auth: Any = None,
        timeout: Any = None,
        allow_redirects: bool = False,
    ) -> Response:
        self.requests.append((method, uri, dict(data or {}), auth))
        return Response(201, json.dumps({"sid": "SM" + "0" * 32, "status": "queued"}))


class FakeTwilio:
    """Validates as the provider: Basic auth, account in the path, form fields, E.164, body length."""

    def __init__(self) -> None:
        self.messages: list[dict[str, str]] = []
        self.script: list[tuple[int, dict[str, Any]]] = []
        self.paths: list[str] = []

    async def create(self, request: web.Request) -> web.Response:
        self.paths.append(request.path)
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
    # The same message sent with Twilio's own SDK: the same path, fields and credentials.
    sdk = Captured()
    Client(SID, TOKEN, http_client=sdk).messages.create(
        to="+4915112345678", from_="+15005550006", body="Your code is S-9.", status_callback=callback_url
    )
    [(method, uri, data, auth)] = sdk.requests
    assert (method, urlsplit(uri).path, data, auth) == ("POST", peer.paths[-1], form, (SID, TOKEN))

    report = {"MessageSid": "SM" + "0" * 31 + "1", "MessageStatus": "delivered", "AccountSid": SID}
    forged = {"X-Twilio-Signature": "bm9wZQ=="}
    assert (await client.post(CALLBACKS, data=report, headers=forged)).status == 401
    resp = await client.post(CALLBACKS, data=report, headers=twilio_signs(callback_url, report))
    assert resp.status == 200 and await resp.json() == {"accepted": 1}

    async def delivered() -> bool:
        return (await history(client))[0]["status"] == "delivered"

    await eventually(delivered)


async def test_carrier_block_suppresses_the_number(
    make_client: Any, aiohttp_server: Any, settings: Settings
) -> None:
    peer, base = await fake(aiohttp_server)
    client = await sms_client(make_client, settings, base)
    await go(client)
    await settled(client)
    report = {"MessageSid": "SM" + "0" * 31 + "1", "MessageStatus": "undelivered", "ErrorCode": "30007"}
    # Without status_callback_url the signed URL is the one the provider called.
    url = str(client.make_url(CALLBACKS))
    assert (await client.post(CALLBACKS, data=report, headers=twilio_signs(url, report))).status == 200
    await go(client)

    async def suppressed() -> bool:
        msgs = await history(client)
        return len(msgs) == 2 and msgs[1]["status"] == "suppressed"

    await eventually(suppressed)
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


async def test_an_opted_out_recipient_is_blocked_at_once_and_the_number_suppressed(
    make_client: Any, aiohttp_server: Any, settings: Settings, db: Any
) -> None:
    """Twilio answers 21610 synchronously for a number that texted STOP: the same fate as a callback's."""
    peer, base = await fake(aiohttp_server)
    peer.script = [(400, {"code": 21610, "message": "Attempt to send to unsubscribed recipient"})]
    client = await sms_client(make_client, settings, base)
    await go(client)
    [msg] = await settled(client)
    assert (msg["status"], msg["reason"]) == ("blocked", "recipient_blocked")
    assert msg["detail"] == "HTTP 400: 21610 Attempt to send to unsubscribed recipient"

    async def suppressed_in_the_database() -> bool:
        contact = await db.contacts.find_one({"_id": "c1"})
        return bool(contact and contact.get("state", {}).get("suppressed", {}).get("sms"))

    await eventually(suppressed_in_the_database)
    # Rules hear of it as of a callback's block: a message_blocked event for that message.
    [event] = await db.events.find({"type": "message_blocked"}).to_list()
    assert (event["attributes"]["message_id"], event["attributes"]["synchronous"]) == (
        msg["message_id"],
        True,
    )
    await go(client)
    msgs = await settled(client, count=2)
    assert (msgs[1]["status"], msgs[1]["reason"]) == ("suppressed", "suppression_list")
    assert len(peer.paths) == 1 and peer.messages == []  # the second message never reached the provider


async def test_a_block_written_just_before_a_crash_still_suppresses_the_number(
    make_client: Any, aiohttp_server: Any, settings: Settings, db: Any
) -> None:
    """The message said `blocked` but the process died before its `message_blocked` was queued: the
    entry, run again, queues it then (and calls the provider no more)."""
    due = datetime.now(UTC) - timedelta(seconds=1)
    planted = message_doc("m-blocked", "c1", "sms", due, status="blocked", reason="recipient_blocked",
                          detail="HTTP 400: 21610 Attempt to send to unsubscribed recipient",
                          sent_channel="sms", attempt=1)  # fmt: skip
    await db.messages.insert_one(planted)
    await db.schedule.insert_one(entry_doc({**planted, "status": "scheduled"}))
    peer, base = await fake(aiohttp_server)
    await sms_client(make_client, settings, base)

    async def suppressed_in_the_database() -> bool:
        contact = await db.contacts.find_one({"_id": "c1"})
        return bool(contact and contact.get("state", {}).get("suppressed", {}).get("sms"))

    await eventually(suppressed_in_the_database)
    [event] = await db.events.find({"type": "message_blocked"}).to_list()
    assert event["attributes"]["message_id"] == "m-blocked"
    assert peer.paths == []  # the provider was not asked again
    assert (await db.messages.find_one({"_id": "m-blocked"}))["status"] == "blocked"


def callback_channel(**settings: str) -> SmsChannel:
    return SmsChannel({"account_sid": SID, "auth_token": TOKEN, "from": "+15005550006", **settings})


async def callback_client(make_client: Any, settings: Settings, channel: SmsChannel) -> Any:
    channels = builtin_channels()
    channels.register(channel)
    return await make_client(create_app(setup(settings, [send("sms")]), channels))


REPORT = {"MessageSid": "SM" + "9" * 32, "MessageStatus": "delivered"}  # a message we do not know: 0 accepted


@pytest.mark.parametrize(
    ("configured", "signed"),
    [
        ("https://rulesvc.shop.example/v1/channels/sms/callbacks",
         "https://rulesvc.shop.example:443/v1/channels/sms/callbacks"),
        ("https://rulesvc.shop.example:443/v1/channels/sms/callbacks",
         "https://rulesvc.shop.example/v1/channels/sms/callbacks"),
        ("http://rulesvc.shop.example/v1/channels/sms/callbacks",
         "http://rulesvc.shop.example:80/v1/channels/sms/callbacks"),
    ],
)  # fmt: skip
async def test_callbacks_are_accepted_with_and_without_the_default_port(
    make_client: Any, settings: Settings, configured: str, signed: str
) -> None:
    """As twilio's RequestValidator.validate does: Twilio signs the URL with or without :443 / :80."""
    assert RequestValidator(TOKEN).validate(
        signed, REPORT, twilio_signs(configured, REPORT)["X-Twilio-Signature"]
    )
    client = await callback_client(make_client, settings, callback_channel(status_callback_url=configured))
    resp = await client.post(CALLBACKS, data=REPORT, headers=twilio_signs(signed, REPORT))
    assert resp.status == 200 and await resp.json() == {"accepted": 0}
    other_port = urlsplit(signed)._replace(netloc="rulesvc.shop.example:8443").geturl()  # not a default port
    assert (await client.post(CALLBACKS, data=REPORT, headers=twilio_signs(other_port, REPORT))).status == 401


async def test_behind_a_proxy_the_public_url_is_what_twilio_signed(
    make_client: Any, settings: Settings
) -> None:
    channel = callback_channel(public_url="https://rulesvc.shop.example/")
    assert channel.callback_url == "https://rulesvc.shop.example/v1/channels/sms/callbacks"  # StatusCallback
    client = await callback_client(make_client, settings, channel)
    for url in ("https://rulesvc.shop.example/v1/channels/sms/callbacks?shop=eu",
                "https://rulesvc.shop.example:443/v1/channels/sms/callbacks?shop=eu"):  # fmt: skip
        resp = await client.post(CALLBACKS + "?shop=eu", data=REPORT, headers=twilio_signs(url, REPORT))
        assert resp.status == 200, await resp.text()
    # The URL the service sees itself (http://127.0.0.1:port) is not what Twilio called: refused.
    local = str(client.make_url(CALLBACKS))
    resp = await client.post(CALLBACKS, data=REPORT, headers=twilio_signs(local, REPORT))
    assert resp.status == 401 and (await resp.json())["error"] == "X-Twilio-Signature does not match"


async def test_twilios_documented_signature_example_is_accepted(make_client: Any, settings: Settings) -> None:
    """The example of Twilio's "Validating requests" documentation, its literal values:
    https://www.twilio.com/docs/usage/security#validating-requests (also in twilio-php's
    docs/usage/validation.rst): auth token 12345, this URL and these parameters sign to this value."""
    url = "https://mycompany.com/myapp.php?foo=1&bar=2"
    params = {"CallSid": "CA1234567890ABCDE", "Caller": "+14158675309", "Digits": "1234",
              "From": "+14158675309", "To": "+18005551212"}  # fmt: skip
    documented = "RSOYDt4T1cUTdK1PDd93/VVr8B8="
    assert twilio_signature("12345", url, {k: [v] for k, v in params.items()}) == documented
    channel = SmsChannel({"account_sid": SID, "auth_token": "12345", "from": "+15005550006",
                          "status_callback_url": url})  # fmt: skip
    client = await callback_client(make_client, settings, channel)
    resp = await client.post(CALLBACKS, data=params, headers={"X-Twilio-Signature": documented})
    # The signature passes; the body is a voice call's, not a message status report.
    assert (resp.status, (await resp.json())["error"]) == (400, "MessageSid and MessageStatus are required")
    forged = {"X-Twilio-Signature": documented.replace("R", "r", 1)}
    assert (await client.post(CALLBACKS, data=params, headers=forged)).status == 401


async def test_a_callback_body_that_is_not_a_form_is_415(make_client: Any, settings: Settings) -> None:
    client = await callback_client(make_client, settings, callback_channel())
    multipart = aiohttp.FormData({"MessageSid": "SM1", "MessageStatus": "delivered"})
    multipart.add_field("file", b"x", filename="x.txt")
    for body in (multipart, json.dumps(REPORT)):
        resp = await client.post(CALLBACKS, data=body)
        answer = await resp.json()
        assert resp.status == 415, answer
        assert answer["error"].startswith("expected a form-encoded body (application/x-www-form-urlencoded)")
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    resp = await client.post(CALLBACKS, data=b"\xff\xfe=1", headers=form)  # not UTF-8
    assert resp.status == 400
    assert (await resp.json())["error"].startswith("the form-encoded body cannot be read: 'utf-8' codec")


@pytest.mark.parametrize(
    ("given", "problem"),
    [
        ({"public_url": "rulesvc.shop.example"},
         "channels.sms.public_url: expected an http or https URL such as https://rulesvc.shop.example, "
         "got 'rulesvc.shop.example'"),
        ({"status_callback_url": "https://rulesvc.shop.example:44x/cb"},
         "channels.sms.status_callback_url: the port is not a number, in 'https://rulesvc.shop.example:44x/cb'"),
        ({"status_callback_url": "https://twilio:s3cr3t@rulesvc.shop.example:44x/cb"},  # no credentials shown
         "channels.sms.status_callback_url: the port is not a number, in 'https://rulesvc.shop.example:44x/cb'"),
    ],
)  # fmt: skip
def test_a_callback_url_twilio_could_not_call_is_a_settings_error(
    given: dict[str, str], problem: str
) -> None:
    with pytest.raises(ChannelSettingsError) as caught:
        callback_channel(**given)
    assert caught.value.problems == [problem]


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
