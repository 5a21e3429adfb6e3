"""The `webhook` channel: each message is a JSON POST, signed so the receiver can trust it.

Settings ([channels.webhook] or RULESVC_CHANNEL_WEBHOOK_*): `url` and `secret` (required), `timeout`
(seconds, default 10). Every request carries `X-Rulesvc-Timestamp` (Unix seconds) and
`X-Rulesvc-Signature: v1=<hex HMAC-SHA256 of "<timestamp>.<body>" with the secret>`, and the message id as
`Idempotency-Key`: a receiver verifies the signature, rejects old timestamps and ignores a key it has seen,
so a retried delivery is never acted on twice.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Callable
from typing import Any

from rulesvc import hookimpl
from rulesvc.channels import Channel, Delivery, HttpChannel, OutboundMessage, retry_after


def sign(secret: str, timestamp: str, body: bytes) -> str:
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"v1={digest}"


class WebhookChannel(HttpChannel):
    name = "webhook"
    deduplicates = True  # the receiver ignores an Idempotency-Key it has seen

    def __init__(self, config: dict[str, Any]) -> None:
        self.url = str(config.get("url", ""))
        self.secret = str(config.get("secret", ""))
        self.timeout = float(config.get("timeout", 10))

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
