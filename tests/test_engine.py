"""The engine's decisions, on a virtual clock: conditions, state, entry rules, waits and cancellation."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from rulesvc.core.engine import ContactView, EngineEvent
from tests.helpers import T0, at, event, load, run, sent, write_ruleset


def send_now(template: str) -> dict[str, Any]:
    return {"send": {"channel": "log", "template": template}}


def rule(
    name: str, event_type: str, conditions: dict[str, Any] | None = None, **extra: Any
) -> dict[str, Any]:
    return {
        "name": name,
        "when": {"event": event_type, "conditions": conditions or {}},
        "then": extra.pop("then", [send_now(name)]),
        **extra,
    }


def fired(actions: list[Any]) -> set[str]:
    return {a.rule for a in actions if a.status == "sent"}


OPERATOR_RULES = [
    rule("eq", "t", {"attributes.colour": "red"}),
    rule("ne", "t", {"attributes.colour": {"ne": "red"}}),
    rule("lt", "t", {"attributes.n": {"lt": 10}}),
    rule("lte", "t", {"attributes.n": {"lte": 10}}),
    rule("gt", "t", {"attributes.n": {"gt": 10}}),
    rule("gte_lt", "t", {"attributes.n": {"gte": 10, "lt": 20}}),
    rule("in", "t", {"attributes.colour": {"in": ["green", "blue"]}}),
    rule("contains_list", "t", {"attributes.tags": {"contains": "sale"}}),
    rule("contains_text", "t", {"attributes.title": {"contains": "Sale"}}),
    rule("exists", "t", {"attributes.coupon": {"exists": True}}),
    rule("absent", "t", {"attributes.coupon": {"exists": False}}),
    rule("nested", "t", {"attributes.cart.total": {"gt": 100}}),
    rule("consented", "t", {"contact.consent.email": True}),
    rule("profile", "t", {"contact.attributes.tier": "gold"}),
    {
        "name": "any_group",
        "when": {"event": "t", "any": [{"attributes.colour": "red"}, {"attributes.n": {"gt": 100}}]},
        "then": [send_now("any_group")],
    },
]


@pytest.mark.parametrize(
    ("attributes", "expected"),
    [
        ({"colour": "red", "n": 5}, {"eq", "lt", "lte", "absent", "any_group"}),
        ({"colour": "blue", "n": 10}, {"ne", "lte", "gte_lt", "in", "absent"}),
        ({"n": 15, "coupon": "X"}, {"ne", "gt", "gte_lt", "exists"}),
        ({"n": 1e-05, "tags": ["new", "sale"]}, {"ne", "lt", "lte", "contains_list", "absent"}),
        ({"n": 1e18, "title": "Winter Sale now"}, {"ne", "gt", "contains_text", "absent", "any_group"}),
        ({"cart": {"total": 150}, "colour": None}, {"ne", "absent", "nested"}),
    ],
)
def test_operators(tmp_path: Path, attributes: dict[str, Any], expected: set[str]) -> None:
    write_ruleset(tmp_path, "ops", {"rules": OPERATOR_RULES})
    actions = run(load(tmp_path), [event("e", "t", **attributes)])
    assert fired(actions) == expected


def test_contact_profile_conditions(tmp_path: Path) -> None:
    write_ruleset(tmp_path, "ops", {"rules": OPERATOR_RULES})
    contacts = [
        {"contact_id": "c1", "consent": {"email": True}, "attributes": {"tier": "gold"}},
        {"contact_id": "c2", "consent": {"email": False}},
    ]
    actions = run(load(tmp_path), [event("e1", "t"), event("e2", "t", contact="c2")], contacts)
    by_contact = {c: {a.rule for a in actions if a.contact_id == c} for c in ("c1", "c2")}
    assert {"consented", "profile"} <= by_contact["c1"]
    assert not {"consented", "profile"} & by_contact["c2"]


def test_only_listening_rulesets_run(tmp_path: Path) -> None:
    write_ruleset(tmp_path, "a", {"rules": [rule("on_view", "product_viewed")]})
    write_ruleset(tmp_path, "b", {"rules": [rule("on_cart", "cart_updated"), rule("on_both", "x")]})
    rulesets = load(tmp_path)
    assert set(rulesets.index.by_event) == {"product_viewed", "cart_updated", "x"}
    assert fired(run(rulesets, [event("e", "cart_updated")])) == {"on_cart"}


def test_counters_in_a_window_and_in_a_session(tmp_path: Path) -> None:
    write_ruleset(
        tmp_path,
        "views",
        {
            "rules": [
                {
                    "name": "count",
                    "when": {"event": "product_viewed"},
                    "then": [
                        {"count": {"name": "views_day", "window": "1d"}},
                        {"count": {"name": "views_session", "window": "session"}},
                        {"count": {"name": "products", "window": "1d", "per": "attributes.product_id"}},
                    ],
                },
                rule("two_in_session", "product_viewed", {"counters.views_session": {"gte": 2}}),
                rule("three_a_day", "product_viewed", {"counters.views_day": {"gte": 3}}),
                rule("two_products", "product_viewed", {"counters.products": 2}),
            ]
        },
    )
    actions = run(
        load(tmp_path),
        [
            event("v1", "product_viewed", minutes=0, product_id="p1"),
            event("v2", "product_viewed", minutes=5, product_id="p1"),
            event("v3", "product_viewed", minutes=70, product_id="p2"),  # new session: idle > 30 min
            event("v4", "product_viewed", minutes=60 * 25, product_id="p3"),  # next day
        ],
    )
    got = [(a.rule, a.at) for a in actions if a.status == "sent"]
    assert got == [
        ("two_in_session", T0 + timedelta(minutes=5)),
        ("three_a_day", T0 + timedelta(minutes=70)),
        ("two_products", T0 + timedelta(minutes=70)),
        ("two_products", T0 + timedelta(hours=25)),  # p2 (+70 min) and p3 within one day; p1 fell out
    ]


def test_flags_values_and_expiry(tmp_path: Path) -> None:
    write_ruleset(
        tmp_path,
        "state",
        {
            "rules": [
                {
                    "name": "mark",
                    "when": {"event": "subscribed"},
                    "then": [
                        {"set_flag": {"name": "vip", "for": "1h"}},
                        {"remember": {"name": "seen", "from": "attributes.sku", "append": True, "max": 2}},
                    ],
                },
                rule("is_vip", "t", {"flags.vip": True}),
                rule("not_vip", "t", {"flags.vip": {"exists": False}}),
                rule("remembers", "t", {"values.seen": {"contains": "B"}}),
                rule("forgot_a", "t", {"values.seen": {"contains": "A"}}),
            ]
        },
    )
    actions = run(
        load(tmp_path),
        [
            event("s1", "subscribed", sku="A"),
            event("s2", "subscribed", minutes=1, sku="B"),
            event("s3", "subscribed", minutes=2, sku="C"),  # max 2: A falls out
            event("t1", "t", minutes=30),
            event("t2", "t", minutes=90),  # the flag was set for 1 h (from s3 at +2 min)
        ],
    )
    assert [(a.rule, a.at - T0) for a in actions if a.status == "sent"] == [
        ("is_vip", timedelta(minutes=30)),
        ("remembers", timedelta(minutes=30)),
        ("not_vip", timedelta(minutes=90)),
        ("remembers", timedelta(minutes=90)),
    ]


def test_once_per_session_per_period_per_key_and_ever(tmp_path: Path) -> None:
    write_ruleset(
        tmp_path,
        "once",
        {
            "rules": [
                rule("per_session", "v", once={"per": "session"}),
                rule("per_week_per_product", "v", once={"per": "7d", "key": "attributes.product_id"}),
                rule("ever", "v", once={"per": "ever"}),
            ]
        },
    )
    actions = run(
        load(tmp_path),
        [
            event("a", "v", minutes=0, product_id="p1"),
            event("b", "v", minutes=1, product_id="p1"),
            event("c", "v", minutes=2, product_id="p2"),
            event("d", "v", minutes=120, product_id="p1"),  # new session, same week
            event("e", "v", minutes=60 * 24 * 8, product_id="p1"),  # a week later
        ],
    )
    counts: dict[str, list[str]] = {}
    for a in actions:
        counts.setdefault(a.rule, []).append(a.message_id.split("/")[0] if a.message_id else "")
    assert counts == {
        "per_session": ["a", "d", "e"],
        "per_week_per_product": ["a", "c", "e"],
        "ever": ["a"],
    }


def test_stale_event_starts_nothing(tmp_path: Path) -> None:
    write_ruleset(tmp_path, "stale", {"timeout": "1h", "rules": [rule("r", "t")]})
    engine = load(tmp_path).engine()
    contact = ContactView("c1", {}, {})
    old = EngineEvent("e1", "t", "c1", T0, {})
    assert engine.evaluate(old, contact, now=T0 + timedelta(minutes=59)).schedule
    assert not engine.evaluate(old, contact, now=T0 + timedelta(minutes=61)).schedule


def test_wait_for_event_else(tmp_path: Path) -> None:
    write_ruleset(
        tmp_path,
        "engagement",
        {
            "rules": [
                {
                    "name": "not_opened",
                    "when": {"event": "message_delivered", "conditions": {"attributes.channel": "email"}},
                    "then": [
                        {
                            "wait": {
                                "event": "message_opened",
                                "within": "24h",
                                "same": ["attributes.message_id"],
                                "else": [
                                    {
                                        "send": {
                                            "channel": "push",
                                            "template": "nudge",
                                            "params": {"m": "$attributes.message_id"},
                                        }
                                    },
                                    {"set_flag": "nudged"},
                                ],
                            }
                        }
                    ],
                },
                rule("after_nudge", "t", {"flags.nudged": True}),
            ]
        },
    )
    rulesets = load(tmp_path)
    delivered = [
        event("d1", "message_delivered", contact="c1", channel="email", message_id="m1"),
        event("d2", "message_delivered", contact="c2", channel="email", message_id="m2"),
        event("d3", "message_delivered", contact="c3", channel="email", message_id="m3"),
    ]
    later = [
        event("o1", "message_opened", contact="c1", minutes=60, message_id="m1"),  # opened in time
        event("o2", "message_opened", contact="c2", minutes=60, message_id="m-other"),  # another message
        event("t3", "t", contact="c3", minutes=60 * 25),
    ]
    actions = run(rulesets, delivered + later)
    assert sent(actions) == [
        ("c2", "not_opened", "push", at(hours=24)),
        ("c3", "not_opened", "push", at(hours=24)),
        ("c3", "after_nudge", "log", at(hours=25)),
    ]
    nudge = next(a for a in actions if a.contact_id == "c2" and a.status == "sent")
    assert nudge.params == {"m": "m2"}
    cancelled = [a for a in actions if a.status == "cancelled"]
    assert [(a.contact_id, a.reason, a.detail) for a in cancelled] == [
        ("c1", "cancelled_by_event", "cancelled by message_opened")
    ]


def test_rearm_and_keep(tmp_path: Path) -> None:
    def reminder(name: str, on_repeat: str) -> dict[str, Any]:
        send = {"channel": "log", "template": name, "after": "20m", "on_repeat": on_repeat}
        return {"name": name, "when": {"event": "cart_updated"}, "then": [{"send": send}]}

    write_ruleset(tmp_path, "r", {"rules": [reminder("rearmed", "rearm"), reminder("kept", "keep")]})
    actions = run(load(tmp_path), [event("a", "cart_updated"), event("b", "cart_updated", minutes=10)])
    assert sent(actions) == [("c1", "kept", "log", at(minutes=20)), ("c1", "rearmed", "log", at(minutes=30))]
    assert [(a.rule, a.reason, a.detail) for a in actions if a.status == "cancelled"] == [
        ("rearmed", "rearmed", "re-armed by a repeat trigger")
    ]


def test_cancel_on_same_value_only(tmp_path: Path) -> None:
    write_ruleset(
        tmp_path,
        "price",
        {
            "rules": [
                {
                    "name": "follow_up",
                    "when": {"event": "product_viewed"},
                    "then": [
                        {
                            "send": {
                                "channel": "log",
                                "template": "t",
                                "after": "1h",
                                "per": "attributes.product_id",
                                "cancel_on": [{"event": "purchased", "same": ["attributes.product_id"]}],
                            }
                        }
                    ],
                }
            ]
        },
    )
    actions = run(
        load(tmp_path),
        [
            event("v1", "product_viewed", product_id="p1"),
            event("v2", "product_viewed", product_id="p2"),
            event("p", "purchased", minutes=5, product_id="p2"),
        ],
    )
    assert [a.message_id for a in actions if a.status == "sent"] == ["v1/price/follow_up/0"]
