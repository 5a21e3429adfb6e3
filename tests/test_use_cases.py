"""The shipped rulesets, all loaded together as in production, on a virtual clock: one test per use case
in ../shared/USE_CASES.md that the engine covers today (the catalog fan-out, 11-12, and the triggers
without an incoming event, 2's idle timeout and 21, come with the interest index and time triggers)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from rulesvc.runtime.rulesets import Rulesets
from tests.helpers import at, event, load, run

SHIPPED = Path(__file__).parent.parent / "rulesets"


@pytest.fixture(scope="module")
def shipped() -> Rulesets:
    return load(SHIPPED)


def out(actions: list[Any]) -> list[tuple[str, str, str | None, str]]:
    """(time, ruleset/rule, channel, template) of what would go out."""
    return [
        (a.at.isoformat().replace("+00:00", "Z"), f"{a.ruleset}/{a.rule}", a.channel, a.template)
        for a in actions
        if a.status == "sent"
    ]


def test_uc1_two_views_no_cart_show_free_shipping_once_per_session(shipped: Rulesets) -> None:
    views = [event(f"v{i}", "product_viewed", minutes=i, product_id=f"p{i}") for i in range(4)]
    later = [event("n1", "product_viewed", minutes=120, product_id="p9"),
             event("n2", "product_viewed", minutes=121, product_id="p8")]  # fmt: skip
    assert out(run(shipped, views + later)) == [
        (at(minutes=1), "browse_abandon/free_shipping_offer", "inapp", "browse_abandon/free_shipping"),
        (at(minutes=121), "browse_abandon/free_shipping_offer", "inapp", "browse_abandon/free_shipping"),
    ]
    carted = [event("c", "cart_updated", value=10), *views]
    assert [a for a in out(run(shipped, carted)) if "free_shipping" in (a[3] or "")] == []


def test_uc2_ten_products_then_session_end_push_and_email(shipped: Rulesets) -> None:
    views = [event(f"v{i}", "product_viewed", minutes=i, product_id=f"p{i}") for i in range(10)]
    ended = event("end", "session_ended", minutes=12)
    sent = [a for a in out(run(shipped, [*views, ended])) if a[1] == "browse_abandon/after_session"]
    assert sent == [
        (at(minutes=32), "browse_abandon/after_session", "push", "browse_abandon/push"),
        (at(minutes=12, hours=12), "browse_abandon/after_session", "email", "browse_abandon/email"),
    ]
    nine = [*views[:9], ended]
    assert not [a for a in out(run(shipped, nine)) if a[1] == "browse_abandon/after_session"]
    cancelled = run(shipped, [*views, ended, event("c", "cart_updated", minutes=25, value=5)])
    assert [(a.channel, a.status) for a in cancelled if a.rule == "after_session"] == [
        ("push", "cancelled"),
        ("email", "cancelled"),
    ]


def test_uc3_paywall_three_times_in_14_days_without_subscribing(shipped: Rulesets) -> None:
    visits = [event(f"p{d}", "page_viewed", minutes=d * 60 * 24 * 4, page="paywall") for d in range(3)]
    assert [a[1:] for a in out(run(shipped, visits))] == [
        ("browse_abandon/premium_offer", "inapp", "browse_abandon/premium_discount")
    ]
    spread = [event(f"p{d}", "page_viewed", minutes=d * 60 * 24 * 8, page="paywall") for d in range(3)]
    assert out(run(shipped, spread)) == []  # 16 days for three visits: outside the window
    subscriber = [event("s", "subscribed"), *visits]
    assert out(run(shipped, subscriber)) == []


def test_uc5_high_value_cart_gets_email_and_webpush_in_5_minutes(shipped: Rulesets) -> None:
    actions = run(shipped, [event("c", "cart_updated", value=250.0, currency="EUR")])
    assert out(actions) == [
        (at(minutes=5), "cart_abandon/high_value", "email", "cart_abandon/high_value_email"),
        (at(minutes=5), "cart_abandon/high_value", "webpush", "cart_abandon/high_value_webpush"),
    ]
    assert actions[0].params and actions[0].params["incentive_percent"] == 5
    assert actions[0].params["valid_hours"] == 24
    bought = run(shipped, [event("c", "cart_updated", value=250.0), event("p", "purchased", minutes=3)])
    assert [a for a in out(bought) if a[1].startswith("cart_abandon")] == []


def test_uc6_checkout_abandonment(shipped: Rulesets) -> None:
    actions = run(shipped, [event("k", "checkout_started", value=80, currency="EUR")])
    assert out(actions) == [
        (at(minutes=20), "checkout_abandon/remind", "push", "checkout_abandon/push"),
        (at(hours=12), "checkout_abandon/remind", "email", "checkout_abandon/email"),
    ]
    bought = run(
        shipped, [event("k", "checkout_started"), event("p", "purchased", minutes=19, order_id="o1")]
    )
    assert [a[1] for a in out(bought)] == ["confirmations/order"]


def test_uc7_9_delivery_updates_on_the_matching_channel(shipped: Rulesets) -> None:
    events = [
        event("s", "delivery_status_changed", status="shipped", order_id="o1", carrier="DHL"),
        event("d", "delivery_status_changed", minutes=60 * 24, status="delayed", order_id="o1"),
        event("x", "delivery_status_changed", minutes=60 * 48, status="delivered", order_id="o1"),
    ]
    assert out(run(shipped, events)) == [
        (at(), "delivery_status/shipped", "email", "delivery_status/shipped"),
        (at(hours=24), "delivery_status/delayed", "push", "delivery_status/delayed"),
        (at(hours=48), "delivery_status/delivered", "push", "delivery_status/delivered"),
        (at(hours=50), "delivery_status/delivered", "email", "delivery_status/rate_delivery"),
    ]


def test_uc8_sms_when_the_order_arrives_today_in_the_contacts_time_zone(shipped: Rulesets) -> None:
    # 12:00 UTC on 2026-11-20 is already the 21st in Auckland (+13:00), still the 20th in New York.
    contacts = [
        {"contact_id": "nz", "timezone": "Pacific/Auckland"},
        {"contact_id": "ny", "timezone": "America/New_York"},
    ]
    events = [
        event("a", "delivery_status_changed", contact="nz", minutes=180, status="shipped", order_id="o1",
              expected_delivery_date="2026-11-21"),
        event("b", "delivery_status_changed", contact="ny", minutes=180, status="shipped", order_id="o2",
              expected_delivery_date="2026-11-21"),
        event("c", "delivery_status_changed", contact="ny", minutes=1200, status="out_for_delivery",
              order_id="o2"),
        event("d", "delivery_status_changed", contact="ny", minutes=1260, status="out_for_delivery",
              order_id="o2"),
    ]  # fmt: skip
    sms = [(a.contact_id, a.at) for a in run(shipped, events, contacts) if a.channel == "sms"]
    assert [(c, t.isoformat().replace("+00:00", "Z")) for c, t in sms] == [
        ("nz", at(hours=3)),
        ("ny", at(hours=20)),
    ]


def test_uc10_confirmations_and_voucher_reminder(shipped: Rulesets) -> None:
    purchase = event(
        "p", "purchased", order_id="o7", value=30, promo_code="WELCOME", points_used=100, points_left=20
    )
    voucher = event("v", "voucher_issued", voucher_code="V-1", expires_at="2026-12-01T00:00:00Z", value=10)
    redeemed = event(
        "w", "voucher_issued", contact="c2", voucher_code="V-2", expires_at="2026-12-01T00:00:00Z"
    )
    use = event("u", "voucher_redeemed", contact="c2", minutes=60, voucher_code="V-2")
    got = out(run(shipped, [purchase, voucher, redeemed, use]))
    assert got == [
        (at(), "confirmations/order", "email", "confirmations/order"),
        (at(), "confirmations/promo_code", "email", "confirmations/promo_code"),
        (at(), "confirmations/loyalty_points", "email", "confirmations/loyalty_points"),
        ("2026-11-28T00:00:00Z", "confirmations/voucher_reminder", "email", "confirmations/voucher_reminder"),
    ]


def delivered(
    msg: str, channel: str, minutes: float = 0, contact: str = "c1", **extra: Any
) -> dict[str, Any]:
    return event(f"d-{msg}", "message_delivered", contact=contact, minutes=minutes, message_id=msg,
                 channel=channel, ruleset="cart_abandon", **extra)  # fmt: skip


def outcome(kind: str, msg: str, channel: str, minutes: float, contact: str = "c1") -> dict[str, Any]:
    return event(f"{kind}-{msg}", f"message_{kind}", contact=contact, minutes=minutes, message_id=msg,
                 channel=channel, ruleset="cart_abandon")  # fmt: skip


def test_uc13_14_email_opened_discount_not_opened_push(shipped: Rulesets) -> None:
    events = [
        delivered("m1", "email", contact="a"),
        outcome("opened", "m1", "email", 30, contact="a"),
        delivered("m2", "email", contact="b"),
    ]
    assert out(run(shipped, events)) == [
        (at(minutes=30), "engagement/email_opened", "email", "engagement/personal_discount"),
        (at(hours=24), "engagement/email_not_opened", "push", "engagement/email_nudge"),
    ]


def test_uc15_bounce_flags_for_cleanup(shipped: Rulesets) -> None:
    engine = shipped.engine()
    from rulesvc.core.engine import ContactView, EngineEvent
    from tests.helpers import T0

    contact = ContactView("c1", {"email": "a@b.c"}, {})
    engine.evaluate(
        EngineEvent("b", "message_bounced", "c1", T0, {"channel": "email", "message_id": "m"}), contact, T0
    )
    assert "needs_data_cleanup" in contact.state["flags"]


def test_uc17_sms_branches(shipped: Rulesets) -> None:
    events = [
        delivered("s1", "sms", contact="replier"),
        outcome("replied", "s1", "sms", 10, contact="replier"),
        delivered("s2", "sms", contact="clicker"),
        outcome("clicked", "s2", "sms", 10, contact="clicker"),
        delivered("s3", "sms", contact="silent"),
        delivered("s4", "sms", contact="surveyed"),
        outcome("clicked", "s4", "sms", 10, contact="surveyed"),
        event("done", "survey_completed", contact="surveyed", minutes=60),
    ]
    got = {(a.contact_id, a.template) for a in run(shipped, events) if a.status == "sent"}
    assert got == {
        ("replier", "engagement/thanks_coupon"),
        ("clicker", "engagement/survey_reminder"),
        ("silent", "engagement/sms_follow_up"),
    }


def test_uc18_push_clicked_opened_or_ignored(shipped: Rulesets) -> None:
    events = [
        delivered("p1", "push", contact="clicker"),
        outcome("opened", "p1", "push", 5, contact="clicker"),
        outcome("clicked", "p1", "push", 6, contact="clicker"),
        delivered("p2", "push", contact="opener"),
        outcome("opened", "p2", "push", 5, contact="opener"),
        event("visit", "page_viewed", contact="opener", minutes=60 * 30, page="home"),
        event("visit2", "page_viewed", contact="opener", minutes=60 * 30 + 1, page="shoes"),
        event("v-click", "page_viewed", contact="clicker", minutes=60 * 30, page="home"),
        delivered("p3", "push", contact="ignorer"),
    ]
    actions = run(shipped, events)
    got = [(a.contact_id, a.channel, a.template) for a in actions if a.status == "sent"]
    assert sorted(got) == [
        ("ignorer", "sms", "engagement/offer_sms"),
        ("opener", "inapp", "engagement/offer_banner"),  # once, at the next session
    ]


def test_uc19_third_share_earns_free_shipping_and_uc20_new_address(shipped: Rulesets) -> None:
    shares = [event(f"s{i}", "social_shared", minutes=i * 60) for i in range(4)]
    moved = [
        event("m1", "address_changed", city="Kraków"),
        event("m2", "address_changed", minutes=60, city="Gdańsk"),
    ]
    got = out(run(shipped, [*shares, *moved]))
    assert got == [
        (
            at(),
            "lifecycle/new_address",
            "email",
            "lifecycle/local_greeting",
        ),  # the second move: within 30 days
        (at(hours=2), "lifecycle/free_shipping", "email", "lifecycle/free_shipping"),
    ]


def catalog(event_id: str, type_: str, minutes: float = 0, **attributes: Any) -> dict[str, Any]:
    return {"id": event_id, "type": type_, "time": at(minutes=minutes), "attributes": attributes}


def test_uc11_price_drop_reaches_viewers_and_wishlisters_only(shipped: Rulesets) -> None:
    events = [
        catalog("p0", "price_changed", price=100.0, product_id="lamp"),  # the catalog learns the price
        event("v", "product_viewed", contact="viewer", minutes=10, product_id="lamp"),
        event("w", "wishlist_added", contact="wisher", minutes=10, product_id="lamp"),
        event("old", "product_viewed", contact="long_ago", minutes=-60 * 24 * 40, product_id="lamp"),
        event("o", "product_viewed", contact="other", minutes=10, product_id="sofa"),
        catalog("p1", "price_changed", minutes=60, price=85.0, product_id="lamp", name="Lamp"),
        catalog("p2", "price_changed", minutes=120, price=80.0, product_id="lamp"),  # again: 7-day limit
        catalog("p3", "price_changed", minutes=180, price=120.0, product_id="lamp"),  # an increase
    ]
    actions = run(shipped, events)
    sent = [(a.contact_id, a.at) for a in actions if a.status == "sent" and a.ruleset == "price_drop"]
    assert sorted(sent) == [("viewer", at_dt(minutes=90)), ("wisher", at_dt(minutes=90))]
    first = next(a for a in actions if a.ruleset == "price_drop")
    assert first.params and first.params["drop_percent"] == 15.0 and first.params["previous_price"] == 100.0


def at_dt(**delta: float) -> Any:
    from tests.helpers import T0

    return T0 + __import__("datetime").timedelta(**delta)


def test_uc11_the_discount_must_still_be_real_when_sent(shipped: Rulesets) -> None:
    events = [
        catalog("p0", "price_changed", price=100.0, product_id="lamp"),
        event("v", "product_viewed", contact="viewer", minutes=1, product_id="lamp"),
        catalog("p1", "price_changed", minutes=10, price=80.0, product_id="lamp"),
        catalog("p2", "price_changed", minutes=20, price=100.0, product_id="lamp"),  # back up before the send
    ]
    [action] = [a for a in run(shipped, events) if a.ruleset == "price_drop"]
    assert (action.status, action.reason) == ("suppressed", "guard_failed")
    assert action.detail == "the price is no longer 80.0 (now 100.0)"


def test_uc12_back_in_stock_and_low_stock_notify_the_right_contacts(shipped: Rulesets) -> None:
    events = [
        catalog("s0", "stock_changed", in_stock=False, product_id="boots"),
        event("oos", "product_viewed", contact="wanted", minutes=5, product_id="boots", in_stock=False),
        event("sub", "subscribed", contact="subscriber", minutes=5, product_id="boots"),
        event("w", "wishlist_added", contact="wisher", minutes=5, product_id="boots"),
        event("v", "product_viewed", contact="browser", minutes=5, product_id="boots", in_stock=True),
        event("x", "wishlist_added", contact="elsewhere", minutes=5, product_id="hat"),
        catalog(
            "s1", "stock_changed", minutes=60, in_stock=True, quantity=40, product_id="boots", name="Boots"
        ),
        catalog(
            "s2", "stock_changed", minutes=120, in_stock=True, quantity=3, product_id="boots", name="Boots"
        ),
    ]
    actions = [a for a in run(shipped, events) if a.ruleset == "back_in_stock" and a.status == "sent"]
    back = sorted(a.contact_id for a in actions if a.rule == "back_in_stock")
    assert back == ["subscriber", "wanted", "wisher"]
    assert all(
        a.at == at_dt(minutes=60) and a.template == "back_in_stock/email"
        for a in actions
        if a.rule == "back_in_stock"
    )
    assert [(a.contact_id, a.template) for a in actions if a.rule == "low_stock"] == [
        ("wisher", "back_in_stock/low_stock")
    ]


def test_uc2_quiet_for_30_minutes_ends_the_session_too(shipped: Rulesets) -> None:
    views = [event(f"v{i}", "product_viewed", minutes=i, product_id=f"p{i}") for i in range(10)]
    actions = run(shipped, views)
    sent = [
        (a.rule, a.channel, a.at) for a in actions if a.status == "sent" and a.ruleset == "browse_abandon"
    ]
    assert sent[-2:] == [
        ("idle_after_browsing", "push", at_dt(minutes=9 + 30 + 20)),
        ("idle_after_browsing", "email", at_dt(minutes=9 + 30, hours=12)),
    ]
    ended = run(shipped, [*views, event("end", "session_ended", minutes=12)])
    rules = {a.rule for a in ended if a.status == "sent" and a.ruleset == "browse_abandon"}
    assert "idle_after_browsing" not in rules and "after_session" in rules  # one reminder pair, not two


def test_uc21_inactive_for_90_days_with_a_wishlist(shipped: Rulesets) -> None:
    events = [
        event("w", "wishlist_added", product_id="lamp"),
        event("v", "product_viewed", minutes=60 * 24 * 30, product_id="sofa"),  # activity re-arms the wait
        event("n", "product_viewed", contact="no_wishlist", product_id="sofa"),
    ]
    actions = [a for a in run(shipped, events) if a.ruleset == "lifecycle" and a.status == "sent"]
    assert [(a.contact_id, a.at, a.template) for a in actions] == [
        ("c1", at_dt(days=120), "lifecycle/wishlist_reminder")
    ]
    assert actions[0].params == {"wishlist": ["lamp"]}


def test_stale_events_start_nothing_in_the_shipped_flows(shipped: Rulesets) -> None:
    from datetime import timedelta

    from rulesvc.core.engine import ContactView, EngineEvent
    from tests.helpers import T0

    engine = shipped.engine()
    for event_type in ("cart_updated", "checkout_started"):
        late = EngineEvent("late", event_type, "c1", T0, {"value": 50})
        fresh = engine.evaluate(late, ContactView("c1", {}, {}), now=T0 + timedelta(hours=11))
        stale = engine.evaluate(late, ContactView("c1", {}, {}), now=T0 + timedelta(hours=13))
        assert fresh.schedule and not stale.schedule, event_type
