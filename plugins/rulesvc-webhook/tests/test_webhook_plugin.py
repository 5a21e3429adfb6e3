"""The webhook channel against a real HTTP receiver on 127.0.0.1 that verifies each request with the
Standard Webhooks library (`standardwebhooks`), as a shop's endpoint would."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from rulesvc_webhook import WebhookChannel

from rulesvc.channels import ChannelSettingsError
from rulesvc.config import Settings
from rulesvc.plugins import builtin_channels
from rulesvc.web.app import create_app
from tests.helpers import go, send, settled, setup
from tests.webhook_flow import SECRET, verified

OLD_SECRET = "whsec_" + base64.b64encode(b"the secret before rotation!!").decode()


class Receiver:
    """What a shop's endpoint does: verify, refuse stale or forged requests, de-duplicate by id."""

    def __init__(self, secret: str = SECRET) -> None:
        self.secret = secret
        self.accepted: list[dict[str, Any]] = []
        self.requests: list[tuple[bytes, dict[str, str]]] = []
        self.script: list[int] = []

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.requests.append((body, dict(request.headers)))
        payload = verified(body, request.headers, self.secret)
        if payload is None:
            return web.Response(status=401, text="bad signature")
        assert request.content_type == "application/json"
        if self.script:
            status = self.script.pop(0)
            return web.Response(
                status=status, headers={"Retry-After": "0"} if status == 429 else {}, text="busy"
            )
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
    # webhook-id is the message id on every attempt: the receiver's idempotency key, as is Idempotency-Key.
    ids = [(h["webhook-id"], h["Idempotency-Key"]) for _, h in receiver.requests]
    assert ids == [(msg["message_id"], msg["message_id"])] * 3
    [payload] = receiver.accepted
    assert payload["contact_id"] == "c1" and payload["params"] == {"code": "W-7"}
    assert payload["content"]["body"] == "Code W-7"
    # The judge can say no: the same request with one byte of the body changed is refused.
    body, headers = receiver.requests[-1]
    assert verified(body.replace(b"W-7", b"W-8"), headers) is None


async def test_wrong_secret_is_a_permanent_failure(
    make_client: Any, aiohttp_server: Any, settings: Settings
) -> None:
    receiver = Receiver()
    channels = builtin_channels()
    url = await receiver_url(aiohttp_server, receiver)
    channels.register(WebhookChannel({"url": url, "secret": OLD_SECRET}))
    client = await make_client(create_app(setup(settings, [send("webhook", transactional=True)]), channels))
    await go(client)
    [msg] = await settled(client)
    assert (msg["status"], msg["reason"], msg["detail"]) == (
        "failed",
        "provider_rejected",
        "HTTP 401: bad signature",
    )
    assert receiver.accepted == []


async def test_rotation_signs_with_both_secrets(
    make_client: Any, aiohttp_server: Any, settings: Settings
) -> None:
    """During a rotation a receiver still holding the old secret and one given the new both accept."""
    receiver = Receiver(OLD_SECRET)
    channels = builtin_channels()
    url = await receiver_url(aiohttp_server, receiver)
    channels.register(WebhookChannel({"url": url, "secret": SECRET, "previous_secret": OLD_SECRET}))
    client = await make_client(create_app(setup(settings, [send("webhook", transactional=True)]), channels))
    await go(client, code="R-1")
    [msg] = await settled(client)
    assert msg["status"] == "sent"
    [(body, headers)] = receiver.requests
    assert len(headers["webhook-signature"].split(" ")) == 2
    assert verified(body, headers, SECRET) == verified(body, headers, OLD_SECRET) == json.loads(body)
    other = "whsec_" + base64.b64encode(b"a third secret, never used").decode()
    assert verified(body, headers, other) is None


@pytest.mark.parametrize(
    ("secret", "problem"),
    [
        ("reliability-secret", "expected `whsec_` followed by base64"),
        ("whsec_not base64!", "the part after `whsec_` is not base64"),
        ("whsec_" + base64.b64encode(b"short").decode(), "the key is 5 bytes; Standard Webhooks asks for 24"),
    ],
)
def test_a_secret_the_receivers_libraries_cannot_use_is_a_settings_error(secret: str, problem: str) -> None:
    with pytest.raises(ChannelSettingsError) as caught:
        WebhookChannel({"url": "https://shop.example/hooks", "secret": secret})
    [line] = caught.value.problems
    assert line.startswith(f"channels.webhook.secret: {problem}")
    assert secret not in line  # a secret is never echoed


def test_unconfigured_is_reported() -> None:
    assert WebhookChannel({}).status() == (False, "missing setting(s): url, secret")


def docs_receiver() -> str:
    """The Python receiver example of docs/channels.md, as printed there."""
    text = (Path(__file__).parents[3] / "docs" / "channels.md").read_text()
    section = text[text.index("### Webhook\n") :]
    start = section.index("```python\n") + len("```python\n")
    return section[start : section.index("```\n", start)]


async def test_the_documented_receiver_accepts_our_messages_once(
    make_client: Any, aiohttp_server: Any, settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    monkeypatch.setenv("RULESVC_WEBHOOK_SECRET", SECRET)
    example: dict[str, Any] = {}
    exec(compile(docs_receiver(), "docs/channels.md", "exec"), example)  # the docs' own code
    app = web.Application()
    app.router.add_post("/hooks", example["rulesvc_message"])
    server = await aiohttp_server(app)
    channels = builtin_channels()
    channels.register(WebhookChannel({"url": str(server.make_url("/hooks")), "secret": SECRET}))
    client = await make_client(create_app(setup(settings, [send("webhook", transactional=True)]), channels))
    await go(client, code="D-1")
    [msg] = await settled(client)
    assert msg["status"] == "sent"
    assert example["handled"] == {msg["message_id"]}
    [printed] = [line for line in capsys.readouterr().out.splitlines() if line.startswith("hello {")]
    assert "'body': 'Code D-1'" in printed  # the example printed the verified message's template and content
