"""The carts kept from Segment's cart calls (`segment_carts`, rulesvc/core/carts.py): one document per
contact and cart, `{"_id": "<contact>" or "<contact>/<cart_id>", "contact_id", "cart_id", "lines",
"currency", "applied": [message ids], "version", "updated_at"}` (contact ids hold no `/`, so the two never
meet). Changed by a version check, so two requests of the same contact at once lose no product; a cart
untouched for `CART_MEMORY` is forgotten."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from pymongo import ASCENDING, IndexModel
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.errors import DuplicateKeyError

from rulesvc.core.carts import APPLIED_KEPT, Cart, CartChange, changed, merged

if TYPE_CHECKING:
    from rulesvc.store.db import Store

Doc = dict[str, Any]
CARTS = "segment_carts"
CART_MEMORY = timedelta(days=30)
ATTEMPTS = 50  # version conflicts in a row before giving up: each one is another request's write done


class CartContention(Exception):
    """The cart kept changing under this request (ATTEMPTS writers at once)."""


def cart_key(contact_id: str, cart_id: str | None) -> str:
    return contact_id if cart_id is None else f"{contact_id}/{cart_id}"


def _cart(doc: Doc | None) -> Cart:
    if doc is None:
        return Cart()
    return Cart(doc.get("lines") or [], doc.get("applied") or [], doc.get("currency"), doc.get("version", 0))


class Carts:
    def __init__(self, store: Store) -> None:
        self.carts = store.db[CARTS]

    async def ensure_indexes(self) -> None:
        await self.carts.create_indexes(
            [
                IndexModel([("contact_id", ASCENDING)], name="segment_carts_by_contact"),
                IndexModel([("updated_at", ASCENDING)], name="segment_carts_ttl",
                           expireAfterSeconds=int(CART_MEMORY.total_seconds())),
            ]
        )  # fmt: skip

    async def apply(self, change: CartChange, now: datetime) -> Cart | None:
        """The change made once (a retried message id is not applied again) and the cart after it. None
        for `keep` and `remove` on a cart not kept, and for `clear`, which deletes every cart of the
        contact (its event, an order, is not about the cart)."""
        contact = str(change.event.contact_id)
        if change.op == "clear":
            await self.carts.delete_many({"contact_id": contact})
            return None
        key = cart_key(contact, change.cart_id)
        for _ in range(ATTEMPTS):
            doc = await self.carts.find_one({"_id": key})
            cart = _cart(doc)
            if doc is None and change.op in ("keep", "remove"):
                return None  # no cart known (begun before the upgrade, or forgotten): nothing to say
            if change.op == "keep" or change.event.id in cart.applied:
                return cart
            given = change.event.attributes.get("currency")
            after = Cart(
                changed(cart.lines, change.op, change.items),
                [*cart.applied, change.event.id][-APPLIED_KEPT:],
                given if isinstance(given, str) else cart.currency,
                cart.version + 1,
            )
            fields = {"lines": after.lines, "applied": after.applied, "currency": after.currency,
                      "version": after.version, "updated_at": now}  # fmt: skip
            if doc is None:
                try:
                    await self.carts.insert_one(
                        {"_id": key, "contact_id": contact, "cart_id": change.cart_id, **fields}
                    )
                except DuplicateKeyError:
                    continue  # made meanwhile by another request: change that one
                return after
            result = await self.carts.update_one({"_id": key, "version": cart.version}, {"$set": fields})
            if result.matched_count:
                return after
        raise CartContention(key)

    async def merge(
        self, anonymous_id: str, known_id: str, now: datetime, session: AsyncClientSession
    ) -> int:
        """For the identity merge (in its transaction): the anonymous contact's carts joined into the
        known contact's carts of the same cart id; how many moved."""
        found = await self.carts.find({"contact_id": anonymous_id}, session=session).to_list()
        for doc in found:
            key = cart_key(known_id, doc.get("cart_id"))
            known = _cart(await self.carts.find_one({"_id": key}, session=session))
            fields = {
                "contact_id": known_id,
                "cart_id": doc.get("cart_id"),
                "lines": merged(known.lines, doc.get("lines") or []),
                "applied": [*known.applied, *(doc.get("applied") or [])][-APPLIED_KEPT:],
                "currency": known.currency or doc.get("currency"),
                "version": known.version + 1,
                "updated_at": now,
            }
            await self.carts.update_one({"_id": key}, {"$set": fields}, upsert=True, session=session)
            await self.carts.delete_one({"_id": doc["_id"]}, session=session)
        return len(found)
