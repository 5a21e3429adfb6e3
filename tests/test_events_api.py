"""POST /v1/events: every status of the contract, and what ends up stored."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest

from rulesvc.config import Settings
from rulesvc.web.app import create_app
from rulesvc.web.keys import KEYS


def cart(event_id: str, contact: str = "c1", **attributes: Any) -> dict[str, Any]:
    return {"id": event_id, "type": "cart_updated", "contact_id": contact, "attributes": attributes}


async def stored_ids(db: Any) -> set[str]:
    return {d["_id"] async for d in db.events.find({}, {"_id": 1})}


async def test_single_event_accepted_and_stored_pending(client: Any, db: Any) -> None:
    before = datetime.now(UTC)
    resp = await client.post("/v1/events", json=cart("e1", value=59.9, items=[{"sku": "A", "qty": 2}]))
    assert resp.status == 202
    assert await resp.json() == {"accepted": 1, "duplicates": 0}
    doc = await db.events.find_one({"_id": "e1"})
    assert doc["type"] == "cart_updated"
    assert doc["contact_id"] == "c1"
    assert doc["attributes"] == {"value": 59.9, "items": [{"sku": "A", "qty": 2}]}
    # Stored as received; in the inbox's queue while waiting to be evaluated, or already evaluated and out
    # of it (the inbox runs beside this test).
    assert "state" not in doc
    queued = await db.inbox.find_one({"_id": "e1"})
    assert queued is None or (queued["state"], queued["contact_id"], queued["time"]) == (
        "pending",
        "c1",
        doc["time"],
    )
    assert before - timedelta(seconds=1) <= doc["time"] <= datetime.now(UTC) + timedelta(seconds=1)


async def test_array_and_given_time_with_offset(client: Any, db: Any) -> None:
    events = [
        {**cart("a1"), "time": "2026-11-20T10:00:00+01:00"},
        {"id": "a2", "type": "product_viewed", "contact_id": "c2", "attributes": {"product_id": "p1"}},
        {"id": "p-1", "type": "price_changed", "attributes": {"product_id": "p1", "price": 9.5}},
        {"id": "x-1", "type": "loyalty_tier_reached", "contact_id": "c1"},  # a custom event type
    ]
    resp = await client.post("/v1/events", json=events)
    assert resp.status == 202
    assert await resp.json() == {"accepted": 4, "duplicates": 0}
    doc = await db.events.find_one({"_id": "a1"})
    assert doc["time"] == datetime(2026, 11, 20, 9, 0, tzinfo=UTC)
    assert (await db.events.find_one({"_id": "p-1"}))["contact_id"] is None


async def test_ndjson(client: Any, db: Any) -> None:
    body = "\n".join(json.dumps(cart(f"n{i}", contact=f"c{i % 3}")) for i in range(50)) + "\n\n"
    resp = await client.post("/v1/events", data=body, headers={"Content-Type": "application/x-ndjson"})
    assert resp.status == 202
    assert await resp.json() == {"accepted": 50, "duplicates": 0}
    assert len(await stored_ids(db)) == 50


async def test_duplicates_counted_and_change_nothing(client: Any, db: Any) -> None:
    assert (await client.post("/v1/events", json=cart("d1", value=10))).status == 202
    resp = await client.post("/v1/events", json=[cart("d1", value=999), cart("d2"), cart("d2")])
    assert resp.status == 202
    assert await resp.json() == {"accepted": 1, "duplicates": 2}
    assert (await db.events.find_one({"_id": "d1"}))["attributes"] == {"value": 10}
    assert await stored_ids(db) == {"d1", "d2"}


async def test_concurrent_requests_share_writes_and_each_gets_its_own_answer(
    client: Any, db: Any, settings: Settings
) -> None:
    async def inserts() -> int:
        top = await db.client.admin.command("top")
        count: int = top["totals"].get(f"{settings.database}.events", {}).get("insert", {}).get("count", 0)
        return count

    before = await inserts()
    bodies = [cart(f"k{n}") for n in range(60)] + [[cart("same"), cart("k0")], [cart("same")]]
    answers = await asyncio.gather(*(client.post("/v1/events", json=body) for body in bodies))
    results = [await a.json() for a in answers]
    assert all(a.status == 202 for a in answers)
    assert results[:60] == [{"accepted": 1, "duplicates": 0}] * 60
    # "k0" was stored by an earlier request; "same" is in two requests: whichever is written first wins.
    assert sorted(r["accepted"] for r in results[60:]) == [0, 1]
    assert sum(r["duplicates"] for r in results[60:]) == 2
    assert await stored_ids(db) == {f"k{n}" for n in range(60)} | {"same"}
    assert await inserts() - before < len(bodies)  # requests in flight together were written together


async def test_invalid_batch_rejected_whole_with_every_error(client: Any, db: Any) -> None:
    events = [
        cart("ok-1"),
        {"id": "bad-1", "type": "cart_updated"},  # no contact
        {"id": 7, "type": "cart_updated", "contact_id": "c1"},
        {"id": "bad-3", "type": "purchased", "contact_id": "c1", "time": "yesterday"},
        {"id": "bad-4", "type": "price_changed", "contact_id": "c1", "attributes": {"product_id": "p"}},
        {"id": "bad-5", "type": "cart_updated", "contact_id": "c1", "colour": "red"},
        {"id": "bad-6", "type": "cart_updated", "contact_id": "c1", "attributes": {"n": 2**70}},
        {"id": "bad-7", "type": "cart_updated", "contact_id": "c1", "attributes": {"a": {"$gt": 1}}},
        {"id": "bad-8", "type": "has space", "contact_id": "c1"},
        {"id": "bad-9", "type": "cart_updated", "contact_id": "c1", "time": "2026-11-20T10:00:00"},
        cart("ok-2"),
    ]
    resp = await client.post("/v1/events", json=events)
    assert resp.status == 422
    body = await resp.json()
    errors = {(e["index"], e["path"]) for e in body["errors"]}
    assert errors == {
        (1, "$.contact_id"),
        (2, "$.id"),
        (3, "$.time"),
        (4, "$.contact_id"),
        (5, "$"),
        (6, "$.attributes.n"),
        (7, "$.attributes.a"),
        (8, "$.type"),
        (9, "$.time"),
    }
    assert all(e["message"] for e in body["errors"])
    assert "colour" in next(e["message"] for e in body["errors"] if e["index"] == 5)
    assert await stored_ids(db) == set()  # nothing of the batch, not even the valid ones


async def test_a_single_invalid_event_is_reported_as_an_event(client: Any, db: Any) -> None:
    resp = await client.post("/v1/events", json={"type": "cart_updated", "contact_id": "c1"})
    assert resp.status == 422
    [error] = (await resp.json())["errors"]
    assert (error["index"], error["path"]) == (0, "$")
    assert "`id`" in error["message"] and "array" not in error["message"]
    resp = await client.post("/v1/events", json={"id": "s1", "type": "cart_updated", "contact_id": 5})
    assert [(e["path"], "str" in e["message"]) for e in (await resp.json())["errors"]] == [
        ("$.contact_id", True)
    ]
    assert await stored_ids(db) == set()


async def test_invalid_ndjson_line_reports_its_index(client: Any, db: Any) -> None:
    body = "\n".join([json.dumps(cart("l1")), json.dumps({"id": "l2", "type": "cart_updated"})])
    resp = await client.post("/v1/events", data=body, headers={"Content-Type": "application/x-ndjson"})
    assert resp.status == 422
    assert (await resp.json())["errors"] == [
        {"index": 1, "path": "$.contact_id", "message": "required for event type `cart_updated`"}
    ]
    assert await stored_ids(db) == set()


@pytest.mark.parametrize(
    ("body", "content_type", "where"),
    [
        (b'{"id": "x", "type": }', "application/json", "byte 20"),
        (b'[{"id": "x",', "application/json", "byte 12"),
        (b'{"id":"a","type":"t","contact_id":"c"}\n{"id": oops}\n', "application/x-ndjson", "line 2"),
        (b"", "application/json", "byte 0"),
    ],
)
async def test_malformed_json_400_with_position(
    client: Any, db: Any, body: bytes, content_type: str, where: str
) -> None:
    resp = await client.post("/v1/events", data=body, headers={"Content-Type": content_type})
    assert resp.status == 400
    message = (await resp.json())["error"]
    assert message.startswith("malformed JSON")
    assert where in message
    assert await stored_ids(db) == set()


async def test_wrong_content_type_415(client: Any) -> None:
    resp = await client.post(
        "/v1/events", data=json.dumps(cart("t1")), headers={"Content-Type": "text/plain"}
    )
    assert resp.status == 415
    assert "application/json" in (await resp.json())["error"]
    resp = await client.post("/v1/events", data=json.dumps(cart("t1")).encode())  # octet-stream
    assert resp.status == 415


async def test_empty_array_422(client: Any) -> None:
    resp = await client.post("/v1/events", json=[])
    assert resp.status == 422


async def test_body_over_limit_413(make_client: Any, settings: Settings, db: Any) -> None:
    small = msgspec.structs.replace(settings, max_body_bytes=4096, max_batch_events=5)
    client = await make_client(create_app(small))
    resp = await client.post("/v1/events", json=cart("big", blob="x" * 5000))
    assert resp.status == 413
    assert "4096" in (await resp.json())["error"]
    resp = await client.post("/v1/events", json=[cart(f"m{i}") for i in range(6)])
    assert resp.status == 413
    assert "limit is 5" in (await resp.json())["error"]
    assert await stored_ids(db) == set()
    assert (await client.post("/v1/events", json=[cart(f"m{i}") for i in range(5)])).status == 202


async def test_contact_events_newest_first(client: Any) -> None:
    events = [{**cart(f"h{i}"), "time": f"2026-11-2{i}T12:00:00Z"} for i in range(4)]
    events.append({**cart("other", contact="c9")})
    assert (await client.post("/v1/events", json=events)).status == 202
    resp = await client.get("/v1/contacts/c1/events", params={"limit": "3"})
    assert resp.status == 200
    assert [e["id"] for e in (await resp.json())["events"]] == ["h3", "h2", "h1"]
    resp = await client.get("/v1/contacts/c1/events", params={"before": "2026-11-21T12:00:00Z"})
    assert [e["id"] for e in (await resp.json())["events"]] == ["h0"]
    assert (await client.get("/v1/contacts/c1/events", params={"limit": "0"})).status == 422
    assert (await client.get("/v1/contacts/c1/events", params={"before": "soon"})).status == 422


async def test_size_limits_inside_events(client: Any, db: Any) -> None:
    events = [
        cart("k1", **{f"a{i}": i for i in range(257)}),
        cart("k2", note="x" * 16_385),
        cart("k3", items=list(range(1001))),
        cart("k4", deep={"a": {"b": {"c": {"d": {"e": {"f": {"g": {"h": 1}}}}}}}}),
    ]
    resp = await client.post("/v1/events", json=events)
    assert resp.status == 422
    errors = {(e["index"], e["path"]): e["message"] for e in (await resp.json())["errors"]}
    assert errors == {
        (0, "$.attributes"): "more than 256 keys",
        (1, "$.attributes.note"): "string longer than 16384 characters",
        (2, "$.attributes.items"): "more than 1000 items",
        (3, "$.attributes.deep.a.b.c.d.e.f.g"): "nested deeper than 8 levels",
    }
    assert await stored_ids(db) == set()


async def test_rate_limit_per_key(make_client: Any, settings: Settings) -> None:
    # One request per 100 s (a burst of one): how many requests fit in a second of this machine's
    # clock does not matter.
    client = await make_client(create_app(msgspec.structs.replace(settings, rate_limit=0.01)))
    assert (await client.get("/v1/contacts/c1/events")).status == 200
    resp = await client.get("/v1/contacts/c1/events")
    assert resp.status == 429
    assert await resp.json() == {"error": "rate limit for this API key exceeded"}
    assert 1 <= int(resp.headers["Retry-After"]) <= 100  # whole seconds until a request is allowed again
    other, _ = await client.server.app[KEYS].create("admin")  # another key has its own budget
    headers = {"Authorization": f"Bearer {other}"}
    assert (await client.get("/v1/contacts/c1/events", headers=headers)).status == 200


async def test_unstorable_keys_in_a_contact_are_422_not_500(client: Any) -> None:
    """Found by the schemathesis run: a NUL in an attribute key reached MongoDB and came back as a 500."""
    resp = await client.put("/v1/contacts/c1", json={"attributes": {"ok": {"bad\u0000key": 1}, "$where": 2}})
    assert resp.status == 422
    assert {e["path"] for e in (await resp.json())["errors"]} == {"$.attributes.ok", "$.attributes"}
    assert (await client.get("/v1/contacts/c1")).status == 404  # nothing stored
