"""The backtest's reads: a window of stored events in per-contact time order, the catalog events of the
window, today's profiles, and the messages the service recorded. Nothing here writes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

from pymongo import ASCENDING, DESCENDING

from rulesvc.core.catalog import INTEREST_EVENTS
from rulesvc.core.contacts import PROFILE_FIELDS
from rulesvc.core.engine import TIMER_EVENT
from rulesvc.store.db import Doc, Store
from rulesvc.store.event_queue import DROPPED, QUARANTINED

EVENT_FIELDS = {"_id": 1, "type": 1, "contact_id": 1, "time": 1, "attributes": 1}
# Events the live service never evaluated: set aside (quarantined) or dropped by an operator.
NEVER_EVALUATED = {"$nin": [QUARANTINED, DROPPED]}


def _products(products: list[str]) -> list[Any]:
    """A product id as stored in events: a string, or the integer a shop may have sent."""
    return [*products, *(int(p) for p in products if p.isdigit() and len(p) < 19)]


def _contact_events(start: datetime, end: datetime, contacts: list[str] | None) -> Doc:
    """What a replay reads of a contact's own events: what was posted and what providers reported. Not
    the service's own copies (a catalog event's per-contact copy, a wait's timer): the replay makes them."""
    return {
        "contact_id": {"$in": contacts} if contacts is not None else {"$ne": None},
        "time": {"$gte": start, "$lt": end},
        "type": {"$ne": TIMER_EVENT},
        "fanout_of": {"$exists": False},
        "state": NEVER_EVALUATED,
    }


def _catalog_events(start: datetime, end: datetime) -> Doc:
    return {"contact_id": None, "time": {"$gte": start, "$lt": end}, "state": NEVER_EVALUATED}


class BacktestReads:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def count_events(self, start: datetime, end: datetime, contacts: list[str] | None) -> int:
        """The contacts' events of the window, and the catalog events (each replayed once per version)."""
        own = await self.store.events.count_documents(
            _contact_events(start, end, contacts), hint="events_by_contact"
        )
        return own + await self.store.events.count_documents(
            _catalog_events(start, end), hint="events_by_contact"
        )

    async def contact_events(
        self, start: datetime, end: datetime, contacts: list[str] | None
    ) -> AsyncIterator[Doc]:
        """Grouped by contact, each contact's in time order: the `events_by_contact` index (contact
        ascending, time descending) walked backwards, so MongoDB sorts nothing and the replay keeps one
        contact in memory at a time. Same-moment events are put in id order by the caller."""
        cursor = self.store.events.find(
            _contact_events(start, end, contacts),
            EVENT_FIELDS,
            sort=[("contact_id", DESCENDING), ("time", ASCENDING)],
            hint="events_by_contact",
            batch_size=2000,
        )
        async for doc in cursor:
            yield doc

    async def catalog_events(self, start: datetime, end: datetime) -> list[Doc]:
        """The window's price and stock changes (no contact), in time order."""
        return await self.store.events.find(
            _catalog_events(start, end),
            EVENT_FIELDS,
            sort=[("contact_id", ASCENDING), ("time", ASCENDING), ("_id", ASCENDING)],
        ).to_list()

    async def prior_interest(self, contact_ids: list[str], since: datetime, start: datetime) -> list[Doc]:
        """These contacts' events before the window that show interest in a product (a view, a wishlist
        entry, a subscription): the live fan-out counts them for the window's price and stock changes."""
        return await self.store.events.find(
            {
                "contact_id": {"$in": contact_ids},
                "time": {"$gte": since, "$lt": start},
                "type": {"$in": list(INTEREST_EVENTS)},
                "attributes.product_id": {"$exists": True},
                "fanout_of": {"$exists": False},
                "state": NEVER_EVALUATED,
            },
            {"type": 1, "contact_id": 1, "time": 1, "attributes.product_id": 1, "attributes.in_stock": 1},
            hint="events_by_contact",
        ).to_list()

    async def interested_contacts(self, products: list[str]) -> set[str]:
        """The contacts the interest index links to these products (whenever their interest began); a
        cursor, not `distinct`, whose answer is one document of at most 16 MB."""
        cursor = await self.store.interests.aggregate(
            [{"$match": {"product_id": {"$in": products}}}, {"$group": {"_id": "$contact_id"}}]
        )
        return {str(doc["_id"]) async for doc in cursor}

    async def catalog_before(self, products: list[str], since: datetime, start: datetime) -> list[Doc]:
        """Per product, its last price change and its last stock change before the window (`type`,
        `attributes`): the catalog as the window found it."""
        match: Doc = {"contact_id": None, "time": {"$gte": since, "$lt": start},
                 "attributes.product_id": {"$in": _products(products)}, "state": NEVER_EVALUATED}  # fmt: skip
        last: Doc = {"_id": {"product": "$attributes.product_id", "type": "$type"},
                "attributes": {"$last": "$attributes"}}  # fmt: skip
        pipeline = [{"$match": match}, {"$sort": {"time": ASCENDING, "_id": ASCENDING}}, {"$group": last}]
        cursor = await self.store.events.aggregate(pipeline, hint="events_by_contact")
        return [{"type": doc["_id"]["type"], "attributes": doc["attributes"]} async for doc in cursor]

    async def profiles(self, contact_ids: list[str]) -> dict[str, Doc]:
        """Today's profiles of these contacts: what a channel and a rule see (not the service's state)."""
        fields: dict[str, Any] = dict.fromkeys(PROFILE_FIELDS, 1)
        found: dict[str, Doc] = {}
        async for doc in self.store.contacts.find({"_id": {"$in": contact_ids}}, fields):
            found[doc.pop("_id")] = doc
        return found

    async def recorded_messages(self, contact_ids: list[str], start: datetime, end: datetime) -> list[Doc]:
        """The messages the service decided for these contacts in the window."""
        fields = {"contact_id": 1, "ruleset": 1, "rule": 1, "channel": 1, "sent_channel": 1, "status": 1,
                  "reason": 1, "created_at": 1, "due_at": 1}  # fmt: skip
        return await self.store.messages.find(
            {"contact_id": {"$in": contact_ids}, "created_at": {"$gte": start, "$lt": end}},
            fields,
            hint="messages_by_contact",
        ).to_list()
