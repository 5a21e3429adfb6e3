"""Shopify webhooks as our events, profile updates and catalog changes (docs/shopify.md).

Pure: the signature check, the delivery's headers, and what each topic's payload becomes. What needs the
database (the contact found by email, a variant's last price, seen webhook ids) is looked up by the view
(rulesvc/web/views/shopify.py) and handed in.

Event ids are in the service's own namespace (they contain `/`, which client ids may not: core/ids.py),
so no client can post an event under one of them first. They are fixed per thing that happened: a replayed
webhook, or `orders/create` and `orders/paid` of the same order, store one event, not two.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from rulesvc.core.audiences import normalise_email, normalise_phone
from rulesvc.core.contacts import EMAIL_MAX, EMAIL_PATTERN, ContactPatch
from rulesvc.core.events import Event, time_in_range
from rulesvc.core.ids import id_problem

Doc = dict[str, Any]

# What each handled topic becomes (docs/shopify.md has the same table in words).
TOPICS: dict[str, str] = {
    "checkouts/create": "checkout_started",
    "checkouts/update": "checkout_started",
    "orders/create": "purchased",
    "orders/paid": "purchased",
    "orders/cancelled": "order_cancelled",
    "fulfillments/create": "delivery_status_changed",
    "fulfillments/update": "delivery_status_changed",
    "products/update": "price_changed, stock_changed (catalog)",
    "inventory_levels/update": "stock_changed (catalog)",
    "customers/create": "profile",
    "customers/update": "profile",
    "customers/data_request": "privacy: export",
    "customers/redact": "privacy: erase",
    "shop/redact": "privacy: erase the shop's data",
}
PRIVACY_TOPICS = frozenset({"customers/data_request", "customers/redact", "shop/redact"})

# Fulfillment `shipment_status` (the carrier's tracking state) as the delivery_status ruleset names it.
# A fulfillment without one (just created, no tracking events yet) has shipped.
SHIPMENT_STATUS = {
    None: "shipped",
    "label_printed": "shipped",
    "label_purchased": "shipped",
    "confirmed": "shipped",
    "in_transit": "in_transit",
    "carrier_picked_up": "in_transit",
    "out_for_delivery": "out_for_delivery",
    "attempted_delivery": "delayed",
    "delayed": "delayed",
    "ready_for_pickup": "ready_for_pickup",
    "picked_up": "delivered",
    "delivered": "delivered",
    "failure": "failed",
}

# Shopify's marketing consent states (CustomerEmailMarketingState, CustomerSmsMarketingState) as our
# consent: only a yes and a no count. `not_subscribed` is Shopify's default for a customer who was never
# asked, and `pending` a double opt-in not confirmed yet: neither takes back an opt-in given elsewhere
# (Segment, PUT /v1/contacts), so they, and any state not listed, leave the consent as it is.
CONSENT_STATES: dict[str, bool] = {
    "subscribed": True,
    "unsubscribed": False,
    "redacted": False,
    "invalid": False,
}

EMAIL_CONTACT_PREFIX = "shopify-email:"
_EMAIL = re.compile(EMAIL_PATTERN)
_WEBHOOK_ID = re.compile(r"^[A-Za-z0-9._:-]{1,100}$")


class PayloadRejected(Exception):
    """The body is not the topic's JSON: 400 with the field path."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(message)
        self.path, self.message = path, message


# --- the signature -------------------------------------------------------------------------------------


def parse_secrets(setting: str | None) -> list[str]:
    """RULESVC_SHOPIFY_SECRET: one secret, or several separated by commas while a rotated secret is still
    signing (Shopify may sign with the old one for up to an hour after a rotation)."""
    return [s.strip() for s in (setting or "").split(",") if s.strip()]


def signature(secret: str, body: bytes) -> str:
    """What Shopify sends in X-Shopify-Hmac-Sha256: base64 of HMAC-SHA256 of the raw body."""
    return base64.b64encode(hmac.new(secret.encode(), body, hashlib.sha256).digest()).decode()


def signature_valid(secrets: Sequence[str], body: bytes, presented: str) -> bool:
    """Constant time per secret; every secret is tried, so the time does not say which one matched."""
    given = presented.strip().encode("utf-8", "replace")
    matched = False
    for secret in secrets:
        matched |= hmac.compare_digest(signature(secret, body).encode(), given)
    return matched


# --- the delivery --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Delivery:
    """The headers Shopify sends with every delivery."""

    topic: str
    shop: str
    webhook_id: str
    triggered_at: datetime | None = None
    api_version: str = ""


def webhook_id_problem(webhook_id: str) -> str | None:
    if not webhook_id:
        return "X-Shopify-Webhook-Id is missing: Shopify sends it with every delivery"
    if not _WEBHOOK_ID.match(webhook_id):
        return "X-Shopify-Webhook-Id must be 1-100 letters, digits, `.`, `_`, `:` or `-`"
    return None


def read_triggered_at(value: str) -> datetime | None:
    try:
        moment = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment if time_in_range(moment) else None


def unknown_topic_message(topic: str) -> str:
    shown = topic[:80] if topic else "(none)"
    return f"X-Shopify-Topic `{shown}` is not handled; handled topics: {', '.join(sorted(TOPICS))}"


# --- values --------------------------------------------------------------------------------------------


def money(value: Any) -> float | None:
    """Shopify's amounts are strings (`"199.00"`); numbers are taken too. None if not an amount."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return None
    if isinstance(value, int | float) and math.isfinite(value) and 0 <= value < 1e15:
        return round(float(value), 2)
    return None


def _id(value: Any) -> str | None:
    """A Shopify id (a number, sometimes a string) as our id string; None if there is none."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int) or (isinstance(value, str) and value):
        text = str(value)
        return text if id_problem(text) is None and len(text) <= 64 else None
    return None


def _text(value: Any, limit: int = 1000) -> str | None:
    return value[:limit] if isinstance(value, str) and value else None


def _obj(value: Any) -> Doc:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _time(value: Any) -> datetime | None:
    return read_triggered_at(value) if isinstance(value, str) else None


def _currency(payload: Doc) -> str | None:
    for key in ("presentment_currency", "currency"):
        value = payload.get(key)
        if isinstance(value, str) and re.fullmatch(r"[A-Z]{3}", value):
            return value
    return None


def _root(body: Any) -> Doc:
    if not isinstance(body, dict):
        raise PayloadRejected("$", "the body must be a JSON object, as Shopify sends it")
    return body


def _required_id(payload: Doc, key: str, path: str = "$") -> str:
    value = _id(payload.get(key))
    if value is None:
        raise PayloadRejected(f"{path}.{key}", f"`{key}` is required: the resource's id, a number")
    return value


# --- who it is about -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Subject:
    """The customer a checkout or order belongs to: the contact id is the Shopify customer id; without
    one, the contact with this email (looked up by the view), else an id made from the email."""

    customer_id: str | None
    email: str | None

    def email_contact_id(self) -> str | None:
        if self.email is None:
            return None
        return EMAIL_CONTACT_PREFIX + hashlib.sha256(self.email.encode()).hexdigest()[:32]


def _email(value: Any) -> str | None:
    if isinstance(value, str) and len(value.strip()) <= EMAIL_MAX and _EMAIL.match(value.strip()):
        return normalise_email(value)
    return None


def subject_of(payload: Doc) -> Subject:
    customer = _obj(payload.get("customer"))
    email = (
        _email(payload.get("email")) or _email(payload.get("contact_email")) or _email(customer.get("email"))
    )
    return Subject(_id(customer.get("id")), email)


def profile_of(customer: Doc, fallback: Doc | None = None) -> ContactPatch:
    """A customer's profile fields: email, phone (E.164), marketing consent per channel, names and tags.
    Consent follows CONSENT_STATES: only a yes or a no from Shopify changes it; a consent Shopify does not
    send, or sends as `not_subscribed` or `pending`, is left as it is. `fallback`: the checkout or order
    around an embedded customer, for its email and phone."""
    outer = fallback or {}
    email = _email(customer.get("email")) or _email(outer.get("email"))
    phone_text = customer.get("phone") or outer.get("phone")
    phone = normalise_phone(phone_text) if isinstance(phone_text, str) else None
    consent: dict[str, bool] = {}
    for channel, key in (("email", "email_marketing_consent"), ("sms", "sms_marketing_consent")):
        given = _obj(customer.get(key)).get("state")
        said = CONSENT_STATES.get(given.lower()) if isinstance(given, str) else None
        if said is not None:
            consent[channel] = said
    attributes: Doc = {}
    for key in ("first_name", "last_name"):
        if (value := _text(customer.get(key), 200)) is not None:
            attributes[key] = value
    tags = customer.get("tags")
    if isinstance(tags, str):
        attributes["tags"] = [t.strip()[:255] for t in tags.split(",") if t.strip()][:250]
    if (state := _text(customer.get("state"), 40)) is not None:
        attributes["shopify_state"] = state
    return ContactPatch(email=email, phone=phone, consent=consent, attributes=attributes)


# --- what a delivery becomes ---------------------------------------------------------------------------


@dataclass
class Plan:
    """What to do for one delivery. `events` without a contact id get the subject's (`subject`)."""

    events: list[Event] = field(default_factory=list)
    subject: Subject | None = None
    profile: ContactPatch | None = None
    customer_id: str | None = None  # customers/*: the contact whose profile `profile` is
    order_id: str | None = None  # fulfillments/*: the order whose contact it is
    # checkouts/*: `checkout_token` and `checkout_id`, as an order of this checkout keeps them
    checkout: dict[str, str] = field(default_factory=dict)
    note: str = ""  # why nothing is stored, for the answer and the log


def _line_items(payload: Doc) -> list[Doc]:
    items: list[Doc] = []
    for line in _list(payload.get("line_items"))[:250]:
        if not isinstance(line, dict):
            continue
        item: Doc = {}
        for ours, theirs in (("product_id", "product_id"), ("variant_id", "variant_id")):
            if (value := _id(line.get(theirs))) is not None:
                item[ours] = value
        for key in ("sku", "title", "variant_title", "vendor"):
            if (text := _text(line.get(key), 500)) is not None:
                item[key] = text
        name = _text(line.get("presentment_title"), 500) or item.get("title")
        if name is not None:
            item["name"] = name
        quantity = line.get("quantity")
        item["qty"] = quantity if isinstance(quantity, int) and not isinstance(quantity, bool) else 1
        price = money(line.get("price"))
        if price is not None:
            item["price"] = price
        items.append(item)
    return items


def _order_like(payload: Doc, delivery: Delivery) -> Doc:
    """What checkouts and orders share: value, currency, items and their product ids."""
    items = _line_items(payload)
    attributes: Doc = {
        "items": items,
        "product_ids": sorted({i["product_id"] for i in items if "product_id" in i}),
    }
    value = money(payload.get("total_price"))
    if value is not None:
        attributes["value"] = value
    if (currency := _currency(payload)) is not None:
        attributes["currency"] = currency
    attributes["shop"] = delivery.shop[:255]
    return attributes


def _event_time(payload: Doc, delivery: Delivery, *keys: str) -> datetime | None:
    """When it happened: the delivery's X-Shopify-Triggered-At, else the resource's own time."""
    if delivery.triggered_at is not None:
        return delivery.triggered_at
    for key in keys:
        if (moment := _time(payload.get(key))) is not None:
            return moment
    return None


def checkout_plan(payload: Doc, delivery: Delivery) -> Plan:
    """Every create and update is a `checkout_started`: the shipped checkout_abandon re-arms its reminders
    from the latest one, personalised with what the checkout holds now. A completed checkout is an order,
    not an abandoned checkout: it starts nothing (the order's own webhook brings `purchased`). Nor does
    one whose order came first (Shopify does not keep the order of deliveries): `checkout` names it for
    the view to look for that order."""
    checkout_id = _required_id(payload, "id")
    subject = subject_of(payload)
    if payload.get("completed_at"):
        return Plan(subject=subject, note=f"checkout {checkout_id} is completed")
    attributes = _order_like(payload, delivery)
    attributes["checkout_id"] = checkout_id
    for ours, theirs in (("checkout_token", "token"), ("cart_token", "cart_token")):
        if (text := _text(payload.get(theirs), 200)) is not None:
            attributes[ours] = text
    if (url := _text(payload.get("abandoned_checkout_url"), 2000)) is not None:
        attributes["checkout_url"] = url
    event = Event(
        id=f"shopify/{delivery.webhook_id}",
        type="checkout_started",
        time=_event_time(payload, delivery, "updated_at", "created_at"),
        attributes=attributes,
    )
    profile = profile_of(_obj(payload.get("customer")), payload)
    keys: dict[str, str] = {k: attributes[k] for k in ("checkout_token", "checkout_id") if k in attributes}
    return Plan([event], subject, profile, checkout=keys)


def order_event_id(order_id: str, kind: str) -> str:
    return f"shopify/order/{order_id}/{kind}"


def order_plan(payload: Doc, delivery: Delivery) -> Plan:
    """`purchased` once per order, whichever of orders/create and orders/paid comes first (the event id
    is the order's); `order_cancelled` once per order."""
    order_id = _required_id(payload, "id")
    subject = subject_of(payload)
    attributes = _order_like(payload, delivery)
    attributes["order_id"] = order_id
    if (name := _text(payload.get("name"), 100)) is not None:
        attributes["order_name"] = name
    # The checkout it came from: a checkout webhook delivered after its order finds the order by these.
    if (token := _text(payload.get("checkout_token"), 200)) is not None:
        attributes["checkout_token"] = token
    if (checkout_id := _id(payload.get("checkout_id"))) is not None:
        attributes["checkout_id"] = checkout_id
    if delivery.topic == "orders/cancelled":
        if not payload.get("cancelled_at"):  # the signed body must say so, whatever the header says
            return Plan(subject=subject, note=f"order {order_id} has no cancelled_at: not cancelled")
        if (reason := _text(payload.get("cancel_reason"), 100)) is not None:
            attributes["cancel_reason"] = reason
        kind, time_keys = "order_cancelled", ("cancelled_at", "updated_at")
    elif payload.get("cancelled_at"):
        return Plan(subject=subject, note=f"order {order_id} is cancelled: not a purchase")
    else:
        codes = [c.get("code") for c in _list(payload.get("discount_codes")) if isinstance(c, dict)]
        if codes and isinstance(codes[0], str) and codes[0]:
            attributes["promo_code"] = codes[0][:200]
        if (status := _text(payload.get("financial_status"), 40)) is not None:
            attributes["financial_status"] = status
        kind, time_keys = "purchased", ("processed_at", "created_at")
    event = Event(
        id=order_event_id(order_id, kind),
        type=kind,
        time=_event_time(payload, delivery, *time_keys),
        attributes=attributes,
    )
    return Plan([event], subject, profile_of(_obj(payload.get("customer")), payload))


def fulfillment_plan(payload: Doc, delivery: Delivery) -> Plan:
    """A fulfillment's carrier status as the delivery_status ruleset's `status`; one event per fulfillment
    and status, so a repeated update (a new tracking number, the same status) sends nothing twice."""
    fulfillment_id = _required_id(payload, "id")
    order_id = _required_id(payload, "order_id")
    raw = payload.get("shipment_status")
    if raw is not None and not isinstance(raw, str):
        raise PayloadRejected("$.shipment_status", "`shipment_status` must be a string or null")
    if payload.get("status") in ("cancelled", "error", "failure"):
        status = "cancelled" if payload.get("status") == "cancelled" else "failed"
    elif payload.get("status") in ("pending", "open") and SHIPMENT_STATUS.get(raw) == "shipped":
        status = "pending"  # with the fulfillment service, not with a carrier yet
    else:
        status = SHIPMENT_STATUS.get(raw, raw if isinstance(raw, str) else "shipped")
    status = re.sub(r"[^a-z0-9_]", "_", status.lower())[:40] or "shipped"
    attributes: Doc = {"status": status, "order_id": order_id, "fulfillment_id": fulfillment_id}
    if isinstance(raw, str):
        attributes["shipment_status"] = raw[:40]
    for ours, theirs in (("carrier", "tracking_company"), ("tracking_number", "tracking_number"),
                         ("tracking_url", "tracking_url"), ("name", "name")):  # fmt: skip
        if (text := _text(payload.get(theirs), 2000)) is not None:
            attributes[ours] = text
    if (expected := _time(payload.get("estimated_delivery_at"))) is not None:
        attributes["expected_delivery_date"] = expected.date().isoformat()
    attributes["shop"] = delivery.shop[:255]
    event = Event(
        id=f"shopify/fulfillment/{fulfillment_id}/{status}",
        type="delivery_status_changed",
        time=_event_time(payload, delivery, "updated_at", "created_at"),
        attributes=attributes,
    )
    # A fulfillment names no customer: the view finds the contact of the order's `purchased` first.
    return Plan([event], Subject(None, _email(payload.get("email"))), order_id=order_id)


def customer_plan(payload: Doc, delivery: Delivery) -> Plan:
    customer_id = _required_id(payload, "id")
    return Plan(profile=profile_of(payload), customer_id=customer_id)


# --- the catalog ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VariantState:
    """What the service remembers of a Shopify variant (`shopify_variants`), to tell a real change from
    a repeat and to find the product of an inventory item."""

    variant_id: str
    product_id: str
    price: float | None
    available: bool
    quantity: int | None
    tracked: bool  # Shopify counts its stock; untracked or "continue selling" is always available
    inventory_item_id: str | None = None
    name: str | None = None
    image_url: str | None = None
    url: str | None = None
    product_name: str | None = None


def _available(quantity: int | None, tracked: bool) -> bool:
    return not tracked or (quantity is not None and quantity > 0)


def variants_of(payload: Doc, delivery: Delivery) -> tuple[list[VariantState], dict[str, float]]:
    """A products/update's variants as we keep them, and each variant's `compare_at_price` (the price a
    shop shows struck through: the previous price when we have not seen the variant before)."""
    product_id = _required_id(payload, "id")
    title = _text(payload.get("title"), 500)
    handle = _text(payload.get("handle"), 500)
    url = f"https://{delivery.shop}/products/{handle}" if handle and delivery.shop else None
    images = {
        _id(image.get("id")): image.get("src")
        for image in _list(payload.get("images"))
        if isinstance(image, dict) and isinstance(image.get("src"), str)
    }
    first_image = _text(_obj(payload.get("image")).get("src"), 2000)
    states: list[VariantState] = []
    compare: dict[str, float] = {}
    for i, variant in enumerate(_list(payload.get("variants"))[:1000]):
        if not isinstance(variant, dict):
            raise PayloadRejected(f"$.variants[{i}]", "a variant must be an object")
        variant_id = _required_id(variant, "id", f"$.variants[{i}]")
        quantity = variant.get("inventory_quantity")
        quantity = quantity if isinstance(quantity, int) and not isinstance(quantity, bool) else None
        tracked = (
            variant.get("inventory_management") is not None and variant.get("inventory_policy") != "continue"
        )
        variant_title = _text(variant.get("title"), 500)
        name = (
            title
            if variant_title in (None, "Default Title")
            else f"{title or ''} - {variant_title}".strip(" -")
        )
        image = images.get(_id(variant.get("image_id"))) or first_image
        states.append(
            VariantState(
                variant_id=variant_id,
                product_id=product_id,
                price=money(variant.get("price")),
                available=_available(quantity, tracked),
                quantity=quantity,
                tracked=tracked,
                inventory_item_id=_id(variant.get("inventory_item_id")),
                name=name,
                image_url=image if isinstance(image, str) else None,
                url=url,
                product_name=title,
            )
        )
        if (was := money(variant.get("compare_at_price"))) is not None and was > 0:
            compare[variant_id] = was
    return states, compare


def _descriptive(state: VariantState) -> Doc:
    out: Doc = {"product_id": state.product_id}
    for key in ("name", "url", "image_url"):
        if (value := getattr(state, key)) is not None:
            out[key] = value
    return out


def lowest_price(states: Sequence[VariantState]) -> VariantState | None:
    """The variant with the product's lowest price ("from 19.99"): the catalog's one price per product."""
    priced = [s for s in states if s.price is not None]
    return min(priced, key=lambda s: s.price or 0.0) if priced else None


def price_event(
    now: Sequence[VariantState], before: Sequence[VariantState], compare: dict[str, float],
    catalog_price: float | None, event_id: str, at: datetime | None,
) -> Event | None:  # fmt: skip
    """At most one `price_changed` per product and delivery: the catalog keeps one price per product, and
    price_drop fires once per product with its guard comparing that price, so the product's price is its
    lowest variant price, announced when that changed (a rise too: the catalog must know it, and it
    notifies nobody). The previous price is the lowest we saw before; for a product not seen before, the
    catalog's price (from events posted to /v1/events), else the lowest the shop showed before its sale
    (each variant's `compare_at_price` when above its price) if that is higher; with neither, nothing."""
    cheapest = lowest_price(now)
    if cheapest is None or cheapest.price is None:
        return None
    price = cheapest.price
    seen = lowest_price(before)
    previous: float | None
    if seen is not None and seen.price is not None:
        previous = seen.price
    elif catalog_price is not None:
        previous = catalog_price
    else:
        shown = [max(s.price, compare.get(s.variant_id, 0.0)) for s in now if s.price is not None]
        previous = min(shown)
        if previous <= price:
            return None
    if previous == price:
        return None
    attributes = {**_descriptive(cheapest), "variant_id": cheapest.variant_id, "price": price}
    if cheapest.product_name is not None:
        attributes["name"] = cheapest.product_name  # the product's, not the variant's: its lowest price
    if previous > 0:
        attributes["previous_price"] = previous
    return Event(id=event_id, type="price_changed", time=at, attributes=attributes)


def product_stock(states: Sequence[VariantState]) -> tuple[bool, int | None]:
    """A product is in stock when any variant is; its quantity is the tracked variants' sum."""
    tracked = [s.quantity for s in states if s.tracked]
    quantity = sum(max(q, 0) for q in tracked if q is not None) if tracked else None
    return any(s.available for s in states), quantity


def stock_event(
    now: Sequence[VariantState], before: Sequence[VariantState], catalog_in_stock: bool | None,
    event_id: str, at: datetime | None,
) -> Event | None:  # fmt: skip
    """A product-level `stock_changed` when its availability or its stock count changed. `before`: the
    variants as we knew them; for a product we have not seen, the catalog's own `in_stock` (from events
    posted to /v1/events) is the comparison, and without that there is no change to tell."""
    if not now:
        return None
    in_stock, quantity = product_stock(now)
    if before:
        if (in_stock, quantity) == product_stock(before):
            return None
    elif catalog_in_stock is None or catalog_in_stock == in_stock:
        return None
    attributes = {**_descriptive(now[0]), "in_stock": in_stock}
    if now[0].product_name is not None:
        attributes["name"] = now[0].product_name
    if quantity is not None:
        attributes["quantity"] = quantity
    return Event(id=event_id, type="stock_changed", time=at, attributes=attributes)


def inventory_level(payload: Doc) -> tuple[str, str, int]:
    """inventory_levels/update: (inventory item id, location id, available there)."""
    item = _required_id(payload, "inventory_item_id")
    # A key of the variant's `levels` document: nothing MongoDB reads as a path or an operator.
    location = re.sub(r"[^A-Za-z0-9_-]", "_", _id(payload.get("location_id")) or "default")
    available = payload.get("available")
    if available is None:
        available = 0
    if not isinstance(available, int) or isinstance(available, bool):
        raise PayloadRejected("$.available", "`available` must be a whole number (units at the location)")
    return item, location, available


# --- privacy -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PrivacyAsk:
    """What a privacy topic asks: export or erase, for which contacts (by id), in which shop."""

    kind: str  # "export" or "erase"
    scope: str  # "customer" or "shop"
    shop: str
    contact_ids: list[str]
    orders: list[str]
    request_id: str | None = None
    email: str | None = None  # to find the customer's other contacts; never stored with the request


# The exact fields of each privacy topic's body as Shopify documents them. The signature covers only the
# body, not X-Shopify-Topic: a signed order, product or customer body posted again under a privacy topic
# must not pass for one, and no other topic's body has these fields.
PRIVACY_FIELDS = {
    "shop/redact": ({"shop_id", "shop_domain"}, frozenset({"shop_id", "shop_domain"})),
    "customers/redact": ({"shop_id", "shop_domain", "customer", "orders_to_redact"}, None),
    "customers/data_request": (
        {"shop_id", "shop_domain", "customer", "orders_requested", "data_request"},
        None,
    ),
}


def privacy_shape(payload: Doc, delivery: Delivery) -> str:
    """The shop a privacy request is for, once its body is that topic's (PayloadRejected otherwise): every
    documented field present, nothing else for shop/redact, and the shop the same as the header's."""
    required, exact = PRIVACY_FIELDS[delivery.topic]
    missing = sorted(required - payload.keys())
    if missing:
        raise PayloadRejected(f"$.{missing[0]}", f"required in a {delivery.topic} body: {', '.join(missing)}")
    if exact is not None and payload.keys() != exact:
        extra = sorted(payload.keys() - exact)[0]
        raise PayloadRejected(f"$.{extra}", f"a {delivery.topic} body has only {', '.join(sorted(exact))}")
    shop = _text(payload.get("shop_domain"), 255)
    if not shop:
        raise PayloadRejected("$.shop_domain", "the shop's domain is required")
    if delivery.shop and shop.lower() != delivery.shop.lower():
        raise PayloadRejected("$.shop_domain", "not the shop of X-Shopify-Shop-Domain")
    if "customer" in required and not isinstance(payload.get("customer"), dict):
        raise PayloadRejected("$.customer", "an object with the customer's `id` and `email`")
    return shop


def privacy_ask(payload: Doc, delivery: Delivery) -> PrivacyAsk:
    shop = privacy_shape(payload, delivery)
    if delivery.topic == "shop/redact":
        return PrivacyAsk("erase", "shop", shop, [], [])
    customer = _obj(payload.get("customer"))
    customer_id = _id(customer.get("id"))
    email = _email(customer.get("email"))
    if customer_id is None and email is None:
        raise PayloadRejected("$.customer", "`customer` with an `id` or `email` is required")
    ids = [customer_id] if customer_id else []
    subject_email = Subject(None, email).email_contact_id()
    if subject_email is not None:
        ids.append(subject_email)
    key = "orders_requested" if delivery.topic == "customers/data_request" else "orders_to_redact"
    orders = [o for o in (_id(v) for v in _list(payload.get(key))[:1000]) if o is not None]
    request = _id(_obj(payload.get("data_request")).get("id"))
    kind = "export" if delivery.topic == "customers/data_request" else "erase"
    return PrivacyAsk(kind, "customer", shop, ids, orders, request, email)


def plan(payload: Any, delivery: Delivery) -> Plan:
    """The plan for a contact-facing topic (checkouts, orders, fulfillments, customers)."""
    body = _root(payload)
    topic = delivery.topic
    if topic.startswith("checkouts/"):
        return checkout_plan(body, delivery)
    if topic.startswith("orders/"):
        return order_plan(body, delivery)
    if topic.startswith("fulfillments/"):
        return fulfillment_plan(body, delivery)
    if topic.startswith("customers/"):
        return customer_plan(body, delivery)
    raise ValueError(f"no plan for {topic}")
