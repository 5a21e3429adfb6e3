"""`POST /v1/sources/shopify`: Shopify's webhooks, verified by their HMAC, each delivery handled once, as
our events (through `views.events.ingest`), profile updates and catalog changes (docs/shopify.md)."""

from __future__ import annotations

import dataclasses
import hashlib
from datetime import UTC, datetime
from typing import Any, Literal

import msgspec
import structlog
from aiohttp import web

from rulesvc.core.bodies import TOO_DEEP
from rulesvc.core.contacts import ContactPatch
from rulesvc.core.events import Event, EventsAccepted, event_problems
from rulesvc.core.shopify import (
    PRIVACY_TOPICS,
    TOPICS,
    Delivery,
    PayloadRejected,
    Plan,
    PrivacyAsk,
    Subject,
    inventory_level,
    order_event_id,
    parse_secrets,
    plan,
    price_event,
    privacy_ask,
    read_triggered_at,
    signature_valid,
    stock_event,
    unknown_topic_message,
    variants_of,
    webhook_id_problem,
)
from rulesvc.runtime.privacy import tombstone_drops
from rulesvc.store.catalog import Catalog
from rulesvc.store.contacts import Contacts
from rulesvc.store.db import Store
from rulesvc.store.shopify import ShopifyStore, as_state
from rulesvc.web.keys import SETTINGS, SHOPIFY_PRIVACY, STORE
from rulesvc.web.schemas import ErrorBody
from rulesvc.web.views.base import error_response, json_response, read_body
from rulesvc.web.views.events import ingest

log = structlog.get_logger(__name__)

NOT_CONFIGURED = "Shopify webhooks are not configured (RULESVC_SHOPIFY_SECRET)"


class ShopifyReceived(msgspec.Struct):
    """`accepted`: handled now; `duplicate`: this X-Shopify-Webhook-Id was handled before, nothing done
    again; `ignored`: verified and acknowledged, nothing to store (`note` says why). `accepted` and
    `duplicates` count the events stored and the events already there (same id)."""

    status: Literal["accepted", "duplicate", "ignored"]
    topic: str
    accepted: int = 0
    duplicates: int = 0
    contact_id: str | None = None
    note: str | None = None


async def privacy_request(store: Store, ask: PrivacyAsk, delivery: Delivery, now: datetime) -> str:
    """Shopify's mandatory privacy topics: customers/data_request (export), customers/redact and
    shop/redact (erase). Recorded in `shopify_privacy_requests` (contact and order ids, never an email or
    phone) and acknowledged at once; rulesvc.runtime.shopify_privacy carries it out."""
    ask = dataclasses.replace(ask, contact_ids=await _also_known_as(store, ask))
    request_id = await ShopifyStore(store).record_privacy(ask, delivery, now)
    log.info("shopify.privacy_request", topic=delivery.topic, shop=ask.shop, kind=ask.kind,
             contacts=len(ask.contact_ids), orders=len(ask.orders), request=request_id)  # fmt: skip
    return request_id


async def _also_known_as(store: Store, ask: PrivacyAsk) -> list[str]:
    """The customer's contacts beyond its Shopify ids: those with its email (a guest checkout went to
    them) and those its orders were stored for; found now, while the email is at hand (the request keeps
    ids only)."""
    ids = list(ask.contact_ids)
    if ask.scope != "customer":
        return ids
    found = await Contacts(store).with_email(ask.email, 100) if ask.email else []
    ids += [str(doc["_id"]) for doc in found]
    purchases = [order_event_id(order, "purchased") for order in ask.orders]
    ids += await ShopifyStore(store).contacts_of_events(purchases)
    return list(dict.fromkeys(ids))


def _refused(status: int, message: str, path: str | None = None) -> web.Response:
    return json_response(ErrorBody(message, path), status)


async def post_shopify(request: web.Request) -> web.Response:
    secrets = parse_secrets(request.app[SETTINGS].shopify_secret)
    if not secrets:
        return error_response(401, NOT_CONFIGURED)
    body = await read_body(request)
    presented = request.headers.get("X-Shopify-Hmac-Sha256", "")
    if not presented:
        return error_response(401, "X-Shopify-Hmac-Sha256 is missing: Shopify signs every delivery")
    if not signature_valid(secrets, body, presented):
        return error_response(
            401, "X-Shopify-Hmac-Sha256 does not match the body signed with RULESVC_SHOPIFY_SECRET"
        )
    topic = request.headers.get("X-Shopify-Topic", "").strip()
    if topic not in TOPICS:
        return _refused(400, unknown_topic_message(topic), "X-Shopify-Topic")
    webhook_id = request.headers.get("X-Shopify-Webhook-Id", "").strip()
    problem = webhook_id_problem(webhook_id)
    if problem is not None:
        return _refused(400, problem, "X-Shopify-Webhook-Id")
    delivery = Delivery(
        topic=topic,
        shop=request.headers.get("X-Shopify-Shop-Domain", "").strip()[:255],
        webhook_id=webhook_id,
        triggered_at=read_triggered_at(request.headers.get("X-Shopify-Triggered-At", "")),
        api_version=request.headers.get("X-Shopify-API-Version", "").strip()[:32],
    )
    store = request.app[STORE]
    shopify = ShopifyStore(store)
    digest = hashlib.sha256(topic.encode() + b"\n" + body).hexdigest()
    if await shopify.seen(webhook_id, digest):
        return json_response(ShopifyReceived("duplicate", topic, note="this webhook was handled before"))
    try:
        payload = msgspec.json.decode(body)
    except msgspec.DecodeError as exc:
        return _refused(400, f"malformed JSON: {exc}", "$")
    except RecursionError:
        return _refused(400, TOO_DEEP, "$")
    now = datetime.now(UTC)
    try:
        received = await _handle(request, store, payload, delivery, now)
    except PayloadRejected as exc:
        return _refused(400, f"{topic}: {exc.message}", exc.path)
    await shopify.remember(delivery, digest, now)
    log.info("shopify.webhook", topic=topic, shop=delivery.shop, status=received.status,
             accepted=received.accepted, duplicates=received.duplicates, note=received.note)  # fmt: skip
    return json_response(received)


async def _handle(
    request: web.Request, store: Store, payload: Any, delivery: Delivery, now: datetime
) -> ShopifyReceived:
    topic = delivery.topic
    if topic in PRIVACY_TOPICS:
        if not isinstance(payload, dict):
            raise PayloadRejected("$", "the body must be a JSON object, as Shopify sends it")
        ask = privacy_ask(payload, delivery)
        request_id = await privacy_request(store, ask, delivery, now)
        if SHOPIFY_PRIVACY in request.app:
            request.app[SHOPIFY_PRIVACY].set()
        return ShopifyReceived("accepted", topic, note=f"privacy request {request_id} recorded ({ask.kind})")
    if topic == "products/update":
        return await _product(request, store, payload, delivery)
    if topic == "inventory_levels/update":
        return await _inventory(request, store, payload, delivery)
    todo = plan(payload, delivery)
    if todo.customer_id is not None:  # customers/create|update
        if todo.profile is not None:
            if not await _patch(request, todo.customer_id, todo.profile, delivery, now):
                return ShopifyReceived("ignored", topic, note="the customer was erased after this was sent")
        return ShopifyReceived("accepted", topic, contact_id=todo.customer_id)
    contact_id = None
    if todo.order_id is not None:
        contact_id = await ShopifyStore(store).contact_of_event(order_event_id(todo.order_id, "purchased"))
    contact_id = contact_id or await _contact_for(store, todo.subject)
    if contact_id is None:
        return ShopifyReceived(
            "ignored", topic, note="no customer id and no email: no contact to store it for"
        )
    if not todo.events:
        return ShopifyReceived("ignored", topic, contact_id=contact_id, note=todo.note or None)
    ordered = await ShopifyStore(store).order_of_checkout(contact_id, todo.checkout)
    if ordered is not None:  # the order came first: the checkout was not abandoned, arm nothing
        note = f"checkout {todo.checkout.get('checkout_id', '')} became order {ordered}, which came first"
        return ShopifyReceived("ignored", topic, contact_id=contact_id, note=note)
    events = [msgspec.structs.replace(e, contact_id=contact_id) for e in todo.events]
    _check(events)  # before the profile is touched: a refused delivery changes nothing
    if todo.profile is not None and _has_fields(todo):
        # Only the customer's own profile takes what a checkout says; a contact found by the email a
        # guest typed is filled, never changed (anyone can start a checkout with somebody's email).
        own = todo.subject is not None and todo.subject.customer_id == contact_id
        await _patch(request, contact_id, todo.profile, delivery, now, own=own)
    return await _ingest(request, topic, events, contact_id)


async def _patch(
    request: web.Request,
    contact_id: str,
    profile: ContactPatch,
    delivery: Delivery,
    now: datetime,
    *,
    own: bool = True,
) -> bool:
    """The profile change of a Shopify customer, tagged with its shop (a shop's redact finds its contacts
    by it); for another contact (`own` false: found by an email) only what it lacks is filled and no tag
    is set. Not made when the contact was erased after Shopify sent it (a late retry must not bring the
    email back)."""
    sent = delivery.triggered_at or now
    if await tombstone_drops(request.app[STORE], contact_id, sent, request.app[SETTINGS].erasure_tombstone):
        return False
    if own:
        profile = msgspec.structs.replace(
            profile, attributes={**profile.attributes, "shopify_shop": delivery.shop}
        )
    await request.app[STORE].patch_contact(contact_id, profile, now, fill_only=not own)
    return True


def _has_fields(todo: Plan) -> bool:
    p = todo.profile
    return p is not None and bool(p.email or p.phone or p.consent or p.attributes)


async def _contact_for(store: Store, subject: Subject | None) -> str | None:
    """The Shopify customer id; else the contact with the email (any letter case); else one named by it."""
    if subject is None:
        return None
    if subject.customer_id is not None:
        return subject.customer_id
    if subject.email is None:
        return None
    found = await Contacts(store).with_email(subject.email, 1)
    return str(found[0]["_id"]) if found else subject.email_contact_id()


def _check(events: list[Event]) -> None:
    """The events hold to the same contract as those posted to /v1/events."""
    for event in events:
        problems = event_problems(event, fuzzy=False)
        if problems:
            path, message = problems[0]
            raise PayloadRejected(path, f"the {event.type} it becomes is refused: {message}")


async def _ingest(
    request: web.Request, topic: str, events: list[Event], contact_id: str | None = None
) -> ShopifyReceived:
    _check(events)
    result = await ingest(request, events)
    if not isinstance(result, EventsAccepted):  # only outcome events are checked there, never these
        raise PayloadRejected("$", result.error)
    return ShopifyReceived("accepted", topic, result.accepted, result.duplicates, contact_id)


async def _product(request: web.Request, store: Store, payload: Any, delivery: Delivery) -> ShopifyReceived:
    """Price and stock changes through the catalog path, one of each at most per product: the catalog
    keeps one price and one availability per product (its lowest variant price; in stock if any variant
    is), compared with what we saw of its variants."""
    if not isinstance(payload, dict):
        raise PayloadRejected("$", "the body must be a JSON object, as Shopify sends it")
    states, compare = variants_of(payload, delivery)
    product_id = str(payload["id"])
    shopify = ShopifyStore(store)
    before = await shopify.product_variants(product_id)
    catalog = await Catalog(store).product(product_id)
    price, in_stock = catalog.get("price"), catalog.get("in_stock")
    price_changed = price_event(
        states,
        before,
        compare,
        price if isinstance(price, int | float) and not isinstance(price, bool) else None,
        f"shopify/{delivery.webhook_id}/price",
        delivery.triggered_at,
    )
    events = [price_changed] if price_changed is not None else []
    stock = stock_event(
        states,
        before,
        in_stock if isinstance(in_stock, bool) else None,
        f"shopify/{delivery.webhook_id}/stock",
        delivery.triggered_at,
    )
    events += [stock] if stock is not None else []
    received = await _ingest(request, delivery.topic, events)
    await shopify.save_variants(product_id, states, datetime.now(UTC))
    if not events:
        received.note = "no price or availability changed"
    return received


async def _inventory(request: web.Request, store: Store, payload: Any, delivery: Delivery) -> ShopifyReceived:
    if not isinstance(payload, dict):
        raise PayloadRejected("$", "the body must be a JSON object, as Shopify sends it")
    item, location, available = inventory_level(payload)
    shopify = ShopifyStore(store)
    doc = await shopify.by_inventory_item(item)
    if doc is None:
        note = f"inventory item {item} is not known yet: its product's products/update names it"
        return ShopifyReceived("ignored", delivery.topic, note=note)
    before = await shopify.product_variants(str(doc["product_id"]))
    levels = {**(doc.get("levels") or {}), location: available}
    quantity = sum(v for v in levels.values() if isinstance(v, int))
    changed = as_state(doc)
    changed = dataclasses.replace(changed, quantity=quantity, available=not changed.tracked or quantity > 0)
    after = [changed if s.variant_id == changed.variant_id else s for s in before]
    event = stock_event(after, before, None, f"shopify/{delivery.webhook_id}/stock", delivery.triggered_at)
    received = await _ingest(request, delivery.topic, [event] if event else [])
    await shopify.save_level(changed.variant_id, location, available, datetime.now(UTC))
    if event is None:
        received.note = "the product's availability and stock count did not change"
    return received
