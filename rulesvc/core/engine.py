"""The rules engine: durable-rules as a pure matcher, and the decisions a matched rule makes.

Everything here is synchronous and storage-free: given a contact's state, its pending sends and one
event, it returns what changes. The live inbox and the simulator both drive it, so a simulation shows
exactly what the service would do.

durable-rules is used only to match: each rule becomes its own engine ruleset (an event is consumed by
the first rule that fires, and we want every rule to see every event), with one engine session that
holds nothing between events, no engine timers and no background threads. Time, state and schedules
live in MongoDB.

Why one long-lived session instead of a session per event: in 2.0.28 a new session's action context is
left uninitialised, and deleting a session that never ran an action frees garbage (a crash that depends
on heap layout). So each compiled rule is primed once with an internal rule that runs an action on the
session, which leaves the context clean; after that the session can be kept, and deleted safely when
the rule is freed. Nothing accumulates in it: a matched event is consumed, an unmatched one not stored.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import InitVar, dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import durable_rules_engine
import msgspec
import structlog

from rulesvc.core import reasons
from rulesvc.core.assign import Groups
from rulesvc.core.durations import parse_duration
from rulesvc.core.events import MESSAGE_EVENT_TYPES, read_time, time_in_range
from rulesvc.core.ruleformat import (
    HOLDOUT_GROUP,
    UNSET,
    Action,
    Conditions,
    Ops,
    Rule,
    RulesetFile,
    Send,
    When,
    event_list,
)

log = structlog.get_logger(__name__)

TIMER_EVENT = "$timer"  # internal: a `wait` ran out; never accepted from outside
_PRIME = "$prime"  # internal: the event that primes a compiled rule's engine session
SESSION_IDLE = timedelta(minutes=30)
MAX_COUNTER_TIMES = 1000

# --- the matcher ---------------------------------------------------------------------------------------


class MatchError(Exception):
    """The matcher itself failed (not: the event did not match)."""


class CompileError(Exception):
    def __init__(self, path: str, message: str) -> None:
        super().__init__(message)
        self.path = path


def _json_number(value: int | float) -> str:
    """durable-rules' parser rejects exponents (1e-05, 1e+18): write every number as plain digits."""
    text = repr(value)
    if "e" in text or "E" in text:
        text = format(Decimal(text), "f")
    return text


def _json_value(value: Any) -> str | None:
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int | float):
        if value != value or value in (float("inf"), float("-inf")):
            return None
        return _json_number(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        items = [v for v in map(_json_value, value) if v is not None]
        return "[" + ",".join(items) + "]"
    return None  # objects and null cannot be compared: treated as absent


class CompiledRule:
    """One rule of one ruleset version, compiled to its own durable-rules ruleset."""

    _ids = itertools.count()

    def __init__(self, ruleset: str, version: str, index: int, rule: Rule) -> None:
        self.ruleset = ruleset
        self.version = version
        self.index = index
        self.rule = rule
        self.events = frozenset([rule.when.event] if isinstance(rule.when.event, str) else rule.when.event)
        self.keys: dict[str, str] = {}  # path -> message key
        # Tests durable-rules cannot do (substring, two paths equal): done here, matched as a flag.
        self.flag_checks: dict[str, tuple[Literal["contains", "same_as"], str, str]] = {}
        definition = {"r": {"all": [{"m": self._expression()}]}, "p": {"all": [{"m": {"t": _PRIME}}]}}
        self.engine_name = f"{ruleset}@{version}#{index}:{next(self._ids)}"
        try:
            self.handle = durable_rules_engine.create_ruleset(self.engine_name, json.dumps(definition))
        except Exception as exc:  # the C core reports any problem as a bare error
            raise CompileError(
                f"$.rules[{index}].when", f"durable-rules rejected the conditions: {exc}"
            ) from exc
        self._sequence = itertools.count()
        self._prime()

    def _prime(self) -> None:
        result = durable_rules_engine.assert_event(self.handle, f'{{"sid":"m","id":"prime","t":"{_PRIME}"}}')
        action = durable_rules_engine.start_action_for_state(self.handle, result[1])
        assert action is not None and '"p"' in action[1], "the priming rule did not fire"
        durable_rules_engine.complete_and_start_action(self.handle, result[1])

    def _flag(self, kind: Literal["contains", "same_as"], path: str, argument: str) -> str:
        flag = f"s{len(self.flag_checks)}"
        self.flag_checks[flag] = (kind, path, argument)
        return flag

    def _key(self, path: str) -> str:
        if path not in self.keys:
            self.keys[path] = f"f{len(self.keys)}"
        return self.keys[path]

    def _expression(self) -> dict[str, Any]:
        when = self.rule.when
        types = sorted(self.events)
        parts: list[dict[str, Any]] = [
            {"t": types[0]} if len(types) == 1 else {"$or": [{"t": t} for t in types]}
        ]
        parts.extend(self._group(when.conditions, "$.when.conditions"))
        if when.any:
            groups = [{"$and": self._group(g, f"$.when.any[{i}]")} for i, g in enumerate(when.any)]
            parts.append({"$or": groups})
        return {"$and": parts}

    def _group(self, conditions: Conditions, where: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for path, cond in conditions.items():
            key = self._key(path)
            if not isinstance(cond, Ops):
                out.append({key: cond})
                continue
            if cond.eq is not UNSET:
                out.append({key: cond.eq})
            if cond.ne is not UNSET:
                out.append({"$or": [{"$neq": {key: cond.ne}}, {"$nex": {key: 1}}]})
            for op in ("lt", "lte", "gt", "gte"):
                value = getattr(cond, op)
                if value is not UNSET:
                    out.append({f"${op}": {key: value}})
            if cond.in_ is not UNSET:
                if not cond.in_:
                    raise CompileError(f"{where}.{path}.in", "`in` needs at least one value")
                out.append({"$or": [{key: v} for v in cond.in_]})
            if cond.contains is not UNSET:  # lists are matched by the engine, texts by a flag
                flag = self._flag("contains", path, str(cond.contains))
                out.append({"$or": [{"$iany": {key: {"$i": cond.contains}}}, {flag: True}]})
            if cond.exists is not UNSET:
                out.append({"$ex" if cond.exists else "$nex": {key: 1}})
            if isinstance(cond.same_as, str):
                out.append({self._flag("same_as", path, cond.same_as): True})
        return out

    def matches(self, event_type: str, context: Context) -> bool:
        parts = ['"sid":"m"', f'"id":"{next(self._sequence)}"', f'"t":{json.dumps(event_type)}']
        for path, key in self.keys.items():
            encoded = _json_value(context.resolve(path))
            if encoded is not None:
                parts.append(f'"{key}":{encoded}')
        for flag, (kind, path, argument) in self.flag_checks.items():
            value = context.resolve(path)
            if kind == "contains":
                holds = isinstance(value, str) and argument in value
            else:
                holds = value is not None and value == context.resolve(argument)
            if holds:
                parts.append(f'"{flag}":true')
        message = "{" + ",".join(parts) + "}"
        try:
            result = durable_rules_engine.assert_event(self.handle, message)
            if result[0] != 0:
                return False
            action = durable_rules_engine.start_action_for_state(self.handle, result[1])
            if action is None:
                return False
            durable_rules_engine.complete_and_start_action(self.handle, result[1])
            return True
        except durable_rules_engine.error as exc:
            # Not a "no": the batch fails and its events stay in the inbox, rather than lose a decision.
            raise MatchError(f"{self.ruleset}/{self.rule.name}: durable-rules failed: {exc}") from exc

    def free(self) -> None:
        durable_rules_engine.delete_state(self.handle, "m")
        durable_rules_engine.delete_ruleset(self.handle)


@dataclass
class CompiledRuleset:
    name: str
    version: str
    source: RulesetFile
    rules: list[CompiledRule]
    timeout: timedelta | None
    groups: Groups  # its holdout and arms
    goal: CompiledRule | None = None  # the goal's event and conditions, matched as a rule is

    @classmethod
    def compile(cls, name: str, version: str, source: RulesetFile) -> CompiledRuleset:
        compiled: list[CompiledRule] = []
        try:
            for i, rule in enumerate(source.rules):
                try:
                    compiled.append(CompiledRule(name, version, i, rule))
                except CompileError as exc:
                    exc.path = exc.path.replace("$.when", f"$.rules[{i}].when", 1)
                    raise
            goal = None
            if source.goal is not None:
                when = When(source.goal.event, source.goal.conditions)
                try:
                    goal = CompiledRule(name, version, -1, Rule("goal", when, []))
                except CompileError as exc:  # its paths as the goal's, not as a rule's
                    path = exc.path.replace("$.rules[-1].when", "$.goal", 1)
                    exc.path = path.replace("$.when", "$.goal", 1)
                    raise
        except BaseException:
            for c in compiled:
                c.free()
            raise
        timeout = parse_duration(source.timeout) if source.timeout else None
        return cls(name, version, source, compiled, timeout, Groups.of(name, source), goal)

    def free(self) -> None:
        for rule in self.rules:
            rule.free()
        if self.goal is not None:
            self.goal.free()


class RuleIndex:
    """Which rules listen to which event type: only those run for an event."""

    def __init__(self, rulesets: list[CompiledRuleset]) -> None:
        self.rulesets = {r.name: r for r in rulesets}
        self.by_event: dict[str, list[CompiledRule]] = {}
        self.goals_by_event: dict[str, list[CompiledRuleset]] = {}
        for rs in sorted(rulesets, key=lambda r: r.name):
            for rule in rs.rules:
                for event in rule.events:
                    self.by_event.setdefault(event, []).append(rule)
            if rs.goal is not None:
                for event in rs.goal.events:
                    self.goals_by_event.setdefault(event, []).append(rs)


# --- contact state and context -------------------------------------------------------------------------


def ts(moment: datetime) -> float:
    return moment.timestamp()


def _until(at: datetime, period: str | None) -> float | None:
    """When a flag or a suppression set at `at` for `period` ends; None: until cleared."""
    return ts(at + parse_duration(period)) if period else None


def from_ts(value: float) -> datetime:
    return datetime.fromtimestamp(value, UTC)


@dataclass
class PendingEntry:
    entry_id: str
    key: str
    ruleset: str
    rule: str
    cancel_on: list[dict[str, Any]]


_UNHASHABLE = object()  # a `same` value that cannot be a dict key: such entries are checked one by one


def _frozen(value: Any) -> Any:
    """A hashable stand-in that is equal exactly when the JSON values are (lists and objects included)."""
    if isinstance(value, dict):
        return frozenset((k, _frozen(v)) for k, v in value.items())
    if isinstance(value, list):
        return tuple(_frozen(v) for v in value)
    return value


def _same_key(values: Iterable[Any]) -> Any:
    key = tuple(_frozen(v) for v in values)
    try:
        hash(key)
    except TypeError:
        return _UNHASHABLE
    return key


class Pending:
    """A contact's pending entries, indexed by what the engine looks them up by: the event (and the
    `same` values) that cancel them, their key, their ruleset. A contact with thousands of waiting sends
    (vouchers, per-product sends) then costs the same per event as one with a few: a scan of them all
    per event made a simulation of one such contact quadratic (8,000 events: minutes).
    Lookups return entries in the order they were added."""

    def __init__(self, entries: Iterable[PendingEntry] = ()) -> None:
        self._entries: dict[str, PendingEntry] = {}
        self._order: dict[str, int] = {}
        self._seq = itertools.count()
        self._index: dict[Any, dict[str, None]] = {}
        self._same_paths: dict[str, dict[tuple[str, ...], int]] = {}  # event type -> `same` path sets
        for entry in entries:
            self.add(entry)

    @staticmethod
    def _cancel_keys(entry: PendingEntry) -> set[tuple[str, str, tuple[str, ...], Any]]:
        keys: set[tuple[str, str, tuple[str, ...], Any]] = set()
        for spec in entry.cancel_on:
            same = spec.get("same") or {}
            paths = tuple(sorted(same))
            values = _same_key(same[p] for p in paths)
            keys.update(("cancel", t, paths, values) for t in event_list(spec.get("event", [])))
        return keys

    def _keys(self, entry: PendingEntry) -> set[Any]:
        return {("key", entry.key), ("ruleset", entry.ruleset), *self._cancel_keys(entry)}

    def add(self, entry: PendingEntry) -> None:
        self.remove(entry.entry_id)  # an id seen again replaces the earlier entry, as in the store
        self._entries[entry.entry_id] = entry
        self._order[entry.entry_id] = next(self._seq)
        for key in self._keys(entry):
            self._index.setdefault(key, {})[entry.entry_id] = None
            if key[0] == "cancel":
                paths = self._same_paths.setdefault(key[1], {})
                paths[key[2]] = paths.get(key[2], 0) + 1

    def remove(self, entry_id: str) -> PendingEntry | None:
        entry = self._entries.pop(entry_id, None)
        if entry is None:
            return None
        del self._order[entry_id]
        for key in self._keys(entry):
            ids = self._index[key]
            del ids[entry_id]
            if not ids:
                del self._index[key]
            if key[0] == "cancel":
                paths = self._same_paths[key[1]]
                paths[key[2]] -= 1
                if not paths[key[2]]:
                    del paths[key[2]]
        return entry

    def _lookup(self, *keys: Any) -> list[PendingEntry]:
        ids = {i for key in keys for i in self._index.get(key, ())}
        return [self._entries[i] for i in sorted(ids, key=self._order.__getitem__)]

    def cancellable_by(self, event_type: str, resolve: Callable[[str], Any]) -> list[PendingEntry]:
        """The entries a `cancel_on` spec of which names this event type with `same` values equal to
        the event's (`resolve` gives the event's value at a path); the caller still checks each."""
        keys = []
        for paths in self._same_paths.get(event_type, {}):
            keys.append(("cancel", event_type, paths, _same_key(resolve(p) for p in paths)))
            keys.append(("cancel", event_type, paths, _UNHASHABLE))
        return self._lookup(*keys)

    def with_key(self, key: str) -> list[PendingEntry]:
        return self._lookup(("key", key))

    def of_ruleset(self, ruleset: str) -> list[PendingEntry]:
        return self._lookup(("ruleset", ruleset))

    def any_of_ruleset(self, ruleset: str) -> bool:
        """`of_ruleset` without building the list: asked for every firing, where a contact may have
        thousands pending (a voucher reminder each)."""
        return bool(self._index.get(("ruleset", ruleset)))

    def __iter__(self) -> Iterator[PendingEntry]:
        return iter(list(self._entries.values()))

    def __len__(self) -> int:
        return len(self._entries)


@dataclass
class ContactView:
    """A contact as the engine sees it: profile read-only, state mutable, pending sends."""

    contact_id: str
    profile: dict[str, Any]
    state: dict[str, Any]
    pending_entries: InitVar[Iterable[PendingEntry]] = ()
    pending: Pending = field(init=False)
    profile_set: dict[str, Any] = field(default_factory=dict)  # profile fields the service itself changed
    session_new: bool = False  # the event being evaluated started a new session

    def __post_init__(self, pending_entries: Iterable[PendingEntry]) -> None:
        self.pending = Pending(pending_entries)


class Context:
    """Resolves rule paths against one event and one contact at one moment."""

    def __init__(self, event: EngineEvent, contact: ContactView) -> None:
        self.event = event
        self.contact = contact

    def resolve(self, path: str) -> Any:
        root, _, rest = path.partition(".")
        if root == "attributes":
            return _walk(self.event.attributes, rest)
        if root == "event":
            if rest in ("local_date", "local_hour", "local_weekday"):
                local = self.event.time.astimezone(_zone(self.contact.profile.get("timezone")))
                return {"local_date": local.date().isoformat(), "local_hour": local.hour,
                        "local_weekday": local.isoweekday()}[rest]  # fmt: skip
            return {"id": self.event.id, "type": self.event.type, "time": ts(self.event.time)}.get(rest)
        if root == "session":
            session = self.contact.state.get("session", {})
            return {"new": self.contact.session_new, "number": session.get("n", 0)}.get(rest)
        if root == "contact":
            return _walk(self.contact.profile, rest)
        state = self.contact.state
        name, _, sub = rest.partition(".")
        if root == "flags":
            return True if flag_active(state, name, self.event.time) else None
        if root == "counters":
            return counter_value(state, name, self.event.time)
        if root == "values":
            value = remembered(state, name, self.event.time)
            return _walk(value, sub) if sub else value
        return None

    def render(self, value: Any) -> Any:
        """Params: a string starting with `$` is a path (`$attributes.items`); `$$` escapes a literal `$`."""
        if isinstance(value, str) and value.startswith("$"):
            return value[1:] if value.startswith("$$") else self.resolve(value[1:])
        if isinstance(value, dict):
            return {k: self.render(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.render(v) for v in value]
        return value


def _moment(value: Any) -> datetime | None:
    """An RFC 3339 string or Unix seconds from an event, as an aware datetime; None if neither, or if
    outside the times the service computes with (an event stored before ingest checked this, or a value
    from a contact's profile)."""
    try:
        moment = read_time(value)
    except OverflowError:
        return None
    return moment if moment is not None and time_in_range(moment) else None


def _zone(name: Any) -> ZoneInfo:
    try:
        return ZoneInfo(str(name)) if name else ZoneInfo("UTC")
    except (ZoneInfoNotFoundError, ValueError):
        return ZoneInfo("UTC")


def _walk(value: Any, path: str) -> Any:
    if not path:
        return value
    for part in path.split("."):
        if isinstance(value, dict):
            value = value.get(part)
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return None
    return value


def flag_active(state: dict[str, Any], name: str, at: datetime) -> bool:
    flag = state.get("flags", {}).get(name)
    return flag is not None and (flag.get("until") is None or flag["until"] > ts(at))


def remembered(state: dict[str, Any], name: str, at: datetime) -> Any:
    value = state.get("values", {}).get(name)
    if value is None or (value.get("until") is not None and value["until"] <= ts(at)):
        return None
    return value.get("v")


def _window_start(state: dict[str, Any], counter: dict[str, Any], at: datetime) -> float | None:
    window = counter.get("window")
    if window is None:
        return None
    if window == "session":
        return float(state.get("session", {}).get("started", 0.0))
    return ts(at) - parse_duration(window).total_seconds()


def counter_value(state: dict[str, Any], name: str, at: datetime) -> int:
    counter = state.get("counters", {}).get(name)
    if counter is None:
        return 0
    start = _window_start(state, counter, at)
    if "keys" in counter:
        return sum(1 for t in counter["keys"].values() if start is None or t >= start)
    if "times" in counter:
        return sum(1 for t in counter["times"] if start is None or t >= start)
    return int(counter.get("n", 0))


# --- events and decisions -----------------------------------------------------------------------------


@dataclass
class EngineEvent:
    id: str
    type: str
    contact_id: str | None
    time: datetime
    attributes: dict[str, Any]


@dataclass
class ScheduleEntry:
    """A decision to act later: a send, or the `else` of a wait. Cancelled by the events it names."""

    entry_id: str
    contact_id: str
    ruleset: str
    rule: str
    key: str
    due_at: datetime
    created_at: datetime
    cancel_on: list[dict[str, Any]]
    message: dict[str, Any] | None = None  # a send: channel, template, params, transactional, fallback
    actions: list[dict[str, Any]] | None = None  # a wait's else actions
    trigger: dict[str, Any] | None = None  # the event that armed it, for the else actions' params


@dataclass
class Cancellation:
    entry_id: str
    reason: str  # a code of core.reasons
    detail: str = ""


@dataclass
class Fired:
    ruleset: str
    rule: str
    event_id: str


@dataclass
class Entered:
    """A contact entered a ruleset: a rule fired while it was not in it (the funnel's first step)."""

    ruleset: str
    rule: str
    group: str  # `holdout`, an A/B arm, or ""
    at: datetime
    contact_id: str


@dataclass
class Converted:
    """A goal event within the window after an entry: one per entry; attributed once the messages the
    contact got are known (core.attribution)."""

    ruleset: str
    contact_id: str
    group: str
    entered_at: datetime
    entry_rule: str
    at: datetime
    value: float
    event_id: str


@dataclass
class Decisions:
    schedule: list[ScheduleEntry] = field(default_factory=list)
    cancel: list[Cancellation] = field(default_factory=list)
    fired: list[Fired] = field(default_factory=list)
    audience: list[AudienceChange] = field(default_factory=list)
    entered: list[Entered] = field(default_factory=list)
    converted: list[Converted] = field(default_factory=list)


@dataclass
class AudienceChange:
    """Queued for the ads plugin's batched sync; the contact's state already says who is in."""

    contact_id: str
    audience: str
    op: Literal["add", "remove"]
    at: datetime


def _amount(value: Any) -> float:
    """A conversion's value: a finite number, else 0 (a missing or malformed value counts no revenue)."""
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return 0.0


def _actions_to_builtins(actions: list[Action]) -> list[dict[str, Any]]:
    return [msgspec.to_builtins(a) for a in actions]


class Engine:
    """Evaluates events for one contact at a time; pure apart from the matcher's C state."""

    def __init__(self, index: RuleIndex, session_idle: timedelta = SESSION_IDLE) -> None:
        self.index = index
        self.session_idle = session_idle

    def evaluate(self, event: EngineEvent, contact: ContactView, now: datetime) -> Decisions:
        decisions = Decisions()
        self._cancel_by_event(event, contact, decisions)
        if event.type == TIMER_EVENT:
            self._run_timer(event, contact, now, decisions)
            return decisions
        self._track_session(event, contact)
        ctx = Context(event, contact)
        outcome = event.type in MESSAGE_EVENT_TYPES
        if not outcome:
            self._convert(event, ctx, decisions)
        for compiled in self.index.by_event.get(event.type, ()):
            ruleset = self.index.rulesets[compiled.ruleset]
            if ruleset.timeout is not None and now - event.time > ruleset.timeout:
                continue  # stale: an event older than the ruleset's timeout starts nothing
            if not compiled.matches(event.type, ctx):
                continue
            rule = compiled.rule
            once_key = self._once_key(compiled, ctx)
            if once_key is not None and not self._once_allows(rule, once_key, contact.state, event.time):
                continue
            if once_key is not None:
                session = contact.state.get("session", {}).get("n", 0)
                contact.state.setdefault("once", {})[once_key] = {"at": ts(event.time), "session": session}
            decisions.fired.append(Fired(compiled.ruleset, rule.name, event.id))
            entering = (
                not outcome
                and (ruleset.goal is None or event.type not in ruleset.goal.events)
                and not self._inside(ruleset, event, contact)
            )
            scheduled = len(decisions.schedule)
            self._run_actions(rule.then, compiled.ruleset, rule.name, f"{event.id}", ctx, now, decisions)
            if entering and len(decisions.schedule) > scheduled:  # it started something: an entry
                self._enter(ruleset, rule.name, event, contact, decisions)
        return decisions

    # the funnel: entries and conversions

    @staticmethod
    def _inside(ruleset: CompiledRuleset, event: EngineEvent, contact: ContactView) -> bool:
        """Whether the contact is in the ruleset already: with a goal, within the window of its entry;
        without, while the ruleset has a send or a wait pending for it."""
        if ruleset.source.goal is None:
            return contact.pending.any_of_ruleset(ruleset.name)
        journey = contact.state.get("journeys", {}).get(ruleset.name)
        return journey is not None and journey["at"] <= ts(event.time) < journey["until"]

    def _enter(
        self,
        ruleset: CompiledRuleset,
        rule: str,
        event: EngineEvent,
        contact: ContactView,
        decisions: Decisions,
    ) -> None:
        """A rule fired and scheduled a send or a wait for a contact not in the ruleset: an entry. The
        state keeps only what still matters: journeys of loaded rulesets not yet over, their arms."""
        state, at = contact.state, ts(event.time)
        group = ruleset.groups.group_of(contact.contact_id, state)
        decisions.entered.append(Entered(ruleset.name, rule, group, event.time, contact.contact_id))
        loaded = self.index.rulesets
        if state.get("arms"):
            state["arms"] = {name: arm for name, arm in state["arms"].items() if name in loaded}
        journeys = {
            name: j for name, j in state.get("journeys", {}).items() if name in loaded and j["until"] > at
        }
        if ruleset.source.goal is not None:
            until = at + parse_duration(ruleset.source.goal.within).total_seconds()
            journeys[ruleset.name] = {"at": at, "until": until, "group": group, "rule": rule}
        if journeys:
            state["journeys"] = journeys
        else:
            state.pop("journeys", None)

    def _convert(self, event: EngineEvent, ctx: Context, decisions: Decisions) -> None:
        """A goal event of a contact within its entry's window: a conversion, and the entry is closed."""
        journeys = ctx.contact.state.get("journeys")
        if not journeys:
            return
        at = ts(event.time)
        for ruleset in self.index.goals_by_event.get(event.type, ()):
            journey = journeys.get(ruleset.name)
            if journey is None or not journey["at"] <= at < journey["until"]:
                continue
            assert ruleset.goal is not None and ruleset.source.goal is not None
            if not ruleset.goal.matches(event.type, ctx):
                continue
            path = ruleset.source.goal.value
            value = ctx.resolve(path) if path else None
            amount = _amount(value)
            decisions.converted.append(
                Converted(ruleset.name, ctx.contact.contact_id, str(journey["group"]),
                          from_ts(journey["at"]), str(journey["rule"]), event.time, amount, event.id)
            )  # fmt: skip
            del journeys[ruleset.name]

    # entry rules

    @staticmethod
    def _once_key(compiled: CompiledRule, ctx: Context) -> str | None:
        once = compiled.rule.once
        if once is None:
            return None
        key = f"{compiled.ruleset}/{compiled.rule.name}"
        if once.key:
            key += f"/{ctx.resolve(once.key)}"
        return key

    @staticmethod
    def _once_allows(rule: Rule, key: str, state: dict[str, Any], at: datetime) -> bool:
        assert rule.once is not None
        last = state.get("once", {}).get(key)
        if last is None:
            return True
        if rule.once.per == "ever":
            return False
        if rule.once.per == "session":
            return bool(last.get("session") != state.get("session", {}).get("n", 0))
        elapsed: float = ts(at) - last["at"]
        return elapsed >= parse_duration(rule.once.per).total_seconds()

    def _track_session(self, event: EngineEvent, contact: ContactView) -> None:
        contact.session_new = False
        if event.type.startswith("message_") or event.contact_id is None:
            return  # outcomes of our own messages are not the contact being active
        session = contact.state.setdefault("session", {"n": 0, "started": 0.0, "last": 0.0})
        at = ts(event.time)
        if (
            session["n"] == 0
            or session.get("ended")
            or at - session["last"] > self.session_idle.total_seconds()
        ):
            session.update(n=session["n"] + 1, started=at, ended=False)
            contact.session_new = True
        session["last"] = max(session["last"], at)
        if event.type == "session_ended":
            session["ended"] = True

    # cancellation

    @staticmethod
    def _cancel_by_event(event: EngineEvent, contact: ContactView, decisions: Decisions) -> None:
        if event.type == TIMER_EVENT:
            return
        ctx_values = Context(event, contact)
        for entry in contact.pending.cancellable_by(event.type, ctx_values.resolve):
            if cancels(entry.cancel_on, event.type, ctx_values):
                decisions.cancel.append(cancelled_by_event(entry.entry_id, event.type))
                contact.pending.remove(entry.entry_id)

    # actions

    def _run_timer(
        self, event: EngineEvent, contact: ContactView, now: datetime, decisions: Decisions
    ) -> None:
        attrs = event.attributes
        trigger = attrs.get("trigger") or {}
        origin = EngineEvent(
            id=str(trigger.get("id", event.id)),
            type=str(trigger.get("type", event.type)),
            contact_id=event.contact_id,
            time=event.time,  # relative times in the else actions count from when the wait ran out
            attributes=dict(trigger.get("attributes") or {}),
        )
        actions = msgspec.convert(attrs["actions"], list[Action])
        ctx = Context(origin, contact)
        decisions.fired.append(Fired(attrs["ruleset"], attrs["rule"], event.id))
        self._run_actions(actions, attrs["ruleset"], attrs["rule"], attrs["entry_id"], ctx, now, decisions)

    def _run_actions(
        self,
        actions: list[Action],
        ruleset: str,
        rule: str,
        origin: str,
        ctx: Context,
        now: datetime,
        decisions: Decisions,
    ) -> None:
        state = ctx.contact.state
        at = ctx.event.time
        for i, action in enumerate(actions):
            entry_id = f"{origin}/{ruleset}/{rule}/{i}"
            if action.send is not None:
                self._send(action.send, entry_id, ruleset, rule, i, ctx, now, decisions)
            elif action.wait is not None:
                wait = action.wait
                key = f"{ruleset}/{rule}/{i}/wait"
                self._replace_pending(ctx.contact, key, decisions)
                due = at + parse_duration(wait.within)
                cancel_on = [_cancel_spec(ctx, wait.event, wait.same)]
                entry = _entry(ctx, entry_id, ruleset, rule, key, due, now, cancel_on)
                entry.actions = _actions_to_builtins(wait.else_)
                self._add(ctx.contact, entry, decisions)
            elif action.set_flag is not None:
                name, period = (
                    (action.set_flag, None) if isinstance(action.set_flag, str) else
                    (action.set_flag.name, action.set_flag.for_)
                )  # fmt: skip
                state.setdefault("flags", {})[name] = {"until": _until(at, period)}
            elif action.clear_flag is not None:
                state.get("flags", {}).pop(action.clear_flag, None)
            elif action.count is not None:
                self._count(action, ctx)
            elif action.reset is not None:
                state.get("counters", {}).pop(action.reset, None)
            elif action.remember is not None:
                self._remember(action, ctx)
            elif action.forget is not None:
                state.get("values", {}).pop(action.forget, None)
            elif action.suppress is not None:
                channel, period = (
                    (action.suppress, None) if isinstance(action.suppress, str) else
                    (action.suppress.channel, action.suppress.for_)
                )  # fmt: skip
                state.setdefault("suppressed", {})[channel] = {"since": ts(at), "until": _until(at, period)}
            elif action.unsuppress is not None:
                state.get("suppressed", {}).pop(action.unsuppress, None)
            elif action.audience is not None:
                audiences = state.setdefault("audiences", {})
                if action.audience.add:
                    audiences[action.audience.add] = {"since": ts(at)}
                    decisions.audience.append(
                        AudienceChange(ctx.contact.contact_id, action.audience.add, "add", at)
                    )
                elif action.audience.remove:
                    audiences.pop(action.audience.remove, None)
                    decisions.audience.append(
                        AudienceChange(ctx.contact.contact_id, action.audience.remove, "remove", at)
                    )
            elif action.cancel is not None:
                names = set(action.cancel)
                for pending in ctx.contact.pending.of_ruleset(ruleset):
                    if "*" in names or pending.rule in names:
                        decisions.cancel.append(
                            Cancellation(
                                pending.entry_id, reasons.CANCELLED_BY_RULE, f"cancelled by rule {rule}"
                            )
                        )
                        ctx.contact.pending.remove(pending.entry_id)

    def _send(
        self,
        send: Send,
        entry_id: str,
        ruleset: str,
        rule: str,
        index: int,
        ctx: Context,
        now: datetime,
        decisions: Decisions,
    ) -> None:
        key = f"{ruleset}/{rule}/{index}/{send.channel}/{send.template}"
        if send.per:
            key += f"/{ctx.resolve(send.per)}"
        group = self.index.rulesets[ruleset].groups.group_of(ctx.contact.contact_id, ctx.contact.state)
        channel, template, after, params = send.channel, send.template, send.after, send.params
        arm = next((v for v in send.variants if v.name == group), None)
        if arm is not None:  # the contact's A/B arm changes what it says
            channel, template = arm.channel or channel, arm.template or template
            after, params = arm.after or after, {**params, **arm.params}
        due = ctx.event.time + parse_duration(after) if after else now
        if send.at:
            moment = _moment(ctx.resolve(send.at))
            if moment is None:
                return  # no such time in this event: nothing to remind of
            due = max(moment - (parse_duration(send.before) if send.before else timedelta(0)), now)
        if after or send.at:  # a repeat trigger re-arms or keeps a waiting send; an immediate one goes
            if send.on_repeat == "keep" and ctx.contact.pending.with_key(key):
                return
            self._replace_pending(ctx.contact, key, decisions)
        cancel_on = [
            _cancel_spec(ctx, c, []) if isinstance(c, str) else _cancel_spec(ctx, c.event, c.same)
            for c in send.cancel_on
        ]
        entry = _entry(ctx, entry_id, ruleset, rule, key, due, now, cancel_on)
        entry.message = {
            "channel": channel,
            "template": template,
            "params": ctx.render(params),
            "transactional": send.transactional,
            "fallback": list(send.fallback),
            "guard": send.guard,
        }
        if group and group != HOLDOUT_GROUP:  # the contact's arm, whether or not this send varies by it
            entry.message["variant"] = group
        if group == HOLDOUT_GROUP and not send.transactional:  # a receipt is never held back
            entry.message["held_out"] = True
        self._add(ctx.contact, entry, decisions)

    @staticmethod
    def _replace_pending(contact: ContactView, key: str, decisions: Decisions) -> None:
        for entry in contact.pending.with_key(key):
            decisions.cancel.append(
                Cancellation(entry.entry_id, reasons.REARMED, "re-armed by a repeat trigger")
            )
            contact.pending.remove(entry.entry_id)

    @staticmethod
    def _add(contact: ContactView, entry: ScheduleEntry, decisions: Decisions) -> None:
        decisions.schedule.append(entry)
        contact.pending.add(
            PendingEntry(entry.entry_id, entry.key, entry.ruleset, entry.rule, entry.cancel_on)
        )

    @staticmethod
    def _count(action: Action, ctx: Context) -> None:
        spec = action.count
        assert spec is not None
        name, window, per = (
            (spec, None, None) if isinstance(spec, str) else (spec.name, spec.window, spec.per)
        )
        state = ctx.contact.state
        at = ts(ctx.event.time)
        counter = state.setdefault("counters", {}).get(name)
        if counter is None or counter.get("window") != window or ("keys" in counter) != (per is not None):
            counter = {"window": window}
            counter["keys" if per else ("times" if window else "n")] = {} if per else ([] if window else 0)
            state["counters"][name] = counter
        start = _window_start(state, counter, ctx.event.time)
        if per is not None:
            keys = counter["keys"]
            keys[str(ctx.resolve(per))] = at
            if start is not None:
                counter["keys"] = {k: t for k, t in keys.items() if t >= start}
            if len(counter["keys"]) > MAX_COUNTER_TIMES:
                newest = sorted(counter["keys"].items(), key=lambda kv: kv[1])[-MAX_COUNTER_TIMES:]
                counter["keys"] = dict(newest)
        elif window is not None:
            times = [t for t in counter["times"] if start is None or t >= start]
            times.append(at)
            counter["times"] = times[-MAX_COUNTER_TIMES:]
        else:
            counter["n"] = int(counter.get("n", 0)) + 1

    @staticmethod
    def _remember(action: Action, ctx: Context) -> None:
        spec = action.remember
        assert spec is not None
        value = ctx.resolve(spec.from_)
        if value is None:
            return
        at = ctx.event.time
        until = ts(at + parse_duration(spec.for_)) if spec.for_ else None
        values = ctx.contact.state.setdefault("values", {})
        if spec.append:
            current = remembered(ctx.contact.state, spec.name, at)
            items = [v for v in (current if isinstance(current, list) else []) if v != value]
            items.append(value)
            value = items[-spec.max :]
        values[spec.name] = {"v": value, "until": until}


def cancels(cancel_on: list[dict[str, Any]], event_type: str, ctx: Context) -> bool:
    """Whether an event (of this type, `ctx` resolving its paths) cancels an entry waiting on
    `cancel_on`: a spec names its type and every `same` value the entry kept equals the event's."""
    return any(
        event_type in spec["event"]
        and all(ctx.resolve(path) == value for path, value in spec.get("same", {}).items())
        for spec in cancel_on
    )


def cancelled_by_event(entry_id: str, event_type: str) -> Cancellation:
    return Cancellation(entry_id, reasons.CANCELLED_BY_EVENT, f"cancelled by {event_type}")


def event_from_doc(doc: Mapping[str, Any]) -> EngineEvent:
    """A stored event (`events` document) as the engine evaluates it."""
    return EngineEvent(
        doc["_id"], doc["type"], doc.get("contact_id"), doc["time"], doc.get("attributes") or {}
    )


def armed_at(entry: Mapping[str, Any]) -> float:
    """When a schedule entry (a document) was armed: its trigger event's time, else its creation."""
    trigger = entry.get("trigger") or {}
    at = trigger.get("time")
    if isinstance(at, int | float):
        return float(at)
    created = entry.get("created_at")
    return created.timestamp() if isinstance(created, datetime) else 0.0


def first_due(entry: Mapping[str, Any]) -> datetime:
    """When a schedule entry (a document) first came due: `held_due` keeps it across its waits."""
    return entry.get("held_due") or entry["due_at"]  # type: ignore[no-any-return]


def send_order(entry: Mapping[str, Any]) -> tuple[float, str]:
    """Where a schedule entry (a document) stands among its contact's sends, as a simulation orders them:
    a delayed send by the time it first came due (`held_due` keeps it across holds), a send due when it
    was decided by its trigger event's time (live it is due when the inbox got to it, which lags). Ties
    by id, so the order is total."""
    first = first_due(entry)
    created = entry.get("created_at")
    at = first.timestamp()
    if isinstance(created, datetime) and first <= created:
        at = armed_at(entry)
    return at, str(entry["_id"])


def cancelled_by_history(
    entries: Iterable[Mapping[str, Any]], events: Iterable[EngineEvent], contact: ContactView
) -> list[Cancellation]:
    """Waiting entries (documents) an event decided before them cancels: an event at or after the
    entry's trigger, not the trigger itself, that its `cancel_on` names (with `same` values equal, as
    `_cancel_by_event` checks). Such an event was decided while the entry was not yet pending for the
    contact (it was an anonymous contact's, or its trigger arrived late); in time order it would have
    cancelled it. The earliest such event names the cancellation."""
    ordered = sorted(events, key=lambda e: (e.time, e.id))
    out: list[Cancellation] = []
    for entry in entries:
        cancel_on = entry.get("cancel_on") or []
        if not cancel_on:
            continue
        since, trigger_id = armed_at(entry), (entry.get("trigger") or {}).get("id")
        for event in ordered:
            if event.id == trigger_id or ts(event.time) < since:
                continue
            if cancels(cancel_on, event.type, Context(event, contact)):
                out.append(cancelled_by_event(str(entry["_id"]), event.type))
                break
    return out


def _cancel_spec(ctx: Context, events: str | list[str], same: list[str]) -> dict[str, Any]:
    """Which later events cancel an entry: their types, and values they must share with this event."""
    return {"event": event_list(events), "same": {p: ctx.resolve(p) for p in same}}


def _entry(
    ctx: Context,
    entry_id: str,
    ruleset: str,
    rule: str,
    key: str,
    due_at: datetime,
    now: datetime,
    cancel_on: list[dict[str, Any]],
) -> ScheduleEntry:
    return ScheduleEntry(
        entry_id=entry_id,
        contact_id=ctx.contact.contact_id,
        ruleset=ruleset,
        rule=rule,
        key=key,
        due_at=due_at,
        created_at=now,
        cancel_on=cancel_on,
        trigger=_trigger(ctx.event),
    )


def _trigger(event: EngineEvent) -> dict[str, Any]:
    return {"id": event.id, "type": event.type, "time": ts(event.time), "attributes": event.attributes}


def timer_event(entry: ScheduleEntry | dict[str, Any]) -> EngineEvent:
    """The internal event that runs a wait's `else` actions, as the inbox will process it."""
    doc = entry if isinstance(entry, dict) else entry_doc(entry)
    return EngineEvent(
        id=f"timer:{doc['_id']}",
        type=TIMER_EVENT,
        contact_id=doc["contact_id"],
        time=doc["due_at"],
        attributes={
            "entry_id": doc["_id"],
            "ruleset": doc["ruleset"],
            "rule": doc["rule"],
            "actions": doc["actions"],
            "trigger": doc.get("trigger"),
        },
    )


def entry_doc(entry: ScheduleEntry) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "_id": entry.entry_id,
        "contact_id": entry.contact_id,
        "ruleset": entry.ruleset,
        "rule": entry.rule,
        "key": entry.key,
        "due_at": entry.due_at,
        "created_at": entry.created_at,
        "cancel_on": entry.cancel_on,
        "status": "pending",
    }
    if entry.message is not None:
        doc["message"] = entry.message
    if entry.actions is not None:
        doc["actions"] = entry.actions
    if entry.trigger is not None:
        doc["trigger"] = entry.trigger
    return doc


def pending_from_doc(doc: dict[str, Any]) -> PendingEntry:
    return PendingEntry(doc["_id"], doc["key"], doc["ruleset"], doc["rule"], doc.get("cancel_on", []))
