"""Catalog events fan out to the contacts interested in the product.

The interest index (`interests`, one document per contact and product) is kept up to date from the
contacts' own events: a product view (and a view while out of stock), a wishlist entry, a back-in-stock
subscription (`subscribed` with a `product_id`). The catalog (`products`) remembers each product's last
price and stock, so a `price_changed` knows the price it replaces.

A `price_changed` or `stock_changed` is then copied, once per interested contact, into the inbox as that
contact's own event (same type, with `previous_price`, `drop_percent`, `back_in_stock` and the contact's
`interest`), where the rulesets decide as for any other event. The copies are written in batches, each
in one transaction with the position, and each copy has a fixed id: a crash resumes the fan-out without a
duplicate, and ingestion goes on meanwhile because the inbox processes the copies like other events.

What a catalog event must carry (`catalog_problems`, documented in docs/rulesets.md "Catalog events") is
checked at the door by the one event validator, so the copies hold what the shipped rulesets read.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from datetime import datetime, timedelta
from typing import Any, TypeGuard

Doc = dict[str, Any]

VIEW_WINDOW = timedelta(days=30)  # who viewed a product this recently counts as interested in its price


# --- the contract: what a catalog event's attributes must hold ----------------------------------------
# Only the contract's own fields are checked; anything else a shop sends is kept and readable by rules.
# An optional field that is null counts as absent.

DESCRIPTIVE = ("name", "url", "image_url")  # optional strings, for the messages (`product_name` etc.)
CURRENCY = re.compile(r"^[A-Z]{3}\Z")

# Keys that shops send for a contract field under another name: named in the error so it says what to do.
ALIASES = {
    "product_id": ("productId", "product", "productID", "item_id", "itemId"),
    "price": ("new_price", "newPrice", "current_price", "currentPrice", "price_new", "sale_price", "amount"),
    "previous_price": (
        *("old_price", "oldPrice", "previousPrice", "was_price", "price_before", "price_old"),
        *("compare_at_price", "regular_price"),
    ),
    "in_stock": ("inStock", "instock", "is_in_stock", "isInStock", "available", "availability", "stock"),
}


def is_price(value: Any) -> TypeGuard[float]:
    """A price the engine can compare and compute a drop with: a finite number, 0 or more."""
    return (
        isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
    )


def is_previous_price(value: Any) -> TypeGuard[float]:
    """A price to compute a drop from: above 0, as a drop in percent divides by it."""
    return is_price(value) and value > 0


def is_quantity(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _got(attributes: Doc, key: str) -> str:
    """What was sent, in the error's words."""
    if key not in attributes:
        return "got none"
    value = attributes[key]
    if value is None:
        return "got null"
    if isinstance(value, bool):
        return f"got {str(value).lower()}"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:40] + "..."
        return f"got the string {json.dumps(shown)}"
    if isinstance(value, int | float):
        return f"got {value}"
    return f"got {'a list' if isinstance(value, list) else 'an object'}"


def _squash(key: str) -> str:
    return key.replace("_", "").replace("-", "").lower()


# The typo hints (difflib) cost the most: they are looked for only in an event with few keys, and only by
# callers that bound how many events they ask them for (ingest: the first refused ones of a batch). On
# every key of a 5 MB body of refused events they held the event loop for seconds.
FUZZY_KEYS = 32
HINTS = 3  # near misses named at most, per missing field


def _near_misses(attributes: Doc, field: str, fuzzy: bool) -> list[str]:
    """Keys sent that were probably meant as `field`: known aliases, another spelling, or (if `fuzzy`)
    a typo."""
    squashed = _squash(field)
    aliases = ALIASES.get(field, ())
    fuzzy = fuzzy and len(attributes) <= FUZZY_KEYS
    found: list[str] = []
    for key in attributes:
        if key == field:
            continue
        if key in aliases or (len(key) >= len(squashed) and _squash(key) == squashed):
            found.append(key)
        elif fuzzy and len(key) <= 1.5 * len(field):  # a longer key cannot reach the ratio
            matcher = difflib.SequenceMatcher(None, key.lower(), field)
            if matcher.real_quick_ratio() >= 0.8 and matcher.quick_ratio() >= 0.8 and matcher.ratio() >= 0.8:
                found.append(key)
        if len(found) >= HINTS:
            break
    return found


def _hint(attributes: Doc, fuzzy: bool, *fields: str) -> str:
    """` ... is not read: ...` for the near misses of a missing `fields[0]` (and of those it goes with)."""
    near = {key for field in fields for key in _near_misses(attributes, field, fuzzy)}
    misses = [key for key in attributes if key in near]  # in the order sent
    if not misses:
        return ""
    named = "/".join(f"`{key}`" for key in misses)
    verb = "is" if len(misses) == 1 else "are"
    if len(fields) == 1:
        return f". {named} {verb} not read: did you mean `{fields[0]}`?"
    return f". {named} {verb} not read: send `{fields[0]}`" + "".join(
        f" and optionally `{field}`" for field in fields[1:]
    )


def catalog_problems(event_type: str, attributes: Doc, fuzzy: bool = True) -> list[tuple[str, str]]:
    """Every way a catalog event's attributes break the contract, as (path, message); empty if none.
    Ingest and the simulator refuse such an event with these messages (core/events.py). `fuzzy`: the
    hints name typos too (see FUZZY_KEYS)."""
    problems: list[tuple[str, str]] = []

    def refuse(field: str, message: str) -> None:
        problems.append((f"$.attributes.{field}", message))

    product_id = attributes.get("product_id")
    if not isinstance(product_id, str | int) or isinstance(product_id, bool):
        example = 'e.g. "lamp-42"'
        got = _got(attributes, "product_id") + _hint(attributes, fuzzy, "product_id")
        refuse("product_id", f"{event_type} needs a `product_id`, a string or an integer, {example}; {got}")
    if event_type == "price_changed":
        price = attributes.get("price")
        if isinstance(price, int | float) and not isinstance(price, bool) and not is_price(price):
            refuse("price", f"`price` must be 0 or more; {_got(attributes, 'price')}")
        elif not is_price(price):
            got = _got(attributes, "price") + _hint(attributes, fuzzy, "price", "previous_price")
            if isinstance(price, str):
                got += ". Send it as a JSON number, without quotes"
            refuse("price", f"price_changed needs a numeric `price`, e.g. 79.9; {got}")
        previous = attributes.get("previous_price")
        if previous is not None and not is_previous_price(previous):
            what = "`previous_price`, the price before this change, must be a number above 0 if sent"
            refuse("previous_price", f"{what}, e.g. 99.9; {_got(attributes, 'previous_price')}")
        currency = attributes.get("currency")
        if currency is not None and not (isinstance(currency, str) and CURRENCY.match(currency)):
            what = "`currency` must be an ISO 4217 code if sent, three upper-case letters such as EUR"
            refuse("currency", f"{what}; {_got(attributes, 'currency')}")
    if event_type == "stock_changed":
        if not isinstance(attributes.get("in_stock"), bool):
            got = _got(attributes, "in_stock") + _hint(attributes, fuzzy, "in_stock")
            refuse("in_stock", f"stock_changed needs a boolean `in_stock`, true or false; {got}")
        quantity = attributes.get("quantity")
        if quantity is not None and not is_quantity(quantity):
            what = "`quantity`, the number in stock, must be a whole number, 0 or more, if sent"
            refuse("quantity", f"{what}, e.g. 12; {_got(attributes, 'quantity')}")
    for field in DESCRIPTIVE:
        if attributes.get(field) is not None and not isinstance(attributes[field], str):
            refuse(field, f"`{field}` must be a string if sent; {_got(attributes, field)}")
    return problems


def catalog_change(event_type: str, attributes: Doc, before: Doc) -> tuple[Doc, Doc]:
    """(the product's new fields, what the copies learn) for one catalog event. Pure: the live fan-out
    and the simulator share it. A value the contract refuses counts as absent: ingest refuses it, but an
    event stored by an older version may still hold one, and its fan-out or replay must not fail."""
    change: Doc = {"product_id": str(attributes["product_id"])}
    fields: Doc = {}
    if event_type == "price_changed" and is_price(attributes.get("price")):
        price = float(attributes["price"])
        previous = attributes.get("previous_price")
        if not is_previous_price(previous):
            previous = before.get("price")
        fields["price"] = price
        if is_previous_price(previous):
            change["previous_price"] = float(previous)
            change["drop_percent"] = round((float(previous) - price) / float(previous) * 100, 2)
    if event_type == "stock_changed":
        in_stock = attributes.get("in_stock")
        if isinstance(in_stock, bool):
            fields["in_stock"] = in_stock
            change["back_in_stock"] = in_stock and before.get("in_stock") is not True
        if is_quantity(attributes.get("quantity")):
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


PART_BATCHES = 4  # a part of a fan-out is at least this many batches: each claim pays for itself
MOST_PARTS = 16  # enough for every worker of a few machines to take one at a time


def part_ends(interested: int, batch_size: int, most: int = MOST_PARTS) -> list[int]:
    """Where the interested contacts of a fan-out are cut into parts that the workers claim one at a
    time, so a large fan-out is decided by all of them at once: the positions (from 0, in the interest
    index's order) of the last interest of every part but the last. Positions, not ids, so the store can
    pick the ids while it reads the index once, without holding all of them (a product with a million
    interests is not a million ids in memory)."""
    count = min(most, max(1, interested // (PART_BATCHES * batch_size)))
    # Part i ends at the (interested * i // count)th id: sizes differ by one at most, none empty.
    return [interested * i // count - 1 for i in range(1, count)]


def fanout_ranges(after: str | None, bounds: list[str]) -> list[tuple[str | None, str | None]]:
    """The parts as ranges `(after, upto]` of the interest index, given the ids at `part_ends`. The first
    starts at `after` (where a run of the release before stopped), the last has no end: an interest added
    meanwhile falls in one of them, as it would in a fan-out in one piece."""
    return list(zip([after, *bounds], [*bounds, None], strict=True))
