"""Catalog events fan out to the contacts interested in the product.

The interest index (`interests`, one document per contact and product) is kept up to date from the
contacts' own events: a product view (and a view while out of stock), a wishlist entry, a back-in-stock
subscription (`subscribed` with a `product_id`). The catalog (`products`) remembers each product's last
price and stock, so a `price_changed` knows the price it replaces.

A `price_changed` or `stock_changed` is then copied, once per interested contact, into the inbox as that
contact's own event (same type, with `previous_price`, `drop_percent`, `back_in_stock` and the contact's
`interest`), where the rulesets decide as for any other event. The copies are written in batches, the
position is saved after each, and each copy has a fixed id: a crash resumes the fan-out without a
duplicate, and ingestion goes on meanwhile because the inbox processes the copies like other events.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

Doc = dict[str, Any]

VIEW_WINDOW = timedelta(days=30)  # who viewed a product this recently counts as interested in its price


def catalog_change(event_type: str, attributes: Doc, before: Doc) -> tuple[Doc, Doc]:
    """(the product's new fields, what the copies learn) for one catalog event. Pure: the live fan-out
    and the simulator share it."""
    change: Doc = {"product_id": str(attributes["product_id"])}
    fields: Doc = {}
    if event_type == "price_changed" and isinstance(attributes.get("price"), int | float):
        price = float(attributes["price"])
        previous = attributes.get("previous_price", before.get("price"))
        fields["price"] = price
        if isinstance(previous, int | float) and previous > 0:
            change["previous_price"] = float(previous)
            change["drop_percent"] = round((float(previous) - price) / float(previous) * 100, 2)
    if event_type == "stock_changed":
        in_stock = attributes.get("in_stock")
        if isinstance(in_stock, bool):
            fields["in_stock"] = in_stock
            change["back_in_stock"] = in_stock and before.get("in_stock") is not True
        if isinstance(attributes.get("quantity"), int):
            fields["quantity"] = attributes["quantity"]
    return fields, change


def interested(event_type: str, interest: Doc, at: datetime) -> bool:
    """Price: viewed in the last 30 days, or wishlisted. Stock: wanted while out of stock, or wishlisted."""
    if interest.get("wishlisted_at") is not None:
        return True
    if event_type == "price_changed":
        return interest.get("viewed_at") is not None and interest["viewed_at"] >= at - VIEW_WINDOW
    return interest.get("wanted_oos_at") is not None


def guard_fails(guard: str | None, params: Doc, product: Doc) -> str | None:
    """What a message promised must still hold: a price drop still a drop, a product still in stock."""
    if guard == "price_still_lower":
        price, promised = product.get("price"), params.get("price")
        if not isinstance(price, int | float) or not isinstance(promised, int | float) or price > promised:
            return f"the price is no longer {promised} (now {price})"
    if guard == "still_in_stock" and product.get("in_stock") is not True:
        return "the product is out of stock again"
    return None


INTEREST_EVENTS = ("product_viewed", "wishlist_added", "subscribed")  # the types `interest_fields` reads


def interest_fields(doc: Doc) -> Doc:
    """What one contact event says about interest in its product (empty if nothing)."""
    attributes = doc.get("attributes") or {}
    if attributes.get("product_id") is None:
        return {}
    if doc["type"] == "product_viewed":
        fields = {"viewed_at": doc["time"]}
        if attributes.get("in_stock") is False:
            fields["wanted_oos_at"] = doc["time"]
        return fields
    if doc["type"] == "wishlist_added":
        return {"wishlisted_at": doc["time"]}
    if doc["type"] == "subscribed":
        return {"wanted_oos_at": doc["time"]}  # a back-in-stock subscription
    return {}
