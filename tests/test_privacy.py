"""Privacy requests: a contact driven through the whole service (profile, events, sends now and later,
the in-app inbox, an ad audience, an inbox token, an identity link, a quarantined event, a backtest
report, an export) and then erased; the judge is a scan of every document of every collection for the
contact's id, email and phone, so a collection the erasure forgets fails it. Tombstones against late
retries, the erasure racing events in flight, the export, the request log, the CLI, and any id on the
new routes."""

from __future__ import annotations

import asyncio
import hashlib
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import msgspec
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rulesvc_ads import AudienceSync

from rulesvc.config import Settings
from rulesvc.plugins import builtin_channels
from rulesvc.runtime.identity import link
from rulesvc.runtime.privacy import tombstone_drops
from rulesvc.store.db import Store
from rulesvc.store.mongod import EmbeddedMongod
from rulesvc.web.app import create_app
from rulesvc.web.keys import STORE
from tests.helpers import eventually, send, setup
from tests.service import ServiceProcess
from tests.stored import plant
from tests.test_api_contract import check_against_document
from tests.test_shopify import SECRET, SHOP
from tests.test_shopify import post as shopify_post

Client = Any
CONTACT = "706405506930370084"  # a Shopify customer id, as the Shopify source names the contact
EMAIL = "Ann.Erase@Example.COM"
PHONE = "+4915112345678"
ANON = "anon:a-4711"


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def iso(when: datetime) -> str:
    return when.isoformat().replace("+00:00", "Z")


FLOW = [
    send("log", transactional=True),
    send("inapp", transactional=True),
    send("log", transactional=True, after="1h"),  # a send to come
    {"audience": {"add": "vip"}},
]


@pytest.fixture
def shop(settings: Settings) -> Settings:
    return setup(settings, FLOW, shopify_secret=SECRET)


def leaks(docs: dict[str, list[Any]], needles: list[str]) -> list[tuple[str, str]]:
    """(collection, needle) for each document whose JSON text holds a needle, in any letter case."""
    found = []
    for name, rows in docs.items():
        for doc in rows:
            text = json.dumps(doc, default=str).lower()
            found += [(name, n) for n in needles if n.lower() in text]
    return found


async def everything(db: Any) -> dict[str, list[Any]]:
    return {name: await db[name].find({}).to_list() for name in await db.list_collection_names()}


async def contact_docs(db: Any, contact: str) -> dict[str, int]:
    return {
        "events": await db.events.count_documents({"contact_id": contact}),
        "messages": await db.messages.count_documents({"contact_id": contact}),
        "schedule": await db.schedule.count_documents({"contact_id": contact}),
        "contacts": await db.contacts.count_documents({"_id": contact}),
    }


async def post(client: Client, events: list[dict[str, Any]]) -> dict[str, Any]:
    resp = await client.post("/v1/events", json=events)
    assert resp.status == 202, await resp.text()
    return await resp.json()  # type: ignore[no-any-return]


async def drive(client: Client, db: Any, store: Store) -> None:
    """The contact through everything the service stores for a contact."""
    profile = {"email": EMAIL, "phone": PHONE, "consent": {"log": True, "inapp": True},
               "attributes": {"first_name": "Ann", "email_copy": EMAIL}}  # fmt: skip
    assert (await client.put(f"/v1/contacts/{CONTACT}", json=profile)).status == 201
    await post(
        client,
        [
            {"id": "e-go", "type": "go", "contact_id": CONTACT, "attributes": {"code": "X1"}},
            {
                "id": "e-view",
                "type": "product_viewed",
                "contact_id": CONTACT,
                "attributes": {"product_id": "p1"},
            },
            {
                "id": "e-page",
                "type": "page_viewed",
                "contact_id": CONTACT,
                "attributes": {"email": EMAIL.lower()},
            },
            {"id": "e-anon", "type": "page_viewed", "contact_id": ANON, "attributes": {"phone": PHONE}},
        ],
    )

    async def sent() -> bool:
        statuses = sorted([m["status"] async for m in db.messages.find({"contact_id": CONTACT})])
        return statuses == ["scheduled", "sent", "sent"]

    await eventually(sent)
    inapp = await db.messages.find_one({"contact_id": CONTACT, "sent_channel": "inapp"})
    resp = await client.post(f"/v1/contacts/{CONTACT}/inbox/{inapp['_id']}", json={"action": "shown"})
    assert resp.status == 204
    assert (await client.post(f"/v1/contacts/{CONTACT}/inbox-token")).status == 200
    # The shop asks for the customer's data through Shopify's privacy topic.
    customer = {"id": int(CONTACT), "email": EMAIL, "phone": PHONE}
    asked = {"shop_id": 954889, "shop_domain": SHOP, "orders_requested": [299938], "customer": customer,
             "data_request": {"id": 9999}}  # fmt: skip
    status, answer = await shopify_post(client, "customers/data_request", asked)
    assert (status, answer["status"]) == (200, "accepted"), answer

    async def logged() -> bool:  # the shop's data request is carried out (logged as an export) by a loop
        return await db.privacy_requests.count_documents({"source": f"shopify:{SHOP}"}) == 1  # type: ignore[no-any-return]

    await eventually(logged)
    # The anonymous visitor identifies as the contact: the link, and the visitor's history merged in.
    await eventually(lambda: _none_pending(db))
    await link(store, ANON, CONTACT, datetime.now(UTC))
    # A quarantined event, as the inbox leaves one after three failed evaluations.
    now = datetime.now(UTC)
    await plant(db, [{"_id": "e-bad", "type": "go", "contact_id": CONTACT, "time": now,
                      "attributes": {"email": EMAIL}, "received_at": now, "state": "quarantined",
                      "attempts": 3, "error": "ValueError: x", "quarantined_at": now}])  # fmt: skip

    async def decided() -> bool:
        pending = await db.inbox.count_documents({"state": "pending"})
        opened = await db.events.count_documents({"contact_id": CONTACT, "type": "message_opened"})
        audience = await db.audience_changes.count_documents({"contact_id": CONTACT})
        merged = await db.identities.count_documents({"_id": ANON, "merged": True})
        return pending == 0 and opened == 1 and audience == 1 and merged == 1

    await eventually(decided)


async def backtest(client: Client) -> None:
    """A backtest whose report shows the contact as an example (the candidate drops its in-app send)."""
    candidate = {"rules": [{"name": "go", "when": {"event": "go"}, "then": [FLOW[0], FLOW[2]]}]}
    body = {"since": "1d", "rulesets": {"flow": candidate}, "contacts": [CONTACT]}
    resp = await client.post("/v1/backtests", json=body)
    job = await resp.json()
    assert resp.status == 202, job

    async def done() -> bool:
        found = await (await client.get(f"/v1/backtests/{job['id']}")).json()
        return found["status"] == "done"

    await eventually(done, 120)


async def test_after_erasure_no_collection_holds_the_contacts_id_email_or_phone(
    make_client: Any, shop: Settings, db: Any
) -> None:
    app = create_app(shop)
    client = await make_client(app)
    await drive(client, db, app[STORE])
    await backtest(client)
    before = await everything(db)
    needles = [CONTACT, EMAIL, PHONE, PHONE.removeprefix("+"), ANON]
    assert {n for _, n in leaks(before, needles)} == set(needles)  # the scan finds each while stored
    held = {c for c, _ in leaks(before, [CONTACT])}
    assert {"contacts", "events", "messages", "schedule", "interests", "audience_changes", "identities",
            "backtests", "shopify_privacy_requests"} <= held  # fmt: skip
    stored = await contact_docs(db, CONTACT)
    anon = await contact_docs(db, ANON)  # what is left of the visitor after the merge

    # The export holds what was stored (counted here from the database) and is logged.
    resp = await client.get(f"/v1/contacts/{CONTACT}/export")
    assert resp.status == 200 and resp.content_type == "application/json"
    export = await resp.json()
    assert export["contact_id"] == CONTACT and export["profile"]["email"] == EMAIL
    # 3 posted, the visitor's merged in, the in-app open, the quarantined one
    assert len(export["events"]) == stored["events"] == 6
    assert len(export["messages"]) == stored["messages"] == 3
    assert sorted(m["status"] for m in export["messages"]) == ["opened", "scheduled", "sent"]
    assert [m.get("outcomes", {}).get("opened") is not None for m in export["messages"]].count(True) == 1
    assert len(export["scheduled"]) == stored["schedule"] >= 1
    assert export["audiences"]["member_of"] == ["vip"]
    assert [i["_id"] for i in export["identities"]] == [ANON]
    assert [i["product_id"] for i in export["interests"]] == ["p1"]
    assert len(export["inbox"]) == 1

    resp = await client.delete(f"/v1/contacts/{CONTACT}")
    answer = await resp.json()
    assert resp.status == 200, answer
    check_against_document("DELETE", "/v1/contacts/{contact_id}", 200, answer)
    assert answer["erased"] is True and answer["contact_id_sha256"] == sha256(CONTACT)
    deleted = answer["deleted"]
    assert deleted["contacts"] == 1 + anon["contacts"] and deleted["identities"] == 1
    assert deleted["events"] == stored["events"] + anon["events"]
    assert deleted["messages"] == stored["messages"] and deleted["schedule"] == stored["schedule"]
    assert deleted["privacy_requests"] == 2 and deleted["backtests"] == 1  # the shop's export, the API's
    assert deleted["shopify_privacy_requests"] == 1
    assert answer["audience_removals"] == 1 and answer["linked_ids"] == 1

    after = await everything(db)
    assert leaks(after, needles) == []
    # What remains: the tombstone (a hash) and the removal from the ad audience, by hashed identifiers.
    assert [t["_id"] for t in after["tombstones"]] == sorted([sha256(CONTACT), sha256(ANON)])
    [removal] = after["audience_changes"]
    assert removal["contact_id"] == f"erased/{sha256(CONTACT)}" and removal["op"] == "remove"
    assert removal["identifiers"]["email_sha256"] == sha256(EMAIL.strip().lower())
    assert removal["identifiers"]["phone_e164_sha256"] == sha256(PHONE)
    assert removal["identifiers"]["phone_digits_sha256"] == sha256(PHONE[1:])
    assert (await client.get(f"/v1/contacts/{CONTACT}/export")).status == 404

    # The request log: the export, then the erasure, each with its source and times; no contact id.
    log = await (await client.get("/v1/privacy/requests")).json()
    check_against_document("GET", "/v1/privacy/requests", 200, log)
    mine = [r for r in log["requests"] if r["contact_sha256"] == sha256(CONTACT)]
    assert [(r["kind"], r["contact_sha256"], r["source"].partition(":")[0]) for r in mine] == [
        ("erase", sha256(CONTACT), "api"),
        ("export", sha256(CONTACT), "api"),
        ("export", sha256(CONTACT), "shopify"),
    ]
    assert all(r["done_at"] >= r["requested_at"] for r in mine)
    assert mine[0]["counts"]["events"] == deleted["events"]

    # Erasing again: 200 with zeros.
    again = await (await client.delete(f"/v1/contacts/{CONTACT}")).json()
    assert again["erased"] is True and set(again["deleted"].values()) == {0}


async def test_a_long_history_is_exported_and_erased_whole(make_client: Any, shop: Settings, db: Any) -> None:
    """More events than a cursor batch or a delete batch: the export streams them all, the erasure
    deletes them all (no cap)."""
    client = await make_client(create_app(shop))
    n = 12_000
    start = datetime.now(UTC) - timedelta(days=1)
    await plant(
        db,
        [{"_id": f"h-{i}", "type": "page_viewed", "contact_id": "long-1",
          "time": start + timedelta(seconds=i), "attributes": {"i": i}, "received_at": start, "state": "done"}
         for i in range(n)],
    )  # fmt: skip
    resp = await client.get("/v1/contacts/long-1/export")
    assert resp.status == 200
    export = await resp.json()
    assert [e["attributes"]["i"] for e in export["events"]] == list(range(n))  # all, oldest first
    answer = await (await client.delete("/v1/contacts/long-1")).json()
    assert answer["deleted"]["events"] == n and await db.events.count_documents({}) == 0


async def test_only_an_admin_key_reads_a_contacts_whole_data(
    make_client: Any, shop: Settings, db: Any
) -> None:
    """A `read` key (the console's read-only users) may look at everything else, not export a person or
    read the privacy log; nor may an ingest key."""
    admin = await make_client(create_app(shop))
    assert (await admin.put("/v1/contacts/r-1", json={"email": "r1@example.com"})).status == 201
    for scope in ("read", "ingest"):
        other = await make_client(create_app(shop), scope)
        for path in ("/v1/contacts/r-1/export", "/v1/privacy/requests"):
            resp = await other.get(path)
            assert resp.status == 403, (scope, path, await resp.text())
    reader = await make_client(create_app(shop), "read")
    assert (await reader.get("/v1/contacts/r-1")).status == 200  # the profile itself: as before
    assert (await admin.get("/v1/contacts/r-1/export")).status == 200

    async def logged_once() -> bool:  # only the admin's export, logged once it has been streamed
        return await db.privacy_requests.count_documents({"kind": "export"}) == 1

    await eventually(logged_once)


async def test_a_late_retry_of_an_old_event_is_dropped_a_new_event_is_kept(
    make_client: Any, shop: Settings, db: Any
) -> None:
    client = await make_client(create_app(shop))
    old = iso(datetime.now(UTC) - timedelta(minutes=5))
    await post(client, [{"id": "o-1", "type": "page_viewed", "contact_id": "c1", "time": old}])
    await eventually(lambda: _none_pending(db))
    assert (await client.delete("/v1/contacts/c1")).status == 200
    assert await db.events.count_documents({}) == 0

    # The shop's queue retries the old event (and an older one) after the erasure: acknowledged, not stored.
    body = [
        {"id": "o-1", "type": "page_viewed", "contact_id": "c1", "time": old},
        {"id": "o-0", "type": "page_viewed", "contact_id": "c1", "time": old},
        {"id": "other", "type": "page_viewed", "contact_id": "c2", "time": old},
    ]
    resp = await client.post("/v1/events", json=body)
    answer = await resp.json()
    assert (resp.status, answer) == (202, {"accepted": 1, "duplicates": 0, "erased": 2})
    check_against_document("POST", "/v1/events", 202, answer)
    assert await db.events.distinct("contact_id") == ["c2"]
    # A new event (time now, after the erasure) is the contact's new history.
    assert await post(client, [{"id": "n-1", "type": "page_viewed", "contact_id": "c1"}]) == {
        "accepted": 1,
        "duplicates": 0,
    }
    assert await db.events.count_documents({"contact_id": "c1"}) == 1


async def test_a_late_retry_of_an_event_posted_without_time_is_dropped_by_its_id(
    make_client: Any, shop: Settings, db: Any
) -> None:
    """An event without `time` is stamped when it arrives, after the erasure: only its id gives the
    retry away. Found: the retry re-created the contact in `old-events` mode."""
    client = await make_client(create_app(shop))
    e1 = {"id": "e1", "type": "page_viewed", "contact_id": "c1"}
    assert await post(client, [e1]) == {"accepted": 1, "duplicates": 0}
    await eventually(lambda: _none_pending(db))
    assert await db.contacts.count_documents({"_id": "c1"}) == 1
    assert (await client.delete("/v1/contacts/c1")).status == 200
    assert [d["_id"] async for d in db.erased_events.find({})] == [sha256("e1")]  # the id, hashed
    kept = (await db.erased_events.index_information())["erased_events_ttl"]["expireAfterSeconds"]
    assert kept == int(shop.event_retention_days * 86400)  # as long as events are kept

    assert await post(client, [e1]) == {"accepted": 0, "duplicates": 0, "erased": 1}
    await eventually(lambda: _none_pending(db))
    assert await contact_docs(db, "c1") == {"events": 0, "messages": 0, "schedule": 0, "contacts": 0}
    # A new event id without time: the person came back, a new history.
    assert await post(client, [{"id": "e2", "type": "page_viewed", "contact_id": "c1"}]) == {
        "accepted": 1,
        "duplicates": 0,
    }
    assert await db.events.distinct("_id", {"contact_id": "c1"}) == ["e2"]


async def test_an_erased_contact_whose_email_bounced_leaves_the_audience_by_email_too(
    make_client: Any, aiohttp_server: Any, settings: Settings, db: Any
) -> None:
    """Added to an audience with its email, which bounced afterwards: the removal must still name the
    email, or the platform keeps the person. Found: the removal carried the phone's digests only."""
    calls: list[tuple[str, dict[str, Any]]] = []

    async def members(request: web.Request) -> web.Response:
        calls.append((request.match_info["audience"], await request.json()))
        return web.json_response({})

    peer = web.Application()
    peer.router.add_post("/audiences/{audience}/members", members)
    server = await aiohttp_server(peer)
    channels = builtin_channels()
    channels.jobs.append(AudienceSync({"base_url": str(server.make_url("")), "token": "t", "interval": 0.2}))
    app = create_app(setup(settings, [{"audience": {"add": "vip"}}]), channels)
    client = await make_client(app)
    assert (await client.put("/v1/contacts/c1", json={"email": EMAIL, "phone": PHONE})).status == 201
    await post(client, [{"id": "g1", "type": "go", "contact_id": "c1"}])
    email, e164 = sha256(EMAIL.strip().lower()), sha256(PHONE)

    async def calls_made(n: int) -> bool:
        return len(calls) >= n

    await eventually(lambda: calls_made(1))
    assert calls == [("vip", {"add": [{"email_sha256": email, "phone_sha256": e164}], "remove": []})]
    await db.contacts.update_one({"_id": "c1"}, {"$set": {"email_invalid": True}})  # as a bounce marks it

    assert (await client.delete("/v1/contacts/c1")).status == 200
    [removal] = await db.audience_changes.find({"op": "remove"}).to_list()
    assert removal["identifiers"]["email_sha256"] == email
    await eventually(lambda: calls_made(2))
    assert calls[1] == ("vip", {"add": [], "remove": [{"email_sha256": email, "phone_sha256": e164}]})


async def test_a_profile_update_from_before_the_erasure_is_dropped_too(
    make_client: Any, shop: Settings, db: Any
) -> None:
    """What Segment's identify and Shopify's customers/update ask before patching a profile."""
    app = create_app(shop)
    client = await make_client(app)
    assert (await client.delete("/v1/contacts/c1")).status == 200
    store = app[STORE]
    now = datetime.now(UTC)
    assert await tombstone_drops(store, "c1", now - timedelta(minutes=1), "old-events")
    assert not await tombstone_drops(store, "c1", now + timedelta(seconds=1), "old-events")
    assert await tombstone_drops(store, "c1", now + timedelta(seconds=1), "all")
    assert not await tombstone_drops(store, "c1", now - timedelta(minutes=1), "off")
    assert not await tombstone_drops(store, "c2", now - timedelta(minutes=1), "all")  # never erased


async def _none_pending(db: Any) -> bool:
    return await db.inbox.count_documents({"state": "pending"}) == 0  # type: ignore[no-any-return]


async def test_mode_all_drops_every_event_until_a_put_re_creates_the_contact(
    make_client: Any, shop: Settings, db: Any
) -> None:
    client = await make_client(create_app(msgspec.structs.replace(shop, erasure_tombstone="all")))
    assert (await client.put("/v1/contacts/c1", json={"email": "a@example.com"})).status == 201
    assert (await client.delete("/v1/contacts/c1")).status == 200
    new = {"id": "n-1", "type": "page_viewed", "contact_id": "c1"}
    assert await post(client, [new]) == {"accepted": 0, "duplicates": 0, "erased": 1}
    assert (await client.put("/v1/contacts/c1", json={"email": "b@example.com"})).status == 201
    assert await post(client, [new]) == {"accepted": 1, "duplicates": 0}
    old = {
        "id": "o-1",
        "type": "page_viewed",
        "contact_id": "c1",
        "time": iso(datetime.now(UTC) - timedelta(hours=1)),
    }
    assert await post(client, [old]) == {"accepted": 0, "duplicates": 0, "erased": 1}  # still a late retry


async def test_a_tombstone_another_process_wrote_is_seen_within_the_settle_pause(
    make_client: Any, shop: Settings, db: Any
) -> None:
    """Ingest reads tombstones from its process's copy; one written by another process (here: straight
    into the database) is in that copy before an erasure's second pass (0.5 s) would miss what came."""
    client = await make_client(create_app(shop))
    first = {"id": "t-0", "type": "page_viewed", "contact_id": "other-1"}
    assert await post(client, [first]) == {"accepted": 1, "duplicates": 0}  # the copy is made
    now = datetime.now(UTC)
    await db.tombstones.insert_one({"_id": sha256("other-1"), "erased_at": now, "changed_at": now})
    await asyncio.sleep(0.3)
    late = {
        "id": "t-1",
        "type": "page_viewed",
        "contact_id": "other-1",
        "time": iso(now - timedelta(minutes=5)),
    }
    assert await post(client, [late]) == {"accepted": 0, "duplicates": 0, "erased": 1}


async def test_mode_off_keeps_old_events(make_client: Any, shop: Settings, db: Any) -> None:
    client = await make_client(create_app(msgspec.structs.replace(shop, erasure_tombstone="off")))
    assert (await client.delete("/v1/contacts/c1")).status == 200
    old = {
        "id": "o-1",
        "type": "page_viewed",
        "contact_id": "c1",
        "time": iso(datetime.now(UTC) - timedelta(hours=1)),
    }
    assert await post(client, [old]) == {"accepted": 1, "duplicates": 0}


async def test_an_erasure_racing_events_in_flight_leaves_nothing(
    make_client: Any, shop: Settings, db: Any
) -> None:
    """Posters send the contact's events (all from before the erasure, as a shop's queue would retry
    them) while the inbox decides them and the scheduler sends; the erasure lands in the middle."""
    client = await make_client(
        create_app(msgspec.structs.replace(shop, rate_limit=0))
    )  # posters at full speed
    assert (await client.put(f"/v1/contacts/{CONTACT}", json={"email": EMAIL, "phone": PHONE})).status == 201
    old = iso(datetime.now(UTC) - timedelta(seconds=1))
    stop = asyncio.Event()
    answers: list[dict[str, Any]] = []
    posted = 0

    async def poster(n: int) -> None:
        nonlocal posted
        i = 0
        while not stop.is_set():
            batch = [{"id": f"r-{n}-{i}-{k}", "type": "go", "contact_id": CONTACT, "time": old,
                      "attributes": {"code": "X", "email": EMAIL}} for k in range(5)]  # fmt: skip
            posted += len(batch)
            answers.append(await post(client, batch))
            i += 1

    posters = [asyncio.create_task(poster(n)) for n in range(8)]

    async def some_sent() -> bool:
        return await db.messages.count_documents({"contact_id": CONTACT, "status": "sent"}) >= 10

    await eventually(some_sent)
    resp = await client.delete(f"/v1/contacts/{CONTACT}")
    assert resp.status == 200
    erased = await resp.json()
    await asyncio.sleep(0.3)  # posters go on after the erasure: every event of theirs is a late retry now
    stop.set()
    await asyncio.gather(*posters)
    assert erased["deleted"]["events"] > 0 and erased["deleted"]["messages"] > 0
    assert sum(a.get("erased", 0) for a in answers) > 0  # some were dropped at the door
    assert sum(a["accepted"] + a["duplicates"] + a.get("erased", 0) for a in answers) == posted
    await eventually(lambda: _none_pending(db))
    assert await contact_docs(db, CONTACT) == {"events": 0, "messages": 0, "schedule": 0, "contacts": 0}
    assert leaks(await everything(db), [CONTACT, EMAIL, PHONE]) == []


# --- a real process: the CLI, and any id on the new routes --------------------------------------------------


@pytest.fixture(scope="module")
def service(mongod: EmbeddedMongod, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    workdir = tmp_path_factory.mktemp("privacy")
    env = {"MONGODB_URI": mongod.uri, "RULESVC_DATABASE": "privacy_cli", "RULESVC_RATE_LIMIT": "0"}
    process = ServiceProcess(workdir, env=env)
    process.start()
    process.key = process.cli("keys", "create", "--scope", "admin", "--name", "p").stdout.splitlines()[-1]
    yield process
    process.stop()


def test_cli_exports_and_erases_a_contact(service: ServiceProcess, tmp_path: Path) -> None:
    assert service.request("PUT", "/v1/contacts/cli-1", {"email": "cli@example.com"})[0] == 201
    events = [{"id": f"cli-e{i}", "type": "page_viewed", "contact_id": "cli-1"} for i in range(3)]
    assert service.request("POST", "/v1/events", events)[0] == 202

    out = tmp_path / "export.json"
    result = service.cli("contacts", "export", "cli-1", "-o", str(out))
    assert result.returncode == 0, result.stderr
    export = json.loads(out.read_text())
    assert export["profile"]["email"] == "cli@example.com" and len(export["events"]) == 3
    result = service.cli("contacts", "export", "nobody-1")
    assert result.returncode == 1 and "no contact nobody-1" in result.stderr

    result = service.cli("contacts", "erase", "cli-1")  # no terminal to ask on: refused
    assert result.returncode == 1 and "--yes" in result.stderr
    assert service.request("GET", "/v1/contacts/cli-1")[0] == 200
    result = service.cli("contacts", "erase", "cli-1", "--yes")
    assert result.returncode == 0, result.stderr
    assert "erased contact cli-1: 5 document(s) (contacts=1, events=3, privacy_requests=1)" in result.stdout
    assert service.request("GET", "/v1/contacts/cli-1")[0] == 404
    _, log = service.request("GET", "/v1/privacy/requests?limit=2")
    assert [(r["kind"], r["source"]) for r in log["requests"]] == [("erase", "cli"), ("export", "cli")]
    assert log["requests"][1]["contact_id"] is None  # the export's entry lost the id with the erasure
    result = service.cli("contacts", "erase", "bad id", "--yes")
    assert result.returncode == 1 and "whitespace" in result.stderr


def _call(service: ServiceProcess, method: str, path: str) -> tuple[int, bytes]:
    request = urllib.request.Request(f"{service.url}{path}", method=method)
    request.add_header("Authorization", f"Bearer {service.key}")
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@given(contact=st.text(max_size=140), route=st.sampled_from(["DELETE", "GET"]))
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
def test_any_contact_id_on_the_privacy_routes_is_never_a_server_error(
    service: ServiceProcess, contact: str, route: str
) -> None:
    path = f"/v1/contacts/{quote(contact, safe='')}" + ("/export" if route == "GET" else "")
    status, body = _call(service, route, path)
    assert status < 500, (contact, status, body)
    if status >= 400:
        assert msgspec.json.decode(body)["error"], body
