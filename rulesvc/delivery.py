"""The send pipeline in front of every channel, and the outbox that makes each send happen once.

When a send comes due: suppression, consent (marketing only), reachability, channel fallback, frequency
cap and quiet hours are checked at that moment, in the contact's time zone; the template is rendered;
then the message goes `scheduled -> sending -> sent | failed | dead` (or back to `scheduled` for a retry
or a postponement). For a channel whose provider does not de-duplicate by our key (message id), the
`sending` mark is written before the provider is called: if the process dies during the call, the next
attempt knows, does not call again, and marks the message `failed` with that reason, because a second
delivery is worse than an explained missing one. A de-duplicating channel needs no mark: it is simply
called again.
"""

from __future__ import annotations

import random
import zoneinfo
from dataclasses import dataclass, field
from datetime import UTC, datetime, time, timedelta
from typing import Any, Literal

import structlog

from rulesvc.catalog import guard_fails
from rulesvc.channels import Channel, ChannelRegistry, Delivery, OutboundMessage
from rulesvc.contacts import PROFILE_FIELDS
from rulesvc.plugins import channel_config
from rulesvc.store import Doc, Store
from rulesvc.templates import TemplateError, Templates

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class SendPolicy:
    frequency_caps: dict[str, int] = field(default_factory=dict)  # marketing messages per channel per day
    quiet_start: time | None = None
    quiet_end: time | None = None
    default_timezone: str = "UTC"
    max_attempts: int = 6
    retry_base: timedelta = timedelta(seconds=30)
    retry_max: timedelta = timedelta(hours=1)
    # Channels that interrupt (a phone buzzes, a mail arrives): quiet hours hold back only these.
    quiet_channels: frozenset[str] = frozenset({"email", "sms", "push", "webpush"})


QUIET_BY_DEFAULT = SendPolicy.quiet_channels
_FLAGS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def quiet_channels(channel_settings: dict[str, dict[str, Any]], environ: dict[str, str]) -> frozenset[str]:
    """The channels quiet hours apply to: email, SMS, push and web push unless a channel's settings say
    `quiet_hours = false`; any other channel (in-app, log, webhook) only with `quiet_hours = true`.
    Raises ValueError for a value that is not a yes or a no."""
    suffix = "_QUIET_HOURS"
    named = {k[len("RULESVC_CHANNEL_") : -len(suffix)].lower() for k in environ
             if k.startswith("RULESVC_CHANNEL_") and k.endswith(suffix)}  # fmt: skip
    chosen = set(QUIET_BY_DEFAULT)
    for name in named | set(channel_settings) | QUIET_BY_DEFAULT:
        value = channel_config(name, channel_settings, environ).get("quiet_hours")
        if value is None:
            continue
        flag = value if isinstance(value, bool) else _FLAGS.get(str(value).strip().lower())
        if flag is None:
            raise ValueError(f"channels.{name}.quiet_hours must be true or false, got {value!r}")
        if flag:
            chosen.add(name)
        else:
            chosen.discard(name)
    return frozenset(chosen)


def parse_quiet_hours(text: str) -> tuple[time | None, time | None]:
    """`21:00-08:00` (may wrap midnight); empty turns quiet hours off."""
    if not text.strip():
        return None, None
    start, _, end = text.partition("-")
    return time.fromisoformat(start.strip()), time.fromisoformat(end.strip())


@dataclass
class Result:
    kind: Literal["sent", "failed", "suppressed", "postponed", "retry", "dead", "skip"]
    channel: str | None = None
    reason: str | None = None
    at: datetime | None = None  # postponed / retry: when to try again
    provider_id: str | None = None
    attempt: int = 0
    unreachable: list[tuple[str, Any]] = field(default_factory=list)
    record: dict[str, Any] = field(default_factory=dict)


def contact_zone(contact: Doc, policy: SendPolicy) -> zoneinfo.ZoneInfo:
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


def suppressed_on(contact: Doc, channel: str, now: datetime) -> bool:
    entry = (contact.get("state") or {}).get("suppressed", {}).get(channel)
    return entry is not None and (entry.get("until") is None or entry["until"] > now.timestamp())


def backoff(attempt: int, policy: SendPolicy, retry_after: float | None) -> timedelta:
    """Exponential with full jitter; a provider's Retry-After is a floor."""
    ceiling = min(policy.retry_max.total_seconds(), policy.retry_base.total_seconds() * 2 ** (attempt - 1))
    delay = random.uniform(ceiling / 2, ceiling)
    if retry_after is not None:
        delay = max(delay, retry_after)
    return timedelta(seconds=delay)


class Dispatcher:
    def __init__(
        self, store: Store, channels: ChannelRegistry, templates: Templates, policy: SendPolicy
    ) -> None:
        self.store = store
        self.channels = channels
        self.templates = templates
        self.policy = policy

    def _choose(self, message: Doc, contact: Doc, now: datetime) -> tuple[Channel | None, str | None]:
        """The first of channel + fallbacks that may and can reach the contact, or why none can."""
        reasons: list[str] = []
        transactional = bool(message.get("transactional"))
        for name in [message["channel"], *message.get("fallback", [])]:
            channel = self.channels.get(name)
            if channel is None:
                reasons.append(f"{name}: channel not installed")
                continue
            try:
                configured, detail = channel.status()
                why = channel.reachable(contact)
            except Exception as exc:
                log.exception("delivery.channel_check_failed", channel=name)
                reasons.append(f"{name}: channel error: {type(exc).__name__}")
                continue
            if not configured:
                reasons.append(f"{name}: {detail}")
            elif suppressed_on(contact, name, now):
                reasons.append(f"{name}: contact is on the suppression list")
            elif (
                not transactional
                and name not in ("log", "inapp")
                and not (contact.get("consent") or {}).get(name)
            ):
                reasons.append(f"{name}: no marketing consent")
            elif why is not None:
                reasons.append(f"{name}: {why}")
            else:
                return channel, None
        return None, "; ".join(reasons)

    def capped(self, channel: str | None) -> bool:
        return channel is not None and channel in self.policy.frequency_caps

    async def _guard_fails(self, message: Doc) -> str | None:
        if not message.get("guard"):
            return None
        params = message.get("params") or {}
        product = await self.store.products.find_one({"_id": str(params.get("product_id"))}) or {}
        return guard_fails(message["guard"], params, product)

    async def _over_cap(self, message: Doc, channel: str, contact: Doc, now: datetime) -> str | None:
        cap = self.policy.frequency_caps.get(channel)
        if cap is None or message.get("transactional"):
            return None
        since = local_midnight(now, contact_zone(contact, self.policy))
        count = await self.store.messages.count_documents(
            {"contact_id": message["contact_id"], "sent_channel": channel, "sent_at": {"$gte": since},
             "transactional": {"$ne": True}, "status": {"$nin": ["scheduled", "failed", "dead", "suppressed",
                                                                 "cancelled"]}},
        )  # fmt: skip
        return f"frequency cap: {cap} {channel} message(s) a day reached" if count >= cap else None

    async def dispatch(self, message: Doc, contact: Doc | None, now: datetime) -> Result:
        """Decide and, if everything allows, deliver one due message."""
        if message["status"] not in ("scheduled", "sending"):
            return Result("skip", reason=f"already {message['status']}")
        contact = contact or {"_id": message["contact_id"]}
        attempt = int(message.get("attempt", 0)) + 1
        interrupted = message["status"] == "sending"
        channel, why_not = self._choose(message, contact, now)
        if channel is None:
            return Result("suppressed", reason=why_not)
        if interrupted and not channel.idempotent:
            return Result(
                "failed",
                channel.name,
                "interrupted during the provider call; not repeated so it cannot arrive twice",
                attempt=attempt - 1,
            )
        stale = await self._guard_fails(message)
        if stale:
            return Result("suppressed", channel.name, stale)
        transactional = bool(message.get("transactional"))
        if not transactional and not interrupted:
            zone = contact_zone(contact, self.policy)
            quiet = channel.name in self.policy.quiet_channels  # an inbox entry or a log line disturbs nobody
            until = quiet_until(now, zone, self.policy) if quiet else None
            if until is not None:
                return Result("postponed", channel.name, "quiet hours in the contact's time zone", at=until)
            over = await self._over_cap(message, channel.name, contact, now)
            if over:
                return Result("suppressed", channel.name, over)
        profile = {k: contact.get(k) for k in PROFILE_FIELDS if contact.get(k) is not None}
        try:
            content = self.templates.render(
                message["template"],
                {
                    "params": message.get("params") or {},
                    "contact": {"id": contact["_id"], **profile},
                    "message": {
                        "id": message["_id"],
                        "channel": channel.name,
                        "ruleset": message.get("ruleset"),
                    },
                },
                html=bool(getattr(channel, "html", False)),  # its title and body go into web pages
            )
        except TemplateError as exc:
            return Result("failed", channel.name, f"template_error: {exc}", attempt=attempt)
        except Exception as exc:  # a template can fail in many ways; the service must not
            reason = f"template_error: template `{message['template']}`: {exc}"
            return Result("failed", channel.name, reason, attempt=attempt)
        if not channel.idempotent:
            # Marked before the call, so an interruption is known afterwards. A channel whose provider
            # de-duplicates by our key needs no mark (and saves a round trip): repeating it is safe.
            claimed = await self.store.messages.update_one(
                {"_id": message["_id"], "status": message["status"]},
                {
                    "$set": {
                        "status": "sending",
                        "attempt": attempt,
                        "sending_at": now,
                        "sent_channel": channel.name,
                    }
                },
            )
            if claimed.modified_count != 1:
                return Result("skip", reason="taken by another process")
        outbound = OutboundMessage(
            message_id=message["_id"],
            contact_id=contact["_id"],
            channel=channel.name,
            template=message["template"],
            content=content,
            params=message.get("params") or {},
            transactional=transactional,
            contact=profile,
            attempt=attempt,
        )
        try:
            delivery = await channel.send(outbound)
        except (TimeoutError, OSError) as exc:
            delivery = Delivery("retry", f"{type(exc).__name__}: {exc}")
        except Exception as exc:  # a plugin's bug fails its message, not the service
            log.exception("delivery.channel_error", channel=channel.name)
            delivery = Delivery("failed", f"channel error: {type(exc).__name__}: {exc}")
        return self._result(delivery, channel.name, attempt, now)

    def _result(self, delivery: Delivery, channel: str, attempt: int, now: datetime) -> Result:
        if delivery.status == "sent":
            return Result("sent", channel, delivery.reason, provider_id=delivery.provider_id, attempt=attempt,
                          unreachable=delivery.unreachable, record=delivery.record)  # fmt: skip
        if delivery.status == "failed":
            return Result(
                "failed", channel, delivery.reason, attempt=attempt, unreachable=delivery.unreachable
            )
        if attempt >= self.policy.max_attempts:
            return Result(
                "dead", channel, f"gave up after {attempt} attempts: {delivery.reason}", attempt=attempt
            )
        at = now + backoff(attempt, self.policy, delivery.retry_after)
        return Result("retry", channel, delivery.reason, at=at, attempt=attempt)
