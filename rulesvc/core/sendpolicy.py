"""The send rules, decided from plain facts: may this due message go out now, on which channel, or when.

`check` is the one place where consent, suppression, reachability, fallback, guards, quiet hours and
frequency caps are decided. The live dispatcher loads the facts from MongoDB and the simulator keeps
them in memory; both call `check`, so a simulation suppresses, postpones and falls back exactly as the
live service does, with the same reasons. Pure: no storage, no network, no clock of its own.
"""

from __future__ import annotations

import zoneinfo
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, time, timedelta
from typing import Any, Literal, Protocol

from rulesvc.core import reasons
from rulesvc.core.catalog import guard_fails

QUIET_REASON = "quiet hours in the contact's time zone"  # the detail of a `quiet_hours` postponement
HELD_OUT_DETAIL = "in the ruleset's holdout group: decided as sent, not sent"
# Channels that never interrupt anybody and that the shop owns: no marketing consent needed.
NO_CONSENT_NEEDED = frozenset({"log", "inapp"})


@dataclass(frozen=True)
class SendPolicy:
    frequency_caps: dict[str, int] = field(default_factory=dict)  # marketing messages per channel per day
    quiet_start: time | None = None
    quiet_end: time | None = None
    default_timezone: str = "UTC"
    max_attempts: int = 6
    retry_base: timedelta = timedelta(seconds=30)
    retry_max: timedelta = timedelta(hours=1)
    lease: timedelta = timedelta(seconds=15)  # how long a process holds a due send (RULESVC_LEASE_SECONDS)
    # Channels that interrupt (a phone buzzes, a mail arrives): quiet hours hold back only these.
    quiet_channels: frozenset[str] = frozenset({"email", "sms", "push", "webpush"})


@dataclass(frozen=True)
class ChannelFacts:
    """What one channel says about one contact, asked before the decision (the plugin's `status` and
    `reachable`), so that `check` needs no channel object: the simulator has none."""

    configured: bool = True
    detail: str = ""  # the channel's status detail: why it is not configured
    unreachable: str | None = None  # `reachable(contact)`: None, or why the contact cannot be reached
    error: str | None = None  # the channel's own checks raised: `channel error: ...`


@dataclass(frozen=True)
class Facts:
    """What the decision reads besides the message and the contact: in the live service from MongoDB."""

    # The catalog's current document of the message's product (its price and stock), for a guard.
    product: Mapping[str, Any] = field(default_factory=dict)
    # Marketing messages already sent per channel since the contact's local midnight (`day_start`).
    sent_today: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Verdict:
    """`send` on `channel`; `postpone` to `at`; `suppress` with `reason` (channel None: none was usable);
    `hold`: it would be sent on `channel`, but the contact is held out. `reason` is a code of
    `core.reasons`, `detail` the sentence a person reads."""

    kind: Literal["send", "postpone", "suppress", "hold"]
    channel: str | None = None
    reason: str | None = None
    at: datetime | None = None
    detail: str | None = None


def contact_zone(contact: Mapping[str, Any], policy: SendPolicy) -> zoneinfo.ZoneInfo:
    try:
        return zoneinfo.ZoneInfo(contact.get("timezone") or policy.default_timezone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        return zoneinfo.ZoneInfo("UTC")


def quiet_until(now: datetime, zone: zoneinfo.ZoneInfo, policy: SendPolicy) -> datetime | None:
    """The end of the quiet window `now` is in (contact's local time), or None if it is not quiet."""
    if policy.quiet_start is None or policy.quiet_end is None:
        return None
    local = now.astimezone(zone)
    t = local.time()
    start, end = policy.quiet_start, policy.quiet_end
    inside = (start <= t or t < end) if start > end else (start <= t < end)
    if not inside:
        return None
    end_day = local.date() if t < end else local.date() + timedelta(days=1)
    return datetime.combine(end_day, end, tzinfo=zone).astimezone(UTC)


def local_midnight(now: datetime, zone: zoneinfo.ZoneInfo) -> datetime:
    local = now.astimezone(zone)
    return datetime.combine(local.date(), time(0), tzinfo=zone).astimezone(UTC)


def day_start(contact: Mapping[str, Any], now: datetime, policy: SendPolicy) -> datetime:
    """Since when `Facts.sent_today` counts: midnight in the contact's time zone, as a cap's day."""
    return local_midnight(now, contact_zone(contact, policy))


def suppressed_on(contact: Mapping[str, Any], channel: str, now: datetime) -> bool:
    entry = (contact.get("state") or {}).get("suppressed", {}).get(channel)
    return entry is not None and (entry.get("until") is None or entry["until"] > now.timestamp())


def candidates(message: Mapping[str, Any]) -> list[str]:
    """The message's channel, then its fallbacks, in the order they are tried."""
    return [message["channel"], *(message.get("fallback") or [])]


def capped_candidates(message: Mapping[str, Any], policy: SendPolicy) -> list[str]:
    """The channels whose `sent_today` count the decision may need: none for a transactional message."""
    if message.get("transactional"):
        return []
    return [name for name in candidates(message) if name in policy.frequency_caps]


def choose(
    message: Mapping[str, Any],
    contact: Mapping[str, Any],
    channels: Mapping[str, ChannelFacts],
    now: datetime,
) -> tuple[str | None, str | None, str | None]:
    """(the first of channel + fallbacks that may and can reach the contact, None, None), or (None, the
    reason code of the first candidate's problem, every candidate's problem). A channel missing from
    `channels` is not installed."""
    problems: list[tuple[str, str]] = []
    transactional = bool(message.get("transactional"))
    for name in candidates(message):
        facts = channels.get(name)
        if facts is None:
            problems.append((reasons.CHANNEL_NOT_INSTALLED, f"{name}: channel not installed"))
        elif facts.error is not None:
            problems.append((reasons.CHANNEL_ERROR, f"{name}: {facts.error}"))
        elif not facts.configured:
            problems.append((reasons.CHANNEL_NOT_CONFIGURED, f"{name}: not configured: {facts.detail}"))
        elif suppressed_on(contact, name, now):
            problems.append((reasons.SUPPRESSION_LIST, f"{name}: contact is on the suppression list"))
        elif (
            not transactional
            and name not in NO_CONSENT_NEEDED
            and not (contact.get("consent") or {}).get(name)
        ):
            problems.append((reasons.NO_CONSENT, f"{name}: no marketing consent"))
        elif facts.unreachable is not None:
            problems.append((reasons.UNREACHABLE, f"{name}: {facts.unreachable}"))
        else:
            return name, None, None
    return None, problems[0][0], "; ".join(detail for _, detail in problems)


def check(
    message: Mapping[str, Any],
    contact: Mapping[str, Any],
    channels: Mapping[str, ChannelFacts],
    facts: Facts,
    now: datetime,
    policy: SendPolicy,
    *,
    interrupted: bool = False,
) -> Verdict:
    """Decide a due message: channel choice (suppression, consent unless transactional, reachability,
    then the fallbacks), the guard, quiet hours, the frequency cap; in that order, as the service always
    did. `interrupted`: a send cut short is being completed; it passed the other checks already, so only
    the channel is chosen again."""
    chosen, code, why_not = choose(message, contact, channels, now)
    if chosen is None:
        return Verdict("suppress", reason=code, detail=why_not)
    if interrupted:
        return Verdict("send", chosen)
    if message.get("guard"):
        stale = guard_fails(message["guard"], message.get("params") or {}, dict(facts.product))
        if stale:
            return Verdict("suppress", chosen, reasons.GUARD_FAILED, detail=stale)
    if message.get("transactional"):
        return Verdict("send", chosen)
    if chosen in policy.quiet_channels:  # an inbox entry or a log line disturbs nobody
        until = quiet_until(now, contact_zone(contact, policy), policy)
        if until is not None:
            return Verdict("postpone", chosen, reasons.QUIET_HOURS, at=until, detail=QUIET_REASON)
    cap = policy.frequency_caps.get(chosen)
    if cap is not None and facts.sent_today.get(chosen, 0) >= cap:
        why = f"frequency cap: {cap} {chosen} message(s) a day reached"
        return Verdict("suppress", chosen, reasons.FREQUENCY_CAP, detail=why)
    if message.get("held_out"):  # every rule above applied: what the funnel compares is a real send
        return Verdict("hold", chosen, reasons.HELD_OUT, detail=HELD_OUT_DETAIL)
    return Verdict("send", chosen)


def count_since(sent_at: Sequence[datetime], since: datetime) -> int:
    """How many of these send times are at or after `since`: a cap's count from an in-memory history."""
    return sum(1 for at in sent_at if at >= since)


def outcome_changes(outcome: str, channel: object, at: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """(profile fields, suppressions) that a provider's bad news changes, so later sends see it: a bounce
    marks the email address invalid; a block suppresses the channel for good."""
    if outcome == "bounced" and channel == "email":
        return {"email_invalid": True}, {}
    if outcome == "blocked" and isinstance(channel, str):
        return {}, {channel: {"since": at, "until": None, "reason": "blocked"}}
    return {}, {}


class _Checkable(Protocol):
    def status(self) -> tuple[bool, str]: ...

    def reachable(self, contact: dict[str, Any]) -> str | None: ...


def ask(
    channel: _Checkable, contact: dict[str, Any], on_error: Callable[[Exception], None] | None = None
) -> ChannelFacts:
    """A channel's `status` and `reachable` for a contact, as facts; a channel whose checks raise is
    reported as such (`on_error` may log it) and never chosen."""
    try:
        configured, detail = channel.status()
        why = channel.reachable(contact)
    except Exception as exc:
        if on_error is not None:
            on_error(exc)
        return ChannelFacts(error=f"channel error: {type(exc).__name__}")
    return ChannelFacts(configured, detail, why)
