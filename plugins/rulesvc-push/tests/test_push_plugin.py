"""The FCM push channel against a local peer that checks the OAuth2 JWT grant as Google does (PyJWT, with the
public half of the test's own service-account key) and answers the v1 send as FCM does."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from rulesvc_push import PushChannel

from rulesvc.config import Settings
from rulesvc.plugins import builtin_channels
from rulesvc.web.app import create_app
from tests.helpers import eventually, go, send, settled, setup

CLIENT_EMAIL = "rulesvc@shop-app.iam.gserviceaccount.com"
KEY_ID = "5f1c0a2b9d"


def fcm_error(status: int, code: str, message: str, error_code: str | None) -> tuple[int, dict[str, Any]]:
    """An FCM v1 error body; `error_code` goes in details[].errorCode as FCM puts it."""
    details = [{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": error_code}]
    error = {"code": status, "status": code, "message": message, "details": details if error_code else []}
    return status, {"error": error}


class FakeGoogle:
    """Token endpoint and FCM v1 as Google checks them."""

    def __init__(self, public_key: rsa.RSAPublicKey) -> None:
        self.public_key = public_key
        self.token_uri = ""
        self.issued: list[str] = []
        self.refused: list[str] = []  # why assertions were refused
        self.valid: set[str] = set()
        self.messages: list[dict[str, Any]] = []
        self.answers: dict[str, tuple[int, Any]] = {
            "dead-token": fcm_error(404, "NOT_FOUND", "Requested entity was not found.", "UNREGISTERED"),
            "malformed-token": fcm_error(
                400,
                "INVALID_ARGUMENT",
                "The registration token is not a valid FCM registration token",
                "INVALID_ARGUMENT",
            ),
            "wrong-project-token": fcm_error(404, "NOT_FOUND", "Requested entity was not found.", None),
            "behind-a-proxy-token": (404, "<html>Not Found</html>"),
        }

    def refuse(self, why: str) -> web.Response:
        self.refused.append(why)
        return web.json_response({"error": "invalid_grant", "error_description": why}, status=400)

    async def token(self, request: web.Request) -> web.Response:
        form = await request.post()
        if form.get("grant_type") != "urn:ietf:params:oauth:grant-type:jwt-bearer":
            return web.json_response({"error": "unsupported_grant_type"}, status=400)
        assertion = str(form.get("assertion", ""))
        try:
            header = jwt.get_unverified_header(assertion)
            claims = jwt.decode(
                assertion,
                self.public_key,
                algorithms=["RS256"],
                audience=self.token_uri,
                issuer=CLIENT_EMAIL,
                options={"require": ["iss", "aud", "iat", "exp"]},
                leeway=300,
            )
        except jwt.InvalidTokenError as exc:
            return self.refuse(f"{type(exc).__name__}: {exc}")
        if header.get("kid") != KEY_ID:
            return self.refuse(f"kid {header.get('kid')!r} is not the key's private_key_id")
        if "https://www.googleapis.com/auth/firebase.messaging" not in str(claims.get("scope", "")).split():
            return self.refuse("scope lacks firebase.messaging")
        if not 0 < claims["exp"] - claims["iat"] <= 3600:
            return self.refuse("an assertion lives at most an hour")
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
        if message["token"] in self.answers:
            status, body = self.answers[message["token"]]
            if isinstance(body, str):
                return web.Response(status=status, text=body, content_type="text/html")
            return web.json_response(body, status=status)
        assert set(message) <= {"token", "notification", "data", "webpush"}
        assert all(isinstance(v, str) for v in message["data"].values())  # FCM data values are strings
        link = message.get("webpush", {}).get("fcm_options", {}).get("link")
        if link is not None and not link.startswith(
            "https://"
        ):  # FCM: "For all URL values, HTTPS is required"
            return web.json_response(fcm_error(400, "INVALID_ARGUMENT", "link", None)[1], status=400)
        self.messages.append(message)
        return web.json_response({"name": f"projects/shop-app/messages/{len(self.messages)}"})


async def google(aiohttp_server: Any, **account_changes: str) -> tuple[FakeGoogle, dict[str, Any], str]:
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
        "private_key_id": KEY_ID,
        "private_key": pem,
        "client_email": CLIENT_EMAIL,
        "token_uri": peer.token_uri,
        **account_changes,
    }
    return peer, account, base


async def push_client(
    make_client: Any, settings: Settings, tmp_path: Path, account: dict[str, Any], base: str
) -> Any:
    key_file = tmp_path / "sa.json"
    key_file.write_text(json.dumps(account))
    channel = PushChannel({"service_account_file": str(key_file), "base_url": base})
    assert channel.status() == (True, "FCM v1, project shop-app")
    channels = builtin_channels()
    channels.register(channel)
    return await make_client(create_app(setup(settings, [send("push")]), channels))


async def test_push_end_to_end_removes_only_unregistered_tokens(
    make_client: Any, aiohttp_server: Any, settings: Settings, tmp_path: Path, db: Any
) -> None:
    peer, account, base = await google(aiohttp_server)
    client = await push_client(make_client, settings, tmp_path, account, base)
    (Path(settings.rulesets_dir) / "templates" / "hello.url").write_text(
        "https://shop.example/cart?c={{ params.code }}"
    )
    tokens = ["dead-token", "malformed-token", "wrong-project-token", "behind-a-proxy-token", "live-token"]
    await client.put("/v1/contacts/c1", json={"push_tokens": tokens, "consent": {"push": True}})
    await go(client, code="P-3")
    [msg] = await settled(client)
    assert msg["status"] == "sent" and peer.refused == []
    [message] = peer.messages
    assert message["token"] == "live-token"
    assert message["notification"] == {"title": "Hello", "body": "Code P-3"}
    url = "https://shop.example/cart?c=P-3"
    assert message["data"] == {"message_id": msg["message_id"], "code": "P-3", "url": url}
    assert message["webpush"] == {"fcm_options": {"link": url}}
    # Only the token FCM called UNREGISTERED is gone; a 400 or another 404 says nothing about the token.
    contact = await db.contacts.find_one({"_id": "c1"})
    assert contact["push_tokens"] == tokens[1:]

    peer.valid = set()  # the token was revoked: the channel renews it once and goes on
    await go(client, code="P-4")
    msgs = await settled(client, count=2)
    assert msgs[1]["status"] == "sent" and len(peer.issued) == 2


async def test_no_token_left_fails_and_keeps_them(
    make_client: Any, aiohttp_server: Any, settings: Settings, tmp_path: Path, db: Any
) -> None:
    _, account, base = await google(aiohttp_server)
    client = await push_client(make_client, settings, tmp_path, account, base)
    tokens = ["malformed-token", "behind-a-proxy-token"]
    await client.put("/v1/contacts/c1", json={"push_tokens": tokens, "consent": {"push": True}})
    await go(client)
    [msg] = await settled(client)
    assert (msg["status"], msg["reason"]) == ("failed", "provider_rejected")
    assert msg["detail"] == (
        "HTTP 400: INVALID_ARGUMENT The registration token is not a valid FCM registration token; "
        "HTTP 404: Not Found"
    )
    assert (await db.contacts.find_one({"_id": "c1"}))["push_tokens"] == tokens


async def test_the_token_endpoint_refuses_an_assertion_google_would_refuse(
    make_client: Any, aiohttp_server: Any, settings: Settings, tmp_path: Path
) -> None:
    """The fake is a judge that can say no: a key file whose client_email is not the key's account."""
    peer, account, base = await google(
        aiohttp_server, client_email="someone-else@shop-app.iam.gserviceaccount.com"
    )
    client = await push_client(make_client, settings, tmp_path, account, base)
    await client.put("/v1/contacts/c1", json={"push_tokens": ["live-token"], "consent": {"push": True}})
    await go(client)

    async def refused() -> bool:
        return bool(peer.refused)

    await eventually(refused)
    assert peer.refused[0] == "InvalidIssuerError: Invalid issuer" and peer.messages == []


async def test_bad_key_is_reported(tmp_path: Any) -> None:
    assert PushChannel({}).status()[0] is False
    broken = tmp_path / "sa.json"
    broken.write_text("{not json")
    configured, detail = PushChannel({"service_account_file": str(broken)}).status()
    assert not configured and detail.startswith("cannot read the service account key")
