"""Shopify's own bookkeeping: webhook ids already handled (`shopify_webhooks`, kept a few days), the
variants as last seen (`shopify_variants`: price, stock per location, the inventory item that names
them), and the privacy requests Shopify sent (`shopify_privacy_requests`)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from pymongo import ASCENDING, IndexModel, ReturnDocument, UpdateOne
from pymongo.errors import BulkWriteError, DuplicateKeyError

from rulesvc.core.shopify import Delivery, PrivacyAsk, VariantState

if TYPE_CHECKING:
    from rulesvc.store.db import Store

Doc = dict[str, Any]

# Shopify retries a failed delivery for up to 4 hours (8 times); a replay later than this is handled again,
# which the events' fixed ids still make harmless.
WEBHOOK_MEMORY = timedelta(days=3)


def _state(doc: Doc) -> VariantState:
    return VariantState(
        variant_id=doc["_id"],
        product_id=doc["product_id"],
        price=doc.get("price"),
        available=bool(doc.get("available")),
        quantity=doc.get("quantity"),
        tracked=bool(doc.get("tracked")),
        inventory_item_id=doc.get("inventory_item_id"),
        name=doc.get("name"),
        image_url=doc.get("image_url"),
        url=doc.get("url"),
        product_name=doc.get("product_name"),
    )


class ShopifyStore:
    def __init__(self, store: Store) -> None:
        self.webhooks = store.db["shopify_webhooks"]
        self.variants = store.db["shopify_variants"]
        self.privacy = store.db["shopify_privacy_requests"]
        self.events = store.events

    async def ensure_indexes(self) -> None:
        await self.webhooks.create_indexes(
            [IndexModel([("at", ASCENDING)], name="shopify_webhooks_ttl",
                        expireAfterSeconds=int(WEBHOOK_MEMORY.total_seconds()))]
        )  # fmt: skip
        await self.variants.create_indexes(
            [
                IndexModel([("product_id", ASCENDING)], name="shopify_variants_by_product"),
                IndexModel([("inventory_item_id", ASCENDING)], name="shopify_variants_by_item", sparse=True),
            ]
        )

    async def seen(self, webhook_id: str, body_sha256: str) -> bool:
        """Handled before: this webhook id, or this very body under this topic with any id (only the body
        is signed: a captured delivery posted again under a new id is a replay, not a new webhook)."""
        ids = [webhook_id, f"body:{body_sha256}"]
        return await self.webhooks.find_one({"_id": {"$in": ids}}, {"_id": 1}) is not None

    async def remember(self, delivery: Delivery, body_sha256: str, now: datetime) -> None:
        """Mark the delivery (and its body) handled, after it was: a crash in between means Shopify's
        retry does it again, which the fixed event ids make harmless."""
        seen = {
            "topic": delivery.topic,
            "shop": delivery.shop,
            "api_version": delivery.api_version,
            "at": now,
        }
        try:
            await self.webhooks.insert_many(
                [{"_id": delivery.webhook_id, **seen}, {"_id": f"body:{body_sha256}", **seen}], ordered=False
            )
        except BulkWriteError:
            pass  # two deliveries of the same webhook at once: both did the same, once is recorded

    async def contacts_of_events(self, event_ids: list[str]) -> list[str]:
        """The contacts these events were stored for (one query)."""
        if not event_ids:
            return []
        cursor = self.events.find({"_id": {"$in": event_ids}}, {"contact_id": 1})
        return [d["contact_id"] async for d in cursor if isinstance(d.get("contact_id"), str)]

    async def contact_of_event(self, event_id: str) -> str | None:
        """The contact of a stored event (an order's `purchased`: whose order a fulfillment ships)."""
        doc = await self.events.find_one({"_id": event_id}, {"contact_id": 1})
        contact = doc.get("contact_id") if doc else None
        return contact if isinstance(contact, str) else None

    async def order_of_checkout(self, contact_id: str, checkout: dict[str, str]) -> str | None:
        """The order (id) of the contact's `purchased` that came from this checkout (its `checkout_token`
        or `checkout_id`), if that arrived first. The contact's events, on `events_by_contact`."""
        if not checkout:
            return None
        query = {
            "contact_id": contact_id,
            "type": "purchased",
            "$or": [{f"attributes.{key}": value} for key, value in checkout.items()],
        }
        doc = await self.events.find_one(query, {"attributes.order_id": 1}, hint="events_by_contact")
        if doc is None:
            return None
        return str((doc.get("attributes") or {}).get("order_id") or doc["_id"])

    async def product_variants(self, product_id: str) -> list[VariantState]:
        docs = await self.variants.find({"product_id": product_id}).to_list()
        return [_state(d) for d in docs]

    async def save_variants(self, product_id: str, states: list[VariantState], now: datetime) -> None:
        """The product's variants as the last products/update had them; variants gone from it are
        forgotten. Stock per location (`levels`) is kept: inventory_levels/update owns it."""
        ops: list[Any] = []
        for s in states:
            fields = {
                "product_id": s.product_id, "price": s.price, "available": s.available,
                "quantity": s.quantity, "tracked": s.tracked, "inventory_item_id": s.inventory_item_id,
                "name": s.name, "image_url": s.image_url, "url": s.url, "product_name": s.product_name,
                "updated_at": now,
            }  # fmt: skip
            ops.append(UpdateOne({"_id": s.variant_id}, {"$set": fields}, upsert=True))
        if ops:
            await self.variants.bulk_write(ops, ordered=False)
        await self.variants.delete_many(
            {"product_id": product_id, "_id": {"$nin": [s.variant_id for s in states]}}
        )

    async def by_inventory_item(self, item_id: str) -> Doc | None:
        return await self.variants.find_one({"inventory_item_id": item_id})

    async def save_level(self, variant_id: str, location: str, available: int, now: datetime) -> Doc | None:
        """The units at one location; the variant's quantity becomes the sum over its known locations (with
        several locations, right once each has reported), and it is available if that is above 0."""
        doc = await self.variants.find_one_and_update(
            {"_id": variant_id},
            [
                {"$set": {f"levels.{location}": available}},
                {
                    "$set": {
                        "quantity": {
                            "$sum": {"$map": {"input": {"$objectToArray": "$levels"}, "in": "$$this.v"}}
                        },
                        "updated_at": now,
                    }
                },
                {"$set": {"available": {"$or": [{"$not": ["$tracked"]}, {"$gt": ["$quantity", 0]}]}}},
            ],
            return_document=ReturnDocument.AFTER,
        )
        return doc

    async def record_privacy(self, ask: PrivacyAsk, delivery: Delivery, now: datetime) -> str:
        """What Shopify asked, kept until it is done: contact ids and order ids only, no email or phone."""
        doc = {
            "_id": f"shopify/{delivery.webhook_id}",
            "topic": delivery.topic,
            "kind": ask.kind,
            "scope": ask.scope,
            "shop": ask.shop,
            "contact_ids": ask.contact_ids,
            "orders": ask.orders,
            "request_id": ask.request_id,
            "received_at": now,
            "done_at": None,
        }
        try:
            await self.privacy.insert_one(doc)
        except DuplicateKeyError:
            pass
        return str(doc["_id"])


def as_state(doc: Doc) -> VariantState:
    return _state(doc)


class ShopifyPrivacy:
    """The privacy requests Shopify sent that are not carried out yet, and the contacts of a shop."""

    def __init__(self, store: Store) -> None:
        self.requests = store.db["shopify_privacy_requests"]
        self.store = store

    async def open_requests(self, now: datetime, limit: int) -> list[Doc]:
        """Oldest first, those not waiting for a retry; a small collection (a document per request Shopify
        sends), read as it is."""
        query = {"done_at": None, "$or": [{"retry_at": None}, {"retry_at": {"$lte": now}}]}
        # A customer's request first (`customer` < `shop`): a shop's redact may take hours.
        cursor = (
            self.requests.find(query).sort([("scope", ASCENDING), ("received_at", ASCENDING)]).limit(limit)
        )
        return await cursor.to_list()

    async def failed(self, request_id: str, error: str, retry_at: datetime) -> None:
        """Kept open for another try later, the others meanwhile going first."""
        await self.requests.update_one(
            {"_id": request_id},
            {"$set": {"last_error": error, "retry_at": retry_at}, "$inc": {"attempts": 1}},
        )

    async def done(self, request_id: str, now: datetime, counts: Doc) -> None:
        await self.requests.update_one({"_id": request_id}, {"$set": {"done_at": now, "counts": counts}})

    async def shop_contacts(self, shop: str) -> AsyncIterator[str]:
        """Every contact Shopify told us about for this shop: profiles its customer webhooks wrote and the
        contacts of its checkouts, orders and fulfillments, streamed (a big shop has more ids than one
        document holds). Neither field is indexed: a shop's redact comes once, 48 hours after the app was
        uninstalled, and reads the collections through once."""
        if not shop:  # never "every contact stored without a shop"
            return
        seen: set[str] = set()
        async for doc in self.store.contacts.find({"attributes.shopify_shop": shop}, {"_id": 1}):
            seen.add(doc["_id"])
            yield doc["_id"]
        pipeline: list[Doc] = [{"$match": {"attributes.shop": shop}}, {"$group": {"_id": "$contact_id"}}]
        async for doc in await self.store.events.aggregate(pipeline):
            if isinstance(doc["_id"], str) and doc["_id"] not in seen:
                yield doc["_id"]
