"""The catalog fan-out: a `price_changed` or `stock_changed` copied into the inbox once per interested
contact (what counts as interested, and the catalog change itself, are decided in `rulesvc.core.catalog`).

The copies are written in batches, the position is saved after each, and each copy has a fixed id: a crash
resumes the fan-out without a duplicate, and ingestion goes on meanwhile because the inbox processes the
copies like other events.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from pymongo import ASCENDING, UpdateOne
from pymongo.errors import BulkWriteError

from rulesvc.core.catalog import VIEW_WINDOW, catalog_change, interest_fields
from rulesvc.core.ids import fanout_copy_id
from rulesvc.runtime.waiting import work_loop
from rulesvc.store.db import DUPLICATE_KEY, PENDING, Doc, Store, failure_text, transient

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
    ) -> None:
        self.store = store
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
        """Takes the oldest catalog event nobody holds and fans out one batch of it."""
        now = self.clock()
        event = await self.store.events.find_one_and_update(
            {"state": PENDING, "contact_id": None,
             "$or": [{"fanout.until": {"$exists": False}}, {"fanout.until": {"$lt": now}},
                     {"fanout.owner": self.owner}]},
            {"$set": {"fanout.owner": self.owner, "fanout.until": now + self.lease}},
            sort=[("time", ASCENDING), ("_id", ASCENDING)],
            hint="inbox_pending",  # its `contact_id: null` range; another index scans every pending event
        )  # fmt: skip
        if event is None:
            return False
        try:
            await self._fan_out(event, now)
        except Exception as exc:
            if transient(exc):
                raise
            # Set aside with its error, and out of the way for a while: the catalog events behind it go on.
            error = failure_text(exc)
            retry_at = now + self.retry_pause
            quarantined = await self.store.event_failed(event["_id"], error, "fanout", now, retry_at=retry_at)
            log.error(
                "catalog.event_quarantined" if quarantined else "catalog.event_failed",
                event_id=event["_id"],
                event_type=event.get("type"),
                error=error,
            )
            if quarantined and self.on_quarantined is not None:
                self.on_quarantined("fanout")
        return True

    async def _fan_out(self, event: Doc, now: datetime) -> None:
        fanout = event.get("fanout") or {}
        if "product" not in fanout:
            fanout["product"] = await self._update_catalog(event)
            await self.store.events.update_one(
                {"_id": event["_id"]}, {"$set": {"fanout.product": fanout["product"]}}
            )
        done = await self._batch(event, fanout)
        if done:
            await self.store.events.update_one(
                {"_id": event["_id"]},
                {"$set": {"state": "done", "processed_at": now}, "$unset": {"fanout.until": ""}},
            )

    async def _update_catalog(self, event: Doc) -> Doc:
        """Record the new price or stock and return what the copies need to know about the change."""
        attributes = event.get("attributes") or {}
        product_id = str(attributes["product_id"])
        before = await self.store.products.find_one({"_id": product_id}) or {}
        fields, change = catalog_change(event["type"], attributes, before)
        fields["updated_at"] = event["time"]
        await self.store.products.update_one({"_id": product_id}, {"$set": fields}, upsert=True)
        return change

    def _interested(self, event: Doc) -> Doc:
        """The query form of `interested`."""
        product = str((event.get("attributes") or {})["product_id"])
        if event["type"] == "price_changed":
            since = event["time"] - VIEW_WINDOW
            return {
                "product_id": product,
                "$or": [{"viewed_at": {"$gte": since}}, {"wishlisted_at": {"$exists": True}}],
            }
        return {
            "product_id": product,
            "$or": [{"wanted_oos_at": {"$exists": True}}, {"wishlisted_at": {"$exists": True}}],
        }

    async def _batch(self, event: Doc, fanout: Doc) -> bool:
        query = self._interested(event)
        if "after" in fanout:
            query["_id"] = {"$gt": fanout["after"]}
        interests = (
            await self.store.interests.find(query).sort("_id", ASCENDING).limit(self.batch_size).to_list()
        )
        if not interests:
            return True
        now = self.clock()
        copies = []
        for interest in interests:
            attributes = {**(event.get("attributes") or {}), **fanout["product"]}
            attributes["interest"] = {
                k: interest[f"{k}_at"].isoformat()
                for k in ("viewed", "wishlisted", "wanted_oos")
                if f"{k}_at" in interest
            }
            copies.append(
                {"_id": fanout_copy_id(event["_id"], interest["contact_id"]), "type": event["type"],
                 "contact_id": interest["contact_id"], "time": event["time"], "attributes": attributes,
                 "received_at": now, "state": PENDING, "fanout_of": event["_id"]}
            )  # fmt: skip
        try:
            await self.store.events.insert_many(copies, ordered=False)
        except BulkWriteError as exc:  # copies of a run that died before saving its position
            if any(e.get("code") != DUPLICATE_KEY for e in exc.details.get("writeErrors", [])):
                raise
        self.copies += len(copies)
        await self.store.events.update_one(
            {"_id": event["_id"]}, {"$set": {"fanout.after": interests[-1]["_id"]}}
        )
        if self.on_copies is not None:
            self.on_copies()
        return len(interests) < self.batch_size
