"""The `webpush` channel: browser push as the standards define it, to any push service.

RFC 8030 (the push protocol), RFC 8291 (the payload is encrypted for the browser with `aes128gcm`: only the
subscription's keys can read it, not the push service) and RFC 8292 (VAPID: the push service knows the
sender by its key). Settings ([channels.webpush] or RULESVC_CHANNEL_WEBPUSH_*): see `WebPushSettings`.
A subscription the push service answers 404 or 410 for is removed from the contact.
"""

from __future__ import annotations

import base64
import json
import os
import struct
import time
from collections.abc import Callable, Mapping
from typing import Annotated, Any, ClassVar, Literal
from urllib.parse import urlsplit

from cryptography.hazmat.primitives import hashes, hmac, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from msgspec import Meta

from rulesvc import hookimpl
from rulesvc.channels import (
    Channel,
    ChannelSettings,
    Delivery,
    HttpChannel,
    OutboundMessage,
    read_settings,
    retry_after,
)

RECORD_SIZE = 4096


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _hmac(key: bytes, data: bytes) -> bytes:
    h = hmac.HMAC(key, hashes.SHA256())
    h.update(data)
    return h.finalize()


def _point(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)


def derive(
    auth: bytes, ecdh_secret: bytes, ua_public: bytes, as_public: bytes, salt: bytes
) -> tuple[bytes, bytes]:
    """RFC 8291 section 3.4: the content-encryption key and nonce (HKDF-SHA256, one block each)."""
    prk_key = _hmac(auth, ecdh_secret)
    ikm = _hmac(prk_key, b"WebPush: info\x00" + ua_public + as_public + b"\x01")[:32]
    prk = _hmac(salt, ikm)
    cek = _hmac(prk, b"Content-Encoding: aes128gcm\x00\x01")[:16]
    nonce = _hmac(prk, b"Content-Encoding: nonce\x00\x01")[:12]
    return cek, nonce


def encrypt(
    plaintext: bytes,
    p256dh: str,
    auth: str,
    *,
    sender_key: ec.EllipticCurvePrivateKey | None = None,
    salt: bytes | None = None,
) -> bytes:
    """One aes128gcm record (RFC 8188) with the sender's one-time public key as the key id. `sender_key` and
    `salt` are fresh for every message; they are parameters only so a test can replay RFC 8291 Appendix A."""
    ua_public = unb64url(p256dh)
    ua_key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), ua_public)
    as_private = sender_key or ec.generate_private_key(ec.SECP256R1())
    as_public = _point(as_private.public_key())
    salt = salt or os.urandom(16)
    cek, nonce = derive(unb64url(auth), as_private.exchange(ec.ECDH(), ua_key), ua_public, as_public, salt)
    if len(plaintext) + 17 > RECORD_SIZE:
        raise ValueError(f"payload of {len(plaintext)} bytes does not fit one {RECORD_SIZE}-byte record")
    ciphertext = AESGCM(cek).encrypt(nonce, plaintext + b"\x02", None)
    return salt + struct.pack("!IB", RECORD_SIZE, len(as_public)) + as_public + ciphertext


def load_vapid_key(text: str) -> ec.EllipticCurvePrivateKey:
    if "BEGIN" in text:
        key = serialization.load_pem_private_key(text.encode(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError("VAPID key must be an EC P-256 key")
        return key
    return ec.derive_private_key(int.from_bytes(unb64url(text), "big"), ec.SECP256R1())


def vapid_header(key: ec.EllipticCurvePrivateKey, endpoint: str, subject: str, now: float) -> str:
    parts = urlsplit(endpoint)
    claims = {"aud": f"{parts.scheme}://{parts.netloc}", "exp": int(now) + 12 * 3600, "sub": subject}
    signing_input = (
        f"{b64url(json.dumps({'typ': 'JWT', 'alg': 'ES256'}).encode())}.{b64url(json.dumps(claims).encode())}"
    )
    r, s = decode_dss_signature(key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
    token = f"{signing_input}.{b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"
    return f"vapid t={token}, k={b64url(_point(key.public_key()))}"


class WebPushSettings(ChannelSettings):
    """Browser push to any push service: RFC 8030, `aes128gcm` payloads (RFC 8291), VAPID (RFC 8292)."""

    required: ClassVar[tuple[str | tuple[str, ...], ...]] = ("vapid_private_key", "subject")

    vapid_private_key: Annotated[
        str, Meta(description="the VAPID key: PEM, or the base64url private number web-push tools print")
    ] = ""
    subject: Annotated[str, Meta(description="who sends: a `mailto:` or `https:` URL")] = ""
    ttl: Annotated[int, Meta(ge=0, description="seconds a push service keeps an undelivered message")] = 86400
    urgency: Annotated[
        Literal["very-low", "low", "normal", "high"], Meta(description="the push's `Urgency` header")
    ] = "normal"
    timeout: Annotated[float, Meta(gt=0, description="seconds a send may take")] = 10.0


class WebPushChannel(HttpChannel):
    name = "webpush"
    deduplicates = False  # a push service has no idempotency key
    settings_type = WebPushSettings

    def __init__(self, config: Mapping[str, Any] | WebPushSettings) -> None:
        settings = read_settings("webpush", config, WebPushSettings, type(self))
        self.subject = settings.subject
        self.ttl = settings.ttl
        self.urgency = settings.urgency
        self.timeout = settings.timeout
        self.problem: str | None = None
        self.key: ec.EllipticCurvePrivateKey | None = None
        try:
            self.key = load_vapid_key(settings.vapid_private_key) if settings.vapid_private_key else None
        except (ValueError, TypeError) as exc:
            self.problem = f"channels.webpush.vapid_private_key: cannot be loaded: {exc}"

    def status(self) -> tuple[bool, str]:
        if self.problem:
            return False, self.problem
        missing = [n for n, v in (("vapid_private_key", self.key), ("subject", self.subject)) if not v]
        if missing:
            return False, f"missing setting(s): {', '.join(missing)}"
        if not self.subject.startswith(("mailto:", "https:")):
            return False, "channels.webpush.subject: expected a mailto: or https: URL"
        return True, "Web Push with VAPID"

    def reachable(self, contact: dict[str, Any]) -> str | None:
        return None if contact.get("webpush_subscriptions") else "no web push subscription"

    async def send(self, message: OutboundMessage) -> Delivery:
        content = message.content
        if not (content.get("title") or content.get("body")):
            return Delivery("failed", "a web push template needs a .title or .body part")
        payload = json.dumps(
            {"title": content.get("title", ""), "body": content.get("body", ""), "url": content.get("url"),
             "message_id": message.message_id}, separators=(",", ":")
        ).encode()  # fmt: skip
        http = await self.http()
        assert self.key is not None
        accepted: list[str] = []
        gone: list[tuple[str, Any]] = []
        problems: list[str] = []
        for sub in message.contact.get("webpush_subscriptions", []):
            endpoint = sub["endpoint"]
            try:
                body = encrypt(payload, sub["keys"]["p256dh"], sub["keys"]["auth"])
            except ValueError as exc:
                problems.append(str(exc))
                continue
            headers = {
                "TTL": str(self.ttl),
                "Urgency": self.urgency,
                "Content-Encoding": "aes128gcm",
                "Content-Type": "application/octet-stream",
                "Authorization": vapid_header(self.key, endpoint, self.subject, time.time()),
            }
            async with http.post(endpoint, data=body, headers=headers) as resp:
                if resp.status in (200, 201, 202):
                    accepted.append(resp.headers.get("Location", endpoint))
                elif resp.status in (404, 410):
                    gone.append(("webpush_subscriptions", {"endpoint": endpoint}))
                elif resp.status == 429 or resp.status >= 500:
                    detail = f"HTTP {resp.status} from the push service"
                    return Delivery("retry", detail, retry_after=retry_after(resp.headers))
                else:
                    problems.append(f"HTTP {resp.status}: {(await resp.text())[:120]}")
        if accepted:
            return Delivery("sent", provider_id=accepted[0], unreachable=gone)
        return Delivery("failed", "; ".join(problems) or "every subscription has expired", unreachable=gone)


@hookimpl
def register_channels(register: Callable[[Channel], None], config: Callable[[str], dict[str, Any]]) -> None:
    """The Web Push channel, configured from [channels.webpush]."""
    register(WebPushChannel(config("webpush")))
