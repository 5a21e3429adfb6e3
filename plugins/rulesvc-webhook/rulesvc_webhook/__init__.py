"""The `webhook` channel: each message is a JSON POST, signed per Standard Webhooks (standardwebhooks.com).

Settings ([channels.webhook] or RULESVC_CHANNEL_WEBHOOK_*): see `WebhookSettings`. Every request carries
`webhook-id` (the message id: stable across retries, so also the idempotency key, repeated as
`Idempotency-Key`), `webhook-timestamp` (Unix seconds) and
`webhook-signature: v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`, keyed with the base64 part of the
`whsec_` secret. While a secret is being rotated, `previous_secret` adds a second signature (space
separated), so a receiver holding either key accepts the request. A receiver verifies with any Standard
Webhooks library, rejects timestamps more than 5 minutes away and ignores an id it has seen, so a retried
delivery is never acted on twice.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from collections.abc import Callable, Mapping
from typing import Annotated, Any, ClassVar

from msgspec import Meta

from rulesvc import hookimpl
from rulesvc.channels import (
    Channel,
    ChannelSettings,
    ChannelSettingsError,
    Delivery,
    HttpChannel,
    OutboundMessage,
    read_settings,
    retry_after,
)

PREFIX = "whsec_"
MIN_KEY_BYTES = 24  # the standard: "secret keys SHOULD be between 24 bytes and 64 bytes"
NEW_SECRET = "python -c \"import base64,os; print('whsec_' + base64.b64encode(os.urandom(32)).decode())\""


def secret_key(secret: str) -> bytes:
    """The HMAC key of a `whsec_<base64>` secret; ValueError says what is wrong. A plain string is refused,
    not used as is: the receivers' libraries would base64-decode it and never agree."""
    if not secret.startswith(PREFIX):
        raise ValueError(f"expected `{PREFIX}` followed by base64 (make one with: {NEW_SECRET})")
    text = secret[len(PREFIX) :]
    try:
        key = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except binascii.Error:
        raise ValueError(f"the part after `{PREFIX}` is not base64 (make one with: {NEW_SECRET})") from None
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"the key is {len(key)} bytes; Standard Webhooks asks for 24 to 64 ({NEW_SECRET})")
    return key


def sign(keys: list[bytes], message_id: str, timestamp: str, body: bytes) -> str:
    """The `webhook-signature` value: one `v1,<base64>` per key, separated by spaces."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    return " ".join(
        "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode() for key in keys
    )


class WebhookSettings(ChannelSettings):
    """A JSON POST per message, signed per Standard Webhooks (HMAC-SHA256 over id, timestamp and body)."""

    required: ClassVar[tuple[str | tuple[str, ...], ...]] = ("url", "secret")

    url: Annotated[str, Meta(description="where each message is POSTed")] = ""
    secret: Annotated[
        str,
        Meta(description="the signing secret shared with the receiver: `whsec_` and base64 of 24-64 bytes"),
    ] = ""
    previous_secret: Annotated[
        str,
        Meta(
            description="while rotating: the old `whsec_` secret, whose signature is sent beside the new one"
        ),
    ] = ""
    timeout: Annotated[float, Meta(gt=0, description="seconds a send may take")] = 10.0


class WebhookChannel(HttpChannel):
    name = "webhook"
    deduplicates = True  # the receiver ignores an Idempotency-Key it has seen
    settings_type = WebhookSettings

    def __init__(self, config: Mapping[str, Any] | WebhookSettings) -> None:
        settings = read_settings("webhook", config, WebhookSettings, type(self))
        self.url = settings.url
        self.secret = settings.secret
        self.timeout = settings.timeout
        self.keys: list[bytes] = []
        problems = []
        for name in ("secret", "previous_secret"):
            value = getattr(settings, name)
            if value:
                try:
                    self.keys.append(secret_key(value))
                except ValueError as exc:
                    problems.append(f"channels.webhook.{name}: {exc}")
        if problems:
            raise ChannelSettingsError("webhook", problems, type(self))

    def status(self) -> tuple[bool, str]:
        missing = [k for k in ("url", "secret") if not getattr(self, k)]
        if missing:
            return False, f"missing setting(s): {', '.join(missing)}"
        return True, f"POST {self.url}"

    def reachable(self, contact: dict[str, Any]) -> str | None:
        return None

    async def send(self, message: OutboundMessage) -> Delivery:
        body = json.dumps(
            {
                "message_id": message.message_id,
                "contact_id": message.contact_id,
                "template": message.template,
                "content": message.content,
                "params": message.params,
                "transactional": message.transactional,
                "attempt": message.attempt,
            },
            separators=(",", ":"),
            default=str,
        ).encode()
        timestamp = str(int(time.time()))
        headers = {
            "Content-Type": "application/json",
            "webhook-id": message.message_id,
            "webhook-timestamp": timestamp,
            "webhook-signature": sign(self.keys, message.message_id, timestamp, body),
            "Idempotency-Key": message.message_id,
        }
        http = await self.http()
        async with http.post(self.url, data=body, headers=headers) as resp:
            text = (await resp.text())[:200]
            if 200 <= resp.status < 300:
                return Delivery("sent")
            if resp.status == 429 or resp.status >= 500:
                return Delivery("retry", f"HTTP {resp.status}: {text}", retry_after=retry_after(resp.headers))
            return Delivery("failed", f"HTTP {resp.status}: {text}")


@hookimpl
def register_channels(register: Callable[[Channel], None], config: Callable[[str], dict[str, Any]]) -> None:
    """The webhook channel, configured from [channels.webhook]."""
    register(WebhookChannel(config("webhook")))
