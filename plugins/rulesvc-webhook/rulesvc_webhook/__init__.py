"""The `webhook` channel: each message is a JSON POST, signed so the receiver can trust it.

Settings ([channels.webhook] or RULESVC_CHANNEL_WEBHOOK_*): see `WebhookSettings`. Every request carries
`X-Rulesvc-Timestamp` (Unix seconds) and
`X-Rulesvc-Signature: v1=<hex HMAC-SHA256 of "<timestamp>.<body>" with the secret>`, and the message id as
`Idempotency-Key`: a receiver verifies the signature, rejects old timestamps and ignores a key it has seen,
so a retried delivery is never acted on twice.
"""

from __future__ import annotations

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
    Delivery,
    HttpChannel,
    OutboundMessage,
    read_settings,
    retry_after,
)


def sign(secret: str, timestamp: str, body: bytes) -> str:
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"v1={digest}"


class WebhookSettings(ChannelSettings):
    """A JSON POST per message, signed with HMAC-SHA256 over the timestamp and the body."""

    required: ClassVar[tuple[str | tuple[str, ...], ...]] = ("url", "secret")

    url: Annotated[str, Meta(description="where each message is POSTed")] = ""
    secret: Annotated[
        str, Meta(description="the key of the `X-Rulesvc-Signature` HMAC, shared with the receiver")
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
            "X-Rulesvc-Timestamp": timestamp,
            "X-Rulesvc-Signature": sign(self.secret, timestamp, body),
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
