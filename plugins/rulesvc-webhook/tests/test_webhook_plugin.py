"""The webhook channel against a real HTTP receiver on 127.0.0.1 that checks signatures as documented."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from typing import Any

from aiohttp import web
from rulesvc_webhook import WebhookChannel

from rulesvc.config import Settings
from rulesvc.plugins import builtin_channels
from rulesvc.web.app import create_app
from tests.helpers import go, send, settled, setup

SECRET = "whsec_test_123"


class Receiver:
    """What a shop's endpoint does: verify, refuse stale or forged requests, de-duplicate by key."""

    def __init__(self) -> None:
        self.accepted: list[dict[str, Any]] = []
        self.keys: list[str] = []
        self.script: list[int] = []

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        timestamp = request.headers["X-Rulesvc-Timestamp"]
        expected = (
            "v1=" + hmac.new(SECRET.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
        )
        if not hmac.compare_digest(expected, request.headers["X-Rulesvc-Signature"]):
            return web.Response(status=401, text="bad signature")
        if abs(time.time() - int(timestamp)) > 300:
            return web.Response(status=401, text="stale")
        assert request.content_type == "application/json"
        key = request.headers["Idempotency-Key"]
        self.keys.append(key)
        if self.script:
            status = self.script.pop(0)
            return web.Response(
                status=status, headers={"Retry-After": "0"} if status == 429 else {}, text="busy"
            )
        payload = json.loads(body)
        if payload["message_id"] not in {p["message_id"] for p in self.accepted}:
            self.accepted.append(payload)
        return web.Response(status=204)


async def receiver_url(aiohttp_server: Any, receiver: Receiver) -> str:
    app = web.Application()
    app.router.add_post("/hooks", receiver.handle)
    server = await aiohttp_server(app)
    return str(server.make_url("/hooks"))


async def test_signed_delivery_end_to_end(make_client: Any, aiohttp_server: Any, settings: Settings) -> None:
    receiver = Receiver()
    receiver.script = [503, 429]  # retried, then accepted
    channels = builtin_channels()
    channels.register(WebhookChannel({"url": await receiver_url(aiohttp_server, receiver), "secret": SECRET}))
    app = create_app(
        setup(settings, [send("webhook", transactional=True)], retry_base_seconds=0.05), channels
    )
    client = await make_client(app)
    await go(client, code="W-7")
    [msg] = await settled(client)
    assert msg["status"] == "sent" and msg["attempt"] == 3
    assert receiver.keys == [msg["message_id"]] * 3
    [payload] = receiver.accepted
    assert payload["contact_id"] == "c1" and payload["params"] == {"code": "W-7"}
    assert payload["content"]["body"] == "Code W-7"


async def test_wrong_secret_is_a_permanent_failure(
    make_client: Any, aiohttp_server: Any, settings: Settings
) -> None:
    receiver = Receiver()
    channels = builtin_channels()
    channels.register(
        WebhookChannel({"url": await receiver_url(aiohttp_server, receiver), "secret": "wrong"})
    )
    client = await make_client(create_app(setup(settings, [send("webhook", transactional=True)]), channels))
    await go(client)
    [msg] = await settled(client)
    assert (msg["status"], msg["reason"], msg["detail"]) == (
        "failed",
        "provider_rejected",
        "HTTP 401: bad signature",
    )
    assert receiver.accepted == []


def test_unconfigured_is_reported() -> None:
    assert WebhookChannel({}).status() == (False, "missing setting(s): url, secret")
