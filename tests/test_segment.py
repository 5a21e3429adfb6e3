"""Segment's HTTP Tracking API, driven by the client libraries shops run: `segment-analytics-python` and
`rudder-sdk-python` post to the service on 127.0.0.1 as they would to Segment or RudderStack. Their
events arrive with our types, attributes and clock-corrected times, a retried batch is a duplicate, and a
`Product Added` left alone gets the shipped cart reminder. Wrong keys, junk, oversize and gzip bodies
get Segment's statuses."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest
import rudderstack.analytics as rudder_analytics
from segment.analytics.client import Client as SegmentClient
from segment.analytics.request import APIError

from rulesvc.config import Settings
from rulesvc.web.app import create_app
from rulesvc.web.keys import KEYS
from tests.helpers import Provider, eventually, registry
from tests.test_api_contract import check_against_document

ROOT = Path(__file__).parent.parent
Client = Any


def write_key(client: Client) -> str:
    """The test client's API key (an ingest key), which is the Segment write key."""
    return str(client.session.headers["Authorization"]).removeprefix("Bearer ")


def basic(key: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{key}:".encode()).decode()}


def url_of(client: Client) -> str:
    return str(client.make_url("")).rstrip("/")


async def post(client: Client, path: str, body: Any, **headers: str) -> tuple[int, Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    resp = await client.post(
        path,
        data=data,
        headers={**basic(write_key(client)), "Content-Type": "application/json", **headers},
    )
    return resp.status, await resp.json()


async def ingest_client(make_client: Any, settings: Settings, **kwargs: Any) -> Client:
    return await make_client(create_app(settings, **kwargs), "ingest")


async def test_segment_library_track_identify_page_arrive_as_our_events(
    make_client: Any, settings: Settings, db: Any
) -> None:
    client = await ingest_client(make_client, settings)
    segment = SegmentClient(write_key(client), host=url_of(client), sync_mode=True, max_retries=0)
    viewed_at = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=5)

    def send() -> None:
        segment.identify(
            "ann",
            {
                "email": "Ann@Example.com",
                "firstName": "Ann",
                "email_opt_in": True,
                "phone": "+49 151 1234 5678",
                "plan": "gold",
            },
            anonymous_id="visitor-1",
        )
        segment.track(
            "ann",
            "Product Viewed",
            {
                "product_id": "lamp-1",
                "name": "Lamp",
                "price": 59.9,
                "url": "https://shop.example/lamp",
                "image_url": "https://shop.example/lamp.jpg",
            },
            timestamp=viewed_at,
            message_id="m-view",
        )
        segment.track(anonymous_id="visitor-2", event="Signed Up", properties={"plan": "trial"})
        segment.page("ann", name="paywall", properties={"url": "https://shop.example/premium"})

    await asyncio.to_thread(send)
    events = {e["type"]: e async for e in db.events.find({})}
    assert set(events) == {"identified", "product_viewed", "signed_up", "page_viewed"}
    view = events["product_viewed"]
    assert (view["_id"], view["contact_id"]) == ("m-view", "ann")
    assert view["attributes"] == {
        "product_id": "lamp-1",
        "name": "Lamp",
        "price": 59.9,
        "url": "https://shop.example/lamp",
        "image_url": "https://shop.example/lamp.jpg",
    }
    # Sent at once: the device clock and ours agree, so the corrected time is the given one (to the second).
    assert abs(view["time"] - viewed_at) < timedelta(seconds=5)
    assert events["signed_up"]["contact_id"] == "anon:visitor-2"
    assert events["signed_up"]["attributes"] == {"plan": "trial"}
    assert (
        events["page_viewed"]["attributes"]["page"] == "paywall"
    )  # what browse_abandon's paywall rule reads
    assert events["page_viewed"]["attributes"]["url"] == "https://shop.example/premium"
    ann = await db.contacts.find_one({"_id": "ann"})
    assert ann["email"] == "Ann@Example.com"
    assert ann["phone"] == "+4915112345678"
    assert ann["consent"] == {"email": True}
    assert ann["attributes"] == {"first_name": "Ann", "plan": "gold"}


async def test_rudderstack_library_gzip_order_completed_is_a_purchase(
    make_client: Any, settings: Settings, db: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As RudderStack documents its Python SDK: module settings (`dataPlaneUrl`), a background queue sent
    gzip-compressed (its default), flushed at the end."""
    client = await ingest_client(make_client, settings)
    for name, value in {"write_key": write_key(client), "dataPlaneUrl": url_of(client), "max_retries": 0,
                        "default_client": None}.items():  # fmt: skip
        monkeypatch.setattr(rudder_analytics, name, value)
    order = {
        "order_id": "o-7",
        "total": 84.5,
        "revenue": 70.0,
        "currency": "EUR",
        "coupon": "WINTER",
        "products": [
            {"product_id": "lamp-1", "name": "Lamp", "price": 59.9, "quantity": 1},
            {"sku": "bulb", "name": "Bulb", "price": 12.3, "quantity": 2},
        ],
    }

    def send() -> None:
        rudder_analytics.identify("bob", {"email": "bob@example.com", "sms_opt_in": False})
        rudder_analytics.track("bob", "Order Completed", order)
        rudder_analytics.shutdown()  # flush the queue, stop the sender

    await asyncio.to_thread(send)
    assert rudder_analytics.gzip is True
    events = {e["type"]: e async for e in db.events.find({"contact_id": "bob"})}
    assert set(events) == {"identified", "purchased"}
    bob = await db.contacts.find_one({"_id": "bob"})
    assert (bob["email"], bob["consent"]) == ("bob@example.com", {"sms": False})
    attributes = events["purchased"]["attributes"]
    assert (attributes["order_id"], attributes["value"], attributes["promo_code"]) == ("o-7", 84.5, "WINTER")
    assert attributes["items"] == [
        {"product_id": "lamp-1", "sku": "lamp-1", "name": "Lamp", "price": 59.9, "qty": 1},
        {"product_id": "bulb", "sku": "bulb", "name": "Bulb", "price": 12.3, "qty": 2},
    ]


async def test_sent_at_corrects_the_device_clock(make_client: Any, settings: Settings, db: Any) -> None:
    """A device whose clock is 2 hours fast: its event 10 minutes ago is stored 10 minutes ago."""
    client = await ingest_client(make_client, settings)
    fast = datetime.now(UTC) + timedelta(hours=2)
    message = {
        "type": "track",
        "event": "Product Viewed",
        "userId": "cy",
        "messageId": "skewed",
        "properties": {"product_id": "p"},
        "timestamp": (fast - timedelta(minutes=10)).isoformat(),
    }
    before = datetime.now(UTC)
    status, _ = await post(client, "/v1/batch", {"batch": [message], "sentAt": fast.isoformat()})
    after = datetime.now(UTC)
    assert status == 200
    stored = (await db.events.find_one({"_id": "skewed"}))["time"]
    # received between `before` and `after`; stored to the millisecond
    assert before - timedelta(minutes=10, milliseconds=1) <= stored <= after - timedelta(minutes=10)


async def test_a_retried_batch_is_counted_as_duplicates(
    make_client: Any, settings: Settings, db: Any
) -> None:
    client = await ingest_client(make_client, settings)
    batch = {
        "batch": [
            {
                "type": "track",
                "event": "Product Viewed",
                "userId": "dan",
                "messageId": "r-1",
                "properties": {"product_id": "p1"},
            },
            {"type": "page", "name": "home", "anonymousId": "v-9", "messageId": "r-2"},
            {"type": "group", "userId": "dan", "groupId": "acme", "messageId": "r-3"},
        ]
    }
    assert await post(client, "/v1/batch", batch) == (
        200,
        {"success": True, "accepted": 2, "duplicates": 0, "ignored": 1},
    )
    assert await post(client, "/v1/batch", batch) == (
        200,
        {"success": True, "accepted": 0, "duplicates": 2, "ignored": 1},
    )
    assert await db.events.count_documents({}) == 2
    check_against_document("POST", "/v1/batch", 200, (await post(client, "/v1/batch", batch))[1])


async def test_product_added_and_nothing_else_gets_the_shipped_cart_reminder(
    make_client: Any, settings: Settings, db: Any, tmp_path: Path
) -> None:
    """The shipped rulesets as a user installs them; the 20-minute push brought due instead of waited for.
    The library retries the same message (same messageId): the reminder is decided once. (`bea` is not in
    the ruleset's 5 % holdout; `ann` is, and would get only held-out decisions.)"""
    rulesets = tmp_path / "shipped"
    shutil.copytree(ROOT / "rulesets", rulesets)
    push, email = Provider("push", needs="push_tokens"), Provider("email", needs="email")
    app = create_app(msgspec.structs.replace(settings, rulesets_dir=str(rulesets)), registry(push, email))
    client = await make_client(app, "ingest")
    admin_key, _ = await app[KEYS].create("admin", "tests")
    profile = {"email": "bea@example.com", "push_tokens": ["t-1"], "consent": {"push": True, "email": True}}
    resp = await client.put(
        "/v1/contacts/bea", json=profile, headers={"Authorization": f"Bearer {admin_key}"}
    )
    assert resp.status == 201
    segment = SegmentClient(write_key(client), host=url_of(client), sync_mode=True, max_retries=0)
    added = {"product_id": "lamp-1", "name": "Lamp", "price": 29.95, "quantity": 2, "currency": "EUR"}
    for _ in range(2):  # a retry of the same call
        await asyncio.to_thread(segment.track, "bea", "Product Added", added, message_id="add-1")

    async def both_reminders_scheduled() -> bool:
        return await db.schedule.count_documents({"ruleset": "cart_abandon", "status": "pending"}) == 2

    await eventually(both_reminders_scheduled)
    event = await db.events.find_one({"_id": "add-1"})
    assert event["type"] == "cart_updated"
    due = {e["message"]["channel"]: e["due_at"] async for e in db.schedule.find({"ruleset": "cart_abandon"})}
    assert due == {
        "push": event["time"] + timedelta(minutes=20),
        "email": event["time"] + timedelta(hours=12),
    }
    await db.schedule.update_one(
        {"ruleset": "cart_abandon", "message.channel": "push"}, {"$set": {"due_at": datetime.now(UTC)}}
    )

    async def pushed() -> bool:
        return len(push.delivered) == 1

    await eventually(pushed)
    sent = push.delivered[0]
    assert sent.template == "cart_abandon/push"
    assert sent.params["value"] == 59.9  # 2 x 29.95: the cart of this one product
    assert sent.params["items"] == [
        {"product_id": "lamp-1", "sku": "lamp-1", "name": "Lamp", "price": 29.95, "qty": 2, "currency": "EUR"}
    ]
    assert sent.content["body"].startswith("Your Lamp is still in your cart.")
    assert await db.messages.count_documents({"ruleset": "cart_abandon"}) == 2  # decided once


async def test_a_wrong_write_key_is_401_and_an_unscoped_one_403(
    make_client: Any, settings: Settings, db: Any
) -> None:
    client = await ingest_client(make_client, settings)
    track = {"event": "Product Viewed", "userId": "ann", "properties": {"product_id": "p"}}
    resp = await client.post("/v1/track", json=track, headers=basic("rsk_nope_nope"))
    assert resp.status == 401
    check_against_document("POST", "/v1/track", 401, await resp.json())
    assert resp.headers["WWW-Authenticate"] == 'Basic realm="rulesvc"'
    assert "write key" in (await resp.json())["error"]
    resp = await client.post("/v1/track", json=track, headers={"Authorization": "Basic %%%"})
    assert resp.status == 401
    wrong = SegmentClient("rsk_nope_nope", host=url_of(client), sync_mode=True, max_retries=0)
    with pytest.raises(APIError) as refused:
        await asyncio.to_thread(wrong.track, "ann", "Product Viewed", {"product_id": "p"})
    assert refused.value.status == 401
    reader, _ = await client.app[KEYS].create("read", "tests")
    resp = await client.post("/v1/track", json=track, headers=basic(reader))
    assert resp.status == 403
    resp = await client.post("/v1/track", json=track)  # the ingest key as a Bearer token still works
    assert resp.status == 200
    assert await db.events.count_documents({}) == 1


async def test_a_gzip_body_is_read(make_client: Any, settings: Settings, db: Any) -> None:
    client = await ingest_client(make_client, settings)
    body = gzip.compress(
        json.dumps(
            {
                "batch": [
                    {
                        "type": "track",
                        "event": "Cart Viewed",
                        "userId": "eve",
                        "properties": {"products": [{"product_id": "p", "price": 5, "quantity": 3}]},
                    }
                ]
            }
        ).encode()
    )
    status, answer = await post(client, "/v1/batch", body, **{"Content-Encoding": "gzip"})
    assert (status, answer["accepted"]) == (200, 1)
    event = await db.events.find_one({"contact_id": "eve"})
    assert (event["type"], event["attributes"]["value"]) == ("cart_updated", 15)


async def test_over_segments_limits_is_413(make_client: Any, settings: Settings, db: Any) -> None:
    client = await ingest_client(make_client, settings)
    big = {"type": "track", "event": "Product Viewed", "userId": "ann", "properties": {"note": "x" * 33_000}}
    status, answer = await post(client, "/v1/track", big)
    assert status == 413 and answer["success"] is False and answer["code"] == "too_large"
    check_against_document("POST", "/v1/track", 413, answer)
    status, answer = await post(client, "/v1/batch", {"batch": [{**big, "properties": {}}, big]})
    assert status == 413 and answer["error"].startswith("$.batch[1]: message of")
    under = {**big, "properties": {"note": "x" * 30_000}}  # each under 32 KB, all over 500 KB
    status, answer = await post(client, "/v1/batch", {"batch": [under] * 18})
    assert status == 413 and "500 KB" in answer["error"]
    assert await db.events.count_documents({}) == 0


@pytest.mark.parametrize(
    ("path", "body", "where", "says"),
    [
        ("/v1/track", {"userId": "ann", "properties": {}}, "$.event", "required for track"),
        ("/v1/track", {"event": "Product Viewed"}, "$", "userId or anonymousId is required"),
        ("/v1/track", {"event": "x", "userId": "a b"}, "$.userId", "whitespace"),
        ("/v1/track", {"event": "x", "userId": True}, "$.userId", "got `bool`"),
        ("/v1/track", {"event": "x", "userId": "a", "timestamp": "yesterday"}, "$.timestamp", "RFC3339"),
        ("/v1/track", {"event": "x", "userId": "a", "properties": {"a.b": 1}}, "$.properties", "invalid key"),
        ("/v1/page", {"userId": "a", "timestamp": "1900-01-01T00:00:00Z"}, "$.timestamp", "must be between"),
        ("/v1/identify", {"userId": "a", "traits": {"email": "nope"}}, "$.traits.email", "not an email"),
        (
            "/v1/identify",
            {"userId": "a", "context": {"traits": {"email": 5}}},
            "$.context.traits.email",
            "not an email",
        ),
        ("/v1/identify", {"userId": "a", "traits": {"x": {"$set": 1}}}, "$.traits.x", "invalid key"),
        ("/v1/identify", {"userId": "a", "traits": {"sms_opt_in": "yes"}}, "$.traits.sms_opt_in", "true or"),
        ("/v1/identify", {"userId": "a", "traits": {"timezone": "Mars"}}, "$.traits.timezone", "IANA"),
        (
            "/v1/identify",
            {"userId": "a", "traits": {"consent": {"email": 1}}},
            "$.traits.consent.email",
            "true or false",
        ),
        ("/v1/alias", {"userId": "a"}, "$.previousId", "required for alias"),
        ("/v1/alias", {"userId": "anon:x", "previousId": "y"}, "$.userId", "prefix of anonymous contacts"),
        ("/v1/identify", {"userId": "anon:x", "anonymousId": "x"}, "$.userId", "may not begin with"),
        ("/v1/batch", {"batch": [{"type": "boo"}]}, "$.batch[0].type", "one of track"),
        ("/v1/batch", {"batch": []}, "$.batch", "no messages"),
        ("/v1/batch", {"messages": []}, "$", "missing required field `batch`"),
        (
            "/v1/batch",
            {"batch": [{"type": "track", "event": "x", "userId": "a", "messageId": "m/1"}]},
            "$.batch[0].messageId",
            "`/`",
        ),
    ],
)
async def test_an_invalid_message_is_400_with_its_path_and_nothing_is_stored(
    make_client: Any, settings: Settings, db: Any, path: str, body: Any, where: str, says: str
) -> None:
    client = await ingest_client(make_client, settings)
    status, answer = await post(client, path, body)
    assert status == 400, answer
    check_against_document("POST", path, 400, answer)
    assert answer["success"] is False and answer["message"] == answer["error"]
    assert [e["path"] for e in answer["errors"]] == [where], answer
    assert says in answer["errors"][0]["message"]
    assert await db.events.count_documents({}) == 0
    assert await db.contacts.count_documents({}) == 0


async def test_a_batch_of_junk_lists_its_first_hundred_problems(make_client: Any, settings: Settings) -> None:
    client = await ingest_client(make_client, settings)
    status, answer = await post(client, "/v1/batch", {"batch": [{"type": "page"}] * 5000})
    assert status == 400
    assert answer["error"] == "5000 problem(s) (the first 100 listed); nothing stored"
    assert [e["path"] for e in answer["errors"]] == [f"$.batch[{i}]" for i in range(100)]


async def test_other_traits_are_kept_as_they_came(make_client: Any, settings: Settings, db: Any) -> None:
    """Traits the profile does not read are attributes, whatever they hold; a phone that is not E.164 too."""
    client = await ingest_client(make_client, settings)
    traits = {
        "phone": "0151 123",
        "age": 41,
        "address": {"city": "Berlin"},
        "tags": [1, None, "x"],
        "email": None,
        "push_opt_in": False,
        "consent": {"sms": True},
    }
    status, answer = await post(client, "/v1/identify", {"anonymousId": "v-1", "traits": traits})
    assert (status, answer["accepted"]) == (200, 1)
    contact = await db.contacts.find_one({"_id": "anon:v-1"})
    assert "phone" not in contact and "email" not in contact
    assert contact["consent"] == {"push": False, "sms": True}
    assert contact["attributes"] == {
        "phone": "0151 123",
        "age": 41,
        "address": {"city": "Berlin"},
        "tags": [1, None, "x"],
    }


async def test_malformed_json_is_400(make_client: Any, settings: Settings) -> None:
    client = await ingest_client(make_client, settings)
    for path in ("/v1/batch", "/v1/track"):
        status, answer = await post(client, path, b'{"batch": [')
        assert status == 400 and answer["code"] == "malformed_json", answer
    # as a browser posts it (no preflight), and not UTF-8
    status, answer = await post(client, "/v1/track", b'{"event": "\xff"}', **{"Content-Type": "text/plain"})
    assert status == 400 and answer["error"].startswith("request body is not valid UTF-8"), answer
    ok = {"event": "Product Viewed", "userId": "ann"}
    assert (await post(client, "/v1/track", json.dumps(ok).encode(), **{"Content-Type": "text/plain"}))[
        0
    ] == 200


async def test_an_anonymous_visitor_is_merged_into_the_contact_identify_names(
    make_client: Any, settings: Settings, db: Any
) -> None:
    """Segment's identify with both ids: what the visitor did anonymously moves to the known contact, and
    later calls with only the anonymous id land there too."""
    client = await make_client(create_app(settings), "admin")
    added = {"type": "track", "event": "Product Added", "anonymousId": "v9", "messageId": "m-add",
             "properties": {"product_id": "p1", "price": 20, "quantity": 1, "name": "Mug"}}  # fmt: skip
    assert (await post(client, "/v1/track", added))[0] == 200
    identify = {"type": "identify", "userId": "u9", "anonymousId": "v9", "messageId": "m-id",
                "traits": {"email": "u9@example.com", "email_opt_in": True}}  # fmt: skip
    assert (await post(client, "/v1/identify", identify))[0] == 200

    async def merged() -> bool:
        return await db.events.count_documents({"contact_id": "anon:v9"}) == 0

    await eventually(merged)
    moved = await db.events.find_one({"_id": "m-add"})
    assert moved["contact_id"] == "u9" and moved["type"] == "cart_updated"
    assert await db.contacts.find_one({"_id": "anon:v9"}) is None
    assert (await db.contacts.find_one({"_id": "u9"}))["email"] == "u9@example.com"
    page = {"type": "page", "anonymousId": "v9", "messageId": "m-page", "name": "Home"}
    assert (await post(client, "/v1/page", page))[0] == 200
    assert (await db.events.find_one({"_id": "m-page"}))["contact_id"] == "u9"


async def test_a_late_identify_does_not_bring_an_erased_contact_back(
    make_client: Any, settings: Settings, db: Any
) -> None:
    client = await make_client(create_app(settings), "admin")
    sent = datetime.now(UTC).isoformat()
    identify = {"type": "identify", "userId": "u10", "anonymousId": "v10", "messageId": "m-10",
                "timestamp": sent, "traits": {"email": "u10@example.com"}}  # fmt: skip
    assert (await post(client, "/v1/identify", identify))[0] == 200
    assert (await client.delete("/v1/contacts/u10")).status == 200
    retried = {**identify, "messageId": "m-10-retry"}  # a client that lost the answer, sending it again
    assert (await post(client, "/v1/identify", retried))[0] == 200
    assert await db.contacts.find_one({"_id": "u10"}) is None
    assert await db.events.count_documents({"contact_id": "u10"}) == 0
    later = {**identify, "messageId": "m-11", "timestamp": datetime.now(UTC).isoformat()}
    assert (await post(client, "/v1/identify", later))[0] == 200  # sent after the erasure: a new start
    assert (await db.contacts.find_one({"_id": "u10"}))["email"] == "u10@example.com"


async def test_a_batch_keeps_its_valid_messages_and_lists_the_others(
    make_client: Any, settings: Settings, db: Any
) -> None:
    """As Segment does: one bad message (here a `/` in its messageId, and an unknown type) does not cost the
    batch's good ones, which a library would never send again after a 400."""
    client = await ingest_client(make_client, settings)
    batch = [
        {"type": "track", "event": "Order Completed", "userId": "p1", "messageId": "ok-1",
         "properties": {"order_id": "o1", "total": 30}},
        {"type": "track", "event": "x", "userId": "p1", "messageId": "bad/1"},
        {"type": "identify", "userId": "p2", "messageId": "ok-2", "traits": {"email": "p2@example.com"}},
        {"type": "boo", "userId": "p3"},
        {"type": "identify", "userId": "p4", "messageId": "bad-2", "traits": {"email": "not an email"}},
    ]  # fmt: skip
    status, answer = await post(client, "/v1/batch", {"batch": batch})
    assert status == 200, answer
    check_against_document("POST", "/v1/batch", 200, answer)
    assert (answer["accepted"], answer["rejected"]) == (2, 3)
    paths = [e["path"] for e in answer["errors"]]
    assert paths == ["$.batch[1].messageId", "$.batch[3].type", "$.batch[4].traits.email"]
    assert {d["_id"] async for d in db.events.find()} == {"ok-1", "ok-2"}
    assert await db.contacts.find_one({"_id": "p4"}) is None  # a refused identify changes nothing
    assert (await db.contacts.find_one({"_id": "p2"}))["email"] == "p2@example.com"


async def test_a_write_key_fills_a_profile_but_does_not_take_it_over(
    make_client: Any, settings: Settings, db: Any
) -> None:
    """A browser's write key is public: with it an identify may fill what is empty and withdraw consent,
    not redirect a contact's messages or opt anybody in. An admin key (a server's) may change them."""
    client = await ingest_client(make_client, settings)
    first = {"userId": "v1", "traits": {"email": "v1@example.com", "email_opt_in": True, "sms_opt_in": False}}
    assert (await post(client, "/v1/identify", first))[0] == 200
    traits = {
        "email": "thief@example.com",
        "sms_opt_in": True,
        "phone": "+4915112345678",
        "first_name": "Vera",
    }
    taken = {"userId": "v1", "traits": traits}
    assert (await post(client, "/v1/identify", taken))[0] == 200
    contact = await db.contacts.find_one({"_id": "v1"})
    assert contact["email"] == "v1@example.com"  # kept
    assert contact["consent"] == {"email": True, "sms": False}  # no opt-in on somebody's behalf
    assert contact["phone"] == "+4915112345678"  # it had none: filled
    assert contact["attributes"]["first_name"] == "Vera"
    withdrawn = {"userId": "v1", "traits": {"email_opt_in": False}}
    assert (await post(client, "/v1/identify", withdrawn))[0] == 200
    assert (await db.contacts.find_one({"_id": "v1"}))["consent"]["email"] is False

    admin = await make_client(create_app(settings), "admin")
    moved = {"userId": "v1", "traits": {"email": "new@example.com", "email_opt_in": True}}
    assert (await post(admin, "/v1/identify", moved))[0] == 200
    contact = await db.contacts.find_one({"_id": "v1"})
    assert contact["email"] == "new@example.com" and contact["consent"]["email"] is True


async def test_an_old_alias_does_not_bring_an_erased_contact_back(
    make_client: Any, settings: Settings, db: Any
) -> None:
    client = await make_client(create_app(settings), "admin")
    assert (await client.put("/v1/contacts/gone", json={"email": "gone@example.com"})).status == 201
    assert (await client.delete("/v1/contacts/gone")).status == 200
    seen = {"type": "track", "event": "Product Viewed", "anonymousId": "z1", "messageId": "z-1"}
    assert (await post(client, "/v1/track", seen))[0] == 200
    alias = {"userId": "gone", "previousId": "z1", "messageId": "z-2", "timestamp": "2020-01-01T00:00:00Z"}
    assert (await post(client, "/v1/alias", alias))[0] == 200
    assert await db.contacts.find_one({"_id": "gone"}) is None
    assert await db.identities.count_documents({"contact_id": "gone"}) == 0
    assert (await db.events.find_one({"_id": "z-1"}))["contact_id"] == "anon:z1"  # not moved into it


async def test_a_call_with_both_ids_links_the_visitor_and_many_links_stay_cheap(
    make_client: Any, settings: Settings, db: Any
) -> None:
    """Segment's rule: a message with userId and anonymousId says the visitor is the user, whatever its
    type. A batch of thousands of such links is taken in one go; merges beyond the first few are left
    to the merge loop, which finishes them."""
    client = await ingest_client(make_client, settings)
    seen = {"type": "track", "event": "Product Viewed", "anonymousId": "w1", "messageId": "w-1"}
    assert (await post(client, "/v1/track", seen))[0] == 200
    both = {
        "type": "track",
        "event": "Product Viewed",
        "anonymousId": "w1",
        "userId": "wu",
        "messageId": "w-2",
    }
    assert (await post(client, "/v1/track", both))[0] == 200
    assert (await db.identities.find_one({"_id": "anon:w1"}))["contact_id"] == "wu"

    many = [{"type": "identify", "userId": f"m{i}", "anonymousId": f"a{i}", "messageId": f"id-{i}"}
            for i in range(300)]  # fmt: skip
    started = asyncio.get_running_loop().time()
    status, answer = await post(client, "/v1/batch", {"batch": many})
    assert status == 200, answer
    assert asyncio.get_running_loop().time() - started < 20
    assert await db.identities.count_documents({"_id": {"$regex": "^anon:a"}}) == 300

    async def all_merged() -> bool:
        return await db.identities.count_documents({"merged": False}) == 0

    await eventually(all_merged, timeout=60)


# --- the kept cart ----------------------------------------------------------------------------------------

LAMP = {"product_id": "lamp-1", "name": "Lamp", "price": 120, "quantity": 1, "url": "https://shop.example/lamp",
        "image_url": "https://shop.example/lamp.jpg", "currency": "EUR"}  # fmt: skip
SOFA = {"product_id": "sofa-2", "name": "Sofa", "price": 150, "quantity": 1, "currency": "EUR"}


async def shipped(make_client: Any, settings: Settings, tmp_path: Path, contact: str) -> Client:
    """The service with the shipped rulesets, an ingest client, and `contact` reachable by push, email
    and web push (`bea`, `cleo` and `dora` are not in cart_abandon's 5 % holdout)."""
    rulesets = tmp_path / "shipped"
    shutil.copytree(ROOT / "rulesets", rulesets)
    providers = [Provider("push", needs="push_tokens"), Provider("email", needs="email"), Provider("webpush")]
    app = create_app(msgspec.structs.replace(settings, rulesets_dir=str(rulesets)), registry(*providers))
    client = await make_client(app, "ingest")
    admin_key, _ = await app[KEYS].create("admin", "tests")
    profile = {"email": f"{contact}@example.com", "push_tokens": ["t-1"],
               "consent": {"push": True, "email": True, "webpush": True}}  # fmt: skip
    admin = {"Authorization": f"Bearer {admin_key}"}
    resp = await client.put(f"/v1/contacts/{contact}", json=profile, headers=admin)
    assert resp.status == 201
    return client


def pending_cart_sends(db: Any) -> Any:
    return db.schedule.find({"ruleset": "cart_abandon", "status": "pending"}).to_list()


async def test_two_products_added_are_one_cart_of_both_and_its_value(
    make_client: Any, settings: Settings, db: Any, tmp_path: Path
) -> None:
    """Segment sends each `Product Added` with the one product: the event holds the whole cart, so a cart
    of 120 + 150 gets the shipped high-value reminder listing both."""
    client = await shipped(make_client, settings, tmp_path, "bea")
    segment = SegmentClient(write_key(client), host=url_of(client), sync_mode=True, max_retries=0)
    await asyncio.to_thread(segment.track, "bea", "Product Added", LAMP, message_id="add-lamp")
    await asyncio.to_thread(segment.track, "bea", "Product Added", SOFA, message_id="add-sofa")
    lamp = {"product_id": "lamp-1", "sku": "lamp-1", "name": "Lamp", "price": 120, "qty": 1,
            "currency": "EUR", "url": "https://shop.example/lamp",
            "image_url": "https://shop.example/lamp.jpg"}  # fmt: skip
    sofa = {
        "product_id": "sofa-2",
        "sku": "sofa-2",
        "name": "Sofa",
        "price": 150,
        "qty": 1,
        "currency": "EUR",
    }
    second = await db.events.find_one({"_id": "add-sofa"})
    assert (second["type"], second["attributes"]["value"]) == ("cart_updated", 270)
    assert second["attributes"]["items"] == [lamp, sofa]

    async def high_value_armed() -> bool:
        templates = {e["message"]["template"] for e in await pending_cart_sends(db)}
        return {"cart_abandon/high_value_email", "cart_abandon/high_value_webpush"} <= templates

    await eventually(high_value_armed)
    email = next(
        e for e in await pending_cart_sends(db) if e["message"]["template"].endswith("high_value_email")
    )
    assert (email["message"]["params"]["value"], email["message"]["params"]["items"]) == (270, [lamp, sofa])

    # The same product again adds to its line; a retried message (same messageId) adds nothing more.
    for _ in range(2):
        await asyncio.to_thread(
            segment.track, "bea", "Product Added", {**LAMP, "quantity": 2}, message_id="add-2"
        )
    mug = {"product_id": "mug", "price": 8.5}
    await asyncio.to_thread(segment.track, "bea", "Product Added", mug, message_id="add-mug")
    fourth = (await db.events.find_one({"_id": "add-mug"}))["attributes"]
    assert [(i["product_id"], i["qty"]) for i in fourth["items"]] == [
        ("lamp-1", 3),
        ("sofa-2", 1),
        ("mug", 1),
    ]
    assert fourth["value"] == 3 * 120 + 150 + 8.5
    viewed = {"products": [{"product_id": "mug", "price": 8.5, "quantity": 2}]}  # the whole cart: replaces it
    await asyncio.to_thread(segment.track, "bea", "Cart Viewed", viewed, message_id="view-1")
    shown = (await db.events.find_one({"_id": "view-1"}))["attributes"]
    assert ([i["product_id"] for i in shown["items"]], shown["value"]) == (["mug"], 17)


async def test_removing_the_last_product_empties_the_cart_and_cancels_the_reminder(
    make_client: Any, settings: Settings, db: Any, tmp_path: Path
) -> None:
    """`Product Removed` as the spec sends it (the product, no cart): the cart left is empty, value 0,
    which the shipped ruleset's `cart_emptied` rule reads to cancel the reminders."""
    client = await shipped(make_client, settings, tmp_path, "cleo")
    added = {"type": "track", "event": "Product Added", "userId": "cleo", "messageId": "c-add",
             "properties": {"product_id": "mug", "name": "Mug", "price": 12.5, "quantity": 2}}  # fmt: skip
    assert (await post(client, "/v1/track", added))[0] == 200

    async def armed() -> bool:
        return len(await pending_cart_sends(db)) == 2

    await eventually(armed)
    one = {"type": "track", "event": "Product Removed", "userId": "cleo", "messageId": "c-rm-1",
           "properties": {"product_id": "mug", "quantity": 1}}  # fmt: skip
    assert (await post(client, "/v1/track", one))[0] == 200
    left = (await db.events.find_one({"_id": "c-rm-1"}))["attributes"]
    assert ([(i["product_id"], i["qty"]) for i in left["items"]], left["value"]) == ([("mug", 1)], 12.5)
    rest = {**one, "messageId": "c-rm-2", "properties": {"product_id": "mug"}}  # no quantity: all of it
    assert (await post(client, "/v1/track", rest))[0] == 200
    emptied = await db.events.find_one({"_id": "c-rm-2"})
    assert (emptied["type"], emptied["attributes"]["items"], emptied["attributes"]["value"]) == (
        "cart_updated",
        [],
        0,
    )

    async def cancelled() -> bool:
        undecided = await db.inbox.count_documents({"state": "pending"})
        return undecided == 0 and await pending_cart_sends(db) == []

    await eventually(cancelled)


async def test_an_order_empties_the_cart(make_client: Any, settings: Settings, db: Any) -> None:
    """In the batch's order. A removal from a cart not kept (begun before the upgrade) says nothing of it."""
    client = await ingest_client(make_client, settings)
    first = {"product_id": "a", "price": 5}
    batch = {"batch": [
        {"type": "track", "event": "Product Removed", "userId": "olga", "messageId": "o-rm",
         "properties": {"product_id": "z"}},
        {"type": "track", "event": "Product Added", "userId": "olga", "properties": first},
        {"type": "track", "event": "Order Completed", "userId": "olga", "properties": {"order_id": "o1"}},
        {"type": "track", "event": "Product Added", "userId": "olga", "messageId": "o-add",
         "properties": {"product_id": "b", "price": 7}},
    ]}  # fmt: skip
    assert (await post(client, "/v1/batch", batch))[0] == 200
    after = (await db.events.find_one({"_id": "o-add"}))["attributes"]
    assert ([i["product_id"] for i in after["items"]], after["value"]) == (["b"], 7)
    assert "value" not in (await db.events.find_one({"_id": "o-rm"}))["attributes"]  # arms no reminder
    purchase = await db.events.find_one({"type": "purchased"})
    assert purchase["attributes"] == {"order_id": "o1"}


async def test_products_added_at_once_are_all_in_the_cart(
    make_client: Any, settings: Settings, db: Any
) -> None:
    """Requests of the same contact racing each other (a page adding several products in parallel): none
    of the products is lost."""
    client = await ingest_client(make_client, settings)
    adds = [
        {"event": "Product Added", "userId": "rita", "messageId": f"race-{n}",
         "properties": {"product_id": f"p{n}", "price": 1, "quantity": 1}}
        for n in range(12)
    ]  # fmt: skip
    answers = await asyncio.gather(*(post(client, "/v1/track", a) for a in adds))
    assert [status for status, _ in answers] == [200] * 12
    values = [e["attributes"]["value"] async for e in db.events.find({"contact_id": "rita"})]
    assert sorted(values) == list(range(1, 13))  # each saw the cart with every product added before it
    last = await db.events.find_one({"contact_id": "rita", "attributes.value": 12})
    assert sorted(i["product_id"] for i in last["attributes"]["items"]) == sorted(f"p{n}" for n in range(12))


async def test_an_anonymous_cart_joins_the_known_contacts_cart_at_identify(
    make_client: Any, settings: Settings, db: Any
) -> None:
    client = await make_client(create_app(settings), "admin")
    known = {"event": "Product Added", "userId": "u5", "properties": {"product_id": "a", "price": 10}}
    visitor = {"event": "Product Added", "anonymousId": "v5", "properties": {"product_id": "b", "price": 4}}
    assert (await post(client, "/v1/track", known))[0] == 200
    assert (await post(client, "/v1/track", visitor))[0] == 200
    assert (await post(client, "/v1/identify", {"userId": "u5", "anonymousId": "v5"}))[0] == 200
    again = {"event": "Product Added", "anonymousId": "v5", "messageId": "v5-more",
             "properties": {"product_id": "a", "price": 10}}  # fmt: skip
    assert (await post(client, "/v1/track", again))[0] == 200
    event = await db.events.find_one({"_id": "v5-more"})
    assert event["contact_id"] == "u5"
    assert sorted((i["product_id"], i["qty"]) for i in event["attributes"]["items"]) == [("a", 2), ("b", 1)]
    assert event["attributes"]["value"] == 24


async def test_an_erased_contact_leaves_no_cart(make_client: Any, settings: Settings, db: Any) -> None:
    client = await make_client(create_app(settings), "admin")
    added = {"event": "Product Added", "userId": "eric-77", "properties": {"product_id": "a", "price": 10}}
    visitor = {"event": "Product Added", "anonymousId": "v77", "properties": {"product_id": "b", "price": 4}}
    assert (await post(client, "/v1/track", added))[0] == 200
    assert (await post(client, "/v1/track", visitor))[0] == 200
    assert (await post(client, "/v1/alias", {"userId": "eric-77", "previousId": "v77"}))[0] == 200
    assert await db.segment_carts.count_documents({"contact_id": "eric-77"}) == 1
    resp = await client.delete("/v1/contacts/eric-77")
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["deleted"]["segment_carts"] == 1
    for name in await db.list_collection_names():
        async for doc in db[name].find({}):
            text = json.dumps(doc, default=str)
            assert "eric-77" not in text and "v77" not in text, (name, doc)


async def test_a_forwarded_message_keeps_its_corrected_timestamp(
    make_client: Any, settings: Settings, db: Any
) -> None:
    """What Segment's Webhooks destination (or RudderStack) forwards: `timestamp` already corrected by
    Segment, with the device's skewed `sentAt` and `originalTimestamp` and Segment's `receivedAt`."""
    client = await ingest_client(make_client, settings)
    happened = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=3)
    device = timedelta(hours=2)  # the device's clock is 2 hours fast
    forwarded = {
        "type": "track",
        "event": "Product Viewed",
        "userId": "fwd",
        "messageId": "fwd-1",
        "properties": {"product_id": "p"},
        "timestamp": happened.isoformat(),
        "originalTimestamp": (happened + device).isoformat(),
        "sentAt": (happened + device + timedelta(seconds=1)).isoformat(),
        "receivedAt": (happened + timedelta(seconds=1)).isoformat(),
    }
    assert (await post(client, "/v1/track", forwarded))[0] == 200
    assert (await db.events.find_one({"_id": "fwd-1"}))["time"] == happened
