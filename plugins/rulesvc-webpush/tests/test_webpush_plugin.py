"""Web Push against a local push service that checks VAPID and decrypts the payload with the
subscription's keys, as a browser would (RFC 8291 / RFC 8292): decrypted by `http_ece` (the library
pywebpush builds on), and the encryption replayed against RFC 8291 Appendix A byte for byte."""

from __future__ import annotations

import base64
import json
import os
import struct
import time
from typing import Any
from urllib.parse import urlsplit

import http_ece
from aiohttp import web
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from rulesvc_webpush import WebPushChannel, encrypt

from rulesvc.config import Settings
from rulesvc.plugins import builtin_channels
from rulesvc.web.app import create_app
from tests.helpers import go, send, settled, setup


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Browser:
    """A subscription's private side: the keys only the browser has."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.auth = os.urandom(16)
        self.public = self.key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )

    def decrypt(self, body: bytes) -> bytes:
        """As a browser reads it: http_ece, with the subscription's private key and auth secret."""
        rs, idlen = struct.unpack("!IB", body[16:21])
        assert rs == 4096 and idlen == 65 and len(body) - 21 - idlen <= rs  # one record, the key as its id
        plaintext: bytes = http_ece.decrypt(
            body, private_key=self.key, auth_secret=self.auth, version="aes128gcm"
        )
        return plaintext


class PushService:
    def __init__(self) -> None:
        self.browsers: dict[str, Browser] = {}
        self.received: list[dict[str, Any]] = []
        self.vapid_keys: set[str] = set()

    async def push(self, request: web.Request) -> web.Response:
        sub_id = request.match_info["id"]
        if sub_id not in self.browsers:
            return web.Response(status=410, text="subscription expired")
        scheme, _, params = request.headers["Authorization"].partition(" ")
        fields = dict(p.strip().split("=", 1) for p in params.split(","))
        assert scheme == "vapid"
        head, claims, signature = fields["t"].split(".")
        key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), unb64(fields["k"]))
        raw = unb64(signature)
        der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
        key.verify(der, f"{head}.{claims}".encode(), ec.ECDSA(hashes.SHA256()))  # raises if forged
        body = json.loads(unb64(claims))
        origin = urlsplit(str(request.url))
        if body["aud"] != f"{origin.scheme}://{origin.netloc}" or not 0 < body["exp"] - time.time() <= 86400:
            return web.Response(status=403, text="bad VAPID claims")
        if not body["sub"].startswith(("mailto:", "https:")):
            return web.Response(status=403, text="VAPID sub")
        if request.headers["Content-Encoding"] != "aes128gcm" or int(request.headers["TTL"]) < 0:
            return web.Response(status=400, text="encoding")
        self.vapid_keys.add(fields["k"])
        plaintext = self.browsers[sub_id].decrypt(await request.read())
        self.received.append(json.loads(plaintext))
        return web.Response(status=201, headers={"Location": f"/messages/{len(self.received)}"})


async def test_webpush_end_to_end(make_client: Any, aiohttp_server: Any, settings: Settings) -> None:
    service = PushService()
    app = web.Application()
    app.router.add_post("/push/{id}", service.push)
    server = await aiohttp_server(app)
    browser = Browser()
    service.browsers["alive"] = browser
    vapid = ec.generate_private_key(ec.SECP256R1())
    pem = vapid.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()).decode()  # fmt: skip
    channel = WebPushChannel({"vapid_private_key": pem, "subject": "mailto:ops@shop.example"})
    assert channel.status() == (True, "Web Push with VAPID")
    channels = builtin_channels()
    channels.register(channel)
    client = await make_client(create_app(setup(settings, [send("webpush")]), channels))
    keys = {"p256dh": b64(browser.public), "auth": b64(browser.auth)}
    other = Browser()
    other_keys = {"p256dh": b64(other.public), "auth": b64(other.auth)}
    subs = [
        {"endpoint": str(server.make_url("/push/expired")), "keys": other_keys},
        {"endpoint": str(server.make_url("/push/alive")), "keys": keys},
    ]
    await client.put("/v1/contacts/c1", json={"webpush_subscriptions": subs, "consent": {"webpush": True}})
    await go(client, code="WP-1")
    [msg] = await settled(client)
    assert msg["status"] == "sent"
    assert service.received == [
        {"title": "Hello", "body": "Code WP-1", "url": None, "message_id": msg["message_id"]}
    ]
    public = vapid.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    assert service.vapid_keys == {b64(public)}
    contact = await (await client.get("/v1/contacts/c1")).json()
    assert [s["endpoint"] for s in contact["webpush_subscriptions"]] == [subs[1]["endpoint"]]  # 410 removed


def test_raw_base64url_vapid_key_and_settings() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    raw = b64(key.private_numbers().private_value.to_bytes(32, "big"))
    assert WebPushChannel({"vapid_private_key": raw, "subject": "https://shop.example"}).status()[0] is True
    assert WebPushChannel({"vapid_private_key": raw, "subject": "ops"}).status()[0] is False
    assert WebPushChannel({"vapid_private_key": "%%%", "subject": "mailto:a@b.c"}).status()[0] is False


# RFC 8291 Appendix A, "Intermediate Values for Encryption" (https://www.rfc-editor.org/rfc/rfc8291#appendix-A):
# the inputs it fixes and the message it publishes, base64url as printed there.
RFC_PLAINTEXT = b"When I grow up, I want to be a watermelon"
RFC_AS_PRIVATE = "yfWPiYE-n46HLnH0KqZOF1fJJU3MYrct3AELtAQ-oRw"
RFC_UA_PRIVATE = "q1dXpw3UpT5VOmu_cf_v6ih07Aems3njxI-JWgLcM94"
RFC_UA_PUBLIC = "BCVxsr7N_eNgVRqvHtD0zTZsEc6-VV-JvLexhqUzORcxaOzi6-AYWXvTBHm4bjyPjs7Vd8pZGH6SRpkNtoIAiw4"
RFC_SALT = "DGv6ra1nlYgDCS1FRnbzlw"
RFC_AUTH = "BTBZMqHH6r4Tts7J_aSIgg"
RFC_MESSAGE = (
    "DGv6ra1nlYgDCS1FRnbzlwAAEABBBP4z9KsN6nGRTbVYI_c7VJSPQTBtkgcy27ml"
    "mlMoZIIgDll6e3vCYLocInmYWAmS6TlzAC8wEqKK6PBru3jl7A_yl95bQpu6cVPT"
    "pK4Mqgkf1CXztLVBSt2Ks3oZwbuwXPXLWyouBWLVWGNWQexSgSxsj_Qulcy4a-fN"
)


def test_rfc_8291_appendix_a_test_vector() -> None:
    """The RFC's fixed sender key and salt through the plugin's encryption give the RFC's message exactly."""
    sender = ec.derive_private_key(int.from_bytes(unb64(RFC_AS_PRIVATE), "big"), ec.SECP256R1())
    body = encrypt(RFC_PLAINTEXT, RFC_UA_PUBLIC, RFC_AUTH, sender_key=sender, salt=unb64(RFC_SALT))
    assert b64(body) == RFC_MESSAGE
    # And the RFC's receiver reads it with http_ece.
    receiver = ec.derive_private_key(int.from_bytes(unb64(RFC_UA_PRIVATE), "big"), ec.SECP256R1())
    assert http_ece.decrypt(body, private_key=receiver, auth_secret=unb64(RFC_AUTH)) == RFC_PLAINTEXT
