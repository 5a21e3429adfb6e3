"""Property tests: no input, however odd, crashes decoding, the ruleset compiler or the engine."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rulesvc.core.engine import CompiledRuleset, CompileError, ContactView, Engine, EngineEvent, RuleIndex
from rulesvc.core.events import MalformedBody, TooManyEvents, decode_json_body, decode_ndjson_body
from rulesvc.core.ruleformat import InvalidRuleset, parse_ruleset

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=30,
)  # fmt: skip
CHANNELS = frozenset({"log", "email", "push"})


@settings(max_examples=400, deadline=None)
@given(st.one_of(json_values, st.binary(max_size=200)))
def test_any_body_decodes_or_is_rejected_cleanly(body: Any) -> None:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    for decode in (decode_json_body, decode_ndjson_body):
        try:
            _, errors = decode(raw, 50)
        except (MalformedBody, TooManyEvents):
            continue
        for error in errors:
            assert error.path.startswith("$") and error.message


event_strategy = st.fixed_dictionaries(
    {"id": st.text(min_size=1, max_size=10), "type": st.sampled_from(["cart_updated", "t", "price_changed"]),
     "contact_id": st.one_of(st.none(), st.text(min_size=1, max_size=8)), "attributes": json_values},
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(st.lists(event_strategy, max_size=5))
def test_event_batches_are_accepted_or_every_error_is_named(batch: list[dict[str, Any]]) -> None:
    events, errors = decode_json_body(json.dumps(batch).encode(), 100)
    bad = {e.index for e in errors}
    assert bad <= set(range(len(batch)))
    if not errors:
        assert len(events) == len(batch)


PATHS = st.sampled_from(
    ["attributes.a", "attributes.b.c", "contact.consent.email", "flags.f", "counters.n", "values.v",
     "event.local_hour", "session.new", "bad path", "attributes."]
)  # fmt: skip
FLOATS = st.floats(allow_nan=False, allow_infinity=False, width=32)
SCALARS = st.one_of(st.booleans(), st.integers(-(2**40), 2**40), FLOATS, st.text(max_size=8))
OPS = st.dictionaries(
    st.sampled_from(["eq", "ne", "lt", "lte", "gt", "gte", "in", "contains", "exists", "same_as", "nope"]),
    st.one_of(SCALARS, st.lists(SCALARS, max_size=3), PATHS),
    max_size=3,
)
ACTIONS = st.one_of(
    st.fixed_dictionaries({"send": st.fixed_dictionaries(
        {"channel": st.sampled_from(["log", "push", "fax"]), "template": st.just("t")},
        optional={"after": st.sampled_from(["1s", "2d", "x"])})}),
    st.fixed_dictionaries({"count": st.sampled_from(["n", "N!"])}),
    st.fixed_dictionaries({"set_flag": st.just("f")}),
    st.fixed_dictionaries({"remember": st.fixed_dictionaries({"name": st.just("v"), "from": PATHS})}),
    st.fixed_dictionaries({"wait": st.fixed_dictionaries({"event": st.sampled_from(["t", ["t", "u"], []]),
                                                          "within": st.just("1h"),
                                                          "else": st.just([{"set_flag": "g"}])})}),
    json_values,
)  # fmt: skip
RULESETS = st.fixed_dictionaries(
    {"rules": st.lists(st.fixed_dictionaries({
        "name": st.sampled_from(["a", "b", "B"]),
        "when": st.fixed_dictionaries({
            "event": st.sampled_from(["t", ["t", "u"], "9"]),
            "conditions": st.dictionaries(PATHS, st.one_of(SCALARS, OPS), max_size=3)}),
        "then": st.lists(ACTIONS, min_size=0, max_size=3)}), min_size=0, max_size=3)},
)  # fmt: skip


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(RULESETS, json_values), st.lists(json_values, max_size=3))
def test_rulesets_load_whole_or_not_at_all_and_never_crash(source: Any, attributes: list[Any]) -> None:
    data = json.dumps(source).encode()
    try:
        compiled = CompiledRuleset.compile("fuzz", "v", parse_ruleset("fuzz.json", data, CHANNELS))
    except InvalidRuleset as exc:
        assert exc.errors and all(e.path.startswith("$") for e in exc.errors)
        return
    except CompileError as exc:
        assert exc.path.startswith("$.rules[")
        return
    try:
        engine = Engine(RuleIndex([compiled]))
        contact = ContactView("c", {"consent": {"email": True}}, {})
        now = datetime.now(UTC)
        for i, attrs in enumerate(attributes):
            attrs = attrs if isinstance(attrs, dict) else {"a": attrs}
            engine.evaluate(EngineEvent(f"e{i}", "t", "c", now, attrs), contact, now)
        msgspec.json.encode(contact.state)  # the state stays storable
    finally:
        compiled.free()
