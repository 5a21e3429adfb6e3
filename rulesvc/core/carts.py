"""A contact's cart as the service keeps it from Segment's cart calls (`Product Added`, `Product Removed`,
`Cart Viewed`, `Order Completed`): Segment sends one product per call, while the cart rules read the whole
cart (its `items` and `value`). Pure: rulesvc/store/carts.py stores the carts, the Segment view applies
each message's change in message order and gives the event the cart as it is after it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from rulesvc.core.events import Event

CartOp = Literal["add", "remove", "replace", "keep", "clear"]
MAX_LINES = 100  # a cart of more distinct products keeps the latest ones: no shop's cart is that long
KEY_FIELDS = ("product_id", "sku", "id", "name")  # a line is one product: its first present of these
APPLIED_KEPT = 50  # message ids remembered per cart, so a retried message changes the cart once


@dataclass
class CartChange:
    """What one message does to its contact's cart. `items`: the products it names (`replace`: the whole
    cart); `keep` changes nothing (a `Cart Viewed` without products), `clear` empties every cart of the
    contact (an order placed). `items_to`/`value_to`: the event's attributes that get the cart."""

    event: Event
    op: CartOp
    cart_id: str | None = None
    items: list[dict[str, Any]] = field(default_factory=list)
    items_to: str = "items"
    value_to: str | None = "value"


@dataclass
class Cart:
    """A stored cart (`version` 0: none stored yet)."""

    lines: list[dict[str, Any]] = field(default_factory=list)
    applied: list[str] = field(default_factory=list)
    currency: str | None = None
    version: int = 0


def line_key(item: dict[str, Any]) -> str | None:
    for name in KEY_FIELDS:
        value = item.get(name)
        if isinstance(value, str | int) and not isinstance(value, bool) and str(value):
            return str(value)
    return None


def _quantity(item: dict[str, Any]) -> float | None:
    value = item.get("qty", item.get("quantity"))
    return value if isinstance(value, int | float) and not isinstance(value, bool) else None


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else round(value, 6)


def changed(lines: list[dict[str, Any]], op: CartOp, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The cart's lines after the change: an added product's quantity (1 when not given) adds to its line
    (its other fields take the latest values); a removed one's quantity is taken off its line (the whole
    line when not given, or when nothing is left); `replace` is the message's products as they are."""
    if op == "replace":
        return [dict(i) for i in items][-MAX_LINES:]
    if op == "clear":
        return []
    lines = [dict(line) for line in lines]
    for item in items:
        key = line_key(item)
        if key is None:
            continue  # no product named: nothing to add to or take from
        at = next((i for i, line in enumerate(lines) if line_key(line) == key), None)
        given = _quantity(item)
        if op == "add":
            if at is None:
                lines.append({**item, "qty": _number(given if given is not None else 1)})
                continue
            had = _quantity(lines[at])
            total = (had if had is not None else 1) + (given if given is not None else 1)
            lines[at] = {**lines[at], **item, "qty": _number(total)}
        elif op == "remove" and at is not None:
            had = _quantity(lines[at])
            left = (had if had is not None else 1) - given if given is not None else 0
            if left <= 0:
                del lines[at]
            else:
                lines[at] = {**lines[at], "qty": _number(left)}
    return lines[-MAX_LINES:]


def merged(known: list[dict[str, Any]], anonymous: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A visitor's anonymous cart joined into the known contact's when identify links them: the anonymous
    cart's products added to it, as a shop joins the carts at log-in."""
    return changed(known, "add", anonymous)


def cart_total(lines: list[dict[str, Any]]) -> float | None:
    """The lines' sum of price x quantity, to the cent; 0 for an empty cart; None when no line has a
    price (the value is not known)."""
    if not lines:
        return 0
    priced = []
    for line in lines:
        price = line.get("price")
        if isinstance(price, int | float) and not isinstance(price, bool):
            quantity = _quantity(line)
            priced.append(price * (quantity if quantity is not None else 1))
    return round(sum(priced), 2) if priced else None


def cart_attributes(change: CartChange, lines: list[dict[str, Any]], currency: str | None) -> dict[str, Any]:
    """What the event's attributes become: the whole cart's items and value (an empty cart: no items and
    0, which the cart_abandon ruleset's `cart_emptied` rule reads), its currency when the message gave
    none. An unpriced cart keeps the value the message gave, if any."""
    found: dict[str, Any] = {change.items_to: lines}
    total = cart_total(lines)
    if change.value_to is not None and total is not None:
        found[change.value_to] = total
    if currency is not None and "currency" not in change.event.attributes:
        found["currency"] = currency
    return found
