"""The catalog fan-out: a `price_changed` or `stock_changed` decided once per interested contact (what
counts as interested, and the catalog change itself, are decided in `rulesvc.core.catalog`).

The first worker to take a catalog event records the product's change and cuts the interested contacts
(in the interest index's order) into parts, a few batches each at least; every worker's fan-out then takes
one part at a time, so a large fan-out is decided by all of them at once. A batch of a part's contacts at a
time, each gets a copy of the event with a fixed id, decided by the inbox under the contacts' leases
without being stored, in one transaction with the part's position: a crash resumes after the last batch
decided, and ingestion goes on meanwhile (the inbox takes other contacts between the batches). A copy the
inbox cannot decide at once (its contact is in another batch, or has a backlog) is stored and queued like
any event, in that same transaction. Without the inbox as `decider`, every copy is stored and queued, in
one transaction with the part's position too: a batch read before the part was taken over, or before the
operator dropped the event, queues nothing.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import structlog
from pymongo import UpdateOne
from pymongo.asynchronous.client_session import AsyncClientSession

from rulesvc.core.catalog import catalog_change, fanout_ranges, interest_fields, part_ends
from rulesvc.core.ids import fanout_copy_id
from rulesvc.runtime.waiting import renewing, work_loop
from rulesvc.store.catalog import Catalog, Superseded
from rulesvc.store.db import Doc, Store, failure_text, transient

log = structlog.get_logger(__name__)


def interest_updates(events: list[Doc]) -> list[Any]:
    """Index writes for a batch of contact events (run in the inbox's transaction)."""
    ops: list[Any] = []
    for doc in events:
        fields = interest_fields(doc)
        if not fields:
            continue
        product = doc["attributes"]["product_id"]
        key = f"{doc['contact_id']}|{product}"
        ops.append(
            UpdateOne(
                {"_id": key},
                {
                    "$max": fields,
                    "$setOnInsert": {"contact_id": doc["contact_id"], "product_id": str(product)},
                },
                upsert=True,
            )
        )
    return ops


class Decider(Protocol):
    async def decide_given(
        self, docs: list[Doc], also: Callable[[AsyncClientSession], Awaitable[None]]
    ) -> int: ...


class CatalogFanout:
    def __init__(
        self,
        store: Store,
        *,
        batch_size: int = 1000,
        lease: timedelta = timedelta(seconds=60),
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        on_copies: Callable[[], None] | None = None,
        on_quarantined: Callable[[str], None] | None = None,
        retry_pause: timedelta = timedelta(seconds=5),
        decider: Decider | None = None,
    ) -> None:
        self.store = store
        # The inbox, which decides each batch of copies under the contacts' leases without storing them;
        # without it every copy is stored and queued for the inbox (the way for contacts it cannot take).
        self.decider = decider
        self.decided = 0
        self.catalog = Catalog(store)
        self.batch_size = batch_size
        self.lease = lease
        self.clock = clock
        self.on_copies = on_copies
        self.on_quarantined = on_quarantined
        self.retry_pause = retry_pause
        self.owner = uuid.uuid4().hex
        self.wake = asyncio.Event()
        self.copies = 0

    async def run(self, stop: asyncio.Event, idle_poll: float = 0.5) -> None:
        async def step() -> float:
            return 0.0 if await self.process_once() else idle_poll

        await work_loop("catalog", step, stop, self.wake)

    async def process_once(self) -> bool:
        """Takes the oldest catalog event with work nobody holds: records its change and cuts it into parts
        when nobody has yet, else fans out one batch of a part of it."""
        now = self.clock()
        claimed = await self.catalog.claim(self.owner, now, self.lease)
        if claimed is None:
            return False
        event, part = claimed
        try:
            if part is None:
                await self._cut(event, now)
            else:
                await self._part(event, part, now)
        except Superseded as exc:  # another fan-out holds it now and decides this batch
            log.info("catalog.claim_taken_over", event_id=event["_id"], why=str(exc))
        except Exception as exc:
            if transient(exc):
                raise
            # Set aside with its error, and out of the way for a while: the catalog events behind it go on.
            error = failure_text(exc)
            retry_at = now + self.retry_pause
            quarantined = await self.store.event_failed(event["_id"], error, "fanout", now, retry_at=retry_at)
            if part is not None:
                await self.catalog.release(part["_id"], self.owner)
            log.error(
                "catalog.event_quarantined" if quarantined else "catalog.event_failed",
                event_id=event["_id"],
                event_type=event.get("type"),
                error=error,
            )
            if quarantined and self.on_quarantined is not None:
                self.on_quarantined("fanout")
        return True

    async def _cut(self, event: Doc, now: datetime) -> None:
        """The catalog change recorded, and the interested contacts cut into parts that every worker's
        fan-out takes one at a time (a run of the release before may have copied some: after `after`).
        The claim is renewed meanwhile: counting and passing over a million interests takes seconds, and
        on a slow or paused mongod longer than the lease, after which another worker would cut it again."""

        async def renew() -> None:
            await self.catalog.renew_event(event["_id"], self.owner, self.clock() + self.lease)

        async with renewing("catalog", renew, self.lease.total_seconds() / 3):
            await self._cut_now(event, now)

    async def _cut_now(self, event: Doc, now: datetime) -> None:
        fanout = event.get("fanout") or {}
        if "product" not in fanout:
            fanout["product"] = await self._update_catalog(event)
            await self.catalog.save_change(event["_id"], fanout["product"])
        after = fanout.get("after")
        interested = await self.catalog.count_interested(event, after)
        if not interested:
            await self.catalog.finish_event(event["_id"], now, self.owner)
            return
        bounds = await self.catalog.interested_at(event, after, part_ends(interested, self.batch_size))
        await self.catalog.cut(event["_id"], self.owner, fanout_ranges(after, bounds))

    async def _update_catalog(self, event: Doc) -> Doc:
        """Record the new price or stock and return what the copies need to know about the change."""
        attributes = event.get("attributes") or {}
        product_id = str(attributes["product_id"])
        before = await self.catalog.product(product_id)
        fields, change = catalog_change(event["type"], attributes, before)
        fields["updated_at"] = event["time"]
        await self.catalog.save_product(product_id, fields)
        return change

    async def _part(self, event: Doc, part: Doc, now: datetime) -> None:
        """One batch of the part; the part done when a batch comes up short."""
        if await self._batch(event, part):
            await self.catalog.finish_part(event["_id"], part["_id"], self.owner, now)

    async def _batch(self, event: Doc, part: Doc) -> bool:
        interests = await self.catalog.interested(event, part["after"], part["upto"], self.batch_size)
        if not interests:
            return True
        now = self.clock()
        copies = []
        shared = {**(event.get("attributes") or {}), **event["fanout"]["product"]}
        for interest in interests:
            attributes = dict(shared)
            attributes["interest"] = {
                k: interest[f"{k}_at"].isoformat()
                for k in ("viewed", "wishlisted", "wanted_oos")
                if f"{k}_at" in interest
            }
            copies.append(
                {"_id": fanout_copy_id(event["_id"], interest["contact_id"]), "type": event["type"],
                 "contact_id": interest["contact_id"], "time": event["time"], "attributes": attributes,
                 "received_at": now, "fanout_of": event["_id"]}
            )  # fmt: skip
        position = interests[-1]["_id"]
        if self.decider is None:
            until = self.clock() + self.lease
            await self.catalog.queue_copies(copies, part["_id"], self.owner, part["after"], position, until)
        else:
            # Copies an earlier run queued are the inbox's: a direct batch's for contacts another batch
            # held, or 0.1.0's, which saved its position after its copies.
            stored = await self.catalog.stored_copies([c["_id"] for c in copies])
            fresh = [c for c in copies if c["_id"] not in stored]

            async def save(session: AsyncClientSession) -> None:
                until = self.clock() + self.lease
                await self.catalog.advance(part["_id"], self.owner, part["after"], position, until, session)

            self.decided += await self.decider.decide_given(fresh, save)
        self.copies += len(copies)
        if self.on_copies is not None:
            self.on_copies()
        return len(interests) < self.batch_size
