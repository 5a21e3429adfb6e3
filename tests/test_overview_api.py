"""`GET /v1/overview` and what `GET /v1/channels` says of each channel's sends, on a real mongod. The
counting test plants documents in the stored schema (events with `received_at` and, undecided, their
queue documents; the inbox's per-minute counters, schedule entries, the funnel's hourly counters,
messages) and reads the overview with no loop running, so nothing moves under it; every number is
computed here with plain Python. The live test posts events through the API to a running app and watches
the overview count them."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
from aiohttp import web
from pymongo import AsyncMongoClient
from rulesvc_email import EmailChannel

from rulesvc.config import Settings
from rulesvc.plugins import PluginReport, builtin_channels
from rulesvc.store.db import Store
from rulesvc.store.mongod import EmbeddedMongod
from rulesvc.web.app import create_app
from rulesvc.web.keys import CHANNELS, KEYS, PLUGINS, SETTINGS, STORE
from rulesvc.web.views.overview import overview
from tests.helpers import eventually, go, setup
from tests.helpers import send as send_action
from tests.stored import plant
from tests.test_api_contract import check_against_document

Doc = dict[str, Any]


def quarter(at: datetime) -> datetime:
    return at.replace(minute=at.minute - at.minute % 15, second=0, microsecond=0)


def hour(at: datetime) -> datetime:
    return at.replace(minute=0, second=0, microsecond=0)


async def frozen_app(settings: Settings, mongo: AsyncMongoClient[Doc]) -> web.Application:
    """An app holding a real store and channels, its loops not started: the overview's reads on data
    that stays as planted."""
    store = Store(mongo, settings.database, timedelta(days=90))
    await store.ensure_schema()
    app = web.Application()
    channels = builtin_channels()
    channels.register(EmailChannel({"host": "127.0.0.1", "port": 2525, "security": "none",
                                    "from": "news@shop.example"}))  # fmt: skip
    app[SETTINGS], app[STORE], app[CHANNELS] = settings, store, channels
    app[PLUGINS] = [PluginReport("test", "given", sorted(channels.names()))]
    return app


async def test_overview_counts_what_is_stored(settings: Settings, db: Any, mongod: Any) -> None:
    mongo: AsyncMongoClient[Doc] = AsyncMongoClient(mongod.uri, tz_aware=True)
    app = await frozen_app(settings, mongo)
    now = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=1)
    # Events every 7 minutes back over 25.7 h, decided 90 s after they came; a few in the last minute,
    # one just before it; two still pending (10 and 4 minutes old); three quarantined.
    received = [now - timedelta(minutes=7 * k) for k in range(1, 221)]
    received += [now - timedelta(seconds=s) for s in (0, 10, 30, 59, 61)]
    events: list[Doc] = [
        {"_id": f"e{i}", "type": "t", "contact_id": f"c{i % 9}", "time": at, "attributes": {},
         "received_at": at, "state": "done", "processed_at": at + timedelta(seconds=90)}
        for i, at in enumerate(received)
    ]  # fmt: skip
    for e in events:  # decided "in the future" would not be: those are decided just now
        e["processed_at"] = min(e["processed_at"], now)
    decided_at = [e["processed_at"] for e in events]
    # Decided events are counted per minute and process by the inbox (`throughput`): two processes here.
    per_minute: Counter[tuple[datetime, str]] = Counter(
        (at.replace(second=0, microsecond=0), f"inbox:{i % 2}") for i, at in enumerate(decided_at)
    )
    await db.throughput.insert_many([
        {"_id": f"{minute:%Y-%m-%dT%H:%M}|{shard}", "minute": minute, "shard": shard, "decided": n}
        for (minute, shard), n in per_minute.items()
    ])  # fmt: skip
    pending = [now - timedelta(minutes=10), now - timedelta(minutes=4)]
    events += [{"_id": f"p{i}", "type": "t", "contact_id": "cp", "time": at, "attributes": {},
                "received_at": at, "state": "pending"} for i, at in enumerate(pending)]  # fmt: skip
    events += [{"_id": f"q{i}", "type": "t", "contact_id": "cq", "time": now, "attributes": {},
                "received_at": now - timedelta(hours=30), "state": "quarantined", "error": "boom",
                "quarantined_at": now - timedelta(hours=2)} for i in range(3)]  # fmt: skip
    await plant(db, [{k: v for k, v in e.items() if k != "processed_at"} for e in events])
    # The due queue: two sends overdue (2 min and 30 s), two due within the hour, one later; a wait's
    # timer (no message) and a send being worked on are not in it.
    dues = [(-120, "pending", True), (-30, "pending", True), (600, "pending", True), (3540, "pending", True),
            (3660, "pending", True), (-60, "pending", False), (-90, "running", True)]  # fmt: skip
    await db.schedule.insert_many([
        {"_id": f"s{i}", "contact_id": "cs", "status": status, "due_at": now + timedelta(seconds=s),
         **({"message": {"channel": "email"}} if message else {})}
        for i, (s, status, message) in enumerate(dues)
    ])  # fmt: skip
    # Messages: two dead letters; the last sends per channel.
    sent = {
        "email": [now - timedelta(minutes=50), now - timedelta(minutes=5)],
        "log": [now - timedelta(hours=2)],
    }
    messages: list[Doc] = [
        {"_id": f"d{i}", "contact_id": "cd", "status": "dead", "channel": "email", "created_at": now}
        for i in range(2)
    ]
    messages += [
        {"_id": f"m-{ch}-{i}", "contact_id": "cm", "status": "sent", "channel": ch, "sent_channel": ch,
         "sent_at": at, "created_at": at}
        for ch, ats in sent.items() for i, at in enumerate(ats)
    ]  # fmt: skip
    # Tried on sms, never sent: no last send.
    messages.append({"_id": "m-sms", "contact_id": "cm", "status": "failed", "channel": "sms",
                     "sent_channel": "sms", "created_at": now})  # fmt: skip
    await db.messages.insert_many(messages)
    # The funnel's counters: hours from 25 h ago (outside the window) to now, two shards.
    counters = [
        (25, "email", "s1", {"sent": 100, "failed": 50}),  # before the window
        (24, "email", "s1", {"sent": 10, "failed": 2, "delivered": 7}),
        (5, "email", "s2", {"sent": 5, "dead": 1, "suppressed": 3}),
        (5, "email", "s1", {"sent": 1}),
        (0, "log", "s1", {"sent": 4}),
        (0, "sms", "s2", {"suppressed": 6}),
        (0, "", "s1", {"entered": 20, "converted": 2}),  # no channel: not a message
    ]
    await db.stats.insert_many([
        {"_id": f"k{i}", "hour": hour(now) - timedelta(hours=h), "ruleset": "flow", "rule": "go",
         "variant": "", "channel": ch, "shard": shard, "counts": counts, "reasons": {}}
        for i, (h, ch, shard, counts) in enumerate(counters)
    ])  # fmt: skip

    got = msgspec.to_builtins(await overview(app, now))
    await mongo.close()

    # Health is readiness's: here the rulesets were never loaded (no loops run).
    assert got["health"]["status"] == "unavailable"
    assert "the rulesets are not loaded yet" in got["health"]["reasons"]
    # Now: the last whole minute and the current one so far.
    start = now.replace(second=0) - timedelta(minutes=1)
    seconds = round((now - start).total_seconds())  # the rates are over the whole seconds reported
    in_window = [at for at in received + pending if at >= start]
    decided_window = [at for at in decided_at if at >= start]
    assert got["now"] == {"window_seconds": seconds, "accepted": len(in_window),
                          "decided": len(decided_window),
                          "accepted_per_second": round(len(in_window) / seconds, 3),
                          "decided_per_second": round(len(decided_window) / seconds, 3)}  # fmt: skip
    # The series: 96 quarter hours up to the current one, each counted here.
    first = quarter(now) - timedelta(minutes=15 * 95)
    accepted = Counter(quarter(at) for at in received + pending if at >= first)
    decided = Counter(quarter(at) for at in decided_at if at >= first)
    assert got["bucket_seconds"] == 900 and len(got["series"]) == 96
    for i, point in enumerate(got["series"]):
        start = first + timedelta(minutes=15 * i)
        seconds = 900 if i < 95 else (now - start).total_seconds()
        assert datetime.fromisoformat(point.pop("at")) == start
        assert point == {"accepted": accepted[start], "decided": decided[start],
                         "accepted_per_second": round(accepted[start] / seconds, 3),
                         "decided_per_second": round(decided[start] / seconds, 3)}, (i, start)  # fmt: skip
    assert sum(p["accepted"] for p in got["series"]) == sum(accepted.values()) > 90
    # Backlogs.
    assert got["inbox"]["waiting"] == 2
    assert datetime.fromisoformat(got["inbox"]["oldest_received_at"]) == pending[0]
    assert got["inbox"]["lag_seconds"] == 600.0
    assert got["due"]["due_now"] == 2 and got["due"]["overdue_seconds"] == 120.0
    assert datetime.fromisoformat(got["due"]["oldest_due_at"]) == now - timedelta(seconds=120)
    assert got["due"]["next_hour"] == 2
    assert (got["quarantined"], got["dead_letters"]) == (3, 2)
    # Messages by channel and status over the hours of the last 24 h (the 25 h old hour left out).
    assert got["messages"] == [
        {"channel": "email", "counts": {"delivered": 7, "dead": 1, "failed": 2, "sent": 16, "suppressed": 3}},
        {"channel": "log", "counts": {"sent": 4}},
        {"channel": "sms", "counts": {"suppressed": 6}},
    ]
    assert datetime.fromisoformat(got["messages_since"]) == now - timedelta(hours=24)
    # Each channel's sends, from the same counters, and its last send.
    by_name = {c["name"]: c for c in got["channels"]}
    assert (by_name["email"]["sent_24h"], by_name["email"]["failed_24h"]) == (16, 3)
    assert by_name["email"]["error_rate_24h"] == round(3 / 19, 4)
    assert datetime.fromisoformat(by_name["email"]["last_sent_at"]) == now - timedelta(minutes=5)
    assert datetime.fromisoformat(by_name["log"]["last_sent_at"]) == now - timedelta(hours=2)
    log = by_name["log"]
    assert (log["sent_24h"], log["failed_24h"], log["error_rate_24h"]) == (4, 0, 0.0)
    assert by_name["sms"]["last_sent_at"] is None and by_name["sms"]["error_rate_24h"] is None
    assert by_name["sms"]["configured"] is False
    assert [p["name"] for p in got["plugins"]] == ["test"]


async def test_overview_route_counts_events_posted_to_the_api(make_client: Any, settings: Settings) -> None:
    """Events posted through the API appear as accepted now, then decided, their sends as the log
    channel's; the answer is what the document declares; an ingest key may not read it."""
    client = await make_client(create_app(setup(settings, [send_action("log", transactional=True)])))
    before = await (await client.get("/v1/overview")).json()
    assert before["now"]["accepted"] == 0 and before["messages"] == []
    await go(client, "c1", n=3)
    await go(client, "c2", n=2)

    async def all_decided() -> bool:
        got = await (await client.get("/v1/overview")).json()
        sent = sum(m["counts"].get("sent", 0) for m in got["messages"])  # counted once the scheduler sent
        return bool(got["now"]["decided"] == 5 and sent == 5)

    await eventually(all_decided)
    resp = await client.get("/v1/overview")
    got = await resp.json()
    check_against_document("GET", "/v1/overview", 200, got)
    seconds = got["now"]["window_seconds"]
    assert 60 <= seconds <= 120 and got["now"]["decided"] == 5
    assert got["now"]["accepted"] == 5 and got["now"]["accepted_per_second"] == round(5 / seconds, 3)
    assert got["series"][-1]["accepted"] == 5 and got["series"][-1]["decided"] == 5
    assert got["inbox"] == {"waiting": 0, "oldest_received_at": None, "lag_seconds": 0.0}
    assert [m["channel"] for m in got["messages"]] == ["log"]
    assert got["messages"][0]["counts"]["sent"] == 5
    log = next(c for c in got["channels"] if c["name"] == "log")
    assert (log["sent_24h"], log["failed_24h"], log["error_rate_24h"]) == (5, 0, 0.0)
    history = (await (await client.get("/v1/messages", params={"status": "sent"})).json())["messages"]
    assert log["last_sent_at"] == max(m["sent_at"] for m in history)
    readyz = await (await client.get("/readyz")).json()
    assert got["health"] == readyz
    # GET /v1/channels says the same of the channel (new fields only; the old ones as they were).
    listing = await (await client.get("/v1/channels")).json()
    check_against_document("GET", "/v1/channels", 200, listing)
    assert next(c for c in listing["channels"] if c["name"] == "log") == log

    key, _ = await client.server.app[KEYS].create("ingest", "tests")
    resp = await client.get("/v1/overview", headers={"Authorization": f"Bearer {key}"})
    assert resp.status == 403


async def test_overview_without_mongodb_still_has_health_and_channels(
    make_client: Any, settings: Settings, tmp_path: Path
) -> None:
    """MongoDB going away mid-request: the operation answers with what it knows (health says why, the
    channels and plugins as loaded) instead of failing. (Over HTTP the API key check needs MongoDB, so
    the route answers 503 before it; the operation is what a page built on it gets.)"""
    own = EmbeddedMongod(tmp_path / "own")
    own.start()
    try:
        app = create_app(msgspec.structs.replace(settings, mongodb_uri=own.uri, mongodb_timeout_seconds=1.0))
        await make_client(app)
        own.stop()
        got = msgspec.to_builtins(await overview(app))
    finally:
        own.stop()
    assert got["health"]["status"] == "unavailable"
    assert any(r.startswith("MongoDB is unreachable") for r in got["health"]["reasons"])
    assert [got[k] for k in ("now", "inbox", "due", "quarantined", "dead_letters")] == [None] * 5
    assert got["series"] == got["messages"] == []
    assert {c["name"] for c in got["channels"]} >= {"log", "inapp"}
    assert all(c["last_sent_at"] is None and c["sent_24h"] is None for c in got["channels"])
