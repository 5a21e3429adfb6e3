"""The `sms` channel: a Twilio-compatible Messages API, and its signed delivery-status callbacks.

Settings ([channels.sms] or RULESVC_CHANNEL_SMS_*): see `SmsSettings`.

Messages are `POST {base_url}/2010-04-01/Accounts/{sid}/Messages.json`, form-encoded, with HTTP Basic auth.
Callbacks are checked as Twilio signs them and as its `RequestValidator` checks them: base64 HMAC-SHA1 of
the URL Twilio called followed by the sorted form parameters, keyed with the auth token, in
`X-Twilio-Signature`; the URL is tried with and without its default port (:443, :80), since Twilio signs
either. Behind a proxy the URL Twilio called is not the one the service sees: `public_url` (or
`status_callback_url`) says what it is. A recipient who opted out (error 21610) is `blocked`, whether the
API says so at once or a callback says so later.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Callable, Mapping
from typing import Annotated, Any, ClassVar
from urllib.parse import urlsplit, urlunsplit

from aiohttp import web
from msgspec import Meta, field

from rulesvc import hookimpl
from rulesvc.channels import (
    Channel,
    ChannelSettings,
    ChannelSettingsError,
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


CALLBACK_PATH = "/v1/channels/sms/callbacks"
DEFAULT_PORTS = {"https": 443, "http": 80}


def twilio_signature(token: str, url: str, params: Mapping[str, list[str]]) -> str:
    """The URL, then each parameter name (sorted) followed by each of its values (sorted)."""
    data = url + "".join(k + v for k in sorted(params) for v in sorted(set(params[k])))
    return base64.b64encode(hmac.new(token.encode(), data.encode(), hashlib.sha1).digest()).decode()


def url_problem(url: str) -> str | None:
    """Why `url` cannot be the one Twilio calls (None if it can, or if it is not given)."""
    if not url:
        return None
    parts = urlsplit(url)
    shown = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()  # never a user:password in it
    try:
        parts.port  # noqa: B018 (raises for a port that is not a number)
    except ValueError:
        return f"the port is not a number, in {shown!r}"
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
        return f"expected an http or https URL such as https://rulesvc.shop.example, got {shown!r}"
    return None


def port_variants(url: str) -> list[str]:
    """The URL without and with its scheme's default port: Twilio may have signed either."""
    parts = urlsplit(url)
    default = DEFAULT_PORTS.get(parts.scheme)
    try:
        port = parts.port
    except ValueError:
        return [url]
    if default is None or port not in (None, default):
        return [url]
    bare = parts.netloc.removesuffix(f":{default}")
    return [urlunsplit(parts._replace(netloc=n)) for n in (bare, f"{bare}:{default}")]


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
    public_url: Annotated[
        str,
        Meta(
            description="this service's external base URL, as Twilio calls it behind a proxy (e.g. "
            "`https://rulesvc.shop.example`): callbacks' signatures are checked against it and the request's "
            "path, and delivery reports are asked for at `{public_url}/v1/channels/sms/callbacks`"
        ),
    ] = ""
    status_callback_url: Annotated[
        str | None,
        Meta(
            description="the full URL for delivery reports, when it is not `{public_url}"
            "/v1/channels/sms/callbacks` (a path prefix on the proxy)"
        ),
    ] = None
    max_segments: Annotated[int, Meta(ge=1, description="longest message, in SMS segments")] = 10
    timeout: Annotated[float, Meta(gt=0, description="seconds a send may take")] = 10.0


class SmsChannel(HttpChannel):
    name = "sms"
    deduplicates = False  # the Messages API takes no idempotency key
    settings_type = SmsSettings

    def __init__(self, config: Mapping[str, Any] | SmsSettings) -> None:
        settings = read_settings("sms", config, SmsSettings, type(self))
        problems = [
            f"channels.sms.{name}: {problem}"
            for name in ("public_url", "status_callback_url")
            if (problem := url_problem(getattr(settings, name) or ""))
        ]
        if problems:
            raise ChannelSettingsError("sms", problems, type(self))
        self.account_sid = settings.account_sid
        self.auth_token = settings.auth_token
        self.sender = settings.sender
        self.service_sid = settings.messaging_service_sid
        self.base_url = settings.base_url.rstrip("/")
        self.public_url = settings.public_url.rstrip("/")
        self.callback_url = settings.status_callback_url or (
            self.public_url + CALLBACK_PATH if self.public_url else None
        )
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
            if str(body.get("code", "")) in BLOCKING_ERRORS:
                return Delivery("blocked", detail)  # as a callback's report: the number is suppressed
            return Delivery("failed", detail)

    def signed_urls(self, request: web.Request) -> list[str]:
        """Every URL Twilio may have signed for this request: the configured ones, else the one seen."""
        urls = [self.public_url + request.path_qs] if self.public_url else []
        if self.callback_url:
            urls.append(self.callback_url)
        urls = urls or [str(request.url)]
        return [variant for url in urls for variant in port_variants(url)]

    async def callback(self, request: web.Request) -> list[Outcome]:
        if request.content_type != "application/x-www-form-urlencoded":
            raise web.HTTPUnsupportedMediaType(
                text=f"expected a form-encoded body (application/x-www-form-urlencoded), as Twilio sends "
                f"status callbacks; got {request.content_type}"
            )
        try:
            posted = await request.post()
        except (ValueError, UnicodeDecodeError) as exc:
            raise web.HTTPBadRequest(text=f"the form-encoded body cannot be read: {exc}") from None
        params: dict[str, list[str]] = {}
        for key, value in posted.items():
            params.setdefault(key, []).append(str(value))
        signature = request.headers.get("X-Twilio-Signature", "")
        if not any(
            hmac.compare_digest(twilio_signature(self.auth_token, url, params).encode(), signature.encode())
            for url in self.signed_urls(request)
        ):
            raise web.HTTPUnauthorized(text="X-Twilio-Signature does not match")
        form = {k: v[-1] for k, v in params.items()}
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
