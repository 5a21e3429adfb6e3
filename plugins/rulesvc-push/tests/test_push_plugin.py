"""The FCM push channel against a local peer that checks the OAuth2 JWT grant and the v1 message."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

from aiohttp import web
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from rulesvc_push import SCOPE, PushChannel

from rulesvc.config import Settings
from rulesvc.plugins import builtin_channels
from rulesvc.web.app import create_app
from tests.helpers import go, send, settled, setup


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class FakeGoogle:
    """Token endpoint and FCM v1 as Google checks them."""

    def __init__(self, public_key: rsa.RSAPublicKey, token_uri: str = "") -> None:
        self.public_key = public_key
        self.token_uri = token_uri
        self.issued: list[str] = []
        self.valid: set[str] = set()
        self.messages: list[dict[str, Any]] = []
        self.unregistered = {"dead-token"}

    async def token(self, request: web.Request) -> web.Response:
        form = await request.post()
        if form.get("grant_type") != "urn:ietf:params:oauth:grant-type:jwt-bearer":
            return web.json_response({"error": "unsupported_grant_type"}, status=400)
        head, claims, signature = str(form["assertion"]).split(".")
        try:
            self.public_key.verify(
                unb64(signature), f"{head}.{claims}".encode(), padding.PKCS1v15(), hashes.SHA256()
            )
        except InvalidSignature:
            return web.json_response({"error": "invalid_grant"}, status=400)
        body = json.loads(unb64(claims))
        assert json.loads(unb64(head))["alg"] == "RS256"
        if body["aud"] != self.token_uri or body["scope"] != SCOPE or body["exp"] - body["iat"] > 3600:
            return web.json_response({"error": "invalid_grant", "error_description": "claims"}, status=400)
        if abs(body["iat"] - time.time()) > 300:
            return web.json_response({"error": "invalid_grant", "error_description": "clock"}, status=400)
        token = f"ya29.token-{len(self.issued)}"
        self.issued.append(token)
        self.valid = {token}  # issuing a new token revokes the old one here, to exercise renewal
        return web.json_response({"access_token": token, "expires_in": 3599, "token_type": "Bearer"})

    async def send(self, request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or auth[7:] not in self.valid:
            return web.json_response({"error": {"code": 401, "status": "UNAUTHENTICATED"}}, status=401)
        if request.match_info["project"] != "shop-app":
            return web.json_response({"error": {"code": 403, "status": "PERMISSION_DENIED"}}, status=403)
        message = (await request.json())["message"]
        if message["token"] in self.unregistered:
            error = {"code": 404, "status": "NOT_FOUND", "message": "Requested entity was not found.",
                     "details": [{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
                                  "errorCode": "UNREGISTERED"}]}  # fmt: skip
            return web.json_response({"error": error}, status=404)
        assert set(message) <= {"token", "notification", "data"}
        assert all(isinstance(v, str) for v in message["data"].values())  # FCM data values are strings
        self.messages.append(message)
        return web.json_response({"name": f"projects/shop-app/messages/{len(self.messages)}"})


async def google(aiohttp_server: Any) -> tuple[FakeGoogle, dict[str, Any], str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    peer = FakeGoogle(key.public_key())
    app = web.Application()
    app.router.add_post("/token", peer.token)
    app.router.add_post("/v1/projects/{project}/messages:send", peer.send)
    server = await aiohttp_server(app)
    base = str(server.make_url("")).rstrip("/")
    peer.token_uri = f"{base}/token"
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()  # fmt: skip
    account = {
        "type": "service_account",
        "project_id": "shop-app",
        "private_key_id": "k1",
        "private_key": pem,
        "client_email": "rulesvc@shop-app.iam.gserviceaccount.com",
        "token_uri": peer.token_uri,
    }
    return peer, account, base


async def test_push_end_to_end_removes_dead_tokens(
    make_client: Any, aiohttp_server: Any, settings: Settings, tmp_path: Any
) -> None:
    peer, account, base = await google(aiohttp_server)
    key_file = tmp_path / "sa.json"
    key_file.write_text(json.dumps(account))
    channel = PushChannel({"service_account_file": str(key_file), "base_url": base})
    assert channel.status() == (True, "FCM v1, project shop-app")
    channels = builtin_channels()
    channels.register(channel)
    client = await make_client(create_app(setup(settings, [send("push")]), channels))
    profile = {"push_tokens": ["dead-token", "live-token"], "consent": {"push": True}}
    await client.put("/v1/contacts/c1", json=profile)
    await go(client, code="P-3")
    [msg] = await settled(client)
    assert msg["status"] == "sent"
    [message] = peer.messages
    assert message["token"] == "live-token"
    assert message["notification"] == {"title": "Hello", "body": "Code P-3"}
    assert message["data"] == {"message_id": msg["message_id"], "code": "P-3"}
    assert (await (await client.get("/v1/contacts/c1")).json())["push_tokens"] == ["live-token"]

    peer.valid = set()  # the token was revoked: the channel renews it once and goes on
    await go(client, code="P-4")
    msgs = await settled(client, count=2)
    assert msgs[1]["status"] == "sent" and len(peer.issued) == 2


async def test_bad_key_is_reported(tmp_path: Any) -> None:
    assert PushChannel({}).status()[0] is False
    broken = tmp_path / "sa.json"
    broken.write_text("{not json")
    configured, detail = PushChannel({"service_account_file": str(broken)}).status()
    assert not configured and detail.startswith("cannot read the service account key")
