"""Anonymous contacts and what of one carries over when it turns out to be a known contact.

A visitor who is not signed in is the contact `anon:<anonymousId>`; on identify/alias it is merged into
the known contact (`rulesvc.runtime.identity`). These are the merge's decisions, pure: the rules' state
(flags, counters, remembered values...) is combined so that nothing either contact earned is lost, and
of two waiting sends with the same key (the same reminder armed on both) only the later one stays, as a
repeat trigger would have left it: the contact is then never reminded twice of one thing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import msgspec

from rulesvc.core.contacts import PROFILE_FIELDS
from rulesvc.core.engine import MAX_COUNTER_TIMES, armed_at

ANONYMOUS_PREFIX = "anon:"

Doc = dict[str, Any]


def anonymous_contact_id(anonymous_id: str) -> str:
    """The contact an event with only an `anonymousId` belongs to until it is linked."""
    return f"{ANONYMOUS_PREFIX}{anonymous_id}"


def is_anonymous(contact_id: str | None) -> bool:
    return contact_id is not None and contact_id.startswith(ANONYMOUS_PREFIX)


class LinkResult(msgspec.Struct, omit_defaults=True):
    """What `link` did. `contact_id` is the known contact the anonymous one belongs to: the first link
    made for it, which a later identify naming another contact does not change (`conflict` then names
    that other contact, and nothing moves to it). `moved` counts the documents moved per collection."""

    anonymous_contact_id: str
    contact_id: str
    linked: bool  # this call made the link (False: it was there already)
    merged: bool  # everything of the anonymous contact is now the known one's (False: left to a retry)
    conflict: str | None = None
    moved: dict[str, int] = msgspec.field(default_factory=dict)


def link_problem(anonymous_contact_id: str, known_contact_id: str) -> str | None:
    """Why these two ids cannot be linked; None when they can."""
    if not is_anonymous(anonymous_contact_id):
        return f"`{anonymous_contact_id}` is not an anonymous contact id (`{ANONYMOUS_PREFIX}...`)"
    if is_anonymous(known_contact_id):
        return f"`{known_contact_id}` is an anonymous contact id: link an anonymous contact to a known one"
    return None


# --- state -------------------------------------------------------------------------------------------


def _later_until(a: Doc, b: Doc) -> Doc:
    """Of two marks with an `until` (None: for ever), the one that lasts longer."""
    ua, ub = a.get("until"), b.get("until")
    if ua is None:
        return a
    if ub is None:
        return b
    return a if ua >= ub else b


def _merge_counter(known: Doc, anon: Doc) -> Doc:
    """Counts add up; windowed times and per-key times are joined. Counters of different shapes (the
    ruleset changed between them) keep the known contact's."""
    if known.get("window") != anon.get("window"):
        return known
    if "n" in known and "n" in anon:
        return {**known, "n": int(known["n"]) + int(anon["n"])}
    if "times" in known and "times" in anon:
        return {**known, "times": sorted([*known["times"], *anon["times"]])[-MAX_COUNTER_TIMES:]}
    if "keys" in known and "keys" in anon:
        keys = dict(known["keys"])
        for key, at in anon["keys"].items():
            keys[key] = max(at, keys.get(key, at))
        newest = sorted(keys.items(), key=lambda kv: kv[1])[-MAX_COUNTER_TIMES:]
        return {**known, "keys": dict(newest)}
    return known


def _merge_value(known: Doc, anon: Doc) -> Doc:
    """A remembered list joins both (the known's first, no duplicates); any other value is the anonymous
    contact's: it is what the visitor did just before signing in (the cart they are about to buy)."""
    kv, av = known.get("v"), anon.get("v")
    if isinstance(kv, list) and isinstance(av, list):
        joined = [*kv, *(v for v in av if v not in kv)]
        return {"v": joined, "until": _later_until(known, anon).get("until")}
    return anon


def _merge_session(known: Doc | None, anon: Doc | None) -> tuple[Doc | None, dict[str, int]]:
    """One session: the later one goes on, numbered after both (so a rule `once per session` that fired
    in an earlier session of either may fire again, and one that fired in the current one may not).
    Returns the session and how each side's current session number is renumbered."""
    if known is None or anon is None:
        return known or anon, {}
    current = known if known.get("last", 0.0) >= anon.get("last", 0.0) else anon
    n = int(known.get("n", 0)) + int(anon.get("n", 0))
    side = "known" if current is known else "anon"
    return {**current, "n": n}, {side: int(current.get("n", 0))}


def merge_state(known: Mapping[str, Any], anon: Mapping[str, Any]) -> Doc:
    """The known contact's rule state after the anonymous one's is merged in: flags, suppressions,
    `once` marks, audiences and journeys of both (of two, the one that lasts longer or came later);
    counters added up; remembered values as `_merge_value` says; A/B arms the known contact's where it
    has one (a person keeps one arm), else the anonymous contact's."""
    merged: Doc = {k: v for k, v in known.items()}
    for key in ("flags", "suppressed"):
        marks = dict(known.get(key) or {})
        for name, mark in (anon.get(key) or {}).items():
            marks[name] = _later_until(marks[name], mark) if name in marks else mark
        if marks:
            merged[key] = marks
    counters = dict(known.get("counters") or {})
    for name, counter in (anon.get("counters") or {}).items():
        counters[name] = _merge_counter(counters[name], counter) if name in counters else counter
    if counters:
        merged["counters"] = counters
    values = dict(known.get("values") or {})
    for name, value in (anon.get("values") or {}).items():
        values[name] = _merge_value(values[name], value) if name in values else value
    if values:
        merged["values"] = values
    session, renumbered = _merge_session(known.get("session"), anon.get("session"))
    if session is not None:
        merged["session"] = session
    once: Doc = {}
    for side, marks in (("known", known.get("once") or {}), ("anon", anon.get("once") or {})):
        for key, mark in marks.items():
            if side in renumbered and mark.get("session") == renumbered[side] and session is not None:
                mark = {**mark, "session": session["n"]}
            if key not in once or mark.get("at", 0.0) > once[key].get("at", 0.0):
                once[key] = mark
    if once:
        merged["once"] = once
    audiences = dict(anon.get("audiences") or {})
    audiences.update(known.get("audiences") or {})
    for name, mark in (anon.get("audiences") or {}).items():
        if mark.get("since", 0.0) < audiences[name].get("since", 0.0):
            audiences[name] = mark  # a member since the earlier of the two
    if audiences:
        merged["audiences"] = audiences
    journeys = dict(known.get("journeys") or {})
    for name, journey in (anon.get("journeys") or {}).items():
        if name not in journeys or journey.get("at", 0.0) > journeys[name].get("at", 0.0):
            journeys[name] = journey  # the later entry: a goal reached now is credited to it
    if journeys:
        merged["journeys"] = journeys
    arms = {**(anon.get("arms") or {}), **(known.get("arms") or {})}
    if arms:
        merged["arms"] = arms
    return merged


def joined_audiences(known: Mapping[str, Any], anon: Mapping[str, Any]) -> list[str]:
    """The audiences the anonymous contact was in and the known one was not: the ad platforms learn of
    these members only now (an anonymous contact has no address to send them)."""
    return sorted(set(anon.get("audiences") or {}) - set(known.get("audiences") or {}))


def merge_profile(known: Mapping[str, Any] | None, anon: Mapping[str, Any] | None) -> Doc:
    """Profile fields to set on the known contact: what it lacks and the anonymous contact has. The
    known contact's own fields always win (its address and consent apply); `consent` and `attributes`
    are filled key by key."""
    known, anon = known or {}, anon or {}
    fields: Doc = {}
    for name in PROFILE_FIELDS:
        mine, theirs = known.get(name), anon.get(name)
        if theirs in (None, [], {}):
            continue
        if name in ("consent", "attributes"):
            combined = {**theirs, **(mine or {})}
            if combined != mine:
                fields[name] = combined
        elif mine in (None, [], {}):
            fields[name] = theirs
            if name == "email":
                fields["email_invalid"] = bool(anon.get("email_invalid"))
    return fields


# --- waiting sends -----------------------------------------------------------------------------------


def superseded(known: Iterable[Mapping[str, Any]], anon: Iterable[Mapping[str, Any]]) -> list[str]:
    """Of the two contacts' pending schedule entries, those to cancel: where both wait on one key (the
    same reminder, armed on each), the one armed earlier, as a repeat trigger re-arms; ties keep the
    known contact's. Every other entry of either goes on, now the known contact's."""
    by_key: dict[str, Mapping[str, Any]] = {e["key"]: e for e in known}
    cancel: list[str] = []
    for entry in anon:
        other = by_key.get(entry["key"])
        if other is None:
            continue
        if armed_at(entry) > armed_at(other):
            cancel.append(str(other["_id"]))
        else:
            cancel.append(str(entry["_id"]))
    return cancel
