"""The HTTP API's request and response bodies (those not defined by the core's own types)."""

from __future__ import annotations

import types
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union, get_args, get_origin

import msgspec

from rulesvc.core.durations import DURATION_PATTERN
from rulesvc.core.messages import MessageStatus
from rulesvc.core.reasons import REASONS
from rulesvc.core.rulesummary import GoalInfo, RuleSummary, VariantInfo


class ErrorBody(msgspec.Struct, omit_defaults=True):
    """`field` and `allowed` when one named input was refused (a query parameter): what to change it to."""

    error: str
    field: str | None = None
    allowed: list[str] | None = None


class Health(msgspec.Struct):
    """`checks`: one line per part; `reasons`: one sentence per problem, empty when `ok`."""

    status: Literal["ok", "degraded", "unavailable"]
    checks: dict[str, str] = msgspec.field(default_factory=dict)
    reasons: list[str] = msgspec.field(default_factory=list)


class EventRecord(msgspec.Struct, omit_defaults=True):
    """`state`: `pending` (waiting for the rules), `done` (decided), `quarantined` (set aside after
    `attempts` failed evaluations, the last one's `error`), `dropped` (an admin dropped it from quarantine).
    `received_at`: when the service took it in (a ruleset's `timeout` counts from `time` to then)."""

    id: str
    type: str
    time: datetime
    contact_id: str | None = None
    attributes: dict[str, Any] = msgspec.field(default_factory=dict)
    state: str | None = None
    received_at: datetime | None = None
    attempts: int | None = None
    error: str | None = None


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
    """What `rulesvc check` prints as `file:line:column: path: message`; line and column (from 1) are
    null where no place in the text applies (a file that cannot be read, a bad file name)."""

    file: str
    line: int | None
    column: int | None
    path: str
    message: str


class RulesetRejected(msgspec.Struct):
    error: str
    errors: list[RulesetErrorBody]


class RulesetChecked(msgspec.Struct):
    """`?dry_run=true`: valid, and what it would be once written; nothing changed."""

    valid: bool
    name: str
    version: str
    events: list[str]


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
    folder: str  # the rulesets folder's absolute path on the server (a backtest names a sibling)


class ChannelInfo(msgspec.Struct):
    name: str
    configured: bool
    detail: str  # when not configured: what is missing or wrong, with the settings path
    deduplicates: bool  # a send a crash interrupted is repeated once with the same key, else `uncertain`
    callbacks: bool
    send_timeout_seconds: float  # the channel's timeout, at most two thirds of the lease
    kind: str = "message channel"
    # Its sends (GET /v1/overview and the console read them too): the last one, and the last 24 h's from
    # the funnel's hourly counters (null: the database did not answer, or RULESVC_STATS is off).
    last_sent_at: datetime | None = None
    sent_24h: int | None = None
    failed_24h: int | None = None  # failed (the provider said no) or dead (retries ran out)
    error_rate_24h: float | None = None  # failed / (sent + failed); null when none ended


class JobRun(msgspec.Struct):
    at: datetime
    duration_seconds: float


class JobError(msgspec.Struct):
    at: datetime
    duration_seconds: float
    message: str


class PluginPart(msgspec.Struct):
    """A channel or job a plugin registered. `last_run` and `last_error` are a job's (null when it has not
    run or failed yet, or when the database did not answer: `detail` then says so)."""

    name: str
    kind: str  # "message channel", "audience sync" or "job"
    configured: bool
    detail: str
    last_run: JobRun | None = None
    last_error: JobError | None = None


class PluginInfo(msgspec.Struct):
    name: str
    source: str
    channels: list[str]
    jobs: list[str]
    error: str | None  # the plugin failed to load or register
    provides: list[PluginPart] = msgspec.field(default_factory=list)
    settings_errors: list[str] = msgspec.field(default_factory=list)  # channels.NAME.KEY: what is expected


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


class MessageConflict(msgspec.Struct):
    """409: the action does not apply to the message in its current status."""

    error: str
    status: str  # the message's status now
    allowed: list[str]  # the statuses the action applies to


# Query parameters: one struct per route (`Route.query` in web/routes.py). The same struct checks the
# request (web/views/base.py `parse_query`: unknown names, enum values, ranges, times: 422) and becomes
# the operation's OpenAPI `parameters` (web/openapi.py `query_parameters`), so the two cannot differ.


def enum_values(hint: Any) -> list[str] | None:
    """The values of a `Literal` parameter (inside `Annotated`, `| None`) in their declared order, which
    is meaningful (a message's lifecycle) and which msgspec's own introspection sorts away."""
    while True:
        origin = get_origin(hint)
        if origin is Annotated:
            hint = get_args(hint)[0]
        elif origin in (Union, types.UnionType):
            hint = next(a for a in get_args(hint) if a is not type(None))
        elif origin is Literal:
            return [str(v) for v in get_args(hint)]
        else:
            return None


Limit = Annotated[int, msgspec.Meta(ge=1, le=500, description="most items to return")]
# tz=True: a time without an offset is refused (and the document says `format: date-time`).
Before = Annotated[
    datetime, msgspec.Meta(tz=True, description="only items older than this (paging: `next_before`)")
]


BeforeId = Annotated[
    str, msgspec.Meta(description="with `before`: the `next_before_id` of the previous page (ties)")
]
if TYPE_CHECKING:
    ReasonCode = str
else:  # the closed set of core/reasons.py, so an unknown code gets a 422 listing them
    ReasonCode = Literal[tuple(REASONS)]


class NoQuery(msgspec.Struct, forbid_unknown_fields=True):
    """A route that takes no query parameters: any given is a typo worth a 422, not silence."""


class MessagesQuery(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    status: (
        Annotated[MessageStatus, msgspec.Meta(description="messages in this status, e.g. dead")] | None
    ) = None
    limit: Limit = 50
    before: Before | None = None
    before_id: BeforeId | None = None
    channel: (
        Annotated[str, msgspec.Meta(description="only messages the rule named or sent on this channel")]
        | None
    ) = None
    contact_id: Annotated[str, msgspec.Meta(description="only this contact's messages")] | None = None
    ruleset: Annotated[str, msgspec.Meta(description="only messages of this ruleset")] | None = None
    rule: (
        Annotated[str, msgspec.Meta(description="with `ruleset`: only messages of this rule of it")] | None
    ) = None
    reason: (
        Annotated[
            ReasonCode, msgspec.Meta(description="only messages with this reason code, e.g. no_consent")
        ]
        | None
    ) = None
    from_: (
        Annotated[datetime, msgspec.Meta(tz=True, description="only messages decided at or after this time")]
        | None
    ) = msgspec.field(default=None, name="from")
    to: (
        Annotated[datetime, msgspec.Meta(tz=True, description="only messages decided before this time")]
        | None
    ) = None


class ContactMessagesQuery(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    limit: Limit = 50
    before: Before | None = None
    before_id: BeforeId | None = None
    status: Annotated[MessageStatus, msgspec.Meta(description="only messages in this status")] | None = None


class PagingQuery(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    limit: Limit = 50
    before: Before | None = None


QuarantinedBefore = Annotated[
    datetime, msgspec.Meta(tz=True, description="only events quarantined before this")
]


class QuarantineQuery(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    limit: Limit = 50
    before: QuarantinedBefore | None = None


InboxTokenParam = Annotated[str, msgspec.Meta(description="the contact's inbox token, if not in the header")]


class InboxQuery(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    limit: Annotated[int, msgspec.Meta(ge=1, le=100, description="most items to return")] = 20
    token: InboxTokenParam | None = None


class InboxActionQuery(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    token: InboxTokenParam | None = None


class RulesetPutQuery(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    dry_run: Annotated[bool, msgspec.Meta(description="check only; write nothing")] = False


# `GET /v1/rulesets/{name}` (the console's ruleset page reads it too).


class RulesetDetail(RulesetInfo, kw_only=True):
    """A ruleset as its list entry shows it, and what it does: each rule in words (from the live
    version; none while no version ever loaded), its holdout, A/B arms and goal, and the current text of
    its file (which differs from the live version after a refused edit: `status` is then `error`).
    `source` is null, and `source_error` says why, when the file cannot be read."""

    description: str
    timeout: str | None  # older events start nothing in this ruleset
    holdout: str | None  # e.g. "5%"
    variants: list[VariantInfo]
    goal: GoalInfo | None
    rules: list[RuleSummary]
    source: str | None
    source_error: str | None = None
