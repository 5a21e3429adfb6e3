"""Replay events against rulesets on a virtual clock: what would go out, and when. Nothing is stored.

The same engine decides as in the live service; only time and storage are simulated. Due entries fire
before any event that comes later than them; a wait's `else` runs as the same internal timer event the
live scheduler produces. A due message goes through the same send rules (`sendpolicy.check`: consent,
suppression, reachability, fallback, guards, quiet hours, frequency caps) with facts from the simulation's
own history: what it sent per contact, channel and local day, the bounces and blocks it replayed, the
catalog it tracked. Channels are asked about each simulated contact in the service process (`SendRules`).

`POST /v1/simulate` runs it in a simulator process of its own (`Simulator`), with a size limit and a time
budget: a simulation is CPU work that, run on a worker's event loop, stopped that worker's inbox,
schedule and lease renewals for as long as it ran (minutes, for a large one). The CLI runs it in-process.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import os
import sys
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Annotated, Any, BinaryIO, Literal

import msgspec
import structlog

from rulesvc.core import reasons
from rulesvc.core.assign import message_group
from rulesvc.core.bodies import TOO_DEEP
from rulesvc.core.catalog import catalog_change, guard_fails, interest_fields, interested
from rulesvc.core.contacts import ContactIn
from rulesvc.core.engine import (
    CompiledRuleset,
    ContactView,
    Engine,
    EngineEvent,
    PendingEntry,
    RuleIndex,
    ScheduleEntry,
    timer_event,
)
from rulesvc.core.events import (
    MESSAGE_EVENT_TYPES,
    TIME_RANGE,
    Event,
    document_errors,
    event_problems,
    event_time,
    split_validation_error,
    time_in_range,
)
from rulesvc.core.ids import Id, fanout_copy_id
from rulesvc.core.ruleformat import RulesetFile
from rulesvc.core.sendpolicy import (
    ChannelFacts,
    Facts,
    SendPolicy,
    ask,
    capped_candidates,
    check,
    count_since,
    day_start,
    outcome_changes,
)

if TYPE_CHECKING:  # the simulator process itself has no channel objects
    from rulesvc.channels import ChannelRegistry

log = structlog.get_logger(__name__)

# Without `until`, pending entries run out at most this long after the last event.
DEFAULT_HORIZON = timedelta(days=90)


class SimContact(ContactIn, kw_only=True):
    contact_id: Id


# With an offset, as every time the API takes (`format: date-time` in the document).
Until = Annotated[datetime, msgspec.Meta(tz=True, description="RFC 3339 with offset")]


class SimulateRequest(msgspec.Struct, forbid_unknown_fields=True):
    events: list[Event]
    contacts: list[SimContact] = msgspec.field(default_factory=list)
    until: Until | None = None


class SimAction(msgspec.Struct, omit_defaults=True):
    at: datetime
    contact_id: str
    ruleset: str
    rule: str
    channel: str | None
    template: str | None
    status: Literal["sent", "cancelled", "failed", "suppressed", "postponed", "fired", "held_out"]
    reason: str | None = None  # a reason code, as on a live message (docs/channels.md)
    detail: str | None = None  # the sentence for a person
    message_id: str | None = None
    params: dict[str, Any] | None = None
    postponed_to: datetime | None = None  # `postponed`: when it is due again (end of quiet hours)
    variant: str | None = None  # the contact's A/B arm in the ruleset, or `holdout`


class SimulateResult(msgspec.Struct):
    actions: list[SimAction]


class SimulateRejected(msgspec.Struct):
    error: str
    path: str


class Refused(Exception):
    """A simulation that will not run, or could not finish; the status and message the API answers with."""

    def __init__(self, status: int, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.path = path

    def body(self) -> bytes:
        if self.path is None:
            return msgspec.json.encode({"error": self.message})
        return msgspec.json.encode(SimulateRejected(self.message, self.path))


class SendRules(msgspec.Struct):
    """The live send rules for one simulation: the service's policy, and what each installed channel
    says about each simulated contact (its `status` and `reachable`), asked in the service process,
    where the channel objects are. `reach[contact_id]` is a pair of indexes into `answers` (most contacts
    share theirs): as the contact is, and with its email address marked invalid (after a replayed
    bounce); `reach[""]` is for contacts not given."""

    policy: SendPolicy
    answers: list[dict[str, ChannelFacts]]
    reach: dict[str, tuple[int, int]]

    def channels(self, contact_id: str, email_invalid: bool) -> dict[str, ChannelFacts]:
        return self.answers[self.reach.get(contact_id, self.reach[""])[1 if email_invalid else 0]]


def sim_profile(contact: SimContact | None) -> dict[str, Any]:
    """A simulated contact's profile, as a channel and a rule see it."""
    profile: dict[str, Any] = {}
    if contact is not None:
        profile = msgspec.to_builtins(contact)
        profile.pop("contact_id")
    profile["email_invalid"] = False
    return profile


def send_rules(channels: ChannelRegistry, policy: SendPolicy, contacts: list[SimContact]) -> SendRules:
    """Ask every installed channel about every simulated contact (and about one not given)."""
    answers: list[dict[str, ChannelFacts]] = []
    index: dict[tuple[tuple[str, ChannelFacts], ...], int] = {}

    def answer(profile: dict[str, Any]) -> int:
        facts = {c.name: ask(c, profile) for c in channels.all()}
        key = tuple(sorted(facts.items()))
        if key not in index:
            index[key] = len(answers)
            answers.append(facts)
        return index[key]

    def both(profile: dict[str, Any]) -> tuple[int, int]:
        return answer(profile), answer({**profile, "email_invalid": True})

    reach = {"": both(sim_profile(None))}
    for contact in contacts:
        reach[contact.contact_id] = both(sim_profile(contact))
    return SendRules(policy, answers, reach)


class _Contacts(msgspec.Struct):
    contacts: list[SimContact] = msgspec.field(default_factory=list)


def send_rules_for(body: bytes, channels: ChannelRegistry, policy: SendPolicy) -> SendRules:
    """`send_rules` for the contacts of a request body; a body that does not decode gets the rules for
    no contacts (the simulator then refuses the body with the right error)."""
    try:
        contacts = msgspec.json.decode(body, type=_Contacts).contacts
    except (msgspec.DecodeError, RecursionError):
        contacts = []
    return send_rules(channels, policy, contacts)


@dataclass(order=True)
class _Due:
    due_at: datetime
    seq: int
    entry: ScheduleEntry


class Simulation:
    """Without `rules`, every due message counts as sent unless its guard fails: the rules alone, as
    the engine's own tests use it. The service and the CLI always give the send rules."""

    def __init__(
        self,
        engine: Engine,
        contacts: list[SimContact],
        rules: SendRules | None = None,
        on_error: Callable[[str, str], None] | None = None,
        known_messages: set[str] | None = None,
    ) -> None:
        """`on_error(event id, message)`: an event the engine cannot evaluate is skipped and reported
        there (a backtest goes on); without it, the simulation stops with `Refused` (the request's error).
        `known_messages`: ids of messages that exist in this replay's world (a backtest's baseline): an
        outcome event naming one of them that this simulation did not send is skipped, as a provider
        reports nothing about a message it never got."""
        self.engine = engine
        self.rules = rules
        self.on_error = on_error
        self.known_messages = known_messages
        self.sent_ids: set[str] = set()
        self.contacts: dict[str, ContactView] = {}
        for c in contacts:
            self.contacts[c.contact_id] = ContactView(c.contact_id, sim_profile(c), {})
        # What the simulation sent: marketing send times per (contact, channel) for the caps, and each
        # decided message's channel etc. for the outcome events that name it.
        self.sent_at: dict[tuple[str, str], list[datetime]] = {}
        self.messages: dict[str, dict[str, Any]] = {}
        self.queue: list[_Due] = []
        self.entries: dict[str, ScheduleEntry] = {}
        self.actions: list[SimAction] = []
        self._seq = itertools.count()
        # As the live interest index, by product: a catalog event visits only its product's contacts.
        self.interests: dict[str, dict[str, dict[str, Any]]] = {}
        self._index_of: dict[str, int] = {}  # event id -> its index in the request, for error paths
        self.products: dict[str, dict[str, Any]] = {}  # as the live catalog

    def _contact(self, contact_id: str) -> ContactView:
        if contact_id not in self.contacts:
            self.contacts[contact_id] = ContactView(contact_id, {"email_invalid": False}, {})
        return self.contacts[contact_id]

    def run(self, events: list[Event], until: datetime | None) -> list[SimAction]:
        start = datetime.now(UTC)
        # Events of the same moment in id order, as the live inbox takes a contact's events.
        timed = sorted(
            ((event_time(e, start), i, e) for i, e in enumerate(events)), key=lambda t: (t[0], t[2].id, t[1])
        )
        for i, event in enumerate(events):
            self._index_of.setdefault(event.id, i)
        for at, i, event in timed:
            self._fire_until(at, inclusive=False)
            if self._index_of[event.id] != i:
                continue  # a re-used id is a duplicate and changes nothing, as in the live service
            try:
                if event.contact_id is None:
                    self._fan_out(event, at)
                    continue
                attributes = event.attributes
                if event.type in MESSAGE_EVENT_TYPES and self._never_sent(attributes.get("message_id")):
                    continue
                if event.type in MESSAGE_EVENT_TYPES:
                    attributes = self._outcome(event.type, event.contact_id, dict(attributes), at)
                engine_event = EngineEvent(event.id, event.type, event.contact_id, at, attributes)
                fields = interest_fields({"type": event.type, "time": at, "attributes": event.attributes})
                if fields:
                    product = str(event.attributes["product_id"])
                    self.interests.setdefault(product, {}).setdefault(event.contact_id, {}).update(fields)
                self._evaluate(engine_event, at)
            except Refused:
                raise
            except Exception as exc:  # the live inbox would quarantine it; here the caller learns which
                if self.on_error is None:
                    raise _unevaluable(f"$.events[{i}]", "this event", exc) from exc
                self.on_error(event.id, f"{type(exc).__name__}: {exc}")
        end = until or ((timed[-1][0] if timed else start) + DEFAULT_HORIZON)
        self._fire_until(end, inclusive=True)
        return self.actions

    def _never_sent(self, message_id: Any) -> bool:
        known = self.known_messages
        return known is not None and message_id in known and message_id not in self.sent_ids

    def _outcome(
        self, event_type: str, contact_id: str, attributes: dict[str, Any], at: datetime
    ) -> dict[str, Any]:
        """A message_* event as the live inbox takes it: linked to the message it names (its channel,
        template, ruleset, rule), and bad news remembered (a bounced email, a blocked channel)."""
        message_id = attributes.get("message_id")
        message = self.messages.get(message_id) if isinstance(message_id, str) else None
        if message is not None and message["contact_id"] != contact_id:
            message = None
        channel = attributes.get("channel")
        if message is not None:
            channel = channel or message["channel"]
            for key in ("channel", "template", "ruleset", "rule"):
                attributes.setdefault(key, channel if key == "channel" else message.get(key))
        profile, suppressed = outcome_changes(event_type.removeprefix("message_"), channel, at.timestamp())
        contact = self._contact(contact_id)
        contact.profile.update(profile)
        if suppressed:
            contact.state.setdefault("suppressed", {}).update(suppressed)
        return attributes

    def _fan_out(self, event: Event, at: datetime) -> None:
        """A catalog event becomes each interested contact's own event, as the live fan-out does."""
        if event.attributes.get("product_id") is None:
            return
        product = str(event.attributes["product_id"])
        fields, change = catalog_change(event.type, event.attributes, self.products.get(product, {}))
        self.products.setdefault(product, {}).update(fields)
        for contact_id, interest in sorted(self.interests.get(product, {}).items()):
            if interested(event.type, interest, at):
                attributes = {**event.attributes, **change}
                attributes["interest"] = {k.removesuffix("_at"): v.isoformat() for k, v in interest.items()}
                copy = EngineEvent(
                    fanout_copy_id(event.id, contact_id), event.type, contact_id, at, attributes
                )
                self._evaluate(copy, at)

    def _evaluate(self, event: EngineEvent, now: datetime) -> None:
        assert event.contact_id is not None
        contact = self._contact(event.contact_id)
        decisions = self.engine.evaluate(event, contact, now)
        # As the live inbox commits: new entries first, then cancellations (which may hit them).
        for entry in decisions.schedule:
            self.entries[entry.entry_id] = entry
            heapq.heappush(self.queue, _Due(entry.due_at, next(self._seq), entry))
            if entry.message is not None:  # an outcome event may name it from now on, as a live message
                self._named(entry, entry.message["channel"])
        for cancel in decisions.cancel:
            cancelled = self.entries.pop(cancel.entry_id, None)
            if cancelled is not None:
                self._record(cancelled, now, "cancelled", cancel.reason, detail=cancel.detail)

    def _fire_until(self, moment: datetime, inclusive: bool) -> None:
        while self.queue and (self.queue[0].due_at <= moment if inclusive else self.queue[0].due_at < moment):
            due = heapq.heappop(self.queue)
            if self.entries.get(due.entry.entry_id) is not due.entry:
                continue  # cancelled meanwhile
            entry = self.entries.pop(due.entry.entry_id)
            contact = self._contact(entry.contact_id)
            pending = contact.pending.remove(entry.entry_id)
            if entry.message is not None and self.rules is not None:
                self._send(entry, contact, pending, due.due_at)
            elif entry.message is not None:
                params = entry.message.get("params") or {}
                product = self.products.get(str(params.get("product_id")), {})
                stale = guard_fails(entry.message.get("guard"), params, product)
                held = not stale and bool(entry.message.get("held_out"))
                code = reasons.GUARD_FAILED if stale else reasons.HELD_OUT if held else None
                status = "suppressed" if stale else "held_out" if held else "sent"
                self._record(entry, due.due_at, status, code, detail=stale)
            else:
                self._record(entry, due.due_at, "fired", None, detail="waited in vain: running `else`")
                try:
                    self._evaluate(timer_event(entry), due.due_at)
                except Exception as exc:
                    trigger = str((entry.trigger or {}).get("id"))
                    if self.on_error is not None:
                        self.on_error(trigger, f"its `else`: {type(exc).__name__}: {exc}")
                        continue
                    path = f"$.events[{self._index_of[trigger]}]" if trigger in self._index_of else "$.events"
                    what = f"the `else` of {entry.ruleset}/{entry.rule} that it armed"
                    raise _unevaluable(path, what, exc) from exc

    def _send(
        self, entry: ScheduleEntry, contact: ContactView, pending: PendingEntry | None, now: datetime
    ) -> None:
        """A due message through the live send rules, with the simulation's own facts."""
        assert self.rules is not None and entry.message is not None
        message, policy = entry.message, self.rules.policy
        seen = {**contact.profile, "state": contact.state}
        product: dict[str, Any] = {}
        if message.get("guard"):
            product = self.products.get(str((message.get("params") or {}).get("product_id")), {})
        since = day_start(seen, now, policy)
        sent_today = {
            name: count_since(self.sent_at.get((entry.contact_id, name), []), since)
            for name in capped_candidates(message, policy)
        }
        channels = self.rules.channels(entry.contact_id, bool(contact.profile.get("email_invalid")))
        verdict = check(message, seen, channels, Facts(product, sent_today), now, policy)
        # An outcome event names the channel chosen (live: `sent_channel`, kept on a suppression too),
        # else the message's own.
        self._named(entry, verdict.channel if verdict.kind != "postpone" and verdict.channel else None)
        if verdict.kind == "postpone":
            assert verdict.at is not None
            self._record(entry, now, "postponed", verdict.reason, verdict.channel, postponed_to=verdict.at,
                         detail=verdict.detail)  # fmt: skip
            self.entries[entry.entry_id] = entry  # still pending, as the live message stays scheduled
            if pending is not None:
                contact.pending.add(pending)
            heapq.heappush(self.queue, _Due(verdict.at, next(self._seq), entry))
            return
        if verdict.kind == "suppress":
            self._record(entry, now, "suppressed", verdict.reason, verdict.channel, detail=verdict.detail)
            return
        if verdict.kind == "hold":  # as the live dispatcher: decided, not sent, not counted by a cap
            self._record(entry, now, "held_out", verdict.reason, verdict.channel, detail=verdict.detail)
            return
        assert verdict.channel is not None
        if not message.get("transactional"):
            self.sent_at.setdefault((entry.contact_id, verdict.channel), []).append(now)
        self._record(entry, now, "sent", None, verdict.channel)

    def _named(self, entry: ScheduleEntry, channel: str | None) -> None:
        """What an outcome event naming this message learns of it (`_outcome`)."""
        assert entry.message is not None
        self.messages[entry.entry_id] = {"contact_id": entry.contact_id,
                                         "channel": channel or entry.message["channel"],
                                         "template": entry.message.get("template"),
                                         "ruleset": entry.ruleset, "rule": entry.rule}  # fmt: skip

    def _record(
        self,
        entry: ScheduleEntry,
        at: datetime,
        status: Any,
        reason: str | None,
        channel: str | None = None,
        postponed_to: datetime | None = None,
        detail: str | None = None,
    ) -> None:
        """`channel`: the one used or chosen (a fallback), else the message's own; `reason` a code."""
        message = entry.message or {}
        if status == "sent":
            self.sent_ids.add(entry.entry_id)
        self.actions.append(
            SimAction(
                at=at,
                contact_id=entry.contact_id,
                ruleset=entry.ruleset,
                rule=entry.rule,
                channel=channel or message.get("channel"),
                template=message.get("template"),
                status=status,
                reason=reason,
                detail=detail,
                message_id=entry.entry_id,
                params=message.get("params") or None,
                postponed_to=postponed_to,
                variant=message_group(message),
            )
        )


def _unevaluable(path: str, what: str, exc: Exception) -> Refused:
    return Refused(422, f"the engine could not evaluate {what}: {type(exc).__name__}: {exc}", path)


def request_problem(request: SimulateRequest) -> tuple[str, str] | None:
    """The first thing in a request that ingest would refuse (or the engine could not compute with):
    the same checks as `POST /v1/events` per event, and `until` within the same time range."""
    for i, event in enumerate(request.events):
        for path, message in event_problems(event):
            return f"$.events[{i}]{path[1:]}", message
    for i, contact in enumerate(request.contacts):
        for path, message in document_errors(contact.attributes, f"$.contacts[{i}].attributes"):
            return path, message
    if request.until is not None and not time_in_range(request.until):
        return "$.until", f"must be {TIME_RANGE}"
    return None


def simulate(engine: Engine, request: SimulateRequest, rules: SendRules | None = None) -> SimulateResult:
    """Raises Refused (422, with the path) for an event the engine cannot evaluate. Without `rules`,
    no send rule is applied (see `Simulation`)."""
    actions = Simulation(engine, request.contacts, rules).run(request.events, request.until)
    actions.sort(key=lambda a: a.at)  # stable: same-moment actions keep their decision order
    return SimulateResult(actions)


# --- through the API: limits, and a process of its own ---------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """The most events and contacts one `POST /v1/simulate` may carry (413 above)."""

    max_events: int
    max_contacts: int


_REQUEST_DECODER = msgspec.json.Decoder(SimulateRequest)
_RESULT_ENCODER = msgspec.json.Encoder()


def answer(body: bytes, engine: Engine, limits: Limits, rules: SendRules | None = None) -> tuple[int, bytes]:
    """Everything `POST /v1/simulate` does with a body, as (status, JSON body): decode, check, simulate."""
    try:
        request = _REQUEST_DECODER.decode(body)
    except msgspec.ValidationError as exc:
        path, message = split_validation_error(exc)
        return 422, msgspec.json.encode(SimulateRejected(message, path))
    except msgspec.DecodeError as exc:
        return 400, msgspec.json.encode({"error": f"malformed JSON: {exc}"})
    except RecursionError:
        return 400, msgspec.json.encode({"error": TOO_DEEP})
    for what, count, limit, env in (
        ("events", len(request.events), limits.max_events, "RULESVC_SIMULATE_MAX_EVENTS"),
        ("contacts", len(request.contacts), limits.max_contacts, "RULESVC_SIMULATE_MAX_CONTACTS"),
    ):
        if count > limit:
            message = f"{count} {what} in one simulation; the limit is {limit} ({env})"
            return 413, msgspec.json.encode({"error": message})
    problem = request_problem(request)
    if problem is not None:
        return 422, msgspec.json.encode(SimulateRejected(problem[1], problem[0]))
    try:
        return 200, _RESULT_ENCODER.encode(simulate(engine, request, rules))
    except Refused as exc:
        return exc.status, exc.body()


class LiveRuleset(msgspec.Struct):
    """A live ruleset version as the simulator process compiles it (it shares no C state with the worker)."""

    name: str
    version: str
    source: RulesetFile


class _Job(msgspec.Struct):
    rulesets: list[LiveRuleset]
    body: bytes
    max_events: int
    max_contacts: int
    rules: SendRules | None = None


class _Answer(msgspec.Struct):
    status: int
    body: bytes


_JOB_ENCODER = msgspec.msgpack.Encoder()
_JOB_DECODER = msgspec.msgpack.Decoder(_Job)
_ANSWER_DECODER = msgspec.msgpack.Decoder(_Answer)
_HEADER = 8  # bytes of a frame's length, big-endian


def _frame(payload: bytes) -> bytes:
    return len(payload).to_bytes(_HEADER, "big") + payload


class Simulator:
    """The simulator process of one service worker: started at the first simulation and kept for the next;
    stopped (and started afresh next time) when a simulation runs over its time budget.

    One simulation runs at a time per worker and one more may wait for it (at most the budget); any
    further one gets 429 at once, with a Retry-After of the budget.
    """

    def __init__(
        self,
        budget_seconds: float,
        channels: ChannelRegistry | None = None,
        policy: SendPolicy | None = None,
    ) -> None:
        """With `channels` and `policy`, simulations apply the service's send rules."""
        self.budget = budget_seconds
        self.channels = channels
        self.policy = policy
        self._proc: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()
        self.queued = 0  # requests waiting for the running simulation

    @property
    def busy(self) -> bool:
        return self._lock.locked()

    @property
    def pid(self) -> int | None:
        """The simulator process, while there is one."""
        return self._proc.pid if self._proc is not None and self._proc.returncode is None else None

    async def run(
        self, rulesets: Iterable[CompiledRuleset], body: bytes, limits: Limits
    ) -> tuple[int, bytes, dict[str, str]]:
        """(status, JSON body, headers) of the answer to `POST /v1/simulate` with this body."""
        rules = None
        if self.channels is not None and self.policy is not None:
            # The plugins' checks run here, where the channel objects are; off the event loop.
            rules = await asyncio.to_thread(send_rules_for, body, self.channels, self.policy)
        job = _JOB_ENCODER.encode(
            _Job(
                [LiveRuleset(r.name, r.version, r.source) for r in rulesets],
                body,
                limits.max_events,
                limits.max_contacts,
                rules,
            )
        )
        if self.busy and self.queued >= 1:
            retry = str(max(1, math.ceil(self.budget)))
            busy = Refused(
                429, f"two simulations are running or waiting in this process; retry after {retry} s"
            )
            return 429, busy.body(), {"Retry-After": retry}
        self.queued += 1
        try:
            await self._lock.acquire()  # the one running ends within its budget
        finally:
            self.queued -= 1
        try:
            return await self._run(job)
        finally:
            self._lock.release()

    async def _run(self, job: bytes) -> tuple[int, bytes, dict[str, str]]:
        proc: asyncio.subprocess.Process | None = None
        try:
            async with asyncio.timeout(self.budget):  # from the start: a simulation answers within it
                proc = await self._process()
                assert proc.stdin is not None and proc.stdout is not None
                proc.stdin.write(_frame(job))
                await proc.stdin.drain()
                size = int.from_bytes(await proc.stdout.readexactly(_HEADER), "big")
                reply = _ANSWER_DECODER.decode(await proc.stdout.readexactly(size))
        except TimeoutError:
            await self._stop(kill=True)
            log.warning("simulate.over_budget", budget_seconds=self.budget)
            over = Refused(
                422,
                f"simulation over its time budget of {self.budget:g} s; simulate fewer events",
                "$.events",
            )
            return 422, over.body(), {}
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            await self._stop(kill=True)
            code = proc.returncode if proc is not None else None
            log.error("simulate.process_failed", error=repr(exc), returncode=code)
            failed = Refused(500, f"the simulator process stopped (exit code {code})")
            return 500, failed.body(), {}
        except BaseException:
            await self._stop(kill=True)  # cancelled mid-conversation: its state is unknown
            raise
        return reply.status, reply.body, {}

    async def _process(self) -> asyncio.subprocess.Process:
        if self._proc is None or self._proc.returncode is not None:
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "rulesvc.replay.simulate",
                str(os.getpid()),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
            )
            log.info("simulate.process_started", pid=self._proc.pid)
        return self._proc

    async def _stop(self, kill: bool) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.returncode is not None:
            return
        if kill:
            proc.kill()
        elif proc.stdin is not None:
            proc.stdin.close()  # it exits at the end of its input
        try:
            async with asyncio.timeout(5):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()

    async def close(self) -> None:
        await self._stop(kill=False)


def _read_exactly(stream: BinaryIO, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        chunk = stream.read(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def serve(requests: BinaryIO, answers: BinaryIO) -> None:
    """The simulator process: one job after another until its input ends. Compiled rulesets are kept
    between jobs while their version stays live."""
    compiled: dict[tuple[str, str], CompiledRuleset] = {}
    while (header := _read_exactly(requests, _HEADER)) is not None:
        payload = _read_exactly(requests, int.from_bytes(header, "big"))
        if payload is None:
            return
        job = _JOB_DECODER.decode(payload)
        wanted = {(r.name, r.version): r for r in job.rulesets}
        for key in [k for k in compiled if k not in wanted]:
            compiled.pop(key).free()
        for key, live in wanted.items():
            if key not in compiled:
                compiled[key] = CompiledRuleset.compile(live.name, live.version, live.source)
        engine = Engine(RuleIndex(list(compiled.values())))
        try:
            status, body = answer(job.body, engine, Limits(job.max_events, job.max_contacts), job.rules)
        except Exception:  # a bug, not the input's: traceback to the service log; the simulator goes on
            traceback.print_exc()
            status, body = 500, msgspec.json.encode({"error": "internal error"})
        answers.write(_frame(_JOB_ENCODER.encode(_Answer(status, body))))
        answers.flush()


def main(parent_pid: int) -> None:
    from rulesvc.store.mongod import die_with_parent

    die_with_parent()  # a worker killed with SIGKILL takes its simulator along
    if os.getppid() != parent_pid:
        return  # the worker died before that took effect
    # The answers go out on the original stdout; anything printed (a log line) goes to stderr instead.
    answers = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    serve(sys.stdin.buffer, answers)


if __name__ == "__main__":
    main(int(sys.argv[1]))
