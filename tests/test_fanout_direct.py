"""The fan-out decides a catalog change's copies straight from the interest index, under the contacts'
leases, without storing them (issue 19, step 4), on a real mongod with a real inbox and ruleset: each
interested contact decided once, in order after its own undecided events; contacts another batch holds
get a stored, queued copy in the same transaction; a copy an earlier run queued is never decided again."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from rulesvc.config import Settings
from rulesvc.core.events import Event
from rulesvc.core.ids import fanout_copy_id
from rulesvc.plugins import builtin_channels
from rulesvc.runtime.fanout import CatalogFanout
from rulesvc.runtime.inbox import Inbox
from rulesvc.runtime.rulesets import Rulesets
from rulesvc.store.db import Store
from tests.helpers import write_ruleset

Doc = dict[str, Any]
# Each price change a contact is decided for is counted in its state, and the view before it too: the state
# shows how often and in which order the contact was decided.
RULES = {
    "rules": [
        {"name": "drop", "when": {"event": "price_changed"},
         "then": [{"count": "drops"}, {"remember": {"name": "last", "from": "attributes.marker"}}]},
        {"name": "view", "when": {"event": "product_viewed"},
         "then": [{"count": "views"}, {"remember": {"name": "last", "from": "attributes.marker"}}]},
    ]
}  # fmt: skip


async def setup(settings: Settings, db: Any, contacts: int) -> tuple[Store, Inbox, datetime]:
    write_ruleset(Path(settings.rulesets_dir), "drops", RULES)
    rulesets = Rulesets(Path(settings.rulesets_dir), builtin_channels().names())
    rulesets.reload()
    store = Store(db.client, settings.database, timedelta(days=1))
    await store.ensure_schema()
    now = datetime.now(UTC)
    await store.interests.insert_many(
        [{"_id": f"c{i:04d}|lamp", "contact_id": f"c{i:04d}", "product_id": "lamp", "viewed_at": now}
         for i in range(contacts)]
    )  # fmt: skip
    await store.products.insert_one({"_id": "lamp", "price": 100.0})
    return store, Inbox(store, rulesets), now


async def price_drop(store: Store, at: datetime) -> None:
    attributes = {"product_id": "lamp", "price": 80.0, "marker": "drop"}
    await store.insert_events([Event(id="pc", type="price_changed", time=at, attributes=attributes)], at)


async def drops_of(db: Any) -> dict[str, Any]:
    return {c["_id"]: c["state"] async for c in db.contacts.find({}, {"state": 1})}


def count(state: Doc, name: str) -> int:
    return int(((state.get("counters") or {}).get(name) or {}).get("n", 0))


async def test_each_interested_contact_is_decided_once_and_no_copy_is_stored(
    settings: Settings, db: Any
) -> None:
    store, inbox, now = await setup(settings, db, 1200)
    await price_drop(store, now)
    fanout = CatalogFanout(store, batch_size=500, decider=inbox)
    while await fanout.process_once():
        pass
    states = await drops_of(db)
    assert len(states) == 1200
    assert {count(s, "drops") for s in states.values()} == {1}
    assert await db.events.count_documents({"fanout_of": "pc"}) == 0  # nothing stored per contact
    assert await db.inbox.count_documents({}) == 0  # the catalog event decided, nothing queued
    assert fanout.decided == 1200
    decided = sum([d["decided"] async for d in db.throughput.find({})])
    assert decided == 1201  # the copies and the catalog event, as the overview counts them


async def test_a_copy_is_decided_after_the_contacts_own_earlier_event(settings: Settings, db: Any) -> None:
    store, inbox, now = await setup(settings, db, 3)
    view = {"product_id": "lamp", "marker": "view"}
    await store.insert_events(
        [Event(id="v1", type="product_viewed", contact_id="c0001", time=now - timedelta(minutes=1),
               attributes=view)]
    )  # fmt: skip
    await price_drop(store, now)
    fanout = CatalogFanout(store, batch_size=500, decider=inbox)
    while await fanout.process_once():
        pass
    states = await drops_of(db)
    assert (count(states["c0001"], "views"), count(states["c0001"], "drops")) == (1, 1)
    assert states["c0001"]["values"]["last"]["v"] == "drop"  # the view first, then the drop
    assert await db.inbox.count_documents({}) == 0  # the view decided in the same batch


async def test_contacts_held_by_another_batch_get_a_queued_copy_decided_once_by_the_inbox(
    settings: Settings, db: Any
) -> None:
    store, inbox, now = await setup(settings, db, 10)
    await price_drop(store, now)
    held = ["c0003", "c0007"]
    assert await inbox.contact_leases.take("other", "another-process", held, now + timedelta(minutes=1))
    fanout = CatalogFanout(store, batch_size=500, decider=inbox)
    while await fanout.process_once():
        pass
    copies = {d["contact_id"] async for d in db.events.find({"fanout_of": "pc"})}
    assert copies == set(held)  # stored and queued, in the fan-out's transaction
    assert {d["_id"] async for d in db.inbox.find({})} == {fanout_copy_id("pc", c) for c in held}
    await inbox.contact_leases.release("other")
    while await inbox.process_once():
        pass
    states = await drops_of(db)
    assert {c: count(s, "drops") for c, s in states.items()} == {f"c{i:04d}": 1 for i in range(10)}


async def test_a_batch_run_again_never_decides_a_copy_an_earlier_run_queued(
    settings: Settings, db: Any
) -> None:
    """A run that queued a contact's copy and died before its position was saved: the next run decides the
    others, and the queued copy stays the inbox's (decided once, by it)."""
    store, inbox, now = await setup(settings, db, 5)
    await price_drop(store, now)
    copy = {"_id": fanout_copy_id("pc", "c0002"), "type": "price_changed", "contact_id": "c0002",
            "time": now, "attributes": {"product_id": "lamp", "price": 80.0}, "received_at": now,
            "fanout_of": "pc"}  # fmt: skip
    await store.insert_queued([copy])
    while await inbox.process_once():  # the inbox decides the queued copy first
        pass
    fanout = CatalogFanout(store, batch_size=500, decider=inbox)
    while await fanout.process_once():
        pass
    states = await drops_of(db)
    assert {c: count(s, "drops") for c, s in states.items()} == {f"c{i:04d}": 1 for i in range(5)}
    assert fanout.decided == 4


async def test_a_batch_whose_claim_was_taken_over_meanwhile_is_not_decided_twice(
    settings: Settings, db: Any
) -> None:
    """Fan-out A's claim runs out while it decides a batch (a slow database); fan-out B takes the event over
    and decides that batch. A's decisions are then not committed: the position it would move is no longer
    its own (copies decided directly are not stored, so nothing else would catch the repeat)."""
    store, inbox, now = await setup(settings, db, 5)
    await price_drop(store, now)
    later = now + timedelta(seconds=20)  # after A's 15 s claim
    b = CatalogFanout(store, batch_size=500, decider=inbox, lease=timedelta(seconds=15), clock=lambda: later)

    class Stalled:
        """A's inbox, which stalls before deciding: B runs in that time."""

        async def decide_given(self, docs: list[Doc], also: Any) -> int:
            while await b.process_once():
                pass
            return await inbox.decide_given(docs, also)

    a = CatalogFanout(
        store, batch_size=500, decider=Stalled(), lease=timedelta(seconds=15), clock=lambda: now
    )
    assert await a.process_once()  # the change recorded, the contacts in one part
    assert await a.process_once()  # the part's batch, stalled
    while await inbox.process_once():
        pass
    states = await drops_of(db)
    assert {c: count(s, "drops") for c, s in states.items()} == {f"c{i:04d}": 1 for i in range(5)}
    assert await db.inbox.count_documents({}) == 0  # B finished the event; A left nothing behind


async def test_a_cut_slower_than_its_lease_keeps_its_claim(settings: Settings, db: Any) -> None:
    """Worker A's cut stalls (a slow database) past its lease: A renews its claim meanwhile, so worker B,
    looking after A's first claim ran out, finds nothing to take and does not cut the event a second time;
    A's cut then goes through, and every contact is decided once."""
    store, inbox, now = await setup(settings, db, 600)
    await price_drop(store, now)
    lease = timedelta(seconds=1.5)
    stalled, gate = asyncio.Event(), asyncio.Event()

    class Slow(CatalogFanout):
        async def _update_catalog(self, event: Doc) -> Doc:
            stalled.set()
            await gate.wait()
            return await super()._update_catalog(event)

    async def claimed_until() -> datetime:
        doc = await db.inbox.find_one({"_id": "pc"}, {"fanout.until": 1})
        assert doc is not None
        until: datetime = doc["fanout"]["until"]
        return until

    a = Slow(store, batch_size=250, decider=inbox, lease=lease)
    cutting = asyncio.create_task(a.process_once())
    try:
        await stalled.wait()  # A has claimed the event and stalls in its cut
        first = renewed = await claimed_until()
        for _ in range(100):  # A renews every third of its lease
            await asyncio.sleep(0.1)
            renewed = await claimed_until()
            if renewed > first:
                break
        assert renewed > first, "A did not renew its claim while its cut ran"
        after_first = first + (renewed - first) / 2  # A's first claim has run out, the renewed one not
        b = CatalogFanout(store, batch_size=250, decider=inbox, lease=lease, clock=lambda: after_first)
        assert not await b.process_once(), "B took over an event whose cut A was still making"
    finally:
        gate.set()
    assert await cutting
    # A's cut: 600 contacts in batches of 250 make one part (a part is at least four batches).
    assert await db.fanout_parts.count_documents({"event_id": "pc"}) == 1
    other = CatalogFanout(store, batch_size=250, decider=Inbox(store, inbox.rulesets), lease=lease)
    await asyncio.gather(drain(a), drain(other))
    states = await drops_of(db)
    assert {c: count(s, "drops") for c, s in states.items()} == {f"c{i:04d}": 1 for i in range(600)}
    assert await db.inbox.count_documents({}) == 0


async def drain(fanout: CatalogFanout) -> None:
    while await fanout.process_once():
        pass


async def test_two_workers_share_a_large_fanout_and_decide_each_contact_once(
    settings: Settings, db: Any
) -> None:
    """A fan-out of 4,000 contacts in batches of 250 is cut into four parts; two workers (each its own
    inbox and fan-out, as two processes have) take them at once: each contact decided once, both workers
    did part of it, and the event and its parts are gone when the last part is done."""
    store, inbox, now = await setup(settings, db, 4000)
    other = Inbox(store, inbox.rulesets)
    await price_drop(store, now)
    a = CatalogFanout(store, batch_size=250, decider=inbox)
    b = CatalogFanout(store, batch_size=250, decider=other)
    assert await a.process_once()  # the change recorded and the contacts cut into parts
    parts = await db.fanout_parts.find({"event_id": "pc"}).sort("n", 1).to_list()
    assert len(parts) == 4
    ranges = [(p["after"], p["upto"]) for p in parts]
    assert ranges[0][0] is None and ranges[-1][1] is None
    assert all(ranges[i][1] == ranges[i + 1][0] for i in range(3))  # contiguous
    await asyncio.gather(drain(a), drain(b))
    states = await drops_of(db)
    assert {c: count(s, "drops") for c, s in states.items()} == {f"c{i:04d}": 1 for i in range(4000)}
    assert a.decided > 0 and b.decided > 0 and a.decided + b.decided == 4000
    assert await db.inbox.count_documents({}) == 0 and await db.fanout_parts.count_documents({}) == 0
    decided = sum([d["decided"] async for d in db.throughput.find({})])
    assert decided == 4001  # the catalog event counted once, by whichever finished its last part


class Meeting:
    """A worker's `fanout_parts` whose first write waits for the other worker's first write: both mark
    their part done, inside their transactions, before either goes on (then as usual)."""

    def __init__(self, parts: Any, meet: asyncio.Barrier) -> None:
        self.parts, self.meet, self.met = parts, meet, False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.parts, name)

    async def update_one(self, *args: Any, **kwargs: Any) -> Any:
        result = await self.parts.update_one(*args, **kwargs)
        if not self.met:
            self.met = True
            await self.meet.wait()
        return result


async def test_the_last_two_parts_finished_at_once_finish_the_event_once(settings: Settings, db: Any) -> None:
    """Two workers finish the event's last two parts in the same moment, each having marked its part done
    before the other looks: neither may miss the other's (the event would stay queued for good), and the
    event is counted once."""
    store, inbox, now = await setup(settings, db, 2000)
    await price_drop(store, now)
    a = CatalogFanout(store, batch_size=250, decider=inbox)
    assert await a.process_once()
    assert await db.fanout_parts.count_documents({"event_id": "pc"}) == 2
    meet = asyncio.Barrier(2)
    fanouts = []
    for _ in range(2):
        own = Store(db.client, settings.database, timedelta(days=1))
        own.fanout_parts = Meeting(own.fanout_parts, meet)  # type: ignore[assignment]
        fanouts.append(CatalogFanout(own, batch_size=250))
    claims = [await f.catalog.claim(f.owner, now, f.lease) for f in fanouts]
    parts = [c[1]["_id"] for c in claims if c is not None and c[1] is not None]
    assert len(set(parts)) == 2
    await asyncio.wait_for(
        asyncio.gather(
            *(f.catalog.finish_part("pc", p, f.owner, now) for f, p in zip(fanouts, parts, strict=True))
        ),
        30,
    )
    assert await db.inbox.count_documents({}) == 0 and await db.fanout_parts.count_documents({}) == 0
    assert sum([d["decided"] async for d in db.throughput.find({})]) == 1


async def test_a_fanout_the_release_before_left_halfway_goes_on_after_its_position(
    settings: Settings, db: Any
) -> None:
    """A catalog event whose fan-out the release before had taken to `c0599|lamp` (its position on the
    queue document, its claim run out) is cut from there: the contacts after it are decided, none before."""
    store, inbox, now = await setup(settings, db, 1200)
    await price_drop(store, now)
    change = {"previous_price": 100.0, "drop_percent": 20.0}
    left = {"product": change, "after": "c0599|lamp", "owner": "gone", "until": now - timedelta(seconds=1)}
    await db.inbox.update_one({"_id": "pc"}, {"$set": {"fanout": left}})
    await drain(CatalogFanout(store, batch_size=100, decider=inbox))
    states = await drops_of(db)
    assert sorted(states) == [f"c{i:04d}" for i in range(600, 1200)]
    assert {count(s, "drops") for s in states.values()} == {1}
    assert await db.inbox.count_documents({}) == 0


async def test_queued_copies_after_an_upgrade_keep_what_0_1_0_queued_and_replace_a_stale_queue_document(
    settings: Settings, db: Any
) -> None:
    """Queued copies (the default), on a fan-out 0.1.0 took to `c0599|lamp`: it had already queued the
    copies of c0600-c0609 (it saved its position after its copies), and the queue document of c0700's
    copy outlived its event (the events' TTL). The batches that meet them still go on: each contact
    after the position is decided once, and the fan-out finishes."""
    store, inbox, now = await setup(settings, db, 1200)
    await price_drop(store, now)
    change = {"previous_price": 100.0, "drop_percent": 20.0}
    left = {"product": change, "after": "c0599|lamp", "owner": "gone", "until": now - timedelta(seconds=1)}
    await db.inbox.update_one({"_id": "pc"}, {"$set": {"fanout": left}})

    def copy(contact: str) -> Doc:
        return {"_id": fanout_copy_id("pc", contact), "type": "price_changed", "contact_id": contact,
                "time": now, "attributes": {"product_id": "lamp", "price": 80.0, "marker": "drop"},
                "received_at": now, "fanout_of": "pc"}  # fmt: skip

    await store.insert_queued([copy(f"c{i:04d}") for i in range(600, 610)] + [copy("c0700")])
    await db.events.delete_one({"_id": fanout_copy_id("pc", "c0700")})
    fanout = CatalogFanout(store, batch_size=100)
    for _ in range(100):  # a batch that fails the same way each time would never end the fan-out
        if not await fanout.process_once():
            break
    assert await db.fanout_parts.count_documents({}) == 0 and await db.inbox.find_one({"_id": "pc"}) is None
    while await inbox.process_once():
        pass
    states = await drops_of(db)
    assert sorted(states) == [f"c{i:04d}" for i in range(600, 1200)]
    assert {count(s, "drops") for s in states.values()} == {1}
    assert await db.inbox.count_documents({}) == 0


class Broken:
    """A worker whose every decision fails (as a ruleset that raises would): its part is set aside."""

    async def decide_given(self, docs: list[Doc], also: Any) -> int:
        raise ValueError("the ruleset raised")


async def test_a_part_finished_while_another_part_set_the_event_aside_counts_after_the_retry(
    settings: Settings, db: Any
) -> None:
    """Worker A is finishing its part while worker B's part fails until the event is quarantined. A's part
    still counts: once the operator retries the event, B's part is decided and the event leaves the queue
    (else it would wait for a part already done, for good)."""
    store, inbox, now = await setup(settings, db, 2000)
    await price_drop(store, now)
    a = CatalogFanout(store, batch_size=250, decider=inbox)
    for _ in range(5):  # the cut, then part 0's four batches
        assert await a.process_once()
    # A's last look at part 0 (nothing left), its claim good for a minute from now, whatever the setup took.
    claimed = await a.catalog.claim(a.owner, datetime.now(UTC), a.lease)
    assert claimed is not None and claimed[1] is not None and claimed[1]["n"] == 0
    b = CatalogFanout(store, batch_size=250, decider=Broken(), retry_pause=timedelta(0))
    for _ in range(3):
        assert await b.process_once()
    assert (await db.inbox.find_one({"_id": "pc"}))["state"] == "quarantined"
    await a.catalog.finish_part("pc", claimed[1]["_id"], a.owner, now)
    assert await store.release_quarantined(["pc"], "retry", datetime.now(UTC)) == 1
    await drain(CatalogFanout(store, batch_size=250, decider=inbox))
    states = await drops_of(db)
    assert {c: count(s, "drops") for c, s in states.items()} == {f"c{i:04d}": 1 for i in range(2000)}
    assert await db.inbox.count_documents({}) == 0 and await db.fanout_parts.count_documents({}) == 0
    assert sum([d["decided"] async for d in db.throughput.find({})]) == 2001


async def test_an_event_whose_parts_were_all_done_while_set_aside_leaves_the_queue(
    settings: Settings, db: Any
) -> None:
    """Every part finished (the last one by a worker that took it over) while the event was quarantined:
    after the retry there is nothing to claim, and the next claim lets the event go, counted once."""
    store, inbox, now = await setup(settings, db, 2000)
    await price_drop(store, now)
    assert await CatalogFanout(store, batch_size=250, decider=inbox).process_once()
    await db.fanout_parts.update_many({"event_id": "pc"}, {"$set": {"done": True}})
    await db.inbox.update_one({"_id": "pc"}, {"$set": {"fanout.done": 2}})
    await drain(CatalogFanout(store, batch_size=250, decider=inbox))
    assert await db.inbox.count_documents({}) == 0 and await db.fanout_parts.count_documents({}) == 0
    assert sum([d["decided"] async for d in db.throughput.find({})]) == 1


async def test_parts_of_an_expired_event_are_not_taken_for_a_new_event_of_the_same_id(
    settings: Settings, db: Any
) -> None:
    """A fan-out cut into four parts whose event expired (the retention) before it was decided; the shop
    sends an event of the same id again, cut into two parts this time, each held by a worker: a third
    worker finds nothing to take (the old parts would have it decide half the contacts again and count
    the event done before the new parts are), and each contact is decided once, by the new parts."""
    store, inbox, now = await setup(settings, db, 4000)
    await price_drop(store, now)
    assert await CatalogFanout(store, batch_size=250, decider=inbox).process_once()
    assert await db.fanout_parts.count_documents({"event_id": "pc"}) == 4
    await db.events.delete_one({"_id": "pc"})  # as the events' TTL index does
    await price_drop(store, datetime.now(UTC))
    workers = [CatalogFanout(store, batch_size=500, decider=Inbox(store, inbox.rulesets)) for _ in range(3)]
    assert await workers[0].process_once()  # the cut
    for worker in workers[:2]:
        claimed = await worker.catalog.claim(worker.owner, datetime.now(UTC), worker.lease)
        assert claimed is not None and claimed[1] is not None
    assert not await workers[2].process_once()
    for worker in workers[:2]:
        await drain(worker)
    states = await drops_of(db)
    assert {c: count(s, "drops") for c, s in states.items()} == {f"c{i:04d}": 1 for i in range(4000)}
    assert await db.inbox.count_documents({}) == 0 and await db.fanout_parts.count_documents({}) == 0


async def test_the_cut_picks_its_bounds_in_one_pass_and_interests_gone_meanwhile_leave_no_gap(
    settings: Settings, db: Any
) -> None:
    store, _, now = await setup(settings, db, 4000)
    await store.interests.insert_one(  # another product's interest inside the range: not this fan-out's
        {"_id": "c0100|vase", "contact_id": "c0100", "product_id": "vase", "viewed_at": now}
    )
    await price_drop(store, now)
    event = {"_id": "pc", "type": "price_changed", "time": now, "attributes": {"product_id": "lamp"}}
    catalog = CatalogFanout(store, batch_size=100).catalog
    ids = sorted(f"c{i:04d}|lamp" for i in range(4000))
    assert await catalog.count_interested(event, None) == 4000
    assert await catalog.count_interested(event, ids[999]) == 3000
    assert await catalog.interested_at(event, None, [0, 999, 3999]) == [ids[0], ids[999], ids[3999]]
    assert await catalog.interested_at(event, ids[999], [0, 1]) == [ids[1000], ids[1001]]
    # Interests that go between the count and the pass: the positions further on are not reached, so the
    # cut has fewer parts, and every interest is still in exactly one of them.
    fanout = CatalogFanout(store, batch_size=100, decider=None)
    pick = fanout.catalog.interested_at

    async def pick_after_a_deletion(event: Doc, after: str | None, positions: list[int]) -> list[str]:
        assert positions == [400 * n - 1 for n in range(1, 10)]  # ten parts for 4000 in batches of 100
        await store.interests.delete_many({"_id": {"$gte": ids[2000]}, "product_id": "lamp"})
        return await pick(event, after, positions)

    fanout.catalog.interested_at = pick_after_a_deletion  # type: ignore[method-assign]
    assert await fanout.process_once()  # the cut
    parts = [(p["after"], p["upto"]) async for p in db.fanout_parts.find({}).sort("n", 1)]
    assert parts == list(zip([None, *ids[399:2000:400]], [*ids[399:2000:400], None], strict=True))
    for key in ids:
        assert sum(1 for a, u in parts if (a is None or key > a) and (u is None or key <= u)) == 1


async def test_a_batch_read_before_the_operator_dropped_the_event_queues_no_copy(
    settings: Settings, db: Any
) -> None:
    """Queued copies (the default): the operator drops the quarantined price change while a worker has a
    batch of its contacts in hand. The batch queues nothing, so no contact is decided for the dropped
    event, and the worker goes on with other work."""
    store, inbox, now = await setup(settings, db, 2000)
    await price_drop(store, now)
    fanout = CatalogFanout(store, batch_size=250)  # no decider: every copy stored and queued
    assert await fanout.process_once()  # the cut: two parts
    read = fanout.catalog.interested

    async def dropped_meanwhile(event: Doc, after: str | None, upto: str | None, limit: int) -> list[Doc]:
        interests = await read(event, after, upto, limit)
        for _ in range(3):  # as three failures of another worker's part do
            await store.event_failed("pc", "boom", "fanout", datetime.now(UTC))
        assert await store.release_quarantined(["pc"], "drop", datetime.now(UTC)) == 1
        return interests

    fanout.catalog.interested = dropped_meanwhile  # type: ignore[method-assign]
    assert await fanout.process_once()  # the batch in hand when the event was dropped
    fanout.catalog.interested = read  # type: ignore[method-assign]
    assert await db.events.count_documents({"fanout_of": "pc"}) == 0
    assert (await db.events.find_one({"_id": "pc"}))["state"] == "dropped"
    assert await db.inbox.count_documents({}) == 0 and await db.fanout_parts.count_documents({}) == 0
    assert not await fanout.process_once()
    while await inbox.process_once():
        pass
    assert {c: count(s, "drops") for c, s in (await drops_of(db)).items()} == {}
