"""Backtest: a stored two-week history replayed through the live rulesets and a candidate. The expected
numbers are computed here from the history's own construction (which cart was bought how soon), never
by the simulator; and the replay writes nothing and calls no channel."""

from __future__ import annotations

import random
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest
from pymongo import AsyncMongoClient

from rulesvc.config import Settings
from rulesvc.core.contacts import ContactIn
from rulesvc.core.engine import CompiledRuleset
from rulesvc.core.events import Event
from rulesvc.core.ruleformat import RulesetFile
from rulesvc.core.sendpolicy import SendPolicy
from rulesvc.replay.backtest import Options, Report, Version, Window, report_text, run_backtest, window_of
from rulesvc.store.db import Store
from rulesvc.store.mongod import EmbeddedMongod
from rulesvc.web.app import create_app
from rulesvc.web.keys import RULESETS
from tests.helpers import Provider, eventually, history, registry, write_ruleset, yesterday_at

NOW = yesterday_at(12)  # the events are kept 90 days from it
WINDOW = Window(NOW - timedelta(days=14), NOW)
BOUGHT_AFTER = [None, 5, 30, 50, 90]  # minutes from a cart to its purchase; None: never bought


def remind(after: str) -> dict[str, Any]:
    return {
        "name": "remind",
        "when": {"event": "cart_updated", "conditions": {"attributes.value": {"gt": 0}}},
        "then": [{"send": {"channel": "email", "template": "cart", "after": after, "on_repeat": "rearm",
                           "cancel_on": ["purchased"], "params": {"value": "$attributes.value"}}}],
    }  # fmt: skip


THANKS = {
    "name": "thanks",
    "when": {"event": "purchased"},
    "then": [{"send": {"channel": "email", "template": "thanks"}}],
}
NOTE = {
    "name": "note",
    "when": {"event": "purchased"},
    "then": [{"remember": {"name": "bought", "from": "attributes.value", "for": "30d"}}],
}


def version(label: str, rules: list[dict[str, Any]]) -> Version:
    source = msgspec.convert({"rules": rules}, RulesetFile)
    return Version(label, [CompiledRuleset.compile("cart", label, source)])


@dataclass
class Cart:
    contact_id: str
    at: datetime
    bought_after: int | None  # minutes
    consent: bool

    def outcome(self, delay: int) -> tuple[str, datetime]:
        """What a reminder `delay` minutes after this cart becomes, and when: written from the rule's text."""
        due = self.at + timedelta(minutes=delay)
        if self.bought_after is not None and self.bought_after < delay:
            return "cancelled", self.at + timedelta(minutes=self.bought_after)
        if due > WINDOW.end:
            return "scheduled", due
        return ("sent" if self.consent else "suppressed"), due


def cart_history(seed: int = 7, contacts: int = 40) -> tuple[list[Cart], list[Event], dict[str, bool]]:
    """Carts at least a day apart per contact (so reminders never re-arm each other), each bought after
    one of BOUGHT_AFTER; a few carts in the window's last hour, still due at its end."""
    rng = random.Random(seed)
    carts: list[Cart] = []
    consent = {f"c{i:03d}": rng.random() < 0.75 for i in range(contacts)}
    for cid in consent:
        day = rng.randrange(0, 3)
        while day < 14:
            at = WINDOW.start + timedelta(days=day, minutes=rng.randrange(60, 20 * 60))
            carts.append(Cart(cid, at, rng.choice(BOUGHT_AFTER), consent[cid]))
            day += rng.randrange(1, 5)
    for cid in list(consent)[:3]:  # reminders still due when the window ends
        carts.append(Cart(cid, WINDOW.end - timedelta(minutes=10), None, consent[cid]))
    events: list[Event] = []
    for n, cart in enumerate(carts):
        events.append(Event(f"cart-{n}", "cart_updated", cart.contact_id, cart.at, {"value": 40 + n}))
        if cart.bought_after is not None:
            at = cart.at + timedelta(minutes=cart.bought_after)
            if at < WINDOW.end:
                events.append(Event(f"buy-{n}", "purchased", cart.contact_id, at, {"value": 40 + n}))
    # Outside the window: never replayed.
    events.append(Event("before", "cart_updated", "c000", WINDOW.start - timedelta(hours=1), {"value": 9}))
    events.append(Event("after", "cart_updated", "c000", WINDOW.end + timedelta(hours=1), {"value": 9}))
    return carts, events, consent


@pytest.fixture
async def store(mongod: EmbeddedMongod, settings: Any) -> AsyncIterator[Store]:
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongod.uri, tz_aware=True)
    store = Store(client, settings.database, timedelta(days=90))
    await store.ensure_schema()
    yield store
    await client.drop_database(settings.database)
    await client.close()


async def stored(store: Store, seed: int = 7) -> tuple[list[Cart], dict[str, bool]]:
    carts, events, consent = cart_history(seed)
    for cid, ok in consent.items():
        await store.put_contact(cid, ContactIn(email=f"{cid}@example.com", consent={"email": ok}))
    assert (await store.insert_events(events, NOW)).accepted == len(events)
    return carts, consent


async def dump(store: Store) -> dict[str, list[Any]]:
    names = sorted(await store.db.list_collection_names())
    return {n: await store.db[n].find({}).sort("_id", 1).to_list() for n in names}


async def backtest(
    store: Store, baseline: Version, candidate: Version, **options: Any
) -> tuple[Report, Provider]:
    email = Provider("email", needs="email")
    report = await run_backtest(
        store, baseline, candidate, registry(email), SendPolicy(), Options(WINDOW, **options)
    )
    return report, email


def tally(report: Report, rule: str, side: str) -> dict[str, Any]:
    [row] = [r for r in report.rows if r.rule == rule]
    return msgspec.to_builtins(getattr(row, side))  # type: ignore[no-any-return]


def expected(carts: list[Cart], delay: int) -> dict[str, Any]:
    found: dict[str, Any] = {"decided": len(carts), "sent": 0, "suppressed": {}, "cancelled": 0,
                             "failed": 0, "scheduled": 0, "postponed": 0, "held_out": 0}  # fmt: skip
    for cart in carts:
        status, _ = cart.outcome(delay)
        if status == "suppressed":
            found["suppressed"]["no_consent"] = found["suppressed"].get("no_consent", 0) + 1
        else:
            found[status] += 1
    return found


async def test_a_longer_delay_loses_the_carts_bought_in_between(store: Store) -> None:
    carts, _ = await stored(store)
    before = await dump(store)
    report, email = await backtest(store, version("live", [remind("20m")]), version("45m", [remind("45m")]))

    assert tally(report, "remind", "baseline") == expected(carts, 20)
    assert tally(report, "remind", "candidate") == expected(carts, 45)
    [row] = report.rows
    assert row.sent_change == expected(carts, 45)["sent"] - expected(carts, 20)["sent"] < 0
    # A contact changes when one of its carts ends otherwise or at another time; it loses a message
    # when a cart bought between 20 and 45 minutes (with consent) is no longer reminded.
    changed = {c.contact_id for c in carts if c.outcome(20) != c.outcome(45)}
    losing = {c.contact_id for c in carts if c.outcome(20)[0] == "sent" and c.outcome(45)[0] != "sent"}
    assert (report.changes.changed, report.changes.losing, report.changes.gaining) == (
        len(changed),
        len(losing),
        0,
    )
    assert report.changes.lost_messages == sum(
        c.outcome(20)[0] == "sent" and c.outcome(45)[0] != "sent" for c in carts
    )
    # The others changed with the same messages sent: a cart reminded later, or one not reminded otherwise.
    assert (report.changes.same_sent, report.changes.both) == (len(changed - losing), 0)
    assert changed - losing  # this history has some
    assert report.events == sum(1 for _ in cart_history()[1]) - 2  # all but the two outside the window
    assert report.contacts == 40
    example = report.changes.lost_examples[0]
    assert example.contact_id in losing and example.lost and not example.gained
    assert {e.type for e in example.events} <= {"cart_updated", "purchased"}
    # Nothing was recorded by a service: every replayed message is a finding of its own.
    assert report.recorded.recorded == 0
    assert report.recorded.only_replayed == len(carts)
    assert not email.delivered and await dump(store) == before

    text = report_text(report)
    sent = (expected(carts, 20)["sent"], expected(carts, 45)["sent"], row.sent_change)
    assert re.search(r"cart/remind\s+email\s+{}\s+{}\s+{:+d}".format(*sent), text), text
    lost = report.changes.lost_messages
    summary = f"(in time or fate): {len(changed)}; 0 get more (0 message(s) in all), "
    same = len(changed - losing)
    assert summary + f"{len(losing)} get fewer ({lost} in all), {same} the same messages" in text


async def test_an_added_rule_gains_a_message_per_purchase_with_consent(store: Store) -> None:
    carts, consent = await stored(store)
    report, email = await backtest(
        store, version("live", [remind("20m")]), version("thanks", [remind("20m"), THANKS])
    )
    purchases = [
        c for c in carts if c.bought_after is not None and c.at + timedelta(minutes=c.bought_after) < NOW
    ]
    assert tally(report, "remind", "baseline") == tally(report, "remind", "candidate") == expected(carts, 20)
    thanks = tally(report, "thanks", "candidate")
    assert thanks["sent"] == sum(consent[c.contact_id] for c in purchases)
    assert thanks["suppressed"] == {"no_consent": sum(not consent[c.contact_id] for c in purchases)}
    assert tally(report, "thanks", "baseline")["decided"] == 0
    gaining = {c.contact_id for c in purchases if consent[c.contact_id]}
    assert (report.changes.gaining, report.changes.losing) == (len(gaining), 0)
    assert report.changes.gained_messages == thanks["sent"]
    assert not email.delivered


async def test_a_removed_rule_loses_every_reminder(store: Store) -> None:
    carts, _ = await stored(store)
    report, _ = await backtest(store, version("live", [remind("20m"), NOTE]), version("none", [NOTE]))
    assert tally(report, "remind", "candidate")["decided"] == 0
    assert report.rows[0].sent_change == -expected(carts, 20)["sent"]
    losing = {c.contact_id for c in carts if c.outcome(20)[0] == "sent"}
    assert report.changes.losing == len(losing)


async def test_only_the_contacts_asked_for(store: Store) -> None:
    carts, _ = await stored(store)
    report, _ = await backtest(
        store, version("live", [remind("20m")]), version("45m", [remind("45m")]), contacts=["c001", "c002"]
    )
    mine = [c for c in carts if c.contact_id in ("c001", "c002")]
    assert report.contacts == 2
    assert tally(report, "remind", "baseline") == expected(mine, 20)


def test_the_window() -> None:
    now = datetime(2026, 11, 26, tzinfo=UTC)
    assert window_of(None, None, None, now) == Window(now - timedelta(days=14), now)
    assert window_of("2d", None, None, now).start == now - timedelta(days=2)
    with pytest.raises(ValueError, match="not both"):
        window_of("2d", now - timedelta(days=1), None, now)
    with pytest.raises(ValueError, match="empty"):
        window_of(None, now, now - timedelta(days=1), now)


async def test_the_live_rulesets_replayed_decide_what_the_service_recorded(
    make_client: Any, settings: Settings, store: Store
) -> None:
    """Events the live service processed, then a backtest of the same window through the live rulesets:
    every message the service recorded is replayed with the same fate (sent, suppressed with its reason,
    cancelled), a price drop's fan-out included; a candidate without the price rule loses exactly those."""
    folder = Path(settings.rulesets_dir)
    rules = [remind("1s"), {
        "name": "drop",
        "when": {"event": "price_changed", "conditions": {"attributes.drop_percent": {"gte": 10}}},
        "then": [{"send": {"channel": "email", "template": "cart",
                           "params": {"price": "$attributes.price"}}}],
    }]  # fmt: skip
    write_ruleset(folder, "cart", {"rules": rules})
    (folder / "templates").mkdir(exist_ok=True)
    for name in ("cart.subject", "cart.text"):
        (folder / "templates" / name).write_text("Hi")
    email = Provider("email", needs="email")
    app = create_app(msgspec.structs.replace(settings, quiet_hours="", frequency_caps={}), registry(email))
    client = await make_client(app)
    profiles = {"yes": {"email": "y@example.com", "consent": {"email": True}},
                "no": {"email": "n@example.com"},
                "buyer": {"email": "b@example.com", "consent": {"email": True}},
                "viewer": {"email": "v@example.com", "consent": {"email": True}}}  # fmt: skip
    for cid, profile in profiles.items():
        assert (await client.put(f"/v1/contacts/{cid}", json=profile)).status in (200, 201)
    start = datetime.now(UTC)
    t = [(start + timedelta(milliseconds=10 * i)).isoformat() for i in range(8)]
    events = [
        {"id": "e1", "type": "cart_updated", "contact_id": "yes", "time": t[0], "attributes": {"value": 5}},
        {"id": "e2", "type": "cart_updated", "contact_id": "no", "time": t[0], "attributes": {"value": 5}},
        {"id": "e3", "type": "cart_updated", "contact_id": "buyer", "time": t[0], "attributes": {"value": 5}},
        {"id": "e4", "type": "purchased", "contact_id": "buyer", "time": t[1], "attributes": {"value": 5}},
        {"id": "e5", "type": "product_viewed", "contact_id": "viewer", "time": t[1],
         "attributes": {"product_id": "p1"}},
    ]  # fmt: skip
    assert (await client.post("/v1/events", json=events)).status == 202
    await eventually(lambda: _decided(client, ["yes", "no", "buyer"]))
    price = [{"id": f"p1-{n}", "type": "price_changed", "time": t[2 + n],
              "attributes": {"product_id": "p1", "price": value}}
             for n, value in enumerate((100, 80))]  # fmt: skip
    for e in price:  # one after the other: the second one's drop is measured against the first
        assert (await client.post("/v1/events", json=e)).status == 202
        await eventually(lambda: _fanned_out(store))
    await eventually(lambda: _decided(client, ["viewer"]))

    live = Version("live", list(app[RULESETS].live.values()))
    source = msgspec.convert({"rules": [remind("1s")]}, RulesetFile)
    candidate = Version("no drop", [CompiledRuleset.compile("cart", "c", source)])
    window = Window(start - timedelta(minutes=1), datetime.now(UTC) + timedelta(seconds=5))
    before = len(email.delivered)
    report = await run_backtest(store, live, candidate, registry(Provider("email", needs="email")),
                                SendPolicy(), Options(window))  # fmt: skip
    recorded = [m for cid in profiles for m in await history(client, cid)]
    assert sorted((m["contact_id"], m["rule"], m["status"]) for m in recorded) == [
        ("buyer", "remind", "cancelled"),
        ("no", "remind", "suppressed"),
        ("viewer", "drop", "sent"),
        ("yes", "remind", "sent"),
    ]
    assert report.recorded.recorded == 4
    assert (report.recorded.same, report.recorded.different, report.recorded.only_recorded,
            report.recorded.only_replayed) == (4, 0, 0, 0), report.recorded.examples  # fmt: skip
    assert (report.changes.losing, report.changes.lost_messages) == (1, 1)
    assert report.changes.lost_examples[0].contact_id == "viewer"
    assert len(email.delivered) == before  # the live channel was not called by the replay


async def _decided(client: Any, contacts: list[str]) -> bool:
    for cid in contacts:
        msgs = await history(client, cid)
        if not msgs or any(m["status"] in ("scheduled", "sending") for m in msgs):
            return False
    return True


async def _fanned_out(store: Store) -> bool:
    return await store.queue.count_documents({"contact_id": None, "state": "pending"}) == 0


async def test_interest_from_before_the_window_counts_for_a_price_drop(store: Store) -> None:
    """A view 5 days before the window makes a contact interested in a drop inside it (a view counts for
    30 days); one 40 days before does not; a wishlist entry counts however old."""
    drop = {"name": "drop",
            "when": {"event": "price_changed", "conditions": {"attributes.drop_percent": {"gte": 10}}},
            "then": [{"send": {"channel": "email", "template": "cart"}}]}  # fmt: skip
    first = WINDOW.start + timedelta(days=1)
    events = [
        Event("v1", "product_viewed", "recent", WINDOW.start - timedelta(days=5), {"product_id": "p1"}),
        Event("v2", "product_viewed", "old", first - timedelta(days=40), {"product_id": "p1"}),
        Event("w1", "wishlist_added", "wished", WINDOW.start - timedelta(days=60), {"product_id": "p1"}),
        Event("x1", "page_viewed", "recent", WINDOW.start + timedelta(hours=1), {}),
        Event("pa", "price_changed", None, first, {"product_id": "p1", "price": 100}),
        Event("pb", "price_changed", None, first + timedelta(hours=1), {"product_id": "p1", "price": 80}),
    ]
    for cid in ("recent", "old", "wished"):
        await store.put_contact(cid, ContactIn(email=f"{cid}@example.com", consent={"email": True}))
    await store.insert_events(events, NOW)
    # The interest index as the live inbox wrote it when it processed the views; `old` and `wished` did
    # nothing in the window and are replayed because of it.
    for e in events[:3]:
        assert e.contact_id is not None and e.time is not None
        field = "wishlisted_at" if e.type == "wishlist_added" else "viewed_at"
        await store.interests.insert_one({"_id": f"{e.contact_id}|p1", "contact_id": e.contact_id,
                                          "product_id": "p1", field: e.time})  # fmt: skip
    report, email = await backtest(store, version("none", [NOTE]), version("drop", [NOTE, drop]))
    assert report.contacts == 3
    assert tally(report, "drop", "candidate")["sent"] == 2
    assert {ex.contact_id for ex in report.changes.gained_examples} == {"recent", "wished"}
    assert not email.delivered


def stock_rule() -> dict[str, Any]:
    return {"name": "back",
            "when": {"event": "stock_changed", "conditions": {"attributes.back_in_stock": True}},
            "then": [{"send": {"channel": "email", "template": "cart"}}]}  # fmt: skip


def drop_rule() -> dict[str, Any]:
    return {"name": "drop", "when": {"event": "price_changed",
                                     "conditions": {"attributes.drop_percent": {"gte": 10}}},
            "then": [{"send": {"channel": "email", "template": "cart"}}]}  # fmt: skip


async def test_the_catalog_as_the_window_found_it(store: Store) -> None:
    """A product already in stock before the window is not back in stock when it is re-posted in stock;
    one out of stock before is. A price known before the window is what the first drop in it is measured
    against (no `previous_price` in the event)."""
    before, inside = WINDOW.start - timedelta(days=2), WINDOW.start + timedelta(days=1)
    events = [
        Event("s-a0", "stock_changed", None, before, {"product_id": "a", "in_stock": True}),
        Event("s-b0", "stock_changed", None, before, {"product_id": "b", "in_stock": False}),
        Event("p-c0", "price_changed", None, before, {"product_id": "c", "price": 100}),
        Event("sub-a", "subscribed", "ann", WINDOW.start + timedelta(hours=1), {"product_id": "a"}),
        Event("sub-b", "subscribed", "bob", WINDOW.start + timedelta(hours=1), {"product_id": "b"}),
        Event("view-c", "product_viewed", "cid", WINDOW.start + timedelta(hours=1), {"product_id": "c"}),
        Event("s-a1", "stock_changed", None, inside, {"product_id": "a", "in_stock": True}),
        Event("s-b1", "stock_changed", None, inside, {"product_id": "b", "in_stock": True}),
        Event("p-c1", "price_changed", None, inside, {"product_id": "c", "price": 80}),
    ]
    for cid in ("ann", "bob", "cid"):
        await store.put_contact(cid, ContactIn(email=f"{cid}@example.com", consent={"email": True}))
    await store.insert_events(events, NOW)
    report, _ = await backtest(
        store, version("none", [NOTE]), version("cat", [NOTE, stock_rule(), drop_rule()])
    )
    assert tally(report, "back", "candidate")["sent"] == 1  # bob's product b; ann's a never left stock
    assert tally(report, "drop", "candidate")["sent"] == 1  # 100 -> 80 is a 20 % drop
    assert {ex.contact_id for ex in report.changes.gained_examples} == {"bob", "cid"}


async def test_events_the_service_set_aside_or_dropped_are_not_replayed(store: Store) -> None:
    await store.put_contact("c1", ContactIn(email="c1@example.com", consent={"email": True}))
    at = WINDOW.start + timedelta(days=1)
    events = [Event(f"e{i}", "cart_updated", "c1", at + timedelta(days=i), {"value": 10}) for i in range(3)]
    await store.insert_events(events, NOW)
    await store.events.update_one({"_id": "e1"}, {"$set": {"state": "quarantined"}})
    await store.events.update_one({"_id": "e2"}, {"$set": {"state": "dropped"}})
    report, _ = await backtest(store, version("live", [remind("20m")]), version("same", [remind("20m")]))
    assert report.events == 1 and tally(report, "remind", "baseline")["sent"] == 1


async def test_a_message_due_after_a_past_window_is_the_same_as_recorded(store: Store) -> None:
    """The window ended yesterday; the service sent the message after that: still due, as replayed."""
    await store.put_contact("c1", ContactIn(email="c1@example.com", consent={"email": True}))
    at = WINDOW.end - timedelta(minutes=10)
    await store.insert_events([Event("late", "cart_updated", "c1", at, {"value": 10})], NOW)
    await store.messages.insert_one(
        {"_id": "late/cart/remind/0", "contact_id": "c1", "ruleset": "cart", "rule": "remind",
         "channel": "email", "template": "cart", "status": "delivered", "created_at": at,
         "due_at": at + timedelta(minutes=20), "sent_at": at + timedelta(minutes=20)}
    )  # fmt: skip
    report, _ = await backtest(store, version("live", [remind("20m")]), version("same", [remind("20m")]))
    assert tally(report, "remind", "baseline")["scheduled"] == 1
    assert (report.recorded.recorded, report.recorded.same, report.recorded.different) == (1, 1, 0)


async def test_a_message_due_exactly_at_the_window_end_is_still_due(store: Store) -> None:
    await store.put_contact("c1", ContactIn(email="c1@example.com", consent={"email": True}))
    at = WINDOW.end - timedelta(minutes=20)
    await store.insert_events([Event("edge", "cart_updated", "c1", at, {"value": 10})], NOW)
    report, _ = await backtest(store, version("live", [remind("20m")]), version("same", [remind("20m")]))
    assert (
        tally(report, "remind", "baseline")["sent"],
        tally(report, "remind", "baseline")["scheduled"],
    ) == (0, 1)


async def test_the_candidate_hears_nothing_of_a_message_it_does_not_send(store: Store) -> None:
    """Live, the reminder was opened and a follow-up push went out. A candidate without the reminder loses
    both: the open of a message it never sent is not replayed to it."""
    await store.put_contact("c1", ContactIn(email="c1@example.com", push_tokens=["t"],
                                            consent={"email": True, "push": True}))  # fmt: skip
    at = WINDOW.start + timedelta(days=1)
    follow = {"name": "follow", "when": {"event": "message_opened"},
              "then": [{"send": {"channel": "push", "template": "cart"}}]}  # fmt: skip
    opened = Event("open", "message_opened", "c1", at + timedelta(hours=1),
                   {"message_id": "cart-1/cart/remind/0", "channel": "email"})  # fmt: skip
    await store.insert_events([Event("cart-1", "cart_updated", "c1", at, {"value": 10}), opened], NOW)
    push = Provider("push", needs="push_tokens")
    report = await run_backtest(store, version("live", [remind("20m"), follow]), version("none", [follow]),
                                registry(Provider("email", needs="email"), push), SendPolicy(),
                                Options(WINDOW))  # fmt: skip
    assert tally(report, "follow", "baseline")["sent"] == 1
    assert tally(report, "follow", "candidate")["decided"] == 0
    assert report.changes.lost_messages == 2 and not push.delivered


async def test_an_example_of_a_busy_contact_keeps_fifty_events_around_the_change(store: Store) -> None:
    await store.put_contact("bot", ContactIn(email="b@example.com", consent={"email": True}))
    start = WINDOW.start + timedelta(days=1)
    views = [Event(f"v{i}", "page_viewed", "bot", start + timedelta(minutes=i), {}) for i in range(300)]
    cart = Event("cart", "cart_updated", "bot", start + timedelta(minutes=150, seconds=30), {"value": 5})
    await store.insert_events([*views, cart], NOW)
    report, _ = await backtest(store, version("live", [remind("20m")]), version("none", [NOTE]))
    [example] = report.changes.lost_examples
    assert len(example.events) == 50 and example.omitted == 301 - 50
    assert "cart" in [e.event_id for e in example.events]
