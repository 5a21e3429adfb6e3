"""The bodies of `GET /v1/overview` and `POST /v1/channels/{name}/test`."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

import msgspec

from rulesvc.core.contacts import WebPushSubscription
from rulesvc.web.schemas import ChannelInfo, Health, PluginInfo


class Throughput(msgspec.Struct):
    """Events accepted (stored by `POST /v1/events`, provider callbacks, the service's own) and decided
    (evaluated by the rules) over the last `window_seconds` (whole seconds; the rates are the counts
    over that figure, so a reader can check them)."""

    window_seconds: int
    accepted: int
    decided: int
    accepted_per_second: float
    decided_per_second: float


class ThroughputPoint(msgspec.Struct):
    """One UTC quarter hour from `at`; the rates are over its part that has passed."""

    at: datetime
    accepted: int
    decided: int
    accepted_per_second: float
    decided_per_second: float


class InboxLag(msgspec.Struct):
    """The events waiting for the rules: how many, and how long the oldest has waited (0: none waits)."""

    waiting: int
    oldest_received_at: datetime | None
    lag_seconds: float


class DueQueue(msgspec.Struct):
    """Scheduled sends: due now and not yet sent (and how late the oldest is), and due within the hour."""

    due_now: int
    oldest_due_at: datetime | None
    overdue_seconds: float
    next_hour: int


class ChannelMessages(msgspec.Struct):
    """A channel's messages over the window by status (`sent`, `suppressed`, `failed`, `delivered`, ...),
    from the funnel's hourly counters: a message counts once per status it reached."""

    channel: str
    counts: dict[str, int]


class Overview(msgspec.Struct):
    """What an on-call person looks at first. The parts read from MongoDB are null (`series` and
    `messages` empty) when it does not answer: `health` then says so."""

    at: datetime
    health: Health
    now: Throughput | None
    bucket_seconds: int
    series: list[ThroughputPoint]
    inbox: InboxLag | None
    due: DueQueue | None
    messages_since: datetime
    messages: list[ChannelMessages]
    stats_enabled: bool  # RULESVC_STATS: off, nothing is counted and `messages` stays empty
    quarantined: int | None
    dead_letters: int | None
    channels: list[ChannelInfo]
    plugins: list[PluginInfo]


To = Annotated[
    str,
    msgspec.Meta(
        max_length=4096,
        description="the address to send to: an email address (email), an E.164 phone number (sms), a "
        "device token (push); a channel with an address of its own (webhook, log, inapp) needs none",
    ),
]


class ChannelTestRequest(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    to: To | None = None
    webpush_subscription: WebPushSubscription | None = None  # for `webpush`: the browser's subscription


class ChannelTestResult(msgspec.Struct):
    """The provider took the test message. `detail` is what it said, if anything; `provider_id` its id."""

    channel: str
    status: Literal["sent"]
    message_id: str
    seconds: float
    detail: str | None = None
    provider_id: str | None = None


class ChannelTestFailed(msgspec.Struct):
    """The provider did not take it: `status` as a send would have ended (`retry`: a temporary error or
    timeout; `failed`: refused; `blocked`: the recipient refuses), `provider_said` its words."""

    error: str
    channel: str
    status: Literal["failed", "retry", "blocked"]
    provider_said: str
    message_id: str
    seconds: float
