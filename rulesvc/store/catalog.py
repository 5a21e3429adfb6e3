"""The catalog (`products`: each product's last price and stock), the interest index (`interests`: one
document per contact and product), and the fan-out's claim and position on a catalog event (on its queue
document: rulesvc.store.event_queue)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from pymongo import ASCENDING
from pymongo.asynchronous.client_session import AsyncClientSession

from rulesvc.core.catalog import VIEW_WINDOW
from rulesvc.store.db import Doc, Store
from rulesvc.store.event_queue import PENDING
from rulesvc.store.transactions import in_transaction


class Superseded(Exception):
    """The fan-out's claim on a catalog event was taken over (it ran out while a batch was being decided):
    that batch's decisions must not be committed, the new holder decides it."""


class Catalog:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def claim_event(self, owner: str, now: datetime, lease: timedelta) -> Doc | None:
        """The oldest catalog event nobody else holds, now held by `owner` for `lease`, with its `fanout`."""
        while True:
            queued = await self.store.queue.find_one_and_update(
                {"state": PENDING, "contact_id": None,
                 "$or": [{"fanout.until": {"$exists": False}}, {"fanout.until": {"$lt": now}},
                         {"fanout.owner": owner}]},
                {"$set": {"fanout.owner": owner, "fanout.until": now + lease}},
                sort=[("contact_id", ASCENDING), ("time", ASCENDING), ("_id", ASCENDING)],
                hint="inbox_pending",  # its `contact_id: null` range
            )  # fmt: skip
            if queued is None:
                return None
            found = await self.store.events_of([queued])  # an event gone: its queue document goes too
            if found:
                return found[0]

    async def save_change(self, event_id: str, change: Doc) -> None:
        """What the copies are to know about the product's change, kept for a resumed run."""
        await self.store.queue.update_one({"_id": event_id}, {"$set": {"fanout.product": change}})

    async def save_position(
        self, event_id: str, after: str, session: AsyncClientSession | None = None
    ) -> None:
        """The last interest copied or decided: a resumed run goes on after it. With `session`, in the
        transaction of the decisions it covers."""
        position = {"$set": {"fanout.after": after}}
        await self.store.queue.update_one({"_id": event_id}, position, session=session)

    async def advance(
        self,
        event_id: str,
        owner: str,
        before: str | None,
        after: str,
        until: datetime,
        session: AsyncClientSession,
    ) -> None:
        """The position moved from `before` to `after` and the claim extended, in the transaction of the
        batch it covers, only while `owner` still holds the event at `before`: else `Superseded`, and the
        transaction with its decisions is not committed (decided copies are not stored, so nothing else
        would keep a second holder from deciding the same batch again)."""
        at = {"fanout.after": before} if before is not None else {"fanout.after": {"$exists": False}}
        result = await self.store.queue.update_one(
            {"_id": event_id, "state": PENDING, "fanout.owner": owner, **at},
            {"$set": {"fanout.after": after, "fanout.until": until}},
            session=session,
        )
        if result.matched_count != 1:
            raise Superseded(f"catalog event {event_id}: the fan-out's claim was taken over")

    async def stored_copies(self, ids: list[str]) -> set[str]:
        """Which of these copies an earlier run queued (they are the inbox's now, never decided twice)."""
        return {d["_id"] async for d in self.store.events.find({"_id": {"$in": ids}}, {"_id": 1})}

    async def finish_event(self, event_id: str, now: datetime) -> None:
        """Out of the queue and counted, in one transaction. A repeat finds it gone: nothing to change."""

        async def write(session: AsyncClientSession) -> None:
            result = await self.store.queue.delete_one({"_id": event_id, "state": PENDING}, session=session)
            if result.deleted_count:  # a catalog event is decided once its copies are all made
                await self.store.count_decided(now, 1, "fanout", session)

        await in_transaction(self.store.client, write)

    async def product(self, product_id: str) -> Doc:
        """The product's last known fields (`{}` for a product not seen before)."""
        return await self.store.products.find_one({"_id": product_id}) or {}

    async def save_product(self, product_id: str, fields: Doc) -> None:
        await self.store.products.update_one({"_id": product_id}, {"$set": fields}, upsert=True)

    async def interested(self, event: Doc, after: str | None, limit: int) -> list[Doc]:
        """The interests in the event's product that count for its type (the query form of
        `rulesvc.core.catalog.interested`), in id order after `after`."""
        product = str((event.get("attributes") or {})["product_id"])
        query: Doc
        if event["type"] == "price_changed":
            since = event["time"] - VIEW_WINDOW
            query = {
                "product_id": product,
                "$or": [{"viewed_at": {"$gte": since}}, {"wishlisted_at": {"$exists": True}}],
            }
        else:
            query = {
                "product_id": product,
                "$or": [{"wanted_oos_at": {"$exists": True}}, {"wishlisted_at": {"$exists": True}}],
            }
        if after is not None:
            query["_id"] = {"$gt": after}
        return await self.store.interests.find(query).sort("_id", ASCENDING).limit(limit).to_list()

    async def insert_copies(self, copies: list[Doc]) -> None:
        """The per-contact copies of a catalog event, queued with them; copies already there (a run that
        died before saving its position) are left as they are."""
        await self.store.insert_queued(copies)

    async def update_interests(self, ops: list[Any], session: AsyncClientSession) -> None:
        """Index writes for a batch of contact events (see `rulesvc.runtime.fanout.interest_updates`)."""
        await self.store.interests.bulk_write(ops, ordered=False, session=session)
