"""A channel's test send (`POST /v1/channels/{name}/test`): the fixed built-in message, and the made-up
recipient it goes to. Pure: no contact is read or written, no rule is involved; the runtime hands the
result to the channel's own `send` (rulesvc.runtime.testsend)."""

from __future__ import annotations

import ipaddress
import re
from datetime import datetime
from typing import Any, Final
from urllib.parse import urlsplit

from rulesvc.core.contacts import E164_PATTERN, EMAIL_MAX, EMAIL_PATTERN, WebPushSubscription

TEST_TEMPLATE: Final = "rulesvc_test"
TEST_CONTACT: Final = "rulesvc-test"
EMAIL: Final = re.compile(EMAIL_PATTERN)  # as a contact's own
E164: Final = re.compile(E164_PATTERN)

# Where each standard channel finds its recipient in a contact's profile, and what `to` must be for it.
ADDRESSES: Final = {
    "email": ("email", "an email address such as ops@example.com"),
    "sms": ("phone", "a phone number in E.164 form such as +4915112345678"),
    "push": ("push_tokens", "a device's push token"),
}


def message_content(channel: str, at: datetime) -> dict[str, str]:
    """The fixed test message, in every block a channel may read (email: subject, text, html; sms: text;
    push, web push, in-app: title, body)."""
    when = at.strftime("%Y-%m-%d %H:%M:%S UTC")
    text = (
        f"This is a test message from rulesvc, sent at {when}. If it arrived, the `{channel}` channel works."
    )
    return {
        "subject": f"rulesvc test message ({channel})",
        "text": text,
        "html": f"<p>{text}</p>",
        "title": "rulesvc test message",
        "body": text,
    }


def recipient(
    channel: str, to: str | None, subscription: WebPushSubscription | None
) -> tuple[dict[str, Any], str | None, str | None]:
    """The profile of the made-up contact the test goes to, or why `to` will not do: (profile, the
    field at fault, the problem). `to` goes where the channel looks for its address (`email`, `phone`,
    one push token); a web push test needs the browser's subscription; any other channel gets `to` as
    `address` in the profile and says itself, by `reachable`, whether that is enough."""
    if channel == "webpush":
        if subscription is None:
            return {}, "$.webpush_subscription", "a web push test needs the browser's subscription"
        problem = _public_push_service(subscription.endpoint)
        if problem is not None:
            return {}, "$.webpush_subscription.endpoint", problem
        return {"webpush_subscriptions": [_subscription(subscription)]}, None, None
    field_and_words = ADDRESSES.get(channel)
    if field_and_words is None:
        return ({"address": to} if to else {}), None, None
    field, words = field_and_words
    address = (to or "").strip()
    if not address:
        return {}, "$.to", f"the `{channel}` channel needs `to`: {words}"
    if channel == "email" and (len(address) > EMAIL_MAX or not EMAIL.match(address)):
        return {}, "$.to", f"`{_shown(address)}` is not an email address"
    if channel == "sms" and not E164.match(address):
        return {}, "$.to", f"`{_shown(address)}` is not a phone number in E.164 form (+ and 7 to 15 digits)"
    return {field: [address] if field == "push_tokens" else address}, None, None


def _subscription(s: WebPushSubscription) -> dict[str, Any]:
    keys = {"p256dh": s.keys.p256dh, "auth": s.keys.auth}
    out: dict[str, Any] = {"endpoint": s.endpoint, "keys": keys}
    if s.expirationTime is not None:
        out["expirationTime"] = s.expirationTime
    return out


def _shown(text: str) -> str:
    return text[:80] + ("..." if len(text) > 80 else "")


def _public_push_service(endpoint: str) -> str | None:
    """A browser's push service is a public HTTPS host (FCM, Mozilla, Apple, Microsoft): a test send is
    not a way to make the service POST to itself, its network or a cloud's metadata address and read
    the answer. (A name resolving to such an address is not caught here; the provider's own check is.)"""
    parts = urlsplit(endpoint)
    host = (parts.hostname or "").lower().rstrip(".")
    if parts.scheme != "https" or not host:
        return "a push service's endpoint is an https:// URL"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    private_name = host == "localhost" or host.endswith((".localhost", ".local", ".internal", ".lan"))
    if private_name or (address is not None and not address.is_global):
        return f"`{host}` is not a public push service"
    return None
