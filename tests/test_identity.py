"""Anonymous contacts merged into known ones: the shipped cart reminder reaches the identified visitor
once, history and state move, late events follow the link, and a merge racing the inbox or cut short by
a crash loses nothing."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from rulesvc.config import Settings
from rulesvc.core.engine import ContactView, EngineEvent, cancelled_by_history
from rulesvc.core.events import Event
from rulesvc.core.identity import (
    anonymous_contact_id,
    is_anonymous,
    merge_profile,
    merge_state,
    superseded,
)
from rulesvc.runtime.identity import link, resolve_contacts
from rulesvc.store.db import Store
from rulesvc.store.identity import Identities
from rulesvc.web.app import create_app
from rulesvc.web.keys import STORE
from tests.helpers import TEMPLATES, Provider, eventually, registry, wait_for, write_ruleset
from tests.service import ServiceProcess

ROOT = Path(__file__).parent.parent
CART = {"value": 59.9, "currency": "EUR", "items": [{"sku": "A-1", "name": "Lamp", "qty": 1}]}
U1 = {"email": "u1@example.com", "consent": {"email": True, "push": True}}


# --- the merge's decisions ---------------------------------------------------------------------------


def test_ids() -> None:
    assert anonymous_contact_id("v1") == "anon:v1"
    assert is_anonymous("anon:v1") and not is_anonymous("v1") and not is_anonymous(None)


def test_state_merge_keeps_what_either_earned() -> None:
    known = {
        "flags": {"vip": {"until": None}, "seen": {"until": 100.0}},
        "counters": {"views": {"window": None, "n": 3}, "carts": {"window": "1d", "times": [5.0, 9.0]}},
        "values": {"cart_value": {"v": 10, "until": 50.0}, "viewed": {"v": ["a", "b"], "until": 10.0}},
        "session": {"n": 4, "started": 10.0, "last": 20.0},
        "once": {"welcome/hi": {"at": 15.0, "session": 4}},
        "arms": {"cart_abandon": "A"},
        "suppressed": {"sms": {"since": 1.0, "until": None}},
    }
    anon = {
        "flags": {"seen": {"until": 300.0}, "new": {"until": 7.0}},
        "counters": {"views": {"window": None, "n": 2}, "carts": {"window": "1d", "times": [7.0]}},
        "values": {"cart_value": {"v": 59.9, "until": 40.0}, "viewed": {"v": ["b", "c"], "until": 30.0}},
        "session": {"n": 2, "started": 25.0, "last": 30.0},
        "once": {"browse/nudge": {"at": 28.0, "session": 2}, "welcome/hi": {"at": 12.0, "session": 1}},
        "arms": {"cart_abandon": "B", "browse": "B"},
        "audiences": {"lookalike": {"since": 26.0}},
    }
    merged = merge_state(known, anon)
    assert merged["flags"] == {"vip": {"until": None}, "seen": {"until": 300.0}, "new": {"until": 7.0}}
    assert merged["counters"]["views"]["n"] == 5
    assert merged["counters"]["carts"]["times"] == [5.0, 7.0, 9.0]
    assert merged["values"]["cart_value"]["v"] == 59.9  # what the visitor did just before signing in
    assert merged["values"]["viewed"] == {"v": ["a", "b", "c"], "until": 30.0}
    # The anonymous session is the later one: it goes on, numbered after both, and a `once per
    # session` mark made in it stays in it; the known contact's old marks keep their old session.
    assert merged["session"] == {"n": 6, "started": 25.0, "last": 30.0}
    assert merged["once"] == {
        "welcome/hi": {"at": 15.0, "session": 4},
        "browse/nudge": {"at": 28.0, "session": 6},
    }
    assert merged["arms"] == {"cart_abandon": "A", "browse": "B"}
    assert merged["suppressed"] == {"sms": {"since": 1.0, "until": None}}
    assert merged["audiences"] == {"lookalike": {"since": 26.0}}
    assert merge_state({}, {}) == {}


names = st.sampled_from(["a", "b", "c", "d"])
flags = st.dictionaries(names, st.builds(lambda u: {"until": u}, st.none() | st.floats(0, 1e9)))
counts = st.dictionaries(names, st.builds(lambda n: {"window": None, "n": n}, st.integers(0, 10**6)))
sessions = st.none() | st.builds(lambda n, last: {"n": n, "started": 0.0, "last": last},
                                  st.integers(0, 50), st.floats(0, 1e9))  # fmt: skip


@given(flags, counts, sessions, flags, counts, sessions)
def test_state_merge_loses_no_flag_and_no_count(
    kf: Any, kc: Any, ks: Any, af: Any, ac: Any, as_: Any
) -> None:
    known = {"flags": kf, "counters": kc, **({"session": ks} if ks else {})}
    anon = {"flags": af, "counters": ac, **({"session": as_} if as_ else {})}
    merged = merge_state(known, anon)
    assert set(merged.get("flags", {})) == set(kf) | set(af)
    for name in set(kf) & set(af):
        untils = [kf[name]["until"], af[name]["until"]]
        assert merged["flags"][name]["until"] == (None if None in untils else max(untils))
    total = {n: kc.get(n, {"n": 0})["n"] + ac.get(n, {"n": 0})["n"] for n in set(kc) | set(ac)}
    assert {n: c["n"] for n, c in merged.get("counters", {}).items()} == total
    if ks and as_:
        assert merged["session"]["n"] == ks["n"] + as_["n"]


def test_profile_merge_never_overrides_the_known_contact() -> None:
    known = {"email": "u1@example.com", "consent": {"email": False}, "attributes": {"tier": "gold"}}
    anon = {"email": "other@example.com", "push_tokens": ["t1"], "consent": {"email": True, "push": True},
            "attributes": {"tier": "none", "lang": "de"}, "timezone": "Europe/Berlin"}  # fmt: skip
    assert merge_profile(known, anon) == {
        "push_tokens": ["t1"],
        "consent": {"email": False, "push": True},
        "attributes": {"tier": "gold", "lang": "de"},
        "timezone": "Europe/Berlin",
    }
    assert merge_profile(None, {"email": "a@example.com"}) == {
        "email": "a@example.com",
        "email_invalid": False,
    }
    assert merge_profile(known, None) == {}


def test_one_of_two_reminders_with_the_same_key_stays() -> None:
    known = [{"_id": "k1", "key": "cart/remind/1", "trigger": {"time": 10.0}},
             {"_id": "k2", "key": "other", "trigger": {"time": 10.0}}]  # fmt: skip
    later = [{"_id": "a1", "key": "cart/remind/1", "trigger": {"time": 20.0}}]
    earlier = [{"_id": "a1", "key": "cart/remind/1", "trigger": {"time": 5.0}}]
    assert superseded(known, later) == ["k1"]
    assert superseded(known, earlier) == ["a1"]
    assert superseded(known, [{"_id": "a2", "key": "new", "trigger": {"time": 1.0}}]) == []


def test_a_later_decided_event_cancels_what_its_cancel_on_names() -> None:
    """The engine's own test of `cancel_on`, applied to history: an event at or after the trigger (not
    the trigger itself) whose type is named and whose `same` values match."""
    t0 = datetime(2026, 1, 1, tzinfo=UTC)

    def entry(eid: str, at: datetime, same: dict[str, Any]) -> dict[str, Any]:
        return {"_id": eid, "cancel_on": [{"event": ["purchased"], "same": same}],
                "trigger": {"id": f"{eid}-trigger", "time": at.timestamp()}}  # fmt: skip

    def bought(eid: str, at: datetime, **attributes: Any) -> EngineEvent:
        return EngineEvent(eid, "purchased", "u1", at, attributes)

    entries = [
        entry("plain", t0, {}),
        entry("sku-a", t0, {"attributes.sku": "A"}),
        entry("sku-b", t0, {"attributes.sku": "B"}),
        entry("later", t0 + timedelta(hours=2), {}),
    ]
    events = [bought("p-before", t0 - timedelta(minutes=1)), bought("p-a", t0 + timedelta(hours=1), sku="A")]
    found = cancelled_by_history(entries, events, ContactView("u1", {}, {}))
    assert [(c.entry_id, c.reason, c.detail) for c in found] == [
        ("plain", "cancelled_by_event", "cancelled by purchased"),
        ("sku-a", "cancelled_by_event", "cancelled by purchased"),
    ]
    own = {
        "_id": "x",
        "cancel_on": [{"event": ["purchased"], "same": {}}],
        "trigger": {"id": "p-a", "time": 0.0},
    }
    assert cancelled_by_history([own], events[1:], ContactView("u1", {}, {})) == []


# --- the service -------------------------------------------------------------------------------------


def shop(settings: Settings, email_after: str = "1h") -> Settings:
    """Every shipped ruleset, the cart reminder's email brought forward by the test when it wants it,
    and a `tally` ruleset that counts each `ping` and sends one log message for it."""
    folder = Path(settings.rulesets_dir)
    shutil.copytree(ROOT / "rulesets", folder)
    path = folder / "cart_abandon.json"
    cart = json.loads(path.read_text())
    cart["rules"][1]["then"][2]["send"]["after"] = email_after
    path.write_text(json.dumps(cart))
    for name, text in TEMPLATES.items():
        (folder / "templates" / name).write_text(text)
    say = {"send": {"channel": "log", "template": "hello", "params": {"code": "$event.id"}}}
    tally = {"rules": [{"name": "ping", "when": {"event": "ping"}, "then": [{"count": "pings"}, say]}]}
    write_ruleset(folder, "tally", tally)
    return settings


async def started(make_client: Any, settings: Settings) -> tuple[Any, Any, Provider]:
    email = Provider("email", needs="email")
    app = create_app(shop(settings), registry(Provider("push", needs="push_tokens"), email))
    client = await make_client(app)
    return client, app, email


def iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def ev(eid: str, etype: str, contact: str, **attributes: Any) -> dict[str, Any]:
    return {"id": eid, "type": etype, "contact_id": contact, "attributes": attributes}


async def post(client: Any, *events: dict[str, Any]) -> None:
    resp = await client.post("/v1/events", json=list(events))
    assert resp.status == 202, await resp.text()


async def decided(db: Any) -> None:
    async def nothing_pending() -> bool:
        return await db.inbox.count_documents({"state": "pending"}) == 0

    await eventually(nothing_pending)


async def test_anonymous_cart_reminder_goes_to_the_identified_contact_once(
    make_client: Any, settings: Settings, db: Any
) -> None:
    client, app, email = await started(make_client, settings)
    await post(client, ev("v-view", "product_viewed", "anon:v1", product_id="A-1"),
               ev("v-cart", "cart_updated", "anon:v1", **CART))  # fmt: skip
    await decided(db)
    assert await db.schedule.count_documents({"contact_id": "anon:v1", "status": "pending"}) == 2

    assert (await client.put("/v1/contacts/u1", json=U1)).status == 201
    result = await link(app[STORE], "anon:v1", "u1", datetime.now(UTC))
    assert (result.contact_id, result.linked, result.merged, result.conflict) == ("u1", True, True, None)
    assert result.moved == {"events": 2, "schedule": 2, "messages": 2, "interests": 1, "contacts": 1}

    # The anonymous contact is gone; its history and state are u1's.
    assert await db.contacts.find_one({"_id": "anon:v1"}) is None
    assert (await client.get("/v1/contacts/anon:v1")).status == 404
    for name in ("events", "schedule", "messages", "interests"):
        assert await db[name].count_documents({"contact_id": "anon:v1"}) == 0, name
    history = await (await client.get("/v1/contacts/u1/events")).json()
    assert {e["id"] for e in history["events"]} == {"v-view", "v-cart"}
    u1 = await db.contacts.find_one({"_id": "u1"})
    assert u1["email"] == "u1@example.com" and u1["state"]["values"]["cart_value"]["v"] == 59.9
    assert await db.interests.find_one({"_id": "u1|A-1"}) is not None

    # A second identify, the same or naming another contact: nothing moves (the first link wins).
    again = await link(app[STORE], "anon:v1", "u1", datetime.now(UTC))
    assert (again.linked, again.merged, again.moved, again.conflict) == (False, True, {}, None)
    other = await link(app[STORE], "anon:v1", "u2", datetime.now(UTC))
    assert (other.contact_id, other.linked, other.conflict, other.moved) == ("u1", False, "u2", {})
    assert await db.contacts.find_one({"_id": "u2"}) is None
    assert await resolve_contacts(app[STORE], ["anon:v1", "anon:nobody", "u1"]) == {"anon:v1": "u1"}

    # A late event with only the anonymous id lands on u1.
    await post(client, ev("v-late", "product_viewed", "anon:v1", product_id="B-2"))
    assert (await db.events.find_one({"_id": "v-late"}))["contact_id"] == "u1"
    await decided(db)
    assert await db.contacts.find_one({"_id": "anon:v1"}) is None

    # The reminder comes due: one email, to u1's address; the push finds no token and is suppressed.
    await db.schedule.update_many({"status": "pending"}, {"$set": {"due_at": datetime.now(UTC)}})

    async def all_sends_made() -> bool:
        return await db.schedule.count_documents({"status": {"$in": ["pending", "running"]}}) == 0

    await eventually(all_sends_made)
    assert [(m.contact_id, m.contact["email"], m.template) for m in email.delivered] == [
        ("u1", "u1@example.com", "cart_abandon/email")
    ]
    statuses = {(m["channel"], m["status"]) async for m in db.messages.find({"contact_id": "u1"})}
    assert statuses == {("email", "sent"), ("push", "suppressed")}
    assert await db.messages.count_documents({}) == 2


async def test_undecided_anonymous_events_are_decided_once_for_the_known_contact(
    make_client: Any, settings: Settings, db: Any
) -> None:
    """A cart the inbox has not decided yet when the visitor identifies: it is decided for the known
    contact, whose rules arm the reminder for it; no anonymous contact is ever made."""
    store = Store(db.client, settings.database, timedelta(days=1))
    await store.ensure_schema()
    cart = Event(id="w-cart", type="cart_updated", contact_id="anon:w1", attributes=CART)
    assert (await store.insert_events([cart])).accepted == 1  # no service running: it stays undecided
    result = await link(store, "anon:w1", "u5", datetime.now(UTC))
    assert (result.merged, result.moved) == (True, {"events": 1})
    assert (await db.inbox.find_one({"_id": "w-cart"}))["state"] == "pending"

    client, _, _ = await started(make_client, settings)
    await decided(db)
    entries = await db.schedule.find({}).to_list()
    assert sorted((e["contact_id"], e["message"]["channel"]) for e in entries) == [
        ("u5", "email"),
        ("u5", "push"),
    ]
    assert all(e["message"]["params"]["value"] == 59.9 for e in entries)
    assert (await db.contacts.find_one({"_id": "u5"}))["state"]["values"]["cart_value"]["v"] == 59.9
    assert await db.contacts.count_documents({}) == 1
    assert (await client.get("/v1/contacts/anon:w1")).status == 404


async def test_both_carts_armed_one_reminder_goes(make_client: Any, settings: Settings, db: Any) -> None:
    """u1 left a cart signed in, then (on another device, not signed in) a later one: after the merge
    one reminder of each channel waits, the later cart's, as a repeat trigger would have left it."""
    client, app, email = await started(make_client, settings)
    assert (await client.put("/v1/contacts/u1", json=U1)).status == 201
    now = datetime.now(UTC)
    older = {**CART, "value": 20.0}
    known_cart = {**ev("k-cart", "cart_updated", "u1", **older), "time": iso(now - timedelta(minutes=10))}
    anon_cart = {**ev("a-cart", "cart_updated", "anon:d2", **CART), "time": iso(now - timedelta(minutes=5))}
    await post(client, known_cart, anon_cart)
    await decided(db)
    assert await db.schedule.count_documents({"status": "pending"}) == 4

    result = await link(app[STORE], "anon:d2", "u1", datetime.now(UTC))
    assert result.merged and result.moved["schedule"] == 2
    waiting = await db.schedule.find({"status": "pending"}).to_list()
    kept = sorted(
        (e["contact_id"], e["message"]["channel"], e["message"]["params"]["value"]) for e in waiting
    )
    assert kept == [("u1", "email", 59.9), ("u1", "push", 59.9)]
    rearmed = await db.messages.find({"status": "cancelled"}).to_list()
    assert sorted((m["channel"], m["params"]["value"], m["reason"]) for m in rearmed) == [
        ("email", 20.0, "rearmed"), ("push", 20.0, "rearmed")]  # fmt: skip

    await db.schedule.update_many({"status": "pending"}, {"$set": {"due_at": datetime.now(UTC)}})

    async def all_sends_made() -> bool:
        return await db.schedule.count_documents({"status": {"$in": ["pending", "running"]}}) == 0

    await eventually(all_sends_made)
    assert [(m.contact_id, m.params["value"]) for m in email.delivered] == [("u1", 59.9)]


async def nothing_sent_when_due(client: Any, db: Any, email: Provider, contact: str) -> None:
    """Every waiting entry brought due, then a `ping` answered by the scheduler after them: the entries
    had their turn, and no reminder went out."""
    await db.schedule.update_many({}, {"$set": {"due_at": datetime.now(UTC) - timedelta(seconds=1)}})
    await post(client, ev(f"{contact}-marker", "ping", contact))

    async def marker_answered() -> bool:
        return await db.messages.count_documents({"template": "hello", "status": "sent"}) == 1

    await eventually(marker_answered)
    assert [m.template for m in email.delivered if m.template.startswith("cart_abandon")] == []
    kept = {"ruleset": "cart_abandon", "status": {"$ne": "cancelled"}}
    assert await db.messages.count_documents(kept) == 0


async def test_a_purchase_before_the_link_cancels_the_anonymous_reminder(
    make_client: Any, settings: Settings, db: Any
) -> None:
    """The visitor left a cart anonymously, then bought signed in, then the identify came: the reminder
    the anonymous cart armed is cancelled by the purchase, as if both had been u1's from the start."""
    client, app, email = await started(make_client, settings)
    assert (await client.put("/v1/contacts/u1", json=U1)).status == 201
    now = datetime.now(UTC)
    await post(
        client, {**ev("v9-cart", "cart_updated", "anon:v9", **CART), "time": iso(now - timedelta(minutes=10))}
    )
    await decided(db)
    await post(
        client, {**ev("u1-buy", "purchased", "u1", value=59.9), "time": iso(now - timedelta(minutes=5))}
    )
    await decided(db)
    assert await db.schedule.count_documents({"contact_id": "anon:v9", "status": "pending"}) == 2

    result = await link(app[STORE], "anon:v9", "u1", datetime.now(UTC))
    assert result.merged and result.moved["schedule"] == 2
    entries = await db.schedule.find({"contact_id": "u1", "ruleset": "cart_abandon"}).to_list()
    assert sorted((e["message"]["channel"], e["status"], e["reason"]) for e in entries) == [
        ("email", "cancelled", "cancelled by purchased"),
        ("push", "cancelled", "cancelled by purchased"),
    ]
    messages = await db.messages.find({"contact_id": "u1", "ruleset": "cart_abandon"}).to_list()
    assert sorted((m["channel"], m["status"], m["reason"], m["detail"]) for m in messages) == [
        ("email", "cancelled", "cancelled_by_event", "cancelled by purchased"),
        ("push", "cancelled", "cancelled_by_event", "cancelled by purchased"),
    ]
    await nothing_sent_when_due(client, db, email, "u1")


async def test_an_anonymous_cart_decided_after_a_later_purchase_arms_nothing(
    make_client: Any, settings: Settings, db: Any
) -> None:
    """The anonymous cart was still undecided at the merge; u1's later purchase was decided before it.
    Decided now for u1, the cart's reminders are born cancelled by that purchase."""
    client, _, _ = await started(make_client, settings)
    assert (await client.put("/v1/contacts/u1", json=U1)).status == 201
    now = datetime.now(UTC)
    await post(
        client, {**ev("u1-buy", "purchased", "u1", value=59.9), "time": iso(now - timedelta(minutes=5))}
    )
    await decided(db)
    await client.close()  # no inbox runs now: the anonymous cart stays undecided until the merge

    store = Store(db.client, settings.database, timedelta(days=1))
    cart = Event(id="w9-cart", type="cart_updated", contact_id="anon:w9",
                 time=now - timedelta(minutes=10), attributes=CART)  # fmt: skip
    assert (await store.insert_events([cart])).accepted == 1
    result = await link(store, "anon:w9", "u1", datetime.now(UTC))
    assert (result.merged, result.moved) == (True, {"events": 1})

    email = Provider("email", needs="email")
    app = create_app(settings, registry(Provider("push", needs="push_tokens"), email))
    client = await make_client(app)
    await decided(db)
    entries = await db.schedule.find({"contact_id": "u1", "ruleset": "cart_abandon"}).to_list()
    assert sorted((e["message"]["channel"], e["status"], e["reason"]) for e in entries) == [
        ("email", "cancelled", "cancelled by purchased"),
        ("push", "cancelled", "cancelled by purchased"),
    ]
    messages = await db.messages.find({"contact_id": "u1", "ruleset": "cart_abandon"}).to_list()
    assert sorted((m["channel"], m["status"], m["reason"]) for m in messages) == [
        ("email", "cancelled", "cancelled_by_event"),
        ("push", "cancelled", "cancelled_by_event"),
    ]
    await nothing_sent_when_due(client, db, email, "u1")


async def test_a_link_older_than_the_erasure_recreates_nothing(
    make_client: Any, settings: Settings, db: Any
) -> None:
    """An identify made before u8 was erased, merged only after it (its merge waited, or came late):
    u8 is not re-created from the anonymous visitor; the visitor's data is erased as u8's erasure
    would have erased it. A link made after the erasure (u8 signs up again) merges as any."""
    client, app, email = await started(make_client, settings)
    store = app[STORE]
    assert (await client.put("/v1/contacts/u8", json={**U1, "email": "u8@example.com"})).status == 201
    await post(client, ev("e1-cart", "cart_updated", "anon:e1", **CART))
    await decided(db)
    identified = datetime.now(UTC) - timedelta(seconds=1)  # the identify, a moment before the erasure
    assert (await client.delete("/v1/contacts/u8")).status == 200
    assert await db.contacts.find_one({"_id": "u8"}) is None

    result = await link(store, "anon:e1", "u8", identified)
    assert (result.merged, result.moved) == (False, {})
    assert await db.contacts.count_documents({}) == 0
    for name in ("events", "schedule", "messages", "interests", "identities"):
        left = await db[name].count_documents({"$or": [{"contact_id": {"$in": ["u8", "anon:e1"]}},
                                                        {"_id": "anon:e1"}]})  # fmt: skip
        assert left == 0, name
    assert (await client.get("/v1/contacts/u8")).status == 404

    await post(client, ev("e2-view", "product_viewed", "anon:e2", product_id="A-1"))
    await decided(db)
    again = await link(store, "anon:e2", "u8", datetime.now(UTC))
    assert again.merged and again.moved["events"] == 1
    assert await db.contacts.find_one({"_id": "u8"}) is not None
    assert email.delivered == []


async def test_merge_racing_the_inbox_loses_nothing(make_client: Any, settings: Settings, db: Any) -> None:
    """300 pings of one visitor, sent in 15 staggered requests while the visitor identifies halfway:
    every ping is counted once on the known contact, and each sent exactly one message."""
    client, app, _ = await started(make_client, settings)
    assert (await client.put("/v1/contacts/u7", json=U1)).status == 201
    batches = [[ev(f"p-{b}-{i}", "ping", "anon:r7") for i in range(20)] for b in range(15)]
    results: list[Any] = []

    async def identify() -> None:  # twice at once, as two retried identify calls would
        await asyncio.sleep(0.3)
        twice = [link(app[STORE], "anon:r7", "u7", datetime.now(UTC)) for _ in range(2)]
        results.extend(await asyncio.gather(*twice))

    async def post_slowly(events: list[dict[str, Any]], delay: float) -> None:
        await asyncio.sleep(delay)
        await post(client, *events)

    await asyncio.gather(identify(), *(post_slowly(b, i * 0.05) for i, b in enumerate(batches)))
    assert [r.contact_id for r in results] == ["u7", "u7"]
    assert sorted(r.linked for r in results) == [False, True]  # one of them made the link

    async def all_on_u7() -> bool:
        left = await db.events.count_documents({"contact_id": "anon:r7"})
        return not left and await db.contacts.find_one({"_id": "anon:r7"}) is None

    await eventually(all_on_u7)  # a merge the inbox kept waiting is finished by the sweep
    await decided(db)

    async def sends_made() -> bool:
        return await db.messages.count_documents({"status": "sent"}) == 300

    await eventually(sends_made)
    assert await db.events.count_documents({"contact_id": "u7", "type": "ping"}) == 300
    assert await db.messages.count_documents({"contact_id": "u7"}) == 300
    assert await db.messages.count_documents({}) == 300
    u7 = await db.contacts.find_one({"_id": "u7"})
    assert u7["state"]["counters"]["pings"]["n"] == 300  # each ping decided once, none lost
    assert await db.contacts.count_documents({}) == 1


async def test_a_merge_cut_short_is_finished_by_the_next_identify(
    make_client: Any, settings: Settings, db: Any
) -> None:
    """Only the link was recorded (a process died right after it): later events already go to the known
    contact, and the next identify moves the rest."""
    client, app, _ = await started(make_client, settings)
    await post(client, ev("c-cart", "cart_updated", "anon:c1", **CART))
    await decided(db)
    await Identities(app[STORE]).record("anon:c1", "u3", datetime.now(UTC))  # link's first step only
    await post(client, ev("c-late", "product_viewed", "anon:c1", product_id="A-1"))
    assert (await db.events.find_one({"_id": "c-late"}))["contact_id"] == "u3"
    result = await link(app[STORE], "anon:c1", "u3", datetime.now(UTC))
    assert (result.linked, result.merged) == (False, True)
    assert result.moved["events"] == 1 and result.moved["schedule"] == 2
    assert await db.contacts.find_one({"_id": "anon:c1"}) is None
    assert (await db.identities.find_one({"_id": "anon:c1"}))["merged"] is True


async def test_a_merge_cut_short_is_finished_by_the_sweep(
    make_client: Any, settings: Settings, db: Any
) -> None:
    """Only the link was recorded and nobody identifies again: the service's sweep merges it."""
    client, app, _ = await started(make_client, settings)
    await post(client, ev("s-ping", "ping", "anon:s1"))
    await decided(db)
    await Identities(app[STORE]).record("anon:s1", "u4", datetime.now(UTC))  # link's first step only

    async def merged() -> bool:
        link_doc = await db.identities.find_one({"_id": "anon:s1"})
        return bool(link_doc["merged"]) and await db.contacts.find_one({"_id": "anon:s1"}) is None

    await eventually(merged, timeout=20)
    u4 = await db.contacts.find_one({"_id": "u4"})
    assert u4["state"]["counters"]["pings"]["n"] == 1
    assert await db.events.count_documents({"contact_id": "u4"}) == 1


@pytest.mark.slow
def test_a_service_killed_before_merging_merges_at_its_next_start(
    tmp_path: Path, settings: Settings, mongod: Any
) -> None:
    """A real service process killed (SIGKILL) between recording the link and merging, as a crash would:
    the merge's transaction never ran (it is one transaction: a crash inside it is the same as before
    it). Started again, the service finishes the merge by itself, once the dead process's claims on its
    sends have run out (the merge never moves a send another process is deciding)."""
    shop(msgspec.structs.replace(settings, rulesets_dir=str(tmp_path / "rulesets")))
    env = {"MONGODB_URI": mongod.uri, "RULESVC_DATABASE": settings.database,
           "RULESVC_RULESETS_DIR": str(tmp_path / "rulesets"), "RULESVC_QUIET_HOURS": "",
           "RULESVC_LEASE_SECONDS": "4"}  # fmt: skip
    service = ServiceProcess(tmp_path, env=env)
    try:
        service.start()
        service.key = service.cli("keys", "create", "--scope", "admin").stdout.splitlines()[-1]
        events = [ev(f"k-{i}", "ping", "anon:k9") for i in range(5)]
        assert service.request("POST", "/v1/events", events)[0] == 202
        with service.db() as sdb:
            wait_for(lambda: sdb.inbox.count_documents({"state": "pending"}) == 0, what="pings decided")
            # Killed when idle: a process killed inside a transaction leaves its documents locked for
            # mongod's transaction lifetime (60 s), which would only make this test slow.
            wait_for(lambda: sdb.messages.count_documents({"status": "sent"}) == 5, what="pings answered")
            assert service.signal(signal.SIGKILL) == -signal.SIGKILL
            sdb.identities.insert_one(
                {"_id": "anon:k9", "contact_id": "u9", "linked_at": datetime.now(UTC), "merged": False}
            )
            assert sdb.contacts.find_one({"_id": "anon:k9"}) is not None
            service.start()
            wait_for(lambda: sdb.contacts.find_one({"_id": "anon:k9"}) is None, what="merged at start")
            u9 = sdb.contacts.find_one({"_id": "u9"})
            assert u9 is not None and u9["state"]["counters"]["pings"]["n"] == 5
            assert sdb.events.count_documents({"contact_id": "u9"}) == 5
            assert sdb.messages.count_documents({"contact_id": "u9"}) == 5
            assert sdb.identities.find_one({"_id": "anon:k9"})["merged"] is True
    finally:
        service.stop()
