"""The `sms` channel: a Twilio-compatible Messages API, and its signed delivery-status callbacks.

Settings ([channels.sms] or RULESVC_CHANNEL_SMS_*): see `SmsSettings`.

Messages are `POST {base_url}/2010-04-01/Accounts/{sid}/Messages.json`, form-encoded, with HTTP Basic auth.
Callbacks are checked as Twilio signs them: base64 HMAC-SHA1 of the URL followed by the sorted form
parameters, keyed with the auth token, in `X-Twilio-Signature`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Callable, Mapping
from typing import Annotated, Any, ClassVar

from aiohttp import web
from msgspec import Meta, field

from rulesvc import hookimpl
from rulesvc.channels import (
    Channel,
    ChannelSettings,
    Delivery,
    HttpChannel,
    OutboundMessage,
    Outcome,
    read_settings,
    retry_after,
)

E164 = re.compile(r"^\+[1-9][0-9]{6,14}$")
GSM7_BASIC = set(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§"
    "¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
GSM7_EXTENDED = set("^{}\\[~]|€\f")
# Provider error codes that mean the recipient or their carrier refuses our messages.
BLOCKING_ERRORS = {"21610", "30004", "30007"}


def segments(text: str) -> tuple[str, int]:
    """(encoding, parts) as carriers count them: GSM-7 fits 160 (153 per part of a longer message),
    with extension characters counting twice; anything else is UCS-2: 70, or 67 per part, where a
    character outside the Basic Multilingual Plane takes two units."""
    if all(c in GSM7_BASIC or c in GSM7_EXTENDED for c in text):
        units = sum(2 if c in GSM7_EXTENDED else 1 for c in text)
        return "GSM-7", 1 if units <= 160 else -(-units // 153)
    units = sum(2 if ord(c) > 0xFFFF else 1 for c in text)
    return "UCS-2", 1 if units <= 70 else -(-units // 67)


def twilio_signature(token: str, url: str, params: dict[str, str]) -> str:
    data = url + "".join(k + params[k] for k in sorted(params))
    return base64.b64encode(hmac.new(token.encode(), data.encode(), hashlib.sha1).digest()).decode()


class SmsSettings(ChannelSettings):
    """A Twilio-compatible Messages API, with HTTP Basic auth and signed status callbacks."""

    required: ClassVar[tuple[str | tuple[str, ...], ...]] = (
        "account_sid",
        "auth_token",
        ("from", "messaging_service_sid"),
    )

    account_sid: Annotated[str, Meta(description="the account id (`AC...`)")] = ""
    auth_token: Annotated[
        str, Meta(description="the account's auth token; also checks callbacks' signatures")
    ] = ""
    sender: Annotated[str, Meta(description="the number messages come from (E.164)")] = field(
        default="", name="from"
    )
    messaging_service_sid: Annotated[str, Meta(description="a messaging service instead of `from`")] = ""
    base_url: Annotated[str, Meta(description="the API's base URL")] = "https://api.twilio.com"
    status_callback_url: Annotated[
        str | None,
        Meta(description="this service's public `/v1/channels/sms/callbacks` URL, for delivery reports"),
    ] = None
    max_segments: Annotated[int, Meta(ge=1, description="longest message, in SMS segments")] = 10
    timeout: Annotated[float, Meta(gt=0, description="seconds a send may take")] = 10.0


class SmsChannel(HttpChannel):
    name = "sms"
    deduplicates = False  # the Messages API takes no idempotency key
    settings_type = SmsSettings

    def __init__(self, config: Mapping[str, Any] | SmsSettings) -> None:
        settings = read_settings("sms", config, SmsSettings, type(self))
        self.account_sid = settings.account_sid
        self.auth_token = settings.auth_token
        self.sender = settings.sender
        self.service_sid = settings.messaging_service_sid
        self.base_url = settings.base_url.rstrip("/")
        self.callback_url = settings.status_callback_url
        self.max_segments = settings.max_segments
        self.timeout = settings.timeout

    def status(self) -> tuple[bool, str]:
        missing = [k for k in ("account_sid", "auth_token") if not getattr(self, k)]
        if not (self.sender or self.service_sid):
            missing.append("from or messaging_service_sid")
        if missing:
            return False, f"missing setting(s): {', '.join(missing)}"
        return True, f"Messages API at {self.base_url}"

    def reachable(self, contact: dict[str, Any]) -> str | None:
        phone = contact.get("phone")
        if not phone:
            return "no phone number"
        if not E164.match(str(phone)):
            return "phone number is not E.164"
        return None

    def session_headers(self) -> dict[str, str]:
        basic = base64.b64encode(f"{self.account_sid}:{self.auth_token}".encode()).decode()
        return {"Authorization": f"Basic {basic}"}

    async def send(self, message: OutboundMessage) -> Delivery:
        text = message.content.get("text") or message.content.get("body")
        if not text:
            return Delivery("failed", "an SMS template needs a .text or .body part")
        encoding, parts = segments(text)
        if parts > self.max_segments:
            return Delivery(
                "failed", f"{parts} segments ({encoding}) exceed max_segments={self.max_segments}"
            )
        form = {"To": message.contact["phone"], "Body": text}
        form |= {"MessagingServiceSid": self.service_sid} if self.service_sid else {"From": self.sender}
        if self.callback_url:
            form["StatusCallback"] = str(self.callback_url)
        url = f"{self.base_url}/2010-04-01/Accounts/{self.account_sid}/Messages.json"
        async with (await self.http()).post(url, data=form) as resp:
            body = await resp.json(content_type=None) if resp.content_length != 0 else {}
            record = {"segments": parts, "encoding": encoding}
            if resp.status in (200, 201):
                return Delivery("sent", provider_id=body.get("sid"), record=record)
            detail = f"HTTP {resp.status}: {body.get('code', '')} {body.get('message', '')}".strip()
            if resp.status == 429 or resp.status >= 500:
                return Delivery("retry", detail, retry_after=retry_after(resp.headers))
            return Delivery("failed", detail)

    async def callback(self, request: web.Request) -> list[Outcome]:
        form = {k: str(v) for k, v in (await request.post()).items()}
        url = str(self.callback_url or request.url)
        expected = twilio_signature(self.auth_token, url, form)
        if not hmac.compare_digest(expected, request.headers.get("X-Twilio-Signature", "")):
            raise web.HTTPUnauthorized(text="X-Twilio-Signature does not match")
        sid, status, code = form.get("MessageSid"), form.get("MessageStatus"), form.get("ErrorCode", "")
        if not sid or not status:
            raise web.HTTPBadRequest(text="MessageSid and MessageStatus are required")
        if status == "delivered":
            return [Outcome("delivered", provider_id=sid)]
        if status in ("undelivered", "failed"):
            reason = f"{status} (error {code or 'unknown'})"
            if code in BLOCKING_ERRORS:
                return [Outcome("blocked", provider_id=sid, reason=reason)]
            return [Outcome("failed", provider_id=sid, reason=reason)]
        return []  # queued, sending, sent: nothing new for the rules


@hookimpl
def register_channels(register: Callable[[Channel], None], config: Callable[[str], dict[str, Any]]) -> None:
    """The SMS channel, configured from [channels.sms]."""
    register(SmsChannel(config("sms")))
