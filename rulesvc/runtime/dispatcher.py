"""The send pipeline in front of every channel, and the outbox that makes each send happen once.

When a send comes due: suppression, consent (marketing only), reachability, channel fallback, frequency
cap and quiet hours are checked at that moment, in the contact's time zone; the template is rendered;
then the message goes `scheduled -> sending -> sent | failed | dead` (or back to `scheduled` for a retry
or a postponement).

The `sending` mark is written before the provider is called, with the process's claim and the moment
the call is cut off (`sending_until`: the channel's timeout, at most two thirds of the lease). A message
found in `sending` was interrupted (its process died, or lost its claim): it is looked at again only
after `sending_until`, so never while the first call may still be in flight; then it is sent once more,
with the same message id as key, only if the channel `deduplicates` and it was not repeated before;
otherwise it is marked `uncertain` (it may have arrived), because a second delivery is worse than an
explained doubt. Only `local` channels (in-app, log), whose sends never leave the service, skip the mark.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, time, timedelta
from time import monotonic
from typing import Any, Literal

import bson
import structlog

from rulesvc.channels import (
    Channel,
    ChannelRegistry,
    Delivery,
    OutboundMessage,
    as_flag,
    deduplicates,
    is_local,
)
from rulesvc.core import reasons
from rulesvc.core.contacts import PROFILE_FIELDS
from rulesvc.core.sendpolicy import (
    ChannelFacts,
    Facts,
    SendPolicy,
    ask,
    candidates,
    capped_candidates,
    check,
    day_start,
)
from rulesvc.plugins import channel_config
from rulesvc.runtime.templates import TemplateError, Templates
from rulesvc.store.catalog import Catalog
from rulesvc.store.db import Doc, Store, transient
from rulesvc.store.messages import Messages

log = structlog.get_logger(__name__)


def send_timeout(channel: Channel, lease: timedelta) -> float:
    """Seconds a send may take: the channel's `timeout`, at most two thirds of the lease, so a send is
    over before its claim could run out and another process take the message over."""
    cap = lease.total_seconds() * 2 / 3
    declared = getattr(channel, "timeout", None)
    if isinstance(declared, int | float) and not isinstance(declared, bool) and 0 < declared < cap:
        return float(declared)
    return cap


def interrupted_reason(why: str) -> str:
    return f"interrupted during the provider call, so it may have arrived; not sent again: {why}"


QUIET_BY_DEFAULT = SendPolicy.quiet_channels
# How long a lost `sending` mark is tried to be undone while the database comes back (a failover takes a
# few seconds: BENCHMARKS.md and docs/deploy.md).
MARK_TAKE_BACK_SECONDS = 20.0


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
        flag = as_flag(value)
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


# The message must still be as the dispatcher found it for its result to be written.
SCHEDULED: dict[str, Any] = {"status": "scheduled"}


@dataclass
class Result:
    """`wait`: look at the message again at `at` and leave it as it is (a call may be in flight).
    `reason`: a code of `core.reasons` (for a result that is not `sent`); `detail`: the sentence."""

    kind: Literal[
        "sent",
        "failed",
        "blocked",
        "suppressed",
        "postponed",
        "retry",
        "dead",
        "skip",
        "uncertain",
        "wait",
        "held_out",
    ]
    channel: str | None = None
    reason: str | None = None
    detail: str | None = None
    at: datetime | None = None  # postponed / retry / wait: when to look again
    provider_id: str | None = None
    attempt: int = 0
    latency: float | None = None  # seconds the provider call took
    unreachable: list[tuple[str, Any]] = field(default_factory=list)
    record: dict[str, Any] = field(default_factory=dict)
    guard: dict[str, Any] = field(default_factory=lambda: SCHEDULED)  # filter on the message for the write


def backoff(attempt: int, policy: SendPolicy, retry_after: float | None) -> timedelta:
    """Exponential with full jitter; a provider's Retry-After is a floor."""
    ceiling = min(policy.retry_max.total_seconds(), policy.retry_base.total_seconds() * 2 ** (attempt - 1))
    delay = random.uniform(ceiling / 2, ceiling)
    if retry_after is not None:
        delay = max(delay, retry_after)
    return timedelta(seconds=delay)


class Dispatcher:
    def __init__(
        self,
        store: Store,
        channels: ChannelRegistry,
        templates: Templates,
        policy: SendPolicy,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.store = store
        self.messages = Messages(store)
        self.catalog = Catalog(store)
        self.channels = channels
        self.templates = templates
        self.policy = policy
        self.clock = clock
        for channel in channels.all():
            declared = getattr(channel, "timeout", None)
            if isinstance(declared, int | float) and declared > send_timeout(channel, policy.lease):
                log.warning("delivery.timeout_capped", channel=channel.name, timeout=declared,
                            cap=round(send_timeout(channel, policy.lease), 3),
                            hint="a send is cut at two thirds of RULESVC_LEASE_SECONDS; lower the "
                            "channel's timeout or raise the lease")  # fmt: skip

    def _channel_facts(self, message: Doc, contact: Doc) -> dict[str, ChannelFacts]:
        """What each installed channel of the message (and its fallbacks) says about the contact."""
        facts: dict[str, ChannelFacts] = {}
        for name in candidates(message):
            channel = self.channels.get(name)
            if channel is not None and name not in facts:

                def failed(exc: Exception, name: str = name) -> None:
                    log.error("delivery.channel_check_failed", channel=name, exc_info=exc)

                facts[name] = ask(channel, contact, failed)
        return facts

    async def _facts(
        self, message: Doc, contact: Doc, now: datetime, sent_now: Mapping[str, int] | None = None
    ) -> Facts:
        """The facts `check` decides on, from MongoDB: the product of a guard, today's capped sends (and
        `sent_now`: those of the caller's batch, not written yet)."""
        product: Doc = {}
        if message.get("guard"):
            params = message.get("params") or {}
            product = await self.catalog.product(str(params.get("product_id")))
        sent_today: dict[str, int] = {}
        since = day_start(contact, now, self.policy)
        for channel in capped_candidates(message, self.policy):
            sent_today[channel] = await self.messages.sent_since(message["contact_id"], channel, since)
            sent_today[channel] += (sent_now or {}).get(channel, 0)
        return Facts(product, sent_today)

    def _not_again(self, message: Doc, channel: Channel | None, why_not: str | None) -> str | None:
        """Why an interrupted send must not be made again, or None if it may (once, same key)."""
        if channel is None:
            return why_not or "no channel can be used now"
        if channel.name != message.get("sent_channel"):
            return f"`{message.get('sent_channel')}` is no longer the channel to use"
        if is_local(channel):
            return None
        if not deduplicates(channel):
            return f"`{channel.name}` cannot recognise a repeat"
        if message.get("resent"):
            return "it was sent once more with the same key already"
        return None

    async def _take_back_mark(self, message: Doc, mark: Doc) -> bool:
        """A `sending` mark that may have been written although its answer was lost (a failover) would
        make the message look interrupted mid-call, `uncertain` for ever, when no call was made: undone
        while the database comes back (a few tries within `MARK_TAKE_BACK_SECONDS`), else left for the
        interruption rules, as after a crash."""
        until = monotonic() + MARK_TAKE_BACK_SECONDS
        while True:
            try:
                if await self.messages.take_back_mark(message["_id"], mark, message):
                    log.info("dispatch.mark_taken_back", message_id=message["_id"])
                    return True
                return False
            except Exception as exc:
                if not transient(exc) or monotonic() > until:
                    why = str(exc)[:300]
                    log.warning("dispatch.mark_not_taken_back", message_id=message["_id"], error=why)
                    return False
            await asyncio.sleep(0.5)

    async def _taken(self, message_id: str) -> Result:
        """Our `sending` mark lost the race: look again once the other call must be over."""
        doc = await self.messages.sending_state(message_id)
        if doc is None or doc.get("status") != "sending":
            return Result("skip", detail=f"already {doc and doc.get('status')}")
        until = doc.get("sending_until")
        now = self.clock()
        return Result("wait", detail="sending in another process",
                      at=until if isinstance(until, datetime) and until > now else now)  # fmt: skip

    async def dispatch(
        self,
        message: Doc,
        contact: Doc | None,
        now: datetime,
        owner: str = "",
        sent_now: Mapping[str, int] | None = None,
    ) -> Result:
        """Decide and, if everything allows, deliver one due message. `owner` is the caller's claim,
        written with the `sending` mark; `sent_now`: the contact's marketing sends per channel that the
        caller made but has not written yet (a cap counts them)."""
        if message["status"] not in ("scheduled", "sending"):
            if message["status"] == "blocked" and message.get("reason") == reasons.RECIPIENT_BLOCKED:
                # Refused at the send: its `message_blocked` may not be queued yet (a crash right after the
                # message was written); the scheduler queues it again, which a repeat leaves unchanged.
                return Result("skip", message.get("sent_channel") or message["channel"],
                              reasons.RECIPIENT_BLOCKED, detail=message.get("detail"))  # fmt: skip
            return Result("skip", detail=f"already {message['status']}")
        contact = contact or {"_id": message["contact_id"]}
        attempt = int(message.get("attempt", 0)) + 1
        interrupted = message["status"] == "sending"
        guard = SCHEDULED
        if interrupted:
            until = message.get("sending_until")
            if isinstance(until, datetime) and until > self.clock():
                return Result("wait", detail="the call may still be in flight", at=until)
            guard = {"status": "sending", "send_owner": message.get("send_owner")}
            attempt -= 1  # the same attempt, made again
        # The interrupted call passed the guard, quiet hours and cap; it is only being completed.
        facts = Facts() if interrupted else await self._facts(message, contact, now, sent_now)
        verdict = check(message, contact, self._channel_facts(message, contact), facts, now, self.policy,
                        interrupted=interrupted)  # fmt: skip
        channel = self.channels.get(verdict.channel) if verdict.kind == "send" and verdict.channel else None
        if interrupted:
            why_not_again = self._not_again(message, channel, verdict.detail)
            if why_not_again is not None:
                return Result("uncertain", message.get("sent_channel"), reasons.INTERRUPTED,
                              interrupted_reason(why_not_again), attempt=attempt, guard=guard)  # fmt: skip
        if verdict.kind == "suppress":
            return Result("suppressed", verdict.channel, verdict.reason, verdict.detail)
        if verdict.kind == "postpone":
            return Result("postponed", verdict.channel, verdict.reason, verdict.detail, at=verdict.at)
        if verdict.kind == "hold":  # no provider, no template: the contact is held out
            return Result("held_out", verdict.channel, verdict.reason, verdict.detail)
        assert channel is not None
        transactional = bool(message.get("transactional"))
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
            return Result("failed", channel.name, reasons.TEMPLATE_ERROR, str(exc), attempt=attempt,
                          guard=guard)  # fmt: skip
        except Exception as exc:  # a template can fail in many ways; the service must not
            why = f"template `{message['template']}`: {exc}"
            return Result("failed", channel.name, reasons.TEMPLATE_ERROR, why, attempt=attempt, guard=guard)
        started = self.clock()
        deadline = started + timedelta(seconds=send_timeout(channel, self.policy.lease))
        unmarked = guard  # what the message is as long as no mark is on it
        if is_local(channel):
            guard = {"status": message["status"]}  # nothing leaves the service: no mark needed
        else:
            # Marked before the call, so an interruption is known afterwards, with the moment the call
            # is over at the latest: nobody repeats it before then.
            fields: Doc = {"status": "sending", "attempt": attempt, "sending_at": started}
            fields |= {"sending_until": deadline, "sent_channel": channel.name, "send_owner": owner}
            if interrupted:
                fields["resent"] = True
            try:
                marked = await self.messages.mark_sending(message["_id"], guard, fields)
            except Exception as exc:
                if transient(exc):  # the answer was lost, maybe not the mark: the provider was not called
                    await self._take_back_mark(message, fields)
                raise
            if not marked:
                return await self._taken(message["_id"])
            guard = {"status": "sending", "send_owner": owner}
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
        seconds = (deadline - self.clock()).total_seconds()  # what is left of it after the mark
        limit = send_timeout(channel, self.policy.lease)  # what the sentences name: the same every time
        if seconds <= 0 and not is_local(channel):
            # The mark itself took the whole send timeout (a database failing over): the provider was
            # never called, so this is no doubt but a send still to make. Marked `uncertain` it was lost.
            # The mark is taken back at once: were the result's write lost too (the database still
            # failing over), the mark left would make the message look interrupted mid-call.
            why = f"not sent: marking it took the whole send timeout ({limit:.3g}s); tried again"
            if await self._take_back_mark(message, fields):
                guard = unmarked
            return Result("retry", channel.name, reasons.TIMEOUT, why, at=self.clock(),
                          attempt=attempt - 1, guard=guard)  # fmt: skip
        called = monotonic()
        delivery, cut, code = await self._call(channel, outbound, seconds, limit)
        latency = monotonic() - called
        if cut and not deduplicates(channel) and not is_local(channel):
            # Cut off mid-call: as after a crash, it may have arrived, and a repeat could not be told apart.
            why = f"cut off after {limit:.3g}s without an answer, so it may have arrived; not sent again: "
            why += f"`{channel.name}` cannot recognise a repeat"
            return Result("uncertain", channel.name, reasons.TIMEOUT, why, attempt=attempt, guard=guard,
                          latency=latency)  # fmt: skip
        result = self._result(delivery, code, channel.name, attempt, now)
        result.latency = latency
        # A confirmed delivery is the truth whatever happened meanwhile; anything else is only written
        # while the message is still ours.
        result.guard = {"status": {"$in": ["scheduled", "sending", "uncertain"]}} if (
            result.kind == "sent" and not is_local(channel)) else guard  # fmt: skip
        return result

    async def _call(
        self, channel: Channel, outbound: OutboundMessage, seconds: float, limit: float
    ) -> tuple[Delivery, bool, str]:
        """The plugin's send, whether it was cut off after `seconds`, and the reason code should it not be
        sent; whatever a plugin raises fails only its message."""
        timer = asyncio.timeout(max(seconds, 0.0))
        try:
            async with timer:
                delivery = await channel.send(outbound)
        except TimeoutError as exc:
            if timer.expired():
                return (
                    Delivery("retry", f"no answer within {limit:.3g}s (the send timeout)"),
                    True,
                    reasons.TIMEOUT,
                )
            return Delivery("retry", f"{type(exc).__name__}: {exc}"), False, reasons.TIMEOUT
        except OSError as exc:
            return Delivery("retry", f"{type(exc).__name__}: {exc}"), False, reasons.PROVIDER_ERROR
        except (Exception, asyncio.CancelledError) as exc:
            task = asyncio.current_task()
            if isinstance(exc, asyncio.CancelledError) and task is not None and task.cancelling():
                raise  # the service is stopping this task: not the plugin's doing
            log.exception("delivery.channel_error", channel=channel.name)
            error = f"channel error: {type(exc).__name__}: {exc}"
            return Delivery("failed", error), False, reasons.CHANNEL_ERROR
        if not isinstance(delivery, Delivery):
            error = f"channel error: send returned {type(delivery).__name__}, not a Delivery"
            return Delivery("failed", error), False, reasons.CHANNEL_ERROR
        codes = {"failed": reasons.PROVIDER_REJECTED, "blocked": reasons.RECIPIENT_BLOCKED}
        return delivery, False, codes.get(delivery.status, reasons.PROVIDER_ERROR)

    def _result(self, delivery: Delivery, code: str, channel: str, attempt: int, now: datetime) -> Result:
        if delivery.status == "sent":
            record = delivery.record
            try:
                bson.encode(record)
            except Exception:  # kept on the message: it must be storable, or it is left out
                log.warning("delivery.record_dropped", channel=channel, record=repr(record)[:200])
                record = {}
            return Result("sent", channel, None, delivery.reason, provider_id=delivery.provider_id,
                          attempt=attempt, unreachable=delivery.unreachable, record=record)  # fmt: skip
        code, detail = reasons.split_code(delivery.reason, code)
        if delivery.status in ("failed", "blocked"):
            kind: Literal["failed", "blocked"] = "blocked" if delivery.status == "blocked" else "failed"
            return Result(kind, channel, code, detail, attempt=attempt, unreachable=delivery.unreachable)
        if attempt >= self.policy.max_attempts:
            return Result(
                "dead", channel, code, f"gave up after {attempt} attempts: {detail}", attempt=attempt
            )
        at = now + backoff(attempt, self.policy, delivery.retry_after)
        return Result("retry", channel, code, detail, at=at, attempt=attempt)
