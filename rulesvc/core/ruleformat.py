"""The ruleset file format and its validation, every error with a JSON path.

The format is defined once, by the msgspec types below: they validate files and generate
`rulesets/schema.json`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Annotated, Any, Literal

import msgspec

from rulesvc.core.durations import DURATION_PATTERN, parse_duration
from rulesvc.core.events import split_validation_error

Duration = Annotated[
    str, msgspec.Meta(pattern=DURATION_PATTERN, description="e.g. 30s, 20m, 12h, 2d, 1w, 1h30m")
]
Name = Annotated[str, msgspec.Meta(pattern=r"^[a-z][a-z0-9_]{0,63}$")]
Window = Annotated[
    str,
    msgspec.Meta(pattern=r"^(session|([0-9]+[smhdw])+)$", description="`session`, or a duration like 14d"),
]
OncePer = Annotated[
    str,
    msgspec.Meta(
        pattern=r"^(session|ever|([0-9]+[smhdw])+)$", description="`session`, `ever`, or a duration"
    ),
]
# One event type or a list. Plain `str | list[str]` on purpose: with msgspec 0.21-0.22 a union of a
# constrained (Annotated) str and a list makes the interpreter crash at exit, so the names are checked
# in _semantic_errors instead.
EventTypes = str | list[str]
EVENT_TYPE = re.compile(r"^[A-Za-z][A-Za-z0-9_.:-]{0,63}$")
RuleOrAll = Annotated[str, msgspec.Meta(pattern=r"^(\*|[a-z][a-z0-9_]{0,63})$", description="a rule, or *")]
ChannelName = Annotated[str, msgspec.Meta(pattern=r"^[a-z][a-z0-9_]{0,31}$")]
TemplateName = Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9_][a-z0-9_./-]{0,127}$")]
Path_ = Annotated[
    str,
    msgspec.Meta(
        pattern=r"^(attributes|contact|flags|counters|values|event|session)(\.[A-Za-z0-9_-]+)+$",
        description="attributes.* (the event), contact.* (the profile), flags.*, counters.*, values.*,"
        " event.*",
    ),
]
Scalar = str | int | float | bool
UNSET: Any = msgspec.UNSET


class Ops(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Comparisons on one value; all given must hold."""

    eq: Scalar | msgspec.UnsetType = UNSET
    ne: Scalar | msgspec.UnsetType = UNSET
    lt: int | float | str | msgspec.UnsetType = UNSET
    lte: int | float | str | msgspec.UnsetType = UNSET
    gt: int | float | str | msgspec.UnsetType = UNSET
    gte: int | float | str | msgspec.UnsetType = UNSET
    in_: list[Scalar] | msgspec.UnsetType = msgspec.field(default=UNSET, name="in")
    contains: Scalar | msgspec.UnsetType = UNSET
    exists: bool | msgspec.UnsetType = UNSET
    same_as: Path_ | msgspec.UnsetType = UNSET  # equal to the value at another path


Conditions = dict[Path_, Scalar | Ops]


class When(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    event: EventTypes
    conditions: Conditions = msgspec.field(default_factory=dict)
    any: list[Conditions] = msgspec.field(default_factory=list)  # at least one group holds, too


class CancelOn(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    event: EventTypes
    same: list[Path_] = msgspec.field(default_factory=list)  # values equal in trigger and cancelling event


class Send(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    channel: ChannelName
    template: TemplateName
    after: Duration | None = None
    at: Path_ | None = None  # a time in the event (RFC 3339 or Unix seconds) to send at ...
    before: Duration | None = None  # ... less this (e.g. 3d before a voucher expires)
    cancel_on: list[str | CancelOn] = msgspec.field(default_factory=list)
    on_repeat: Literal["rearm", "keep"] = "rearm"
    per: Path_ | None = None  # one pending send per value of this path (e.g. per product)
    params: dict[str, Any] = msgspec.field(default_factory=dict)
    transactional: bool = False
    # Re-checked against the catalog when the send comes due (params must carry product_id, and price):
    guard: Literal["price_still_lower", "still_in_stock"] | None = None
    fallback: list[ChannelName] = msgspec.field(default_factory=list)


class SetFlag(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    name: Name
    for_: Duration | None = msgspec.field(default=None, name="for")


class Count(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    name: Name
    window: Window | None = None
    per: Path_ | None = None  # count distinct values of this path instead of occurrences


class Remember(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    name: Name
    from_: Path_ = msgspec.field(name="from")
    append: bool = False
    max: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 50
    for_: Duration | None = msgspec.field(default=None, name="for")


class Suppress(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    channel: ChannelName
    for_: Duration | None = msgspec.field(default=None, name="for")


class Audience(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    add: Name | None = None
    remove: Name | None = None


class Wait(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Wait up to `within` for `event` (or any of a list); if none comes, run `else`."""

    event: EventTypes
    within: Duration
    else_: list[Action] = msgspec.field(name="else")
    same: list[Path_] = msgspec.field(default_factory=list)


class Action(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Exactly one of the keys."""

    send: Send | None = None
    set_flag: Name | SetFlag | None = None
    clear_flag: Name | None = None
    count: Name | Count | None = None
    reset: Name | None = None
    remember: Remember | None = None
    forget: Name | None = None
    suppress: ChannelName | Suppress | None = None
    unsuppress: ChannelName | None = None
    audience: Audience | None = None
    wait: Wait | None = None
    cancel: list[RuleOrAll] | None = None

    def kind(self) -> str:
        return next(f for f in self.__struct_fields__ if getattr(self, f) is not None)


class Once(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Entry rule: fire at most once per session, or per period, per contact (and per key)."""

    per: OncePer
    key: Path_ | None = None


class Rule(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    name: Name
    when: When
    then: list[Action]
    once: Once | None = None
    description: str = ""


class RulesetFile(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    rules: Annotated[list[Rule], msgspec.Meta(min_length=1)]
    description: str = ""
    timeout: Duration | None = None  # stale-event guard: older events start nothing in this ruleset
    schema: str | None = msgspec.field(default=None, name="$schema")


@dataclass(frozen=True)
class RulesetError:
    file: str
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.path}: {self.message}"


class InvalidRuleset(Exception):
    def __init__(self, errors: list[RulesetError]) -> None:
        super().__init__("; ".join(map(str, errors)))
        self.errors = errors


def json_schema() -> dict[str, Any]:
    schema = msgspec.json.schema(RulesetFile)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "rulesvc ruleset"
    return schema


_DECODER = msgspec.json.Decoder(RulesetFile)


def _event_errors(value: EventTypes, path: str) -> list[tuple[str, str]]:
    names = event_list(value)
    if not names:
        return [(path, "needs at least one event type")]
    return [
        (path if isinstance(value, str) else f"{path}[{i}]", f"invalid event type {name!r}")
        for i, name in enumerate(names)
        if not EVENT_TYPE.match(name)
    ]


def _semantic_errors(rs: RulesetFile, channels: frozenset[str]) -> list[tuple[str, str]]:
    errors: list[tuple[str, str]] = []
    seen: set[str] = set()
    for i, rule in enumerate(rs.rules):
        where = f"$.rules[{i}]"
        if rule.name in seen:
            errors.append((f"{where}.name", f"duplicate rule name `{rule.name}`"))
        seen.add(rule.name)
        errors.extend(_event_errors(rule.when.event, f"{where}.when.event"))
        for g, group in enumerate([rule.when.conditions, *rule.when.any]):
            gpath = f"{where}.when.conditions" if g == 0 else f"{where}.when.any[{g - 1}]"
            for path, cond in group.items():
                if isinstance(cond, Ops) and not any(
                    getattr(cond, f) is not UNSET for f in cond.__struct_fields__
                ):
                    errors.append((f"{gpath}.{path}", "no comparison given"))
        if rule.once and rule.once.per not in ("session", "ever"):
            _check_duration(rule.once.per, f"{where}.once.per", errors)
        errors.extend(_action_errors(rule.then, f"{where}.then", channels))
    return errors


def _check_duration(text: str, path: str, errors: list[tuple[str, str]]) -> None:
    if parse_duration(text) <= timedelta(0):
        errors.append((path, "duration must be more than zero"))


def _action_errors(actions: list[Action], where: str, channels: frozenset[str]) -> list[tuple[str, str]]:
    errors: list[tuple[str, str]] = []
    if not actions:
        errors.append((where, "needs at least one action"))
    for j, action in enumerate(actions):
        apath = f"{where}[{j}]"
        given = [f for f in action.__struct_fields__ if getattr(action, f) is not None]
        if len(given) != 1:
            errors.append((apath, f"an action has exactly one key, got {given or 'none'}"))
            continue
        if action.send is not None:
            for k, channel in enumerate([action.send.channel, *action.send.fallback]):
                if channel not in channels:
                    cpath = f"{apath}.send.channel" if k == 0 else f"{apath}.send.fallback[{k - 1}]"
                    errors.append(
                        (cpath, f"unknown channel `{channel}` (known: {', '.join(sorted(channels))})")
                    )
        if action.audience is not None and (action.audience.add is None) == (action.audience.remove is None):
            errors.append((f"{apath}.audience", "give exactly one of `add` or `remove`"))
        if action.send is not None:
            for k, c in enumerate(action.send.cancel_on):
                cpath = f"{apath}.send.cancel_on[{k}]"
                errors.extend(
                    _event_errors(c, cpath)
                    if isinstance(c, str)
                    else _event_errors(c.event, f"{cpath}.event")
                )
        if action.wait is not None:
            errors.extend(_event_errors(action.wait.event, f"{apath}.wait.event"))
            errors.extend(_action_errors(action.wait.else_, f"{apath}.wait.else", channels))
    return errors


def parse_ruleset(file: str, data: bytes, channels: frozenset[str]) -> RulesetFile:
    """Every problem as file + JSON path + message; raises InvalidRuleset."""
    try:
        parsed = _DECODER.decode(data)
    except msgspec.ValidationError as exc:
        path, message = split_validation_error(exc)
        raise InvalidRuleset([RulesetError(file, path, message)]) from exc
    except msgspec.DecodeError as exc:
        raise InvalidRuleset([RulesetError(file, "$", f"invalid JSON: {exc}")]) from exc
    problems = _semantic_errors(parsed, channels)
    if problems:
        raise InvalidRuleset([RulesetError(file, p, m) for p, m in problems])
    return parsed


def event_list(event: str | list[str]) -> list[str]:
    return [event] if isinstance(event, str) else list(event)


def listened_events(rs: RulesetFile) -> list[str]:
    events: set[str] = set()
    for rule in rs.rules:
        events.update([rule.when.event] if isinstance(rule.when.event, str) else rule.when.event)
    return sorted(events)


def cancel_event_types(rs: RulesetFile) -> set[str]:
    """Event types that can cancel this ruleset's pending sends (they must reach the engine too)."""
    types: set[str] = set()

    def visit(actions: Iterable[Action]) -> None:
        for a in actions:
            if a.send is not None:
                for c in a.send.cancel_on:
                    types.update(event_list(c if isinstance(c, str) else c.event))
            if a.wait is not None:
                types.update(event_list(a.wait.event))
                visit(a.wait.else_)

    for rule in rs.rules:
        visit(rule.then)
    return types


# Paths that resolve to a value whatever the event and the contact: the event's own fields, the session,
# counters (0 when never counted). Any other path may be missing, and a param from it null.
ALWAYS_PRESENT_ROOTS = frozenset({"event", "session", "counters"})


def _requires_value(condition: Scalar | Ops) -> bool:
    """A condition that cannot hold on a missing value (`ne` and `exists: false` can)."""
    if not isinstance(condition, Ops):
        return True
    return condition.exists is True or any(
        getattr(condition, op) is not UNSET
        for op in ("eq", "lt", "lte", "gt", "gte", "in_", "contains", "same_as")
    )


def guaranteed(path: str, rule: Rule) -> bool:
    """Whether `path` has a value whenever `rule` fires: an always-present root, or a condition on the
    path (or on a path inside it) that a missing value fails."""
    if path.partition(".")[0] in ALWAYS_PRESENT_ROOTS:
        return True
    return any(
        (c == path or c.startswith(path + ".")) and _requires_value(v)
        for c, v in rule.when.conditions.items()
    )


def send_actions(rs: RulesetFile) -> list[tuple[str, Send, Rule]]:
    """(JSON path of the send, the send, its rule) of every send, including those inside a wait's `else`."""
    found: list[tuple[str, Send, Rule]] = []

    def visit(actions: Iterable[Action], where: str, rule: Rule) -> None:
        for j, a in enumerate(actions):
            if a.send is not None:
                found.append((f"{where}[{j}].send", a.send, rule))
            if a.wait is not None:
                visit(a.wait.else_, f"{where}[{j}].wait.else", rule)

    for i, rule in enumerate(rs.rules):
        visit(rule.then, f"$.rules[{i}].then", rule)
    return found


def channels_used(rs: RulesetFile) -> dict[str, list[str]]:
    """Every channel a send of this ruleset may use (its channel and fallbacks), with the JSON paths of
    the sends naming it: what `check` and `/readyz` compare with the configured channels."""
    used: dict[str, list[str]] = {}
    for where, send, _ in send_actions(rs):
        for name in (send.channel, *send.fallback):
            used.setdefault(name, []).append(where)
    return used
