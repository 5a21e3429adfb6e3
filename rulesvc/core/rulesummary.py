"""A ruleset in words: per rule, what starts it and a line per action ("sends `cart_abandon/push` on push
20m after the event"), its holdout, arms and goal. What `GET /v1/rulesets/{name}` and the console show a
person who reads the flow rather than its JSON.

Pure: from the parsed file (`core.ruleformat.RulesetFile`), no I/O.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec

from rulesvc.core.ruleformat import UNSET, Action, Conditions, Ops, Rule, RulesetFile, Send, arms, event_list

_OPS = (
    ("eq", "="),
    ("ne", "≠"),
    ("gt", ">"),
    ("gte", "≥"),
    ("lt", "<"),
    ("lte", "≤"),
    ("in_", "in"),
    ("contains", "contains"),
    ("same_as", "same as"),
)


class ActionLine(msgspec.Struct, omit_defaults=True):
    """One action of a rule in a sentence. `channel`, `template`, `after`: a send's (what its funnel row
    is keyed by); `within` a wait's."""

    kind: str
    text: str
    channel: str | None = None
    template: str | None = None
    after: str | None = None
    then: list[ActionLine] = msgspec.field(default_factory=list)  # a wait's `else`, when nothing came


class RuleSummary(msgspec.Struct):
    name: str
    description: str
    events: list[str]  # the event types that trigger it
    conditions: list[str]  # each a sentence; all must hold (an `any` group: "one of: ...")
    once: str | None  # "at most once per session" ...
    actions: list[ActionLine]
    channels: list[str]  # every channel a send of this rule may use, in order of first mention


class VariantInfo(msgspec.Struct):
    name: str
    weight: int


class GoalInfo(msgspec.Struct):
    """What counts as a conversion: one of `events` within `within` of entering, if `conditions` hold."""

    events: list[str]
    within: str
    conditions: list[str]
    value: str | None  # the path of a conversion's revenue


def _value(v: Any) -> str:
    return json.dumps(v, ensure_ascii=False)


def condition_text(path: str, cond: Any) -> str:
    """`attributes.value > 0 and ≤ 200`, `contact.country = "DE"`, `attributes.sku exists`."""
    if not isinstance(cond, Ops):
        return f"{path} = {_value(cond)}"
    parts: list[str] = []
    for field, sign in _OPS:
        given = getattr(cond, field)
        if given is UNSET:
            continue
        if field == "in_":
            parts.append(f"in {', '.join(_value(v) for v in given)}")
        elif field == "same_as":
            parts.append(f"same as {given}")
        else:
            parts.append(f"{sign} {_value(given)}")
    if cond.exists is not UNSET:
        parts.append("exists" if cond.exists else "is missing")
    return f"{path} {' and '.join(parts)}" if parts else path


def conditions_text(conditions: Conditions) -> list[str]:
    return [condition_text(p, c) for p, c in conditions.items()]


def _any_text(any_: list[Conditions]) -> list[str]:
    if not any_:
        return []
    groups = [" and ".join(conditions_text(g)) or "always" for g in any_]
    return ["one of: " + "; or ".join(groups)]


def _cancel_on(send: Send) -> str:
    names: list[str] = []
    for c in send.cancel_on:
        events = event_list(c if isinstance(c, str) else c.event)
        same = "" if isinstance(c, str) or not c.same else f" (same {', '.join(c.same)})"
        names.extend(f"{e}{same}" for e in events)
    return ", ".join(names)


def _when_sent(send: Send) -> str:
    if send.at is not None:
        return f"at the time in {send.at}" + (f", less {send.before}" if send.before else "")
    if send.after is not None:
        return f"{send.after} after the event"
    return "at once"


def send_text(send: Send) -> str:
    """`sends `cart_abandon/push` on push 20m after the event; cancelled by purchased`."""
    text = f"sends `{send.template}` on {send.channel} {_when_sent(send)}"
    extra: list[str] = []
    if send.fallback:
        extra.append(f"else on {', '.join(send.fallback)}")
    if send.per is not None:
        extra.append(f"one pending per {send.per}")
    if send.cancel_on:
        extra.append(f"cancelled by {_cancel_on(send)}")
    if send.on_repeat == "keep":
        extra.append("a repeat keeps the pending one")
    if send.guard == "price_still_lower":
        extra.append("only if the price is still lower then")
    elif send.guard == "still_in_stock":
        extra.append("only if still in stock then")
    if send.transactional:
        extra.append("transactional (no consent or frequency cap needed)")
    if send.variants:
        said = []
        for v in send.variants:
            change = [f"on {v.channel}" if v.channel else "", f"`{v.template}`" if v.template else "",
                      f"after {v.after}" if v.after else "", "own params" if v.params else ""]  # fmt: skip
            what = ", ".join(c for c in change if c) or "as written"
            said.append(f"{v.name} (weight {v.weight}): {what}")
        extra.append("A/B test: " + "; ".join(said))
    return text + ("; " + "; ".join(extra) if extra else "")


def _for(duration: str | None) -> str:
    return f" for {duration}" if duration else ""


def action_line(action: Action) -> ActionLine:
    kind = action.kind()
    if action.send is not None:
        s = action.send
        return ActionLine(kind, send_text(s), s.channel, s.template, s.after)
    if action.wait is not None:
        w = action.wait
        same = f" with the same {', '.join(w.same)}" if w.same else ""
        events = " or ".join(event_list(w.event))
        text = f"waits up to {w.within} for {events}{same}; if none comes:"
        return ActionLine(kind, text, then=[action_line(a) for a in w.else_])
    if action.cancel is not None:
        rules = action.cancel
        text = (
            "cancels every pending send of this ruleset"
            if "*" in rules
            else (f"cancels the pending sends of {', '.join(rules)}")
        )
        return ActionLine(kind, text)
    if action.set_flag is not None:
        f = action.set_flag
        text = f"sets flag {f}" if isinstance(f, str) else f"sets flag {f.name}{_for(f.for_)}"
        return ActionLine(kind, text)
    if action.clear_flag is not None:
        return ActionLine(kind, f"clears flag {action.clear_flag}")
    if action.count is not None:
        c = action.count
        if isinstance(c, str):
            return ActionLine(kind, f"counts {c}")
        window = f" over {c.window}" if c.window else ""
        per = f" (distinct {c.per})" if c.per else ""
        return ActionLine(kind, f"counts {c.name}{per}{window}")
    if action.reset is not None:
        return ActionLine(kind, f"resets counter {action.reset}")
    if action.remember is not None:
        r = action.remember
        how = "appends" if r.append else "remembers"
        return ActionLine(kind, f"{how} {r.from_} as {r.name}{_for(r.for_)}")
    if action.forget is not None:
        return ActionLine(kind, f"forgets {action.forget}")
    if action.suppress is not None:
        s_ = action.suppress
        if isinstance(s_, str):
            return ActionLine(kind, f"stops messages on {s_}", s_)
        return ActionLine(kind, f"stops messages on {s_.channel}{_for(s_.for_)}", s_.channel)
    if action.unsuppress is not None:
        return ActionLine(kind, f"allows messages on {action.unsuppress} again", action.unsuppress)
    if action.audience is not None:
        a = action.audience
        return ActionLine(kind, f"adds to audience {a.add}" if a.add else f"removes from audience {a.remove}")
    return ActionLine(kind, kind)  # pragma: no cover - every key is said above


def _channels(actions: list[Action], found: list[str]) -> None:
    for a in actions:
        if a.send is not None:
            arms_ = [v.channel for v in a.send.variants if v.channel]
            for name in (a.send.channel, *a.send.fallback, *arms_):
                if name not in found:
                    found.append(name)
        if a.wait is not None:
            _channels(a.wait.else_, found)


def _once(rule: Rule) -> str | None:
    if rule.once is None:
        return None
    per = {"session": "per session", "ever": "ever"}.get(rule.once.per, f"per {rule.once.per}")
    key = f" for each {rule.once.key}" if rule.once.key else ""
    return f"at most once {per}{key}"


def rule_summary(rule: Rule) -> RuleSummary:
    channels: list[str] = []
    _channels(rule.then, channels)
    return RuleSummary(
        name=rule.name,
        description=rule.description,
        events=event_list(rule.when.event),
        conditions=conditions_text(rule.when.conditions) + _any_text(rule.when.any),
        once=_once(rule),
        actions=[action_line(a) for a in rule.then],
        channels=channels,
    )


def rules_of(source: RulesetFile) -> list[RuleSummary]:
    return [rule_summary(r) for r in source.rules]


def variants_of(source: RulesetFile) -> list[VariantInfo]:
    return [VariantInfo(v.name, v.weight) for v in arms(source)]


def goal_of(source: RulesetFile) -> GoalInfo | None:
    g = source.goal
    if g is None:
        return None
    return GoalInfo(event_list(g.event), g.within, conditions_text(g.conditions), g.value)
