"""One bad event never stalls the others: refused at the door where it can be, else set aside with its
error after a few attempts (quarantine), listed, retried and dropped by an admin, and reported by
/readyz and /metrics. Real mongod, the real app."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from rulesvc.config import Settings
from rulesvc.store.db import MAX_ATTEMPTS
from rulesvc.store.mongod import free_port
from rulesvc.web.app import create_app
from rulesvc.web.keys import FANOUT, KEYS
from tests.helpers import eventually, write_ruleset
from tests.stored import event_states, plant

Client = TestClient[Any, Any]

SEEN = {
    "rules": [
        {
            "name": "seen",
            "when": {"event": "product_viewed"},
            "then": [
                {"remember": {"name": "last", "from": "attributes.product_id", "for": "30d"}},
                {"send": {"channel": "inapp", "template": "seen", "transactional": True}},
            ],
        }
    ]
}


@pytest.fixture
async def live(make_client: Any, settings: Settings) -> Client:
    rulesets = Path(settings.rulesets_dir)
    write_ruleset(rulesets, "seen", SEEN)
    (rulesets / "templates").mkdir(exist_ok=True)
    (rulesets / "templates" / "seen.title").write_text("Seen")
    (rulesets / "templates" / "seen.body").write_text("You looked")
    return await make_client(create_app(settings))  # type: ignore[no-any-return]


def stored_event(
    event_id: str, type_: str, contact: str | None, at: datetime, **attributes: Any
) -> dict[str, Any]:
    """An event as the inbox finds it, written past the API: what ingest validation cannot catch
    (stored by an older version, or a gap in the checks) must still not stall anything."""
    return {"_id": event_id, "type": type_, "contact_id": contact, "time": at, "attributes": attributes,
            "received_at": datetime.now(UTC), "state": "pending"}  # fmt: skip


async def states(db: Any, ids: list[str]) -> dict[str, str]:
    return await event_states(db, ids)


async def metric(client: Client, name: str) -> float:
    text = await (await client.get("/metrics")).text()
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


# --- refused at the door ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("event", "path"),
    [
        ({"type": "product_viewed", "contact_id": "c", "time": "9999-12-31T23:59:59Z"}, "$.time"),
        ({"type": "product_viewed", "contact_id": "c", "time": "0001-01-01T00:00:00+01:00"}, "$.time"),
        ({"type": "product_viewed", "contact_id": "c", "time": "1969-12-31T23:59:59Z"}, "$.time"),
        (
            {"type": "voucher_issued", "contact_id": "c", "attributes": {"expires_at": 1e300}},
            "$.attributes.expires_at",
        ),
        (
            {
                "type": "voucher_issued",
                "contact_id": "c",
                "attributes": {"expires_at": "9999-01-01T00:00:00Z"},
            },
            "$.attributes.expires_at",
        ),
        (
            {"type": "message_opened", "contact_id": "c", "attributes": {"message_id": ["m1"]}},
            "$.attributes.message_id",
        ),
        (
            {"type": "message_opened", "contact_id": "c", "attributes": {"message_id": {"$gt": ""}}},
            "$.attributes.message_id",
        ),
        ({"type": "cart_updated", "contact_id": "c", "attributes": {"value": "1e400"}}, "$.attributes[...]"),
    ],
)
async def test_what_the_engine_cannot_compute_with_is_refused_with_its_path(
    client: Client, event: dict[str, Any], path: str
) -> None:
    # JSON allows 1e400, which decodes to infinity: sent as the raw number.
    body = json.dumps({"id": "e1", **event}).replace('"1e400"', "1e400")
    response = await client.post("/v1/events", data=body, headers={"Content-Type": "application/json"})
    assert response.status == 422
    errors = (await response.json())["errors"]
    assert [e["path"] for e in errors] == [path], errors


async def test_times_at_the_edges_of_the_range_are_accepted(client: Client) -> None:
    events = [
        {"id": "a", "type": "product_viewed", "contact_id": "c", "time": "1970-01-01T00:00:00Z"},
        {"id": "b", "type": "product_viewed", "contact_id": "c", "time": "2199-12-31T23:59:59Z"},
        {"id": "c", "type": "voucher_issued", "contact_id": "c", "attributes": {"expires_at": 4102444800}},
        {"id": "d", "type": "custom", "contact_id": "c", "attributes": {"created_at": "not a time"}},
    ]
    response = await client.post("/v1/events", json=events)
    assert response.status == 202, await response.text()


# --- quarantine -------------------------------------------------------------------------------------


async def test_an_event_that_fails_is_quarantined_while_its_batch_and_its_contact_go_on(
    live: Client, db: Any
) -> None:
    now = datetime.now(UTC)
    # Year 9999 passes BSON but overflows when the rule remembers a value "for 30 days".
    await plant(
        db,
        [
            stored_event(
                "bad", "product_viewed", "c-bad", datetime(9999, 12, 31, 23, 59, 59), product_id="p"
            ),
            stored_event("later", "product_viewed", "c-bad", now + timedelta(seconds=1), product_id="p"),
        ],
    )
    good = [{"id": f"g{i}", "type": "product_viewed", "contact_id": f"c{i}"} for i in range(5)]
    assert (await live.post("/v1/events", json=good)).status == 202
    ids = ["bad", "later", *(g["id"] for g in good)]

    async def settled() -> bool:
        found = await states(db, ids)
        return found.get("bad") == "quarantined" and all(found.get(i) == "done" for i in ids[1:])

    await eventually(settled)
    bad = await db.inbox.find_one({"_id": "bad"})  # its queue document keeps its failures
    assert bad["attempts"] == MAX_ATTEMPTS
    assert "OverflowError" in bad["error"]
    # The others got their messages; the bad contact's later event too.
    messages = {m["contact_id"] async for m in db.messages.find({"template": "seen"})}
    assert messages == {"c-bad", *(f"c{i}" for i in range(5))}

    listed = await (await live.get("/v1/events/quarantine")).json()
    assert [(e["id"], e["stage"], e["attempts"]) for e in listed["events"]] == [
        ("bad", "inbox", MAX_ATTEMPTS)
    ]
    assert "OverflowError" in listed["events"][0]["error"]
    assert listed["events"][0]["contact_id"] == "c-bad"

    ready = await live.get("/readyz")
    body = await ready.json()
    assert ready.status == 200 and body["status"] == "degraded", body
    assert "1 in the last" in body["checks"]["quarantine"]
    assert body["reasons"] == ["1 event(s) quarantined in the last 1 h; see GET /v1/events/quarantine"]
    assert await metric(live, 'rulesvc_events_quarantined_total{stage="inbox"}') == 1
    assert await metric(live, "rulesvc_events_quarantine_size") == 1

    # Retry: back to the inbox with a clean slate, fails again the same way, quarantined again.
    answer = await live.post("/v1/events/quarantine/retry", json={"ids": ["bad", "unknown"]})
    assert (answer.status, await answer.json()) == (200, {"retried": 1})

    async def quarantined_again() -> bool:
        doc = await db.inbox.find_one({"_id": "bad"})
        return bool(doc["state"] == "quarantined" and doc.get("retried_at"))

    await eventually(quarantined_again)
    assert await metric(live, 'rulesvc_events_quarantined_total{stage="inbox"}') == 2

    answer = await live.post("/v1/events/quarantine/drop", json={"all": True})
    assert (answer.status, await answer.json()) == (200, {"dropped": 1})
    assert (await (await live.get("/v1/events/quarantine")).json())["events"] == []
    assert (await states(db, ["bad"])) == {"bad": "dropped"}
    body = await (await live.get("/readyz")).json()
    assert (body["status"], body["reasons"]) == ("ok", []), body


async def test_a_retried_event_that_now_succeeds_is_decided(live: Client, db: Any) -> None:
    now = datetime.now(UTC)
    quarantined = {
        "state": "quarantined",
        "quarantined_at": now,
        "attempts": 3,
        "error": "x",
        "stage": "inbox",
    }
    await plant(db, [{**stored_event("q", "product_viewed", "c1", now, product_id="p"), **quarantined}])
    assert (await live.post("/v1/events/quarantine/retry", json={"all": True})).status == 200

    async def decided() -> bool:
        return await states(db, ["q"]) == {"q": "done"}

    await eventually(decided)
    assert await db.messages.count_documents({"contact_id": "c1", "template": "seen"}) == 1


@pytest.mark.parametrize(
    "body", [{}, {"ids": ["a"], "all": True}, {"ids": "a"}, {"all": True, "extra": 1}, {"ids": [""]}]
)
async def test_a_quarantine_action_names_its_events_or_all(client: Client, body: dict[str, Any]) -> None:
    response = await client.post("/v1/events/quarantine/retry", json=body)
    assert response.status == 422
    assert (await response.json())["error"]


async def test_the_quarantine_is_for_admins(client: Client) -> None:
    key, _ = await client.app[KEYS].create("ingest", "shop")
    headers = {"Authorization": f"Bearer {key}"}
    assert (await client.get("/v1/events/quarantine", headers=headers)).status == 403
    assert (
        await client.post("/v1/events/quarantine/drop", json={"all": True}, headers=headers)
    ).status == 403


async def test_a_catalog_event_that_fails_is_set_aside_and_the_next_fans_out(live: Client, db: Any) -> None:
    live.app[FANOUT].retry_pause = timedelta(0)
    await plant(
        db,
        [stored_event("old-price", "price_changed", None, datetime(1, 1, 1, 0, 30), product_id="p", price=5)],
    )
    good = {"id": "stock", "type": "stock_changed", "attributes": {"product_id": "p2", "in_stock": True}}
    assert (await live.post("/v1/events", json=good)).status == 202

    async def settled() -> bool:
        return await states(db, ["old-price", "stock"]) == {"old-price": "quarantined", "stock": "done"}

    await eventually(settled)
    listed = (await (await live.get("/v1/events/quarantine")).json())["events"]
    assert [(e["id"], e["stage"]) for e in listed] == [("old-price", "fanout")]
    assert await metric(live, 'rulesvc_events_quarantined_total{stage="fanout"}') == 1


async def test_an_event_whose_decision_cannot_be_stored_is_found_and_quarantined(
    make_client: Any, settings: Settings, db: Any
) -> None:
    """Evaluation succeeds, the commit refuses the batch: each contact is tried alone, the event at fault
    is found one at a time and set aside; its own contact's other events and the batch go on. Here a
    per-product counter keyed by a product id with a NUL, which no BSON key may hold."""
    write_ruleset(
        Path(settings.rulesets_dir),
        "count",
        {
            "rules": [
                {
                    "name": "views",
                    "when": {"event": "product_viewed"},
                    "then": [{"count": {"name": "products", "per": "attributes.product_id"}}],
                }
            ]
        },
    )
    client = await make_client(create_app(settings))
    now = datetime.now(UTC)
    at = [(now + timedelta(seconds=i)).isoformat() for i in range(3)]
    events = [
        {"id": "fine-1", "type": "product_viewed", "contact_id": "c1", "attributes": {"product_id": "p1"}},
        {"id": "poison", "type": "product_viewed", "contact_id": "c2", "time": at[0],
         "attributes": {"product_id": "p\x00"}},
        {"id": "fine-2", "type": "product_viewed", "contact_id": "c2", "time": at[1],
         "attributes": {"product_id": "p2"}},
        {"id": "fine-3", "type": "product_viewed", "contact_id": "c3", "attributes": {"product_id": "p3"}},
    ]  # fmt: skip
    assert (await client.post("/v1/events", json=events)).status == 202

    async def settled() -> bool:
        found = await states(db, ["fine-1", "poison", "fine-2", "fine-3"])
        return found == {"fine-1": "done", "poison": "quarantined", "fine-2": "done", "fine-3": "done"}

    await eventually(settled)
    contact = await db.contacts.find_one({"_id": "c2"})
    assert list(contact["state"]["counters"]["products"]["keys"]) == ["p2"]
    listed = (await (await client.get("/v1/events/quarantine")).json())["events"]
    assert [e["id"] for e in listed] == ["poison"]
    assert "InvalidDocument" in listed[0]["error"]


def cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MONGODB_URI": settings.mongodb_uri or "", "RULESVC_DATABASE": settings.database}
    return subprocess.run(
        [sys.executable, "-m", "rulesvc", "events", "quarantine", *args],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


async def test_an_operator_lists_retries_and_drops_from_the_shell(settings: Settings, db: Any) -> None:
    now = datetime.now(UTC)
    for i, error in enumerate(["OverflowError: date value out of range", "TypeError: unhashable type"]):
        quarantined = {"state": "quarantined", "stage": "inbox", "attempts": 3, "error": error}
        await plant(
            db, [{**stored_event(f"q{i}", "product_viewed", f"c{i}", now), **quarantined,
                  "quarantined_at": now - timedelta(minutes=i)}]
        )  # fmt: skip

    listed = await asyncio.to_thread(cli, settings, "list")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].startswith("q0  product_viewed  contact=c0") and "OverflowError" in lines[1]
    assert lines[2].startswith("q1  product_viewed  contact=c1") and "TypeError" in lines[3]
    as_json = json.loads((await asyncio.to_thread(cli, settings, "list", "--json")).stdout)
    assert [e["id"] for e in as_json] == ["q0", "q1"]

    refused = await asyncio.to_thread(cli, settings, "retry")
    assert refused.returncode == 2 and "--all" in refused.stderr
    retried = await asyncio.to_thread(cli, settings, "retry", "q1")
    assert (retried.returncode, retried.stdout.strip()) == (0, "retried 1 event(s)")
    dropped = await asyncio.to_thread(cli, settings, "drop", "--all")
    assert (dropped.returncode, dropped.stdout.strip()) == (0, "dropped 1 event(s)")
    assert await states(db, ["q0", "q1"]) == {"q0": "dropped", "q1": "pending"}
    assert (await asyncio.to_thread(cli, settings, "list")).stdout.strip() == "no quarantined events"


def test_the_shell_commands_say_when_mongodb_is_away(tmp_path: Path) -> None:
    away = f"mongodb://127.0.0.1:{free_port()}/?directConnection=true"
    env = {**os.environ, "MONGODB_URI": away, "RULESVC_MONGODB_TIMEOUT_SECONDS": "0.5"}
    for args in (["events", "quarantine", "list"], ["keys", "list"]):
        done = subprocess.run(
            [sys.executable, "-m", "rulesvc", *args], env=env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 1, done.stderr
        assert done.stderr.startswith("rulesvc: MongoDB unavailable (ServerSelectionTimeoutError)"), (
            done.stderr
        )
        assert "Traceback" not in done.stderr
