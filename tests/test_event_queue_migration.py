"""The upgrade of a database the release before wrote (fcbb0cb: the inbox's state on the events themselves,
`pending`/`done`/`quarantined`, and partial indexes over `events`) to the queue: planted here by hand as
that release stored it, migrated twice and after an interruption, then decided by the running service."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pymongo import ASCENDING, DESCENDING, IndexModel

from rulesvc.config import Settings
from rulesvc.core.events import Event
from rulesvc.store.db import Store
from rulesvc.store.event_queue import migrate_event_queue
from rulesvc.web.app import create_app
from tests.helpers import eventually, write_ruleset

Doc = dict[str, Any]
OLD_INDEXES = {"inbox_pending", "inbox_oldest", "catalog_pending", "quarantine"}
NOW = datetime.now(UTC).replace(microsecond=0)


def old_events() -> list[Doc]:
    """12 decided (with `processed_at`), 5 pending pings of two contacts, a pending catalog event halfway
    through its fan-out, 2 quarantined: each as fcbb0cb's code wrote it."""
    docs: list[Doc] = []
    for i in range(12):
        at = NOW - timedelta(minutes=30 - i)
        docs.append({"_id": f"done-{i}", "type": "ping", "contact_id": f"c{i % 2}", "time": at,
                     "attributes": {}, "received_at": at, "state": "done", "processed_at": at})  # fmt: skip
    for i in range(5):
        at = NOW - timedelta(minutes=5 - i)
        docs.append({"_id": f"wait-{i}", "type": "ping", "contact_id": f"c{i % 2}", "time": at,
                     "attributes": {}, "received_at": at, "state": "pending"})  # fmt: skip
    docs.append({"_id": "price", "type": "price_changed", "contact_id": None, "time": NOW,
                 "attributes": {"product_id": "lamp", "price": 5}, "received_at": NOW, "state": "pending",
                 "fanout": {"product": {"old_price": 9.0}, "after": "c1|lamp"}})  # fmt: skip
    for i in range(2):
        docs.append({"_id": f"bad-{i}", "type": "ping", "contact_id": "c9", "time": NOW, "attributes": {},
                     "received_at": NOW, "state": "quarantined", "attempts": 3, "stage": "inbox",
                     "error": "ValueError: x", "quarantined_at": NOW - timedelta(minutes=i)})  # fmt: skip
    return docs


async def plant_old(db: Any) -> None:
    await db.events.insert_many(old_events())
    await db.events.create_indexes(
        [
            IndexModel([("contact_id", ASCENDING), ("time", ASCENDING), ("_id", ASCENDING)],
                       name="inbox_pending", partialFilterExpression={"state": "pending"}),
            IndexModel([("received_at", ASCENDING), ("contact_id", ASCENDING)],
                       name="inbox_oldest", partialFilterExpression={"state": "pending"}),
            IndexModel([("quarantined_at", DESCENDING)],
                       name="quarantine", partialFilterExpression={"state": "quarantined"}),
            IndexModel([("time", ASCENDING), ("_id", ASCENDING)], name="catalog_pending",
                       partialFilterExpression={"state": "pending", "contact_id": None}),
        ]
    )  # fmt: skip


async def check_migrated(db: Any) -> None:
    queue = {d["_id"]: d async for d in db.inbox.find({})}
    assert sorted(queue) == sorted([*(f"wait-{i}" for i in range(5)), "price", "bad-0", "bad-1"])
    for i in range(5):
        assert {k: v for k, v in queue[f"wait-{i}"].items() if k != "_id"} == {
            "contact_id": f"c{i % 2}", "time": NOW - timedelta(minutes=5 - i),
            "received_at": NOW - timedelta(minutes=5 - i), "state": "pending"}  # fmt: skip
    assert queue["price"]["fanout"] == {"product": {"old_price": 9.0}, "after": "c1|lamp"}  # resumed there
    assert (queue["bad-1"]["state"], queue["bad-1"]["attempts"], queue["bad-1"]["error"]) == (
        "quarantined", 3, "ValueError: x")  # fmt: skip
    assert queue["bad-1"]["quarantined_at"] == NOW - timedelta(minutes=1)
    assert not OLD_INDEXES & set(await db.events.index_information())
    # The decided ones as they were; the queued pending ones lost their `pending`; quarantined kept theirs.
    events = {d["_id"]: d async for d in db.events.find({})}
    assert [events[f"done-{i}"]["state"] for i in range(12)] == ["done"] * 12
    assert all("processed_at" in events[f"done-{i}"] for i in range(12))
    assert not any("state" in events[f"wait-{i}"] for i in range(5)) and "state" not in events["price"]
    assert {events[f"bad-{i}"]["state"] for i in range(2)} == {"quarantined"}


async def test_the_migration_queues_what_was_undecided_twice_and_after_an_interruption(
    db: Any, settings: Settings
) -> None:
    await plant_old(db)
    store = Store(db.client, settings.database, timedelta(days=30))
    await store.ensure_schema()  # as at start: the new indexes first, then the migrations
    # Interrupted after it queued the first two pending events, before it took their `pending` away.
    old = {d["_id"]: d for d in old_events()}
    await db.inbox.insert_many(
        [{"_id": i, **{k: old[i][k] for k in ("contact_id", "time", "received_at", "state")}}
         for i in ("wait-0", "wait-1")]
    )  # fmt: skip
    await migrate_event_queue(store)
    await check_migrated(db)
    await migrate_event_queue(store)  # again: nothing changes
    await check_migrated(db)
    # Once the new code decided an event (its queue document deleted), a run again does not queue it.
    await db.inbox.delete_one({"_id": "wait-0"})
    await migrate_event_queue(store)
    assert await db.inbox.find_one({"_id": "wait-0"}) is None


async def test_a_migrated_database_is_decided_each_pending_event_once(
    make_client: Any, db: Any, settings: Settings
) -> None:
    await plant_old(db)
    write_ruleset(Path(settings.rulesets_dir), "tally", {"rules": [
        {"name": "ping", "when": {"event": "ping"}, "then": [{"count": "pings"}]}]})  # fmt: skip
    store = Store(db.client, settings.database, timedelta(days=30))
    await store.ensure_schema()
    await migrate_event_queue(store)
    client = await make_client(create_app(settings))

    async def decided() -> bool:
        return await db.inbox.count_documents({"state": "pending"}) == 0

    await eventually(decided)
    # Only the five that waited were decided now (the contacts had no state: the others were history).
    counts = {d["_id"]: d["state"]["counters"]["pings"]["n"] async for d in db.contacts.find({})}
    assert counts == {"c0": 3, "c1": 2}
    listed = await (await client.get("/v1/events/quarantine")).json()
    assert [(e["id"], e["attempts"]) for e in listed["events"]] == [("bad-0", 3), ("bad-1", 3)]
    events = {
        e["id"]: e["state"] for e in (await (await client.get("/v1/contacts/c0/events")).json())["events"]
    }
    assert set(events.values()) == {"done"} and len(events) == 9


async def test_an_id_whose_event_expired_but_left_a_queue_document_is_a_new_event(
    settings: Settings, db: Any
) -> None:
    """The events' TTL can remove an event its queue document outlives (one long in quarantine): the same id
    posted again is a new event, not a refusal of the whole group commit it shares with other requests."""
    store = Store(db.client, settings.database, timedelta(days=1))
    await store.ensure_schema()
    now = datetime.now(UTC)
    await db.inbox.insert_one({"_id": "old", "contact_id": "c1", "time": now, "received_at": now,
                               "state": "quarantined", "attempts": 3, "quarantined_at": now})  # fmt: skip
    result = await store.insert_events(
        [Event(id="old", type="page_viewed", contact_id="c1", time=now),
         Event(id="other", type="page_viewed", contact_id="c2", time=now)], now
    )  # fmt: skip
    assert (result.accepted, result.duplicates) == (2, 0)
    assert {d["_id"] async for d in db.events.find({})} == {"old", "other"}
    queued = {d["_id"]: d["state"] async for d in db.inbox.find({})}
    assert queued == {"old": "pending", "other": "pending"}  # the stale quarantine is gone with its event
