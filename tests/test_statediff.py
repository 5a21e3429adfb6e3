"""A contact's state written as a delta: the update, applied to the state as read, gives exactly the new
state (values, types, key order), in a small interpreter of MongoDB's update written here and in a real
mongod; and the inbox, writing deltas over many batches, stores what the rules decided."""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from bson.int64 import Int64
from bson.objectid import ObjectId
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pymongo import MongoClient
from pymongo.collection import Collection
from pymongo.synchronous.database import Database

from rulesvc.config import Settings
from rulesvc.core.events import Event
from rulesvc.core.statediff import Delta, snapshot, state_delta
from rulesvc.plugins import builtin_channels
from rulesvc.runtime.inbox import Inbox, VersionConflict
from rulesvc.runtime.rulesets import Rulesets
from rulesvc.store.db import Store
from rulesvc.store.mongod import EmbeddedMongod
from tests.helpers import an_hour_ago, write_ruleset

Doc = dict[str, Any]


# --- the judge: equal as stored, and MongoDB's update applied by hand ----------------------------------


def identical(a: Any, b: Any) -> bool:
    """Same values of the same types in the same key order (an int of 64 bits comes back as Int64: the
    driver picks the width by size, so it is an int here; NaN is NaN; -0.0 is not 0.0)."""
    a = int(a) if type(a) is Int64 else a
    b = int(b) if type(b) is Int64 else b
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(identical(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(identical(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return a == b and math.copysign(1, a) == math.copysign(1, b)
    return bool(a == b)


def deep_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [deep_copy(v) for v in value]
    return value


def apply(doc: Doc, delta: Delta) -> Doc:
    """MongoDB's `$set`/`$unset` on a copy of `doc`: a path is names joined by dots, none empty or starting
    with `$`; no path may be another's prefix; a field set that exists keeps its place, new ones go last
    (in path order, as mongod adds names); `$unset` of a missing field does nothing; a path through a
    value that is not a document is an error."""
    out = deep_copy(doc)
    paths = [*delta.set, *delta.unset]
    for path in paths:
        parts = path.split(".")
        assert all(p and not p.startswith("$") for p in parts), path
        for other in paths:
            assert other == path or not other.startswith(path + "."), (path, other)
    for path in sorted(delta.unset):
        *parents, last = path.split(".")
        node: Any = out
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    for path in sorted(delta.set):
        *parents, last = path.split(".")
        node = out
        for part in parents:
            assert isinstance(node, dict), path
            node = node.setdefault(part, {})
        assert isinstance(node, dict), path
        node[last] = delta.set[path]
    return out


# --- examples ------------------------------------------------------------------------------------------

STATE: Doc = {
    "session": {"n": 1, "started": 100.0, "last": 160.0, "ended": False},
    "counters": {"views": {"window": "session", "times": [100.0, 160.0]}},
    "values": {"cart": {"v": 120, "until": None}},
    "flags": {"vip": {"until": None}},
}


def delta_of(old: Doc | None, new: Doc) -> Delta:
    return state_delta(snapshot(old), new)


def changed(**replace: Any) -> Doc:
    new = deep_copy(STATE)
    for path, value in replace.items():
        *parents, last = path.split("__")
        node = new
        for part in parents:
            node = node[part]
        node[last] = value
    return new


def test_only_the_changed_fields_are_set() -> None:
    new = changed(session__last=200.0, counters__views__times=[100.0, 160.0, 200.0])
    delta = delta_of(STATE, new)
    assert delta.set == {"state.session.last": 200.0, "state.counters.views": new["counters"]["views"]}
    assert delta.unset == {}


def test_nothing_changed_is_an_empty_update() -> None:
    assert not delta_of(STATE, deep_copy(STATE))


def test_removed_keys_are_unset() -> None:
    new = deep_copy(STATE)
    del new["flags"]["vip"]
    del new["values"]
    delta = delta_of(STATE, new)
    assert (delta.set, delta.unset) == ({}, {"state.flags.vip": "", "state.values": ""})


@pytest.mark.parametrize("value", [120.0, True, "120", None])
def test_a_value_of_another_type_is_a_change(value: Any) -> None:
    """120, 120.0 and True are equal to Python, not as stored. (An Int64 of the same value is not a
    change: the driver chose the width, reads give the same int.)"""
    new = changed(values__cart__v=value)
    assert delta_of(STATE, new).set == {"state.values.cart": new["values"]["cart"]}


def test_a_change_deep_inside_equal_to_python_is_a_change() -> None:
    new = changed(counters__views={"window": "session", "times": [100, 160.0]})
    assert delta_of(STATE, new).set == {"state.counters.views": new["counters"]["views"]}


def test_negative_zero_is_a_change() -> None:
    old = changed(values__cart__v=0.0)
    new = changed(values__cart__v=-0.0)
    assert delta_of(old, new).set == {"state.values.cart": {"v": -0.0, "until": None}}


@pytest.mark.parametrize("key", ["a.b", "$x", "", "$"])
def test_a_key_no_path_can_name_writes_its_dict_whole(key: str) -> None:
    """An event's value (a counter's key, a channel named by a provider's report) may hold anything."""
    new = changed(counters__views__keys={key: 1.0})
    assert delta_of(STATE, new).set == {"state.counters.views": new["counters"]["views"]}
    new = deep_copy(STATE)
    new["suppressed"] = {}
    new[key] = 1
    assert delta_of(STATE, new).set == {"state": new}
    gone = deep_copy(STATE)
    gone["counters"][key] = {"n": 1}
    assert delta_of(gone, STATE).set == {"state.counters": STATE["counters"]}


def test_a_key_moved_to_the_end_writes_its_dict_whole() -> None:
    """Deleted and added again, a key goes last in Python; mongod would keep it in place."""
    new = deep_copy(STATE)
    new["session"]["n"] = new["session"].pop("n")
    assert delta_of(STATE, new).set == {"state.session": new["session"]}


def test_keys_added_together_only_in_the_order_mongod_adds_them() -> None:
    sorted_names = changed(flags={"vip": {"until": None}, "a": {}, "b": {}})
    assert delta_of(STATE, sorted_names).set == {"state.flags.a": {}, "state.flags.b": {}}
    for added in ({"b": {}, "a": {}}, {"9": {}, "10": {}}, {"1": {}, "2": {}}):
        new = changed(flags={"vip": {"until": None}, **added})
        assert delta_of(STATE, new).set == {"state.flags": new["flags"]}


def test_no_state_read_is_written_whole() -> None:
    assert delta_of(None, STATE).set == {"state": STATE}
    assert snapshot({"id": ObjectId()}) is None  # nothing the engine makes; written whole, as before
    assert delta_of([], STATE).set == {"state": STATE}  # type: ignore[arg-type]


# --- the property: the update applied to the state as read is the new state -----------------------------

KEYS = st.one_of(
    st.sampled_from(["a", "b", "n", "times", "a.b", "$x", "", "0", "9", "10", "é", "-1"]),
    st.text(st.characters(exclude_characters="\x00", exclude_categories=("Cs",)), max_size=4),
).filter(lambda k: k not in ("$ref", "$id", "$db"))  # a document with both is a DBRef to the driver
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(),
    st.text(max_size=4),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=4),
    max_leaves=10,
)
STATES = st.dictionaries(KEYS, VALUES, max_size=5)


def retyped(value: Any) -> Any:
    """Mostly equal to Python, another value as stored: 1 and 1.0 and True, 0.0 and -0.0, the same keys
    in another order."""
    if type(value) is bool:
        return int(value)
    if type(value) is int:
        return float(value)
    if type(value) is float:
        if value == 0:
            return -value
        return int(value) if value.is_integer() and abs(value) < 2**63 else value / 2
    if isinstance(value, dict) and len(value) > 1:
        return dict(reversed(list(value.items())))
    if isinstance(value, dict) and value:
        return {k: retyped(v) for k, v in value.items()}
    if isinstance(value, list) and value:
        return [retyped(value[0]), *value[1:]]
    return value


@st.composite
def changed_states(draw: st.DrawFn, value: Any, depth: int = 0) -> Any:
    """`value` as the engine might leave it: keys kept, dropped, changed, retyped, moved, added."""
    if isinstance(value, dict) and depth < 4:
        out: Doc = {}
        moved: Doc = {}
        for key, inner in value.items():
            how = draw(
                st.sampled_from(["keep", "drop", "new", "retype", "retype", "move", "deeper", "deeper"])
            )
            if how == "keep":
                out[key] = inner
            elif how == "new":
                out[key] = draw(VALUES)
            elif how == "retype":
                out[key] = retyped(inner)
            elif how == "move":
                moved[key] = inner
            elif how == "deeper":
                out[key] = draw(changed_states(inner, depth + 1))
        out.update(moved)
        for key in draw(st.lists(KEYS, max_size=3)):
            out[key] = draw(VALUES)
        return out
    return draw(st.one_of(st.just(value), VALUES))


@st.composite
def before_and_after(draw: st.DrawFn) -> tuple[Doc | None, Doc]:
    old = draw(st.one_of(st.none(), STATES))
    new = draw(changed_states(old)) if old is not None and draw(st.booleans()) else draw(STATES)
    return old, new if isinstance(new, dict) else {"v": new}


@pytest.fixture(scope="module")
def scratch(mongod: EmbeddedMongod) -> Iterator[Collection[Doc]]:
    with MongoClient(mongod.uri) as client:
        db: Database[Doc] = client[f"statediff_{uuid.uuid4().hex[:8]}"]
        yield db.contacts
        client.drop_database(db.name)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(before_and_after())
@example(({"a": {"b": [1, 2.0]}}, {"a": {"b": [1.0, 2.0]}}))  # equal to Python, below the top
@example(({"a": {"b": {"x": 1, "y": 2}}}, {"a": {"b": {"y": 2, "x": 1}}}))
@example(({"a": {"b": 0.0, "c": 1}}, {"a": {"b": -0.0, "c": 2}}))
@example(({"a": {"b": 1}}, {"a": {"b": 1, "10": 2, "9": 1}}))  # sorted, but mongod adds 9 before 10
@example(({"a": {"b": 1}}, {"a": {"b": 1, "x": 1, "10": 2}}))
@example(({"a": {"b": 1}}, {"a": {"b": 2, "c.d": 1}, "$e": {"f": 1}}))
def test_the_update_turns_the_state_read_into_the_new_one(
    scratch: Collection[Doc], case: tuple[Doc | None, Doc]
) -> None:
    old, new = case
    read = snapshot(old)
    delta = state_delta(read, new)
    for path in [*delta.set, *delta.unset]:
        assert path == "state" or path.startswith("state."), path
    assert identical(apply({} if old is None else {"state": old}, delta)["state"], new)

    _id = uuid.uuid4().hex
    if old is not None:
        scratch.insert_one({"_id": _id, "state": old, "version": 1})
    update: Doc = {"$set": {**delta.set, "version": 2}}
    if delta.unset:
        update["$unset"] = delta.unset
    scratch.update_one({"_id": _id}, update, upsert=old is None)
    stored = scratch.find_one({"_id": _id})
    assert stored is not None and identical(stored["state"], new)


# --- the inbox writes deltas, batch after batch -----------------------------------------------------------


async def test_state_written_as_deltas_is_what_the_rules_decided(settings: Settings, db: Any) -> None:
    """Counted per tag, remembered, once per tag: tags with dots and dollars, numbers, the empty one; one
    batch per event, so each writes a delta on the last; the stored state is what the rules say."""
    write_ruleset(
        Path(settings.rulesets_dir),
        "tags",
        {
            "rules": [
                {"name": "count", "when": {"event": "tagged"},
                 "then": [{"count": {"name": "tags", "per": "attributes.tag"}},
                          {"remember": {"name": "last", "from": "attributes.tag"}}]},
                {"name": "first", "when": {"event": "tagged"},
                 "once": {"per": "ever", "key": "attributes.tag"}, "then": [{"count": "firsts"}]},
            ]
        },
    )  # fmt: skip
    rulesets = Rulesets(Path(settings.rulesets_dir), builtin_channels().names())
    rulesets.reload()
    store = Store(db.client, settings.database, timedelta(days=1))
    await store.ensure_schema()
    inbox = Inbox(store, rulesets)
    t0 = an_hour_ago()
    tags = ["plain", "a.b", "$x", "", "10", "9", "plain", "a.b", "ü", "$x", "z"]
    keys: dict[str, float] = {}
    once: dict[str, Doc] = {}
    try:
        for n, tag in enumerate(tags):
            at = t0 + timedelta(minutes=n)
            event = Event(id=f"e{n}", type="tagged", contact_id="c1", time=at, attributes={"tag": tag})
            await store.insert_events([event], now=at)
            assert await inbox.process_once() == 1
            keys[tag] = at.timestamp()
            once.setdefault(f"tags/first/{tag}", {"at": at.timestamp(), "session": 1})
            state = (await db.contacts.find_one({"_id": "c1"}))["state"]
            assert identical(state["counters"]["tags"], {"window": None, "keys": keys})
            assert identical(state["counters"]["firsts"], {"window": None, "n": len(set(tags[: n + 1]))})
            assert identical(state["values"]["last"], {"v": tag, "until": None})
            assert identical(state["once"], once)
    finally:
        for compiled in rulesets.live.values():
            compiled.free()


class DeletingRulesets(Rulesets):
    """The inbox takes the engine once it has read the batch: a contact deleted right then is deleted
    between the batch's reads and its commit."""

    uri = database = ""
    deleting: str | None = None

    def engine(self) -> Any:
        if self.deleting is not None:
            with MongoClient(self.uri) as client:
                client[self.database].contacts.delete_one({"_id": self.deleting})
        return super().engine()


async def test_a_contact_gone_before_the_commit_is_a_conflict_not_a_partial_contact(
    settings: Settings, db: Any, mongod: EmbeddedMongod
) -> None:
    """Merged away or erased while a batch (whose lease ran out) decided for it: the write finds the
    version gone, as it finds another version, and the contact is not made again from part of its state."""
    write_ruleset(
        Path(settings.rulesets_dir),
        "count",
        {"rules": [{"name": "n", "when": {"event": "step"}, "then": [{"count": "steps"}]}]},
    )
    rulesets = DeletingRulesets(Path(settings.rulesets_dir), builtin_channels().names())
    rulesets.reload()
    rulesets.uri, rulesets.database = mongod.uri, settings.database
    store = Store(db.client, settings.database, timedelta(days=1))
    await store.ensure_schema()
    t0 = an_hour_ago()
    inbox = Inbox(store, rulesets, clock=lambda: t0)
    try:
        await store.insert_events([Event(id="e1", type="step", contact_id="c1", time=t0)], now=t0)
        assert await inbox.process_once() == 1
        assert (await db.contacts.find_one({"_id": "c1"}))["state"]["counters"]["steps"]["n"] == 1
        await store.insert_events([Event(id="e2", type="step", contact_id="c1", time=t0)], now=t0)
        rulesets.deleting = "c1"
        with pytest.raises(VersionConflict):
            await inbox.process_once()
        assert await db.contacts.find_one({"_id": "c1"}) is None
    finally:
        for compiled in rulesets.live.values():
            compiled.free()
