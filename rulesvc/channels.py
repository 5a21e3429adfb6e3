"""What a channel is: the interface plugins implement, and the registry of the channels loaded.

A channel receives a message that already passed consent, reachability, suppression, caps and quiet
hours, rendered from its template, and says what became of it. Channel objects have `async` methods;
pluggy only registers them (its hooks are synchronous).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Literal, Protocol, runtime_checkable

import aiohttp
from aiohttp import web

# Ads audiences are not a channel: the `audience` action queues changes, and a plugin job syncs them.
STANDARD_CHANNELS = ("email", "sms", "push", "webpush", "inapp", "webhook")


def retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds from a provider's Retry-After header, given as seconds or as an HTTP date."""
    value = headers.get("Retry-After")
    if not value:
        return None
    if value.strip().isdigit():
        return float(value)
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (moment - datetime.now(UTC)).total_seconds())


@dataclass
class OutboundMessage:
    message_id: str  # stable across retries: the idempotency key for providers that honour one
    contact_id: str
    channel: str
    template: str
    content: dict[str, str]  # rendered template blocks: subject, text, html, title, body, ...
    params: dict[str, Any]
    transactional: bool
    contact: dict[str, Any]  # the profile: email, phone, push_tokens, webpush_subscriptions, timezone, ...
    attempt: int = 1


@dataclass
class Delivery:
    """`retry` is for timeouts, 5xx and 429; `failed` is permanent (the provider said no)."""

    status: Literal["sent", "failed", "retry"]
    reason: str | None = None
    retry_after: float | None = None  # seconds, from the provider's Retry-After
    provider_id: str | None = None
    # Addresses the provider called dead: removed from the contact (e.g. ("push_tokens", token)).
    unreachable: list[tuple[str, Any]] = field(default_factory=list)
    record: dict[str, Any] = field(
        default_factory=dict
    )  # kept on the message (e.g. in-app content, segments)


@dataclass
class Outcome:
    """What a provider reported later about a message (callbacks)."""

    status: Literal["delivered", "opened", "clicked", "bounced", "blocked", "replied", "failed"]
    message_id: str | None = None
    provider_id: str | None = None
    reason: str | None = None
    attributes: dict[str, Any] = field(default_factory=dict)


class Channel(Protocol):
    """A channel plugin. Besides these members a channel may set `local = True` when a send never leaves
    the service (the in-app inbox, the log): it needs no `sending` mark and a re-run is harmless. It
    may set `timeout` (seconds): a send is cut at the lower of it and two thirds of the lease. It may
    set `html = True` when its title and body are shown in web pages (the in-app inbox): template
    params in them are then HTML-escaped."""

    name: str
    # The receiver ignores a repeat of a message id it has already seen (the webhook's Idempotency-Key).
    # A send a crash may have interrupted is then made once more with the same key; on any other
    # channel such a message is marked `uncertain` and not sent again, since it may have arrived.
    deduplicates: bool

    def status(self) -> tuple[bool, str]:
        """(configured, detail): a misconfigured channel is reported and skipped, never fatal."""
        ...

    def reachable(self, contact: dict[str, Any]) -> str | None:
        """None if the contact can be reached on this channel, else why not."""
        ...

    async def send(self, message: OutboundMessage) -> Delivery: ...


def is_local(channel: Channel) -> bool:
    """The send never leaves the service: no `sending` mark, repeated freely after a crash."""
    return bool(getattr(channel, "local", False))


def deduplicates(channel: Channel) -> bool:
    """The channel's `deduplicates` flag; plugins written before it said `idempotent`."""
    flag = getattr(channel, "deduplicates", None)
    if flag is None:
        flag = getattr(channel, "idempotent", False)
    return bool(flag)


@runtime_checkable
class CallbackChannel(Protocol):
    async def callback(self, request: web.Request) -> list[Outcome]:
        """Authenticate the provider's request as the provider signs it; raise HTTPUnauthorized if not."""
        ...


@runtime_checkable
class ManagedChannel(Protocol):
    async def start(self) -> None: ...

    async def close(self) -> None: ...


class LogChannel:
    """Delivers nothing: the message history is the whole delivery. For trying rules out."""

    local = True
    deduplicates = True

    def __init__(self, name: str = "log") -> None:
        self.name = name

    def status(self) -> tuple[bool, str]:
        return True, "records messages in the history only"

    def reachable(self, contact: dict[str, Any]) -> str | None:
        return None

    async def send(self, message: OutboundMessage) -> Delivery:
        return Delivery("sent")


class Unconfigured:
    """A standard channel no installed plugin provides: rulesets may use it; its sends are suppressed."""

    local = True
    deduplicates = True

    def __init__(self, name: str) -> None:
        self.name = name

    def status(self) -> tuple[bool, str]:
        return False, f"no plugin provides `{self.name}`: pip install the rulesvc-{self.name} plugin"

    def reachable(self, contact: dict[str, Any]) -> str | None:
        return None

    async def send(self, message: OutboundMessage) -> Delivery:
        return Delivery("failed", self.status()[1])


@runtime_checkable
class Job(Protocol):
    """Runs every `interval` seconds; a lease keeps it to one process. `data` is a
    `rulesvc.store.jobs.JobData`: named queries (audience changes, contacts), not the collections."""

    name: str
    interval: float

    async def run(self, data: Any) -> None: ...


class HttpChannel:
    """For channels that call an HTTP API: one client session, opened and closed with the service.

    Set `timeout` (seconds); override `session_headers` for headers every request carries."""

    timeout: float = 10.0
    session: aiohttp.ClientSession | None = None

    def session_headers(self) -> dict[str, str]:
        return {}

    async def start(self) -> None:
        self.session = aiohttp.ClientSession(
            headers=self.session_headers(), timeout=aiohttp.ClientTimeout(total=self.timeout)
        )

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    async def http(self) -> aiohttp.ClientSession:
        """The session, started on first use if the service did not start it (e.g. in a script)."""
        if self.session is None:
            await self.start()
        assert self.session is not None
        return self.session


class ChannelRegistry:
    def __init__(self) -> None:
        self._channels: dict[str, Channel] = {}
        self.jobs: list[Job] = []

    def register(self, channel: Channel) -> None:
        self._channels[channel.name] = channel

    def get(self, name: str) -> Channel | None:
        return self._channels.get(name)

    def names(self) -> frozenset[str]:
        return frozenset(self._channels)

    def all(self) -> list[Channel]:
        return [self._channels[n] for n in sorted(self._channels)]
