"""The catalog fan-out on a real mongod: interest kept from events, copies in batches, resumable after
a crash without duplicates, and ingestion answering while a fan-out runs."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest

from rulesvc.config import Settings
from rulesvc.core.events import Event
from rulesvc.runtime.fanout import CatalogFanout
from rulesvc.store.db import Store
from rulesvc.web.app import create_app
from rulesvc.web.keys import FANOUT
from tests.helpers import WAIT_SECONDS, eventually, write_ruleset


async def test_fanout_is_batched_resumable_and_exactly_once(db: Any, settings: Settings) -> None:
    store = Store(db.client, settings.database, timedelta(days=1))
    await store.ensure_schema()
    now = datetime.now(UTC)
    await store.interests.insert_many(
        [{"_id": f"c{i:05d}|lamp", "contact_id": f"c{i:05d}", "product_id": "lamp", "viewed_at": now}
         for i in range(2500)]
        + [{"_id": "old|lamp", "contact_id": "old", "product_id": "lamp",
            "viewed_at": now - timedelta(days=40)},
           {"_id": "x|sofa", "contact_id": "x", "product_id": "sofa", "viewed_at": now}]
    )  # fmt: skip
    await store.products.insert_one({"_id": "lamp", "price": 100.0})
    await store.insert_events(
        [Event(id="pc", type="price_changed", attributes={"product_id": "lamp", "price": 80.0})]
    )

    first = CatalogFanout(store, batch_size=1000)
    assert await first.process_once()  # the change recorded, the fan-out in one part (fewer than 4 batches)
    assert await db.fanout_parts.count_documents({"event_id": "pc"}) == 1
    assert await first.process_once()  # one batch, then the process "dies"
    assert await db.events.count_documents({"fanout_of": "pc"}) == 1000
    second = CatalogFanout(store, batch_size=1000, lease=timedelta(seconds=1))
    assert not await second.process_once()  # the first still holds the part
    await db.fanout_parts.update_many({"event_id": "pc"}, {"$set": {"until": now - timedelta(seconds=1)}})
    while await second.process_once():
        pass
    copies = [d async for d in db.events.find({"fanout_of": "pc"})]
    assert len(copies) == 2500 and len({c["contact_id"] for c in copies}) == 2500  # none twice, none lost
    assert {c["attributes"]["drop_percent"] for c in copies} == {20.0}
    assert all(c["attributes"]["previous_price"] == 100.0 for c in copies)
    assert (
        await db.events.find_one({"_id": "pc"}) is not None and await db.inbox.find_one({"_id": "pc"}) is None
    )
    assert await db.fanout_parts.count_documents({}) == 0  # the parts go with the event
    assert (await db.products.find_one({"_id": "lamp"}))["price"] == 80.0


@pytest.mark.parametrize("direct", [False, True], ids=["queued-copies", "direct"])
async def test_interest_index_follows_events_and_ingestion_goes_on_during_a_fanout(
    make_client: Any, settings: Settings, db: Any, direct: bool
) -> None:
    write_ruleset(Path(settings.rulesets_dir), "noop", {"rules": [
        {"name": "n", "when": {"event": "price_changed"}, "then": [{"count": "price_news"}]}]})  # fmt: skip
    app = create_app(msgspec.structs.replace(settings, fanout_direct=direct))
    client = await make_client(app)
    lamp = {"product_id": "lamp"}
    views = [
        {"id": f"v{i}", "type": "product_viewed", "contact_id": f"c{i}", "attributes": lamp}
        for i in range(3000)
    ]
    assert (await client.post("/v1/events", json=views)).status == 202
    await client.post("/v1/events", json={"id": "w", "type": "wishlist_added", "contact_id": "wisher",
                                          "attributes": {"product_id": "lamp"}})  # fmt: skip

    async def indexed() -> bool:
        return await db.interests.count_documents({"product_id": "lamp"}) == 3001

    await eventually(indexed)
    fanout = app[FANOUT]
    fanout.batch_size = 200
    # The fan-out is held after its first batch (a real one, just stopped there), so "during the fan-out"
    # does not depend on how fast this machine is: direct, before its second batch, at its look for stored
    # copies; queued, once its first batch's copies are written.
    held, go_on = asyncio.Event(), asyncio.Event()
    stored_copies, queue_copies = fanout.catalog.stored_copies, fanout.catalog.queue_copies
    batches = 0

    async def hold_before_the_second(ids: list[str]) -> set[str]:
        nonlocal batches
        batches += 1
        if batches == 2:
            held.set()
            await go_on.wait()
        return await stored_copies(ids)

    async def queue_then_hold(copies: list[dict[str, Any]], *part: Any) -> None:
        await queue_copies(copies, *part)
        held.set()
        await go_on.wait()

    if direct:
        fanout.catalog.stored_copies = hold_before_the_second  # type: ignore[method-assign]
    else:
        fanout.catalog.queue_copies = queue_then_hold  # type: ignore[method-assign]
    await client.post("/v1/events", json={"id": "pc", "type": "price_changed",
                                          "attributes": {"product_id": "lamp", "price": 9.5}})  # fmt: skip
    await asyncio.wait_for(held.wait(), WAIT_SECONDS)
    for n in range(20):  # while the fan-out is half done, other events are still accepted
        post = client.post("/v1/events", json={"id": f"x{n}", "type": "page_viewed", "contact_id": "z"})
        assert (await asyncio.wait_for(post, WAIT_SECONDS)).status == 202
    if direct:
        counted = {"state.counters.price_news.n": 1}
        assert await db.contacts.count_documents(counted) == 200  # still half done: one batch decided
        assert await db.events.count_documents({"fanout_of": "pc"}) == 0  # decided without stored copies
    else:
        assert await db.events.count_documents({"fanout_of": "pc"}) == 200  # still half done
    assert await db.events.count_documents({"contact_id": "z"}) == 20
    go_on.set()

    async def all_counted() -> bool:
        return await db.contacts.count_documents({"state.counters.price_news.n": 1}) == 3001

    await eventually(all_counted)
