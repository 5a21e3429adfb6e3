"""Property: whatever a careless or hostile client puts in an event's attributes and time fields, each
event is refused with a 4xx, or accepted and then decided or quarantined, and a normal event posted after
them is still decided within seconds. A live service process with every shipped ruleset, on a real mongod.

`RULESVC_LONG_FUZZ=1` runs ten times as many examples."""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rulesvc.core.events import KNOWN_EVENT_TYPES
from rulesvc.store.mongod import EmbeddedMongod
from tests.helpers import wait_for
from tests.service import ServiceProcess

pytestmark = pytest.mark.slow
EXAMPLES = 1500 if os.environ.get("RULESVC_LONG_FUZZ") else 150

# What the shipped rulesets read from events, so the junk reaches conditions, timers and actions.
ATTRIBUTE_KEYS = ["value", "product_id", "message_id", "expires_at", "status", "order_id", "channel",
                  "items", "price", "previous_price", "in_stock", "quantity", "expected_date", "code",
                  "points_used", "promo_code", "url", "page", "category", "created_at", "sku"]  # fmt: skip

EDGES = ["9999-12-31T23:59:59Z", "0001-01-01T00:00:00+01:00", "1970-01-01T00:00:00Z", "today", "",
         "2199-12-31T23:59:59-23:59", "2026-11-26T10:00:00", "\x00", "p\x00"]  # fmt: skip
junk_text = st.text(max_size=8)
# Mostly well-formed around the junk, so that most events get past the door and reach the engine.
names = st.one_of(st.text("abcdefghij_", min_size=1, max_size=8), junk_text)
json_leaf = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from([1e300, -1e300, 1e308, 5e-324, 0.0, -0.0, 2**63, -(2**63) - 1, 253402300800])
    | st.text(max_size=30)
    | st.sampled_from(EDGES)
)
json_value = st.recursive(
    json_leaf,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(names, inner, max_size=4),
    max_leaves=12,
)
times = (
    st.none()
    | json_value
    | st.datetimes(timezones=st.timezones()).map(lambda d: d.isoformat())
    | st.sampled_from(EDGES)
)


@st.composite
def events(draw: st.DrawFn) -> dict[str, Any]:
    often = st.integers(0, 9).map(lambda n: n < 8)
    known = st.sampled_from(sorted(KNOWN_EVENT_TYPES))
    event_type = draw(known if draw(often) else st.text(min_size=1, max_size=10))
    keys = st.sampled_from(ATTRIBUTE_KEYS) if draw(often) else names
    attributes = draw(st.dictionaries(keys, json_value, max_size=6))
    event: dict[str, Any] = {"type": event_type, "attributes": attributes}
    if draw(often):
        event["contact_id"] = draw(st.sampled_from(["fz-1", "fz-2", "fz-3", "fz-4"]))
    if not draw(often):
        event["time"] = draw(times)
    if draw(st.integers(0, 9)) == 9:  # now and then the junk is the attributes object itself
        event["attributes"] = draw(json_value)
    return event


@pytest.fixture(scope="module")
def service(mongod: EmbeddedMongod, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    rulesets = Path(__file__).parent.parent / "rulesets"
    env = {"MONGODB_URI": mongod.uri, "RULESVC_DATABASE": "event_properties",
           "RULESVC_RULESETS_DIR": str(rulesets), "RULESVC_RATE_LIMIT": "0"}  # fmt: skip
    process = ServiceProcess(tmp_path_factory.mktemp("event-properties"), env=env)
    process.start()
    process.key = process.cli("keys", "create", "--scope", "admin", "--name", "fuzz").stdout.splitlines()[-1]
    yield process
    process.stop()


def states(service: ServiceProcess, contact: str) -> dict[str, str]:
    status, body = service.request("GET", f"/v1/contacts/{contact}/events?limit=500")
    assert status == 200, body
    return {e["id"]: e.get("state", "") for e in body["events"]}


def test_any_event_is_refused_or_decided_or_quarantined_and_the_next_one_is_decided(
    service: ServiceProcess,
) -> None:
    accepted: dict[str, str] = {}  # event id -> contact

    @given(events())
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def post(event: dict[str, Any]) -> None:
        event = {"id": uuid.uuid4().hex, **event}  # hypothesis repeats examples; each post is a new event
        status, body = service.request("POST", "/v1/events", event)
        assert status in (202, 400, 413, 422), (status, body, event)
        if status >= 400:
            assert isinstance(body["error"], str) and body["error"]
        elif body["accepted"] and isinstance(event.get("contact_id"), str):
            accepted[event["id"]] = event["contact_id"]

    post()
    assert accepted, "no generated event was accepted: the property says nothing"

    control = {
        "id": "control-1",
        "type": "cart_updated",
        "contact_id": "fz-control",
        "attributes": {"value": 20},
    }
    assert service.request("POST", "/v1/events", control)[0] == 202
    wait_for(lambda: states(service, "fz-control").get("control-1") == "done",
             what="a normal event decided, not stuck behind the junk")  # fmt: skip

    deadline = time.monotonic() + 30
    while True:
        found = {eid: state for c in set(accepted.values()) for eid, state in states(service, c).items()}
        open_ = {eid: found.get(eid) for eid in accepted if found.get(eid) not in ("done", "quarantined")}
        if not open_:
            break
        assert time.monotonic() < deadline, f"accepted events neither decided nor quarantined: {open_}"
        time.sleep(0.2)
    status, body = service.request("GET", "/v1/events/quarantine?limit=500")
    assert status == 200
    quarantined = {e["id"] for e in body["events"]}
    assert quarantined <= set(accepted) | {e["id"] for e in body["events"] if e["contact_id"] is None}
    assert all(e["error"] for e in body["events"])
    print(json.dumps({"accepted": len(accepted), "quarantined": len(quarantined)}))
