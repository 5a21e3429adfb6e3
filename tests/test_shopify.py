"""Shopify webhooks through a running app: bodies shaped as Shopify documents them (tests/shopify_payloads,
with their sources), signed here as Shopify signs (base64 HMAC-SHA256 of the raw body with the app's
secret: https://shopify.dev/docs/apps/build/webhooks/verify-deliveries), posted with the headers of
https://shopify.dev/docs/apps/build/webhooks/delivery-structure#headers."""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import json
import shutil
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from rulesvc.config import Settings
from rulesvc.web.app import create_app
from tests.helpers import eventually

ROOT = Path(__file__).parent.parent
PAYLOADS = Path(__file__).parent / "shopify_payloads"
SECRET = "shpss_test_0123456789abcdef"
OLD_SECRET = "shpss_old_fedcba9876543210"
SHOP = "jsmith.myshopify.com"


def payload(name: str) -> dict[str, Any]:
    return json.loads((PAYLOADS / f"{name}.json").read_text())  # type: ignore[no-any-return]


def sign(body: bytes, secret: str = SECRET) -> str:
    """As Shopify does, written out here rather than taken from the code under test."""
    return base64.b64encode(hmac.new(secret.encode(), body, hashlib.sha256).digest()).decode()


def headers(topic: str, body: bytes, webhook_id: str | None = None, **extra: str) -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        "X-Shopify-Topic": topic,
        "X-Shopify-Hmac-Sha256": sign(body),
        "X-Shopify-Shop-Domain": SHOP,
        "X-Shopify-Webhook-Id": webhook_id or str(uuid.uuid4()),
        "X-Shopify-Triggered-At": datetime.now(UTC).isoformat(),
        "X-Shopify-API-Version": "2025-07",
        **extra,
    }


async def post(client: Any, topic: str, body: Any, webhook_id: str | None = None, **extra: str) -> Any:
    raw = json.dumps(body).encode()
    resp = await client.post(
        "/v1/sources/shopify", data=raw, headers=headers(topic, raw, webhook_id, **extra)
    )
    return resp.status, await resp.json()


def rulesets(tmp: Path) -> Path:
    """The shipped rulesets, the checkout flow without its 5 % holdout (this test's contact must be in it)."""
    folder = tmp / "shipped"
    shutil.copytree(ROOT / "rulesets", folder)
    flow = json.loads((folder / "checkout_abandon.json").read_text())
    flow.pop("holdout")
    (folder / "checkout_abandon.json").write_text(json.dumps(flow))
    return folder


async def app_client(make_client: Any, settings: Settings, tmp_path: Path, **changes: Any) -> Any:
    changes.setdefault("shopify_secret", f"{SECRET}, {OLD_SECRET}")
    configured = msgspec.structs.replace(settings, rulesets_dir=str(rulesets(tmp_path)), **changes)
    return await make_client(create_app(configured))


async def test_checkout_then_nothing_arms_the_reminders_and_the_order_cancels_them(
    make_client: Any, settings: Settings, db: Any, tmp_path: Path
) -> None:
    client = await app_client(make_client, settings, tmp_path)
    customer = payload("customers_create")
    customer["id"] = 603851970716743426  # the checkout's customer
    customer["phone"] = "+16135551111"
    customer["tags"] = "vip, newsletter"
    customer["email_marketing_consent"] = {
        "state": "subscribed",
        "opt_in_level": "single_opt_in",
        "consent_updated_at": "2021-12-31T19:00:00-05:00",
    }
    customer["sms_marketing_consent"] = {
        "state": "not_subscribed",
        "opt_in_level": "single_opt_in",
        "consent_updated_at": None,
        "consent_collected_from": "OTHER",
    }
    status, body = await post(client, "customers/create", customer)
    assert (status, body) == (
        200,
        {
            "status": "accepted",
            "topic": "customers/create",
            "accepted": 0,
            "duplicates": 0,
            "contact_id": "603851970716743426",
            "note": None,
        },
    )
    contact = await db.contacts.find_one({"_id": "603851970716743426"})
    assert contact["email"] == "bob@biller.com" and contact["phone"] == "+16135551111"
    assert contact["consent"] == {"email": True}  # sms `not_subscribed`: never asked, nothing to change
    assert contact["attributes"] == {
        "first_name": "Bob",
        "last_name": "Biller",
        "tags": ["vip", "newsletter"],
        "shopify_state": "disabled",
        "shopify_shop": SHOP,  # what a shop's redact finds its contacts by
    }

    checkout = payload("checkouts_create")
    status, body = await post(client, "checkouts/create", checkout, webhook_id="wh-checkout-1")
    assert (status, body["status"], body["accepted"], body["contact_id"]) == (
        200,
        "accepted",
        1,
        "603851970716743426",
    )
    event = await db.events.find_one({"_id": "shopify/wh-checkout-1"})
    assert event["type"] == "checkout_started" and event["contact_id"] == "603851970716743426"
    attributes = event["attributes"]
    assert (attributes["value"], attributes["currency"], attributes["product_ids"]) == (
        398.0,
        "USD",
        ["632910392"],
    )
    assert attributes["checkout_url"] == checkout["abandoned_checkout_url"]
    assert attributes["items"][0] == {
        "product_id": "632910392",
        "variant_id": "49148385",
        "sku": "IPOD2008PINK",
        "title": "IPod Nano - 8GB",
        "variant_title": "Pink",
        "vendor": "Apple",
        "name": "IPod Nano - 8GB",
        "qty": 1,
        "price": 199.0,
    }

    async def reminders(status: str) -> bool:
        found = await db.messages.find(
            {"contact_id": "603851970716743426", "ruleset": "checkout_abandon"}
        ).to_list()
        return sorted((m["channel"], m["status"]) for m in found) == [("email", status), ("push", status)]

    await eventually(lambda: reminders("scheduled"))  # push after 20 minutes, email after 12 hours
    completed = {**checkout, "completed_at": "2021-12-31T19:05:00-05:00"}  # became an order: not abandoned
    status, body = await post(client, "checkouts/update", completed)
    assert (status, body["status"], body["accepted"]) == (200, "ignored", 0)
    assert await db.events.count_documents({"type": "checkout_started"}) == 1

    order = payload("orders_create")
    order.update(cancelled_at=None, cancel_reason=None, financial_status="paid")
    order["customer"]["id"] = 603851970716743426
    status, body = await post(client, "orders/create", order)
    assert (status, body["accepted"]) == (200, 1)
    await eventually(lambda: reminders("cancelled"))
    purchase = await db.events.find_one({"_id": "shopify/order/820982911946154508/purchased"})
    assert purchase["attributes"]["value"] == 403.0 and purchase["attributes"]["order_name"] == "#9999"
    # orders/paid of the same order (another delivery): the same purchase, not a second one
    status, body = await post(client, "orders/paid", order)
    assert (status, body["accepted"], body["duplicates"]) == (200, 0, 1)
    assert await db.events.count_documents({"type": "purchased"}) == 1
    # the order's consent for email is `not_subscribed`, Shopify's default: it does not undo the opt-in
    assert (await db.contacts.find_one({"_id": "603851970716743426"}))["consent"]["email"] is True


async def test_a_checkout_delivered_after_its_order_arms_no_reminder(
    make_client: Any, settings: Settings, db: Any, tmp_path: Path
) -> None:
    """Shopify does not keep the order of deliveries: the order (t1) comes, then an update of the
    checkout it came from (t0 < t1). The customer bought: no reminder may be armed."""
    client = await app_client(make_client, settings, tmp_path)
    customer = {**payload("customers_create"), "id": 603851970716743426}
    customer["email_marketing_consent"] = {"state": "subscribed", "opt_in_level": "single_opt_in"}
    assert (await post(client, "customers/create", customer))[0] == 200
    checkout = payload("checkouts_create")  # id 981820079255243537, token 123123123
    order = payload("orders_create")
    order.update(cancelled_at=None, financial_status="paid", checkout_id=checkout["id"],
                 checkout_token=checkout["token"])  # fmt: skip
    order["customer"]["id"] = 603851970716743426
    # recent times: an event older than the ruleset's 12 h timeout would arm nothing anyway
    now = datetime.now(UTC).replace(microsecond=0)
    t0, t1, t2 = ((now - timedelta(minutes=m)).isoformat() for m in (6, 2, 1))
    status, body = await post(client, "orders/create", order, **{"X-Shopify-Triggered-At": t1})
    assert (status, body["accepted"]) == (200, 1)

    status, body = await post(client, "checkouts/update", checkout, **{"X-Shopify-Triggered-At": t0})
    assert (status, body["status"], body["accepted"]) == (200, "ignored", 0), body
    assert "820982911946154508" in body["note"]

    async def decided() -> bool:
        return await db.inbox.count_documents({"contact_id": "603851970716743426", "state": "pending"}) == 0

    await eventually(decided)
    assert await db.events.count_documents({"type": "checkout_started"}) == 0
    armed = {"contact_id": "603851970716743426", "ruleset": "checkout_abandon"}
    assert await db.schedule.count_documents(armed) == 0
    assert await db.messages.count_documents(armed) == 0
    purchase = await db.events.find_one({"_id": "shopify/order/820982911946154508/purchased"})
    assert purchase["attributes"]["checkout_token"] == "123123123"  # what finds it

    # another checkout of the same customer, not bought: that one still arms the reminders
    other = {**checkout, "id": 981820079255243538, "token": "456456456"}
    status, body = await post(client, "checkouts/update", other, **{"X-Shopify-Triggered-At": t2})
    assert (status, body["status"], body["accepted"]) == (200, "accepted", 1), body
    await eventually(decided)
    assert await db.schedule.count_documents(armed) == 2  # the push and the email (held out or not)


async def test_consent_changes_only_on_a_yes_or_a_no_from_shopify(
    make_client: Any, settings: Settings, db: Any, tmp_path: Path
) -> None:
    """`not_subscribed` (Shopify's default) and `pending` (a double opt-in not confirmed) do not take back
    an opt-in given elsewhere; `unsubscribed`, `redacted` and `invalid` do; `subscribed` gives it."""
    client = await app_client(make_client, settings, tmp_path)
    given = {"email": "bob@biller.com", "consent": {"email": True, "sms": True}}
    assert (await client.put("/v1/contacts/706405506930370084", json=given)).status in (200, 201)
    customer = payload("customers_create")  # id 706405506930370084

    async def consent_after(email_state: str | None, sms_state: str | None) -> Any:
        sent = {**customer, "phone": "+16135551111"}
        sent["email_marketing_consent"] = None if email_state is None else {"state": email_state}
        sent["sms_marketing_consent"] = None if sms_state is None else {"state": sms_state}
        assert (await post(client, "customers/update", sent))[0] == 200
        return (await db.contacts.find_one({"_id": "706405506930370084"}))["consent"]

    assert await consent_after("not_subscribed", "pending") == {"email": True, "sms": True}
    assert await consent_after("pending", "not_subscribed") == {"email": True, "sms": True}
    assert await consent_after("unsubscribed", None) == {"email": False, "sms": True}
    assert await consent_after("subscribed", "redacted") == {"email": True, "sms": False}
    assert await consent_after("invalid", "subscribed") == {"email": False, "sms": True}
    assert await consent_after("not_subscribed", "not_subscribed") == {"email": False, "sms": True}


async def test_documented_order_example_is_cancelled_so_no_purchase(
    make_client: Any, settings: Settings, db: Any, tmp_path: Path
) -> None:
    client = await app_client(make_client, settings, tmp_path)
    order = payload("orders_create")  # as documented: cancelled_at set, financial_status voided
    status, body = await post(client, "orders/create", order)
    assert (status, body["status"], body["contact_id"]) == (200, "ignored", "115310627314723954")
    assert await db.events.count_documents({}) == 0
    status, body = await post(client, "orders/cancelled", order)
    assert (status, body["accepted"]) == (200, 1)
    cancelled = await db.events.find_one({"_id": "shopify/order/820982911946154508/order_cancelled"})
    assert cancelled["type"] == "order_cancelled" and cancelled["contact_id"] == "115310627314723954"
    assert cancelled["attributes"]["cancel_reason"] == "customer"


async def test_fulfillment_goes_to_the_orders_contact_with_the_delivery_status(
    make_client: Any, settings: Settings, db: Any, tmp_path: Path
) -> None:
    client = await app_client(make_client, settings, tmp_path)
    order = payload("orders_create")
    order.update(cancelled_at=None, financial_status="paid")
    assert (await post(client, "orders/create", order))[0] == 200
    fulfillment = payload("fulfillments_create")
    fulfillment["status"] = "success"
    status, body = await post(client, "fulfillments/create", fulfillment)
    assert (status, body["contact_id"], body["accepted"]) == (200, "115310627314723954", 1)
    shipped = await db.events.find_one({"type": "delivery_status_changed"})
    assert shipped["_id"] == "shopify/fulfillment/123456/shipped"
    assert {k: shipped["attributes"][k] for k in ("status", "order_id", "carrier", "tracking_number")} == {
        "status": "shipped",
        "order_id": "820982911946154508",
        "carrier": "UPS",
        "tracking_number": "1z827wk74630",
    }
    for shipment, ours in (
        ("in_transit", "in_transit"),
        ("out_for_delivery", "out_for_delivery"),
        ("attempted_delivery", "delayed"),
        ("delivered", "delivered"),
    ):
        update = {**fulfillment, "shipment_status": shipment}
        assert (await post(client, "fulfillments/update", update))[1]["accepted"] == 1
        stored = await db.events.find_one({"_id": f"shopify/fulfillment/123456/{ours}"})
        assert stored["attributes"]["status"] == ours and stored["contact_id"] == "115310627314723954"
    # the same status again (a new tracking number, say): nothing new
    again = {**fulfillment, "shipment_status": "delivered", "tracking_number": "1z000"}
    assert (await post(client, "fulfillments/update", again))[1]["duplicates"] == 1
    # Found by the fuzz test below: an open fulfillment whose shipment_status is an object was a 500.
    for status in ("open", "pending", "success"):
        odd = {**fulfillment, "status": status, "shipment_status": {"a": 1}}
        code, answer = await post(client, "fulfillments/update", odd)
        assert (code, answer["field"]) == (400, "$.shipment_status"), answer


async def test_price_drop_and_stock_through_the_catalog(
    make_client: Any, settings: Settings, db: Any, tmp_path: Path
) -> None:
    client = await app_client(make_client, settings, tmp_path)
    product = payload("products_update")
    variant = product["variants"][0]
    variant.update(
        inventory_item_id=271878346596884015,
        inventory_management="shopify",
        inventory_policy="deny",
        inventory_quantity=0,
    )
    status, body = await post(client, "products/update", product)
    assert (status, body["accepted"]) == (200, 0)  # first sight: nothing to compare with
    assert await db.events.count_documents({}) == 0

    same = await post(client, "products/update", product)  # another delivery, nothing changed
    assert same[1]["accepted"] == 0

    cheaper = copy.deepcopy(product)
    cheaper["variants"][0]["price"] = "19.99"
    status, body = await post(client, "products/update", cheaper, webhook_id="wh-price")
    assert (status, body["accepted"]) == (200, 1)
    event = await db.events.find_one({"_id": "shopify/wh-price/price"})
    assert event["type"] == "price_changed" and event["contact_id"] is None  # a catalog event
    assert {k: event["attributes"][k] for k in ("product_id", "price", "previous_price", "name")} == {
        "product_id": "9554194432293",
        "price": 19.99,
        "previous_price": 29.99,
        "name": "T-Shirt",
    }

    # A product seen for the first time with a struck-through price above its price: that is the drop.
    sale = copy.deepcopy(product)
    sale["id"], sale["variants"][0]["id"] = 1001, 2002
    sale["variants"][0].update(price="15.00", compare_at_price="20.00", inventory_item_id=None)
    status, body = await post(client, "products/update", sale, webhook_id="wh-sale")
    assert (status, body["accepted"]) == (200, 1)
    first = await db.events.find_one({"_id": "shopify/wh-sale/price"})
    assert (first["attributes"]["price"], first["attributes"]["previous_price"]) == (15.0, 20.0)

    level = payload("inventory_levels_update")  # 6 units arrive at a location
    status, body = await post(client, "inventory_levels/update", level, webhook_id="wh-stock")
    assert (status, body["accepted"]) == (200, 1)
    stock = await db.events.find_one({"_id": "shopify/wh-stock/stock"})
    assert stock["type"] == "stock_changed"
    assert {k: stock["attributes"][k] for k in ("product_id", "in_stock", "quantity")} == {
        "product_id": "9554194432293",
        "in_stock": True,
        "quantity": 6,
    }
    odd = {**level, "location_id": "a.b$c", "available": 0}  # no MongoDB path or operator in a key
    assert (await post(client, "inventory_levels/update", odd))[1]["accepted"] == 0  # still 6 in all
    assert (await db.shopify_variants.find_one({"_id": "123456789"}))["levels"]["a_b_c"] == 0
    unknown = {**level, "inventory_item_id": 1}
    status, body = await post(client, "inventory_levels/update", unknown)
    assert (status, body["status"]) == (200, "ignored")


async def test_a_sale_on_some_variants_is_one_price_drop_at_the_products_lowest_price(
    make_client: Any, settings: Settings, db: Any, tmp_path: Path
) -> None:
    """The catalog keeps one price per product and price_drop fires once per product, its guard comparing
    that price: a delivery where two of three variants drop is one `price_changed`, from the lowest price
    before (25) to the lowest now (20), and the catalog's price is that lowest."""
    client = await app_client(make_client, settings, tmp_path)
    viewed = {"id": "view-1", "type": "product_viewed", "contact_id": "viewer",
              "attributes": {"product_id": "9554194432293"}}  # fmt: skip
    assert (await client.post("/v1/events", json=viewed)).status == 202
    assert (await client.put("/v1/contacts/viewer", json={"email": "viewer@example.com"})).status == 201
    product = payload("products_update")
    base = {"inventory_management": "shopify", "inventory_policy": "deny", "inventory_quantity": 5}
    product["variants"] = [
        {**base, "id": 1, "title": "S", "price": "30.00"},
        {**base, "id": 2, "title": "M", "price": "25.00"},
        {**base, "id": 3, "title": "L", "price": "40.00"},
    ]
    status, body = await post(client, "products/update", product)
    assert (status, body["accepted"]) == (200, 0)  # first sight, no struck-through price: nothing to say

    sale = copy.deepcopy(product)
    sale["variants"][0].update(price="20.00", inventory_quantity=0)
    sale["variants"][2].update(price="22.00", inventory_quantity=0)
    status, body = await post(client, "products/update", sale, webhook_id="wh-sale3")
    assert (status, body["accepted"]) == (200, 2), body  # one price, one stock change
    changed = await db.events.find({"type": "price_changed", "contact_id": None}).to_list()
    assert len(changed) == 1
    assert {k: changed[0]["attributes"][k] for k in ("product_id", "price", "previous_price", "name")} == {
        "product_id": "9554194432293",
        "price": 20.0,
        "previous_price": 25.0,
        "name": "T-Shirt",
    }
    stock = await db.events.find({"type": "stock_changed", "contact_id": None}).to_list()
    assert [(e["attributes"]["in_stock"], e["attributes"]["quantity"]) for e in stock] == [(True, 5)]

    async def drop_scheduled() -> bool:
        return await db.messages.count_documents({"contact_id": "viewer", "ruleset": "price_drop"}) == 1

    await eventually(drop_scheduled)
    message = await db.messages.find_one({"contact_id": "viewer", "ruleset": "price_drop"})
    assert (message["params"]["price"], message["params"]["previous_price"]) == (20.0, 25.0)
    assert message["params"]["drop_percent"] == 20.0  # (25 - 20) / 25
    product_doc = await db.products.find_one({"_id": "9554194432293"})
    assert product_doc["price"] == 20.0  # what the guard compares with when the message is due

    # the cheapest variant back at 30: the lowest is 22 now, a rise the catalog learns (notifies nobody)
    dearer = copy.deepcopy(sale)
    dearer["variants"][0]["price"] = "30.00"
    status, body = await post(client, "products/update", dearer, webhook_id="wh-rise")
    assert (status, body["accepted"]) == (200, 1)
    rise = await db.events.find_one({"_id": "shopify/wh-rise/price"})
    assert (rise["attributes"]["price"], rise["attributes"]["previous_price"]) == (22.0, 20.0)


async def test_privacy_topics_are_carried_out(
    make_client: Any, settings: Settings, db: Any, tmp_path: Path
) -> None:
    """customers/redact erases the customer, shop/redact every contact of the shop (and no other), and
    customers/data_request logs an export for the shop owner; each acknowledged at once, then done."""
    client = await app_client(make_client, settings, tmp_path)
    john = {**payload("customers_create"), "id": 191167, "email": "john@example.com", "phone": "+16135551199"}
    jane = {**payload("customers_create"), "id": 191168, "email": "jane@example.com", "phone": "+16135551200"}
    for customer in (john, jane):
        assert (await post(client, "customers/create", customer))[0] == 200
    checkout = payload("checkouts_create")
    checkout["customer"] = {**checkout.get("customer", {}), "id": 191168, "email": "jane@example.com"}
    checkout["email"] = "jane@example.com"
    assert (await post(client, "checkouts/create", checkout))[1]["accepted"] >= 1
    other = {"id": "e-other", "type": "page_viewed", "contact_id": "not-from-shopify"}
    assert (await client.post("/v1/events", json=other)).status == 202
    assert (await client.put("/v1/contacts/not-from-shopify", json={"email": "x@example.com"})).status == 201

    asked = {**payload("customers_data_request"), "shop_domain": SHOP}
    asked["customer"] = {**asked["customer"], "id": 191167, "email": "john@example.com"}
    status, body = await post(client, "customers/data_request", asked, webhook_id="wh-export")
    assert (status, body["status"]) == (200, "accepted"), body
    logged = {"kind": "export", "contact_id": "191167", "source": f"shopify:{SHOP}"}

    async def export_logged() -> bool:
        return await db.privacy_requests.find_one(logged) is not None

    await eventually(export_logged)
    assert await db.contacts.find_one({"_id": "191167"}) is not None  # an export erases nothing

    redact = {**payload("customers_redact"), "shop_domain": SHOP}
    redact["customer"] = {"id": 191167, "email": "john@example.com", "phone": "+16135551199"}
    status, body = await post(client, "customers/redact", redact, webhook_id="wh-redact")
    assert (status, body["status"]) == (200, "accepted"), body

    async def redact_done() -> Any:
        doc = await db.shopify_privacy_requests.find_one(
            {"_id": "shopify/wh-redact", "done_at": {"$ne": None}}
        )
        return doc

    await eventually(redact_done)
    assert await db.contacts.find_one({"_id": "191167"}) is None
    assert await db.contacts.find_one({"_id": "191168"}) is not None  # jane was not asked for
    left = json.dumps([d async for d in db.shopify_privacy_requests.find()], default=str)
    assert "191167" not in left and "john@example.com" not in left  # the request keeps only digests

    status, body = await post(
        client, "shop/redact", {**payload("shop_redact"), "shop_domain": SHOP}, "wh-shop"
    )
    assert (status, body["status"]) == (200, "accepted"), body

    async def shop_done() -> Any:
        return await db.shopify_privacy_requests.find_one(
            {"_id": "shopify/wh-shop", "done_at": {"$ne": None}}
        )

    await eventually(shop_done)
    assert await db.contacts.find_one({"_id": "191168"}) is None
    assert await db.events.count_documents({"contact_id": "191168"}) == 0
    assert await db.contacts.find_one({"_id": "not-from-shopify"}) is not None  # not the shop's
    assert await db.events.count_documents({"contact_id": "not-from-shopify"}) == 1
    erased = await db.privacy_requests.count_documents({"kind": "erase", "source": f"shopify:{SHOP}"})
    assert erased >= 2


async def test_a_late_customer_update_does_not_bring_an_erased_customer_back(
    make_client: Any, settings: Settings, db: Any, tmp_path: Path
) -> None:
    client = await app_client(make_client, settings, tmp_path)
    customer = {**payload("customers_create"), "id": 191169, "email": "late@example.com"}
    sent_before = datetime.now(UTC).isoformat()
    assert (await post(client, "customers/create", customer))[0] == 200
    assert (await client.delete("/v1/contacts/191169")).status == 200
    status, body = await post(client, "customers/update", customer, **{"X-Shopify-Triggered-At": sent_before})
    assert (status, body["status"]) == (200, "ignored"), body
    assert await db.contacts.find_one({"_id": "191169"}) is None
    fresh = {**customer, "email": "back@example.com"}  # sent after the erasure: the customer came back
    assert (await post(client, "customers/update", fresh))[0] == 200
    assert (await db.contacts.find_one({"_id": "191169"}))["email"] == "back@example.com"


async def test_signature_replay_and_topic_are_refused_as_shopify_expects(
    make_client: Any, settings: Settings, db: Any, tmp_path: Path
) -> None:
    client = await app_client(make_client, settings, tmp_path)
    checkout = payload("checkouts_create")
    raw = json.dumps(checkout).encode()

    wrong = headers("checkouts/create", raw, "wh-1", **{"X-Shopify-Hmac-Sha256": sign(raw, "not-the-secret")})
    resp = await client.post("/v1/sources/shopify", data=raw, headers=wrong)
    assert resp.status == 401 and "does not match" in (await resp.json())["error"]
    tampered = headers("checkouts/create", raw, "wh-1")
    resp = await client.post("/v1/sources/shopify", data=raw.replace(b"398.00", b"1.00"), headers=tampered)
    assert resp.status == 401
    missing = {
        k: v for k, v in headers("checkouts/create", raw, "wh-1").items() if k != "X-Shopify-Hmac-Sha256"
    }
    resp = await client.post("/v1/sources/shopify", data=raw, headers=missing)
    assert resp.status == 401 and "missing" in (await resp.json())["error"]
    assert await db.events.count_documents({}) == 0

    # the old secret of a rotation still verifies
    old = headers("checkouts/create", raw, "wh-1", **{"X-Shopify-Hmac-Sha256": sign(raw, OLD_SECRET)})
    resp = await client.post("/v1/sources/shopify", data=raw, headers=old)
    assert resp.status == 200 and (await resp.json())["accepted"] == 1
    # the same delivery again (Shopify retries): 200, nothing done again
    resp = await client.post(
        "/v1/sources/shopify", data=raw, headers=headers("checkouts/create", raw, "wh-1")
    )
    assert resp.status == 200 and (await resp.json())["status"] == "duplicate"
    assert await db.events.count_documents({}) == 1
    # a customers/update replayed: the profile is not written again (its later change stays)
    customer = payload("customers_create")
    assert (await post(client, "customers/update", customer, webhook_id="wh-c"))[0] == 200
    await db.contacts.update_one({"_id": "706405506930370084"}, {"$set": {"email": "new@biller.com"}})
    assert (await post(client, "customers/update", customer, webhook_id="wh-c"))[1]["status"] == "duplicate"
    assert (await db.contacts.find_one({"_id": "706405506930370084"}))["email"] == "new@biller.com"

    status, body = await post(client, "carts/create", {"id": 1})
    assert status == 400 and "carts/create" in body["error"] and "orders/paid" in body["error"]
    status, body = await post(client, "orders/create", {"id": "x y"})
    assert status == 400 and body["field"] == "$.id"
    resp = await client.post(
        "/v1/sources/shopify", data=b"{not json", headers=headers("orders/create", b"{not json")
    )
    assert resp.status == 400 and "malformed JSON" in (await resp.json())["error"]


async def test_unconfigured_answers_401_naming_the_setting(
    make_client: Any, settings: Settings, tmp_path: Path
) -> None:
    client = await app_client(make_client, settings, tmp_path, shopify_secret=None)
    status, body = await post(client, "orders/create", payload("orders_create"))
    assert (status, body["error"]) == (401, "Shopify webhooks are not configured (RULESVC_SHOPIFY_SECRET)")


TOPICS = [
    "checkouts/create",
    "checkouts/update",
    "orders/create",
    "orders/paid",
    "orders/cancelled",
    "fulfillments/create",
    "fulfillments/update",
    "products/update",
    "inventory_levels/update",
    "customers/create",
    "customers/update",
    "customers/data_request",
    "customers/redact",
    "shop/redact",
]
JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=25,
)
KEYS = [
    "id",
    "order_id",
    "customer",
    "email",
    "line_items",
    "variants",
    "total_price",
    "price",
    "completed_at",
    "cancelled_at",
    "shipment_status",
    "status",
    "inventory_item_id",
    "available",
    "location_id",
    "phone",
    "email_marketing_consent",
    "sms_marketing_consent",
    "tags",
    "first_name",
    "orders_to_redact",
    "shop_domain",
    "discount_codes",
    "currency",
    "title",
    "handle",
    "images",
    "image",
]
BODIES = st.one_of(
    JSON,
    st.dictionaries(st.sampled_from(KEYS), JSON, max_size=10),
    st.sampled_from(
        [
            "checkouts_create",
            "orders_create",
            "fulfillments_create",
            "products_update",
            "customers_create",
            "customers_redact",
            "inventory_levels_update",
        ]
    ).map(payload),
)


async def test_any_signed_body_gets_an_answer_never_a_5xx(
    make_client: Any, settings: Settings, tmp_path: Path
) -> None:
    client = await app_client(make_client, settings, tmp_path)
    seen: list[int] = []

    @hsettings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        topic=st.sampled_from(TOPICS),
        body=BODIES,
        mutate=st.dictionaries(st.sampled_from(KEYS), JSON, max_size=3),
    )
    def check(topic: str, body: Any, mutate: dict[str, Any]) -> None:
        if isinstance(body, dict):
            body = {**body, **mutate}
        seen.append(0)
        pending.append((topic, body))

    pending: list[tuple[str, Any]] = []
    check()
    for topic, body in pending:
        raw = json.dumps(body).encode()
        resp = await client.post("/v1/sources/shopify", data=raw, headers=headers(topic, raw))
        assert resp.status in (200, 400), (topic, body, resp.status, await resp.text())
        answer = await resp.json()
        assert ("error" in answer) == (resp.status == 400)
    assert len(seen) == 200


async def test_a_signed_body_replayed_under_another_id_or_topic_does_nothing(
    make_client: Any, settings: Settings, db: Any, tmp_path: Path
) -> None:
    """Only the body is signed: a captured delivery posted again with a new webhook id is a replay, and an
    order's body posted as a privacy topic is not that topic's body, whatever the headers say."""
    client = await app_client(make_client, settings, tmp_path)
    customer = {**payload("customers_create"), "id": 191170, "email": "keep@example.com"}
    assert (await post(client, "customers/create", customer))[0] == 200
    order = payload("orders_create")
    order.update(cancelled_at=None, financial_status="paid")
    order["customer"]["id"] = 191170
    assert (await post(client, "orders/create", order))[1]["accepted"] == 1
    status, body = await post(client, "orders/create", order)  # same body, a new webhook id
    assert (status, body["status"]) == (200, "duplicate")
    for topic in ("customers/redact", "shop/redact", "customers/data_request"):
        status, body = await post(client, topic, order)
        assert status == 400, (topic, body)
    status, body = await post(client, "orders/cancelled", order)  # not cancelled in the signed body
    assert (status, body["status"]) == (200, "ignored")
    shop = {**payload("shop_redact"), "shop_domain": "other-shop.myshopify.com"}
    assert (await post(client, "shop/redact", shop))[0] == 400  # not the shop that sent it
    assert (await post(client, "shop/redact", {"shop_id": 1, "shop_domain": ""}))[0] == 400
    assert await db.shopify_privacy_requests.count_documents({}) == 0
    assert await db.contacts.find_one({"_id": "191170"}) is not None
    assert await db.events.count_documents({"type": "order_cancelled"}) == 0


async def test_a_guest_checkout_with_somebodys_email_does_not_change_their_profile(
    make_client: Any, settings: Settings, db: Any, tmp_path: Path
) -> None:
    """Anyone may type an email into a checkout: the contact found by it gets the checkout's events, and
    only what its profile lacks; its phone and consent stay its own, and it is not made the shop's."""
    client = await app_client(make_client, settings, tmp_path)
    victim = {"email": "vic@example.com", "phone": "+4915111111111", "consent": {"sms": True}}
    assert (await client.put("/v1/contacts/victim", json=victim)).status == 201
    checkout = payload("checkouts_create")
    checkout.pop("customer", None)
    checkout.update(email="VIC@example.com", phone="+4915199999999")
    checkout["billing_address"] = {**(checkout.get("billing_address") or {}), "phone": "+4915199999999"}
    status, body = await post(client, "checkouts/create", checkout)
    assert (status, body.get("contact_id")) == (200, "victim"), body
    contact = await db.contacts.find_one({"_id": "victim"})
    assert (contact["email"], contact["phone"]) == ("vic@example.com", "+4915111111111")
    assert contact["consent"] == {"sms": True}
    assert "shopify_shop" not in contact.get("attributes", {})


async def test_a_customer_redact_also_erases_the_customers_other_contacts(
    make_client: Any, settings: Settings, db: Any, tmp_path: Path
) -> None:
    """The same person under a contact of its own (e.g. from Segment), found by the email Shopify names,
    and the contact an order to redact was stored for."""
    client = await app_client(make_client, settings, tmp_path)
    assert (await client.put("/v1/contacts/u-42", json={"email": "John@Example.com"})).status == 201
    order = payload("orders_create")
    order.update(cancelled_at=None, financial_status="paid", id=299938, email="someone@example.com")
    order["customer"] = {"id": 555, "email": "someone@example.com"}
    assert (await post(client, "orders/create", order))[1]["accepted"] == 1
    redact = {**payload("customers_redact"), "shop_domain": SHOP}
    status, body = await post(client, "customers/redact", redact)
    assert (status, body["status"]) == (200, "accepted"), body

    async def both_gone() -> bool:
        left = await db.contacts.count_documents({"_id": {"$in": ["u-42", "555"]}})
        return left == 0 and await db.events.count_documents({"contact_id": "555"}) == 0

    await eventually(both_gone)
