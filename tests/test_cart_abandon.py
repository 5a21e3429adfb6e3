"""The shipped cart_abandon ruleset (use case 4) on a virtual clock, through the engine and the API."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec

from rulesvc.config import Settings
from rulesvc.web.app import create_app
from tests.helpers import Provider, at, event, load, registry, run, sent

SHIPPED = Path(__file__).parent.parent / "rulesets"


def cart_only(events: list[dict[str, Any]], **kwargs: Any) -> list[Any]:
    """All shipped rulesets run, as in production; these tests look at cart_abandon's actions."""
    return [a for a in run(load(SHIPPED), events, **kwargs) if a.ruleset == "cart_abandon"]


CART = {"value": 59.9, "currency": "EUR", "items": [{"sku": "A-1", "name": "Lamp", "qty": 1}]}


def test_push_after_20_minutes_and_email_after_12_hours() -> None:
    actions = cart_only([event("c", "cart_updated", **CART)])
    assert sent(actions) == [
        ("c1", "remind", "push", at(minutes=20)),
        ("c1", "remind", "email", at(hours=12)),
    ]
    assert {a.template for a in actions} == {"cart_abandon/push", "cart_abandon/email"}
    assert all(a.params == CART for a in actions)  # personalised from the event payload


def test_purchase_at_19_minutes_cancels_both() -> None:
    actions = cart_only([event("c", "cart_updated", **CART), event("p", "purchased", minutes=19)])
    assert sent(actions) == []
    assert [(a.channel, a.status, a.at) for a in actions] == [
        ("push", "cancelled", actions[0].at),
        ("email", "cancelled", actions[0].at),
    ]
    assert actions[0].at.isoformat().startswith(at(minutes=19)[:16])
    assert (actions[0].reason, actions[0].detail) == ("cancelled_by_event", "cancelled by purchased")


def test_purchase_after_the_push_cancels_only_the_email() -> None:
    actions = cart_only([event("c", "cart_updated", **CART), event("p", "purchased", minutes=21)])
    assert sent(actions) == [("c1", "remind", "push", at(minutes=20))]
    assert [a.channel for a in actions if a.status == "cancelled"] == ["email"]


def test_second_cart_update_rearms_from_the_latest_update() -> None:
    second = {**CART, "value": 89.9}
    actions = run(
        load(SHIPPED),
        [event("c1", "cart_updated", **CART), event("c2", "cart_updated", minutes=10, **second)],
    )
    assert sent(actions) == [
        ("c1", "remind", "push", at(minutes=30)),
        ("c1", "remind", "email", at(hours=12, minutes=10)),
    ]
    assert all(a.params and a.params["value"] == 89.9 for a in actions if a.status == "sent")
    assert [a.reason for a in actions if a.status == "cancelled"] == ["rearmed"] * 2


def test_emptied_cart_cancels_and_contacts_are_independent() -> None:
    actions = run(
        load(SHIPPED),
        [
            event("a", "cart_updated", contact="ann", **CART),
            event("b", "cart_updated", contact="bob", **CART),
            event("a2", "cart_updated", contact="ann", minutes=5, value=0, items=[]),
        ],
    )
    assert sent(actions) == [
        ("bob", "remind", "push", at(minutes=20)),
        ("bob", "remind", "email", at(hours=12)),
    ]


def test_until_bounds_the_virtual_clock() -> None:
    actions = cart_only([event("c", "cart_updated", **CART)], until=at(hours=1))
    assert sent(actions) == [("c1", "remind", "push", at(minutes=20))]


async def test_simulate_endpoint_sends_and_stores_nothing(
    make_client: Any, settings: Settings, db: Any
) -> None:
    # Providers that can reach the contact: a simulation applies the send rules with the app's channels.
    channels = registry(Provider("push", needs="push_tokens"), Provider("email", needs="email"))
    client = await make_client(
        create_app(msgspec.structs.replace(settings, rulesets_dir=str(SHIPPED)), channels)
    )
    ann = {"contact_id": "c1", "email": "ann@example.com", "push_tokens": ["t-1"],
           "consent": {"email": True, "push": True}}  # fmt: skip
    body = {
        "events": [event("c", "cart_updated", **CART), event("p", "purchased", contact="c2", minutes=1)],
        "contacts": [ann],
    }
    resp = await client.post("/v1/simulate", json=body)
    assert resp.status == 200
    actions = [a for a in (await resp.json())["actions"] if a["ruleset"] == "cart_abandon"]
    assert [(a["at"], a["channel"], a["status"]) for a in actions] == [
        (at(minutes=20), "push", "sent"),
        (at(hours=12), "email", "sent"),
    ]
    assert actions[0]["ruleset"] == "cart_abandon" and actions[0]["rule"] == "remind"
    assert await db.events.count_documents({}) == 0
    assert await db.messages.count_documents({}) == 0
    assert await db.contacts.count_documents({}) == 0

    resp = await client.post("/v1/simulate", json={"events": [{"id": "x", "type": 5}]})
    assert resp.status == 422
    assert (await resp.json())["path"] == "$.events[0].type"
