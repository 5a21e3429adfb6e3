"""The HTTP API's request and response bodies (those not defined by the core's own types)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec

from rulesvc.core.durations import DURATION_PATTERN


class ErrorBody(msgspec.Struct):
    error: str


class Health(msgspec.Struct):
    status: Literal["ok", "degraded", "unavailable"]
    checks: dict[str, str] = msgspec.field(default_factory=dict)


class EventRecord(msgspec.Struct, omit_defaults=True):
    id: str
    type: str
    time: datetime
    contact_id: str | None = None
    attributes: dict[str, Any] = msgspec.field(default_factory=dict)
    state: str | None = None


class EventList(msgspec.Struct):
    events: list[EventRecord]


class QuarantinedEvent(msgspec.Struct, omit_defaults=True):
    id: str
    type: str
    time: datetime
    received_at: datetime
    quarantined_at: datetime
    stage: str  # inbox: its contact's evaluation; fanout: copying a catalog event to interested contacts
    attempts: int
    error: str
    contact_id: str | None = None
    attributes: dict[str, Any] = msgspec.field(default_factory=dict)


class QuarantineList(msgspec.Struct):
    events: list[QuarantinedEvent]
    next_before: datetime | None = None


class QuarantineAction(msgspec.Struct, forbid_unknown_fields=True):
    """Name the events (`ids`) or take them all (`all: true`), never both: a bulk action is deliberate."""

    ids: list[Annotated[str, msgspec.Meta(min_length=1, max_length=128)]] | None = None
    all: bool = False


class QuarantineActed(msgspec.Struct, omit_defaults=True):
    retried: int | None = None
    dropped: int | None = None


class RulesetErrorBody(msgspec.Struct):
    file: str
    path: str
    message: str


class RulesetInfo(msgspec.Struct):
    name: str
    file: str
    status: Literal["loaded", "error"]
    version: str | None
    loaded_at: datetime | None
    events: list[str]
    errors: list[RulesetErrorBody]


class RulesetList(msgspec.Struct):
    rulesets: list[RulesetInfo]


class ChannelInfo(msgspec.Struct):
    name: str
    configured: bool
    detail: str
    deduplicates: bool  # a send a crash interrupted is repeated once with the same key, else `uncertain`
    callbacks: bool
    send_timeout_seconds: float  # the channel's timeout, at most two thirds of the lease


class PluginInfo(msgspec.Struct):
    name: str
    source: str
    channels: list[str]
    jobs: list[str]
    error: str | None


class ChannelList(msgspec.Struct):
    channels: list[ChannelInfo]
    plugins: list[PluginInfo]


class CallbacksAccepted(msgspec.Struct):
    accepted: int


class InboxItem(msgspec.Struct, omit_defaults=True):
    message_id: str
    template: str
    content: dict[str, str]
    sent_at: datetime | None = None
    shown_at: datetime | None = None
    params: dict[str, Any] = msgspec.field(default_factory=dict)


class InboxList(msgspec.Struct):
    messages: list[InboxItem]


class InboxAction(msgspec.Struct, forbid_unknown_fields=True):
    action: Literal["shown", "clicked", "dismissed"]


class InboxTokenRequest(msgspec.Struct, forbid_unknown_fields=True):
    ttl: Annotated[
        str,
        msgspec.Meta(
            pattern=DURATION_PATTERN, description="how long it works, e.g. 15m, 1h, 7d; at most 30d"
        ),
    ] = "1h"


class InboxToken(msgspec.Struct):
    """What a page presents to read and act on one contact's inbox: `Authorization: Bearer <token>`."""

    token: str
    contact_id: str
    expires_at: datetime
