"""The ruleset file format and its validation, every error with a JSON path.

The format is defined once, by the msgspec types below: they validate files and generate
`rulesets/schema.json`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from typing import Annotated, Any, Literal

import msgspec
import msgspec.inspect

from rulesvc.core import jsoncheck, jsontext
from rulesvc.core.durations import DURATION_PATTERN, parse_duration
from rulesvc.core.events import split_validation_error

DURATION_DESCRIPTION = "e.g. 30s, 20m, 12h, 2d, 1w, 1h30m"
WINDOW_DESCRIPTION = "`session`, or a duration like 14d"
ONCE_PER_DESCRIPTION = "`session`, `ever`, or a duration"
RULE_OR_ALL_DESCRIPTION = "a rule, or *"
PATH_DESCRIPTION = "attributes.* (the event), contact.* (the profile), flags.*, counters.*, values.*, event.*"
NAME_PATTERN = r"^[a-z][a-z0-9_]{0,63}$"
WINDOW_PATTERN = r"^(session|([0-9]+[smhdw])+)$"
ONCE_PER_PATTERN = r"^(session|ever|([0-9]+[smhdw])+)$"
RULE_OR_ALL_PATTERN = r"^(\*|[a-z][a-z0-9_]{0,63})$"
CHANNEL_PATTERN = r"^[a-z][a-z0-9_]{0,31}$"
TEMPLATE_PATTERN = r"^[a-z0-9_][a-z0-9_./-]{0,127}$"
PATH_PATTERN = r"^(attributes|contact|flags|counters|values|event|session)(\.[A-Za-z0-9_-]+)+$"
# A share of contacts: 0.5% to 50%, at most two decimals.
SHARE_PATTERN = r"^(50(\.00?)?|[1-4]?[0-9](\.[0-9]{1,2})?)%$"
SALT_PATTERN = r"^[A-Za-z0-9_.:-]{1,64}$"

Duration = Annotated[str, msgspec.Meta(pattern=DURATION_PATTERN, description=DURATION_DESCRIPTION)]
Name = Annotated[str, msgspec.Meta(pattern=NAME_PATTERN)]
Window = Annotated[str, msgspec.Meta(pattern=WINDOW_PATTERN, description=WINDOW_DESCRIPTION)]
OncePer = Annotated[str, msgspec.Meta(pattern=ONCE_PER_PATTERN, description=ONCE_PER_DESCRIPTION)]
# One event type or a list. Plain `str | list[str]` on purpose: with msgspec 0.21-0.22 a union of a
# constrained (Annotated) str and a list makes the interpreter crash at exit, so the names are checked
# in _semantic_errors instead.
EventTypes = str | list[str]
EVENT_TYPE = re.compile(r"^[A-Za-z][A-Za-z0-9_.:-]{0,63}$")
RuleOrAll = Annotated[str, msgspec.Meta(pattern=RULE_OR_ALL_PATTERN, description=RULE_OR_ALL_DESCRIPTION)]
ChannelName = Annotated[str, msgspec.Meta(pattern=CHANNEL_PATTERN)]
TemplateName = Annotated[str, msgspec.Meta(pattern=TEMPLATE_PATTERN)]
Path_ = Annotated[str, msgspec.Meta(pattern=PATH_PATTERN, description=PATH_DESCRIPTION)]
Share = Annotated[str, msgspec.Meta(pattern=SHARE_PATTERN, description="a share of contacts, e.g. 5%")]
Salt = Annotated[str, msgspec.Meta(pattern=SALT_PATTERN)]
Weight = Annotated[int, msgspec.Meta(ge=1, le=10_000)]

# What each pattern allows, as an error message says it ("expected <this>, got ...").
SENTENCES = {
    DURATION_PATTERN: "a duration such as `20m` or `2h`",
    NAME_PATTERN: "a name of lower case letters, digits and `_`, starting with a letter "
    "(at most 64 characters)",
    WINDOW_PATTERN: f"{WINDOW_DESCRIPTION.replace('14d', '`14d`')}",
    ONCE_PER_PATTERN: "`session`, `ever`, or a duration such as `7d`",
    RULE_OR_ALL_PATTERN: "a rule's name, or `*` for every rule",
    CHANNEL_PATTERN: "a channel name such as `email`: lower case letters, digits and `_` "
    "(at most 32 characters)",
    TEMPLATE_PATTERN: "a template name such as `cart_abandon/email`: lower case letters, digits, `_`, "
    "`.`, `/` and `-` (at most 128 characters)",
    PATH_PATTERN: f"a path such as `attributes.price`: {PATH_DESCRIPTION}, session.*",
    SHARE_PATTERN: "a share of contacts from `0.5%` to `50%`, such as `5%`",
    SALT_PATTERN: "letters, digits, `_`, `.`, `:` and `-` (at most 64 characters)",
}
Scalar = str | int | float | bool
HOLDOUT_GROUP = "holdout"  # the group of held-out contacts, in counts and reports
TREATMENT_GROUP = "treatment"  # every contact not held out, whatever its arm, in reports
RESERVED_GROUPS = frozenset({HOLDOUT_GROUP, TREATMENT_GROUP})
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


class Variant(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """One arm of an A/B test on a send: what it changes (nothing: the send as written)."""

    name: Name
    weight: Weight
    channel: ChannelName | None = None
    template: TemplateName | None = None
    after: Duration | None = None
    params: dict[str, Any] = msgspec.field(default_factory=dict)  # merged over the send's params


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
    # An A/B test: each contact gets one arm per ruleset (the same names and weights on every send).
    variants: list[Variant] = msgspec.field(default_factory=list)


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


class Goal(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """What counts as a conversion: this event within `within` of the contact entering the ruleset."""

    event: EventTypes
    within: Duration
    conditions: Conditions = msgspec.field(default_factory=dict)
    value: Path_ | None = None  # the revenue of a conversion (e.g. attributes.value)


class RulesetFile(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    rules: Annotated[list[Rule], msgspec.Meta(min_length=1)]
    description: str = ""
    timeout: Duration | None = None  # stale-event guard: older events start nothing in this ruleset
    # A random, stable share of contacts that go through every decision but get no message.
    holdout: Share | None = None
    salt: Salt | None = None  # changes every contact's holdout and arm; default: the ruleset's name
    goal: Goal | None = None
    schema: str | None = msgspec.field(default=None, name="$schema")


@dataclass(frozen=True)
class RulesetError:
    """One problem of a ruleset file: where (line and column from 1, when the file says; the JSON path)
    and what, in a sentence."""

    file: str
    path: str
    message: str
    line: int | None = None
    column: int | None = None

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}:{self.column}" if self.line is not None else self.file
        return f"{where}: {self.path}: {self.message}"


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


def _semantic_errors(
    rules: Iterable[tuple[int, Rule]],
    channels: frozenset[str],
    template_problem: Callable[[str], str | None] | None = None,
) -> list[tuple[str, str]]:
    """Problems the types cannot say, for each (index, rule) that decoded."""
    errors: list[tuple[str, str]] = []
    seen: set[str] = set()
    for i, rule in rules:
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
        errors.extend(_action_errors(rule.then, f"{where}.then", channels, template_problem))
        errors.extend(_duration_errors(rule, where))
    return errors


def _check_duration(text: str, path: str, errors: list[tuple[str, str]]) -> None:
    try:
        if parse_duration(text) <= timedelta(0):
            errors.append((path, "duration must be more than zero"))
    except ValueError:
        pass  # too long: said by `_duration_errors`


def _timeout_errors(timeout: str | None) -> list[tuple[str, str]]:
    try:
        parse_duration(timeout) if timeout is not None else None
    except ValueError as exc:
        return [("$.timeout", str(exc))]
    return []


# Fields that hold a duration (`per` only in `once`: elsewhere it is a path, which never looks like one).
_DURATION_FIELDS = frozenset({"after", "before", "within", "for", "timeout", "window", "per"})
_DURATION = re.compile(DURATION_PATTERN)


def _duration_errors(value: Any, path: str) -> list[tuple[str, str]]:
    """Durations too long to add to a time (`99999999999w`): refused here, not overflowing per event."""
    found: list[tuple[str, str]] = []
    if isinstance(value, msgspec.Struct):
        for info in msgspec.structs.fields(value):
            child, where = getattr(value, info.name), f"{path}.{info.encode_name}"
            if info.encode_name in _DURATION_FIELDS and isinstance(child, str) and _DURATION.match(child):
                try:
                    parse_duration(child)
                except ValueError as exc:
                    found.append((where, str(exc)))
            else:
                found.extend(_duration_errors(child, where))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found.extend(_duration_errors(item, f"{path}[{i}]"))
    return found


def _action_errors(
    actions: list[Action],
    where: str,
    channels: frozenset[str],
    template_problem: Callable[[str], str | None] | None,
) -> list[tuple[str, str]]:
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
            problem = _template_problem(action.send.template, template_problem)
            if problem is not None:
                errors.append((f"{apath}.send.template", problem))
            errors.extend(_variant_errors(action.send, f"{apath}.send", channels, template_problem))
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
            errors.extend(_action_errors(action.wait.else_, f"{apath}.wait.else", channels, template_problem))
    return errors


def _template_problem(template: str, template_problem: Callable[[str], str | None] | None) -> str | None:
    if ".." in template.split("/"):
        return "a template name may not contain a `..` part"
    return template_problem(template) if template_problem else None


def _variant_errors(
    send: Send,
    where: str,
    channels: frozenset[str],
    template_problem: Callable[[str], str | None] | None,
) -> list[tuple[str, str]]:
    """One send's arms: at least two, named once each, each channel and template usable."""
    errors: list[tuple[str, str]] = []
    if not send.variants:
        return errors
    if len(send.variants) < 2:
        errors.append((f"{where}.variants", "an A/B test needs at least two variants"))
    names: set[str] = set()
    for k, variant in enumerate(send.variants):
        vpath = f"{where}.variants[{k}]"
        if variant.name in RESERVED_GROUPS:
            errors.append((f"{vpath}.name", f"`{variant.name}` names a group of every test's report "
                           "(`holdout`: the held-out contacts, `treatment`: all the others): choose another "
                           "name"))  # fmt: skip
        if variant.name in names:
            errors.append((f"{vpath}.name", f"duplicate variant name `{variant.name}`"))
        names.add(variant.name)
        if variant.channel is not None and variant.channel not in channels:
            known = ", ".join(sorted(channels))
            errors.append((f"{vpath}.channel", f"unknown channel `{variant.channel}` (known: {known})"))
        if variant.template is not None:
            problem = _template_problem(variant.template, template_problem)
            if problem is not None:
                errors.append((f"{vpath}.template", problem))
        if variant.after is not None and send.at is not None:
            errors.append((f"{vpath}.after", "this send is timed by `at`: a variant cannot change `after`"))
    return errors


def arms(rs: RulesetFile) -> list[Variant]:
    """The ruleset's A/B arms (those of its first send with variants; every such send has the same)."""
    for _, send, _ in send_actions(rs):
        if send.variants:
            return send.variants
    return []


def _ruleset_errors(rs: RulesetFile) -> list[tuple[str, str]]:
    """Problems of the whole file: the arms agree across sends (a contact has one arm per ruleset), the
    goal is well formed."""
    errors = _timeout_errors(rs.timeout)
    first: tuple[str, list[tuple[str, int]]] | None = None
    for where, send, _ in send_actions(rs):
        if not send.variants:
            continue
        shape = [(v.name, v.weight) for v in send.variants]
        if first is None:
            first = (where, shape)
        elif shape != first[1]:
            errors.append((f"{where}.variants", f"every send of a ruleset has the same variants (names and "
                           f"weights, in order) as the first one, {first[0]}: a contact has one arm per "
                           "ruleset"))  # fmt: skip
    if rs.holdout is not None and not Decimal("0.5") <= Decimal(rs.holdout.removesuffix("%")) <= 50:
        errors.append(("$.holdout", "a holdout is from `0.5%` to `50%`"))
    if rs.goal is not None:
        goal_events = set(event_list(rs.goal.event))
        if all(set(event_list(rule.when.event)) <= goal_events for rule in rs.rules):
            why = (
                "every rule listens to the goal's event only, so no contact can enter the ruleset and "
                "none can convert: a goal is what follows an entry"
            )
            errors.append(("$.goal.event", why))
        errors.extend(_event_errors(rs.goal.event, "$.goal.event"))
        _check_duration(rs.goal.within, "$.goal.within", errors)
        errors.extend(_duration_errors(rs.goal, "$.goal"))
        for path, cond in rs.goal.conditions.items():
            if isinstance(cond, Ops) and not any(
                getattr(cond, f) is not UNSET for f in cond.__struct_fields__
            ):
                errors.append((f"$.goal.conditions.{path}", "no comparison given"))
    return errors


def parse_ruleset(
    file: str,
    data: bytes,
    channels: frozenset[str],
    template_problem: Callable[[str], str | None] | None = None,
) -> RulesetFile:
    """The ruleset, or InvalidRuleset with every problem (file, line:column, JSON path, sentence).

    `template_problem(name)` says why a template cannot be used (None if it can): the caller looks at
    the files, this stays pure. A valid file is decoded by msgspec alone; only a refused one is walked
    again, slowly, to find every problem and its place."""
    try:
        parsed = _DECODER.decode(data)
    except (msgspec.MsgspecError, UnicodeDecodeError, RecursionError) as exc:  # junk decoders choke on too
        raise InvalidRuleset(_every_error(file, data, channels, template_problem, exc)) from exc
    problems = _semantic_errors(enumerate(parsed.rules), channels, template_problem)
    problems.extend(_ruleset_errors(parsed))
    if problems:
        raise InvalidRuleset(locate_errors(file, data, problems))
    return parsed


def locate_errors(file: str, data: bytes, problems: Iterable[tuple[str, str]]) -> list[RulesetError]:
    """(JSON path, message) pairs of a file as errors with the line and column of each path's value."""
    try:
        document: jsontext.Document | None = jsontext.parse(data)
    except jsontext.JsonSyntaxError:
        document = None
    errors = []
    for path, message in problems:
        if document is None:
            errors.append(RulesetError(file, path, message))
        else:
            line, column = document.position(jsontext.locate(document.root, path))
            errors.append(RulesetError(file, path, message, line, column))
    return sorted(errors, key=lambda e: (e.line or 0, e.column or 0))


_TYPE = msgspec.inspect.type_info(RulesetFile)


def _every_error(
    file: str,
    data: bytes,
    channels: frozenset[str],
    template_problem: Callable[[str], str | None] | None,
    refused: Exception,
) -> list[RulesetError]:
    document = parsed(file, data)
    if isinstance(document, list):
        return document
    found = [(p.path, p.message, p.pos) for p in jsoncheck.check(document.root, _TYPE, SENTENCES)]
    rules = document.root.member("rules") if document.root.kind == "object" else None
    decoded: list[tuple[int, Rule]] = []
    for i, node in enumerate(rules.items if rules is not None and rules.kind == "array" else []):
        where = f"$.rules[{i}]"
        if any(p == where or p.startswith((f"{where}.", f"{where}[")) for p, _, _ in found):
            continue  # a broken rule: its own problems are said; the others are still checked
        try:
            decoded.append((i, msgspec.convert(node.plain(), Rule)))
        except msgspec.ValidationError as exc:  # not expected: the walk found nothing in this rule
            path, message = split_validation_error(exc)
            path = where + path[1:]
            found.append((path, message, jsontext.locate(document.root, path)))
    for path, message in _semantic_errors(decoded, channels, template_problem):
        found.append((path, message, jsontext.locate(document.root, path)))
    return located(file, document, found, refused)


Found = list[tuple[str, str, int]]  # (JSON path, message, position in the text)


def parsed(file: str, data: bytes) -> jsontext.Document | list[RulesetError]:
    """The file's JSON with positions, or its syntax error at file:line:column."""
    try:
        return jsontext.parse(data)
    except jsontext.JsonSyntaxError as exc:
        line, column = jsontext.position(data.decode("utf-8", "replace"), exc.pos)
        return [RulesetError(file, exc.path, f"invalid JSON: {exc.message}", line, column)]


def located(file: str, document: jsontext.Document, found: Found, refused: Exception) -> list[RulesetError]:
    """The problems at their line and column, in the file's order. When the walk found none, msgspec's
    own words for what it refused, rather than a refused file with nothing said."""
    if not found:
        path, message = (
            split_validation_error(refused)
            if isinstance(refused, msgspec.ValidationError)
            else ("$", f"invalid JSON: {refused}")
        )
        found = [(path, message, jsontext.locate(document.root, path))]
    errors = [RulesetError(file, p, m, *document.position(pos)) for p, m, pos in found]
    return sorted(errors, key=lambda e: (e.line or 0, e.column or 0))


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
        for k, variant in enumerate(send.variants):
            if variant.channel is not None:
                used.setdefault(variant.channel, []).append(f"{where}.variants[{k}]")
    return used
