"""Holdouts, A/B arms, entries and conversions, decided by the engine (no database): what a marketer
writes in a ruleset, and the groups, messages and conversions it gives.

The judge of who is held out and who gets which arm is the documented formula, computed here with
hashlib: the first 8 bytes of SHA-256 of `salt NUL contact NUL purpose`, as a fraction of 2**64."""

from __future__ import annotations

import hashlib
import json
import math
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from rulesvc.core.attribution import attribute
from rulesvc.core.engine import ContactView, Converted, EngineEvent
from rulesvc.core.ruleformat import InvalidRuleset, channels_used, parse_ruleset
from rulesvc.plugins import builtin_channels
from rulesvc.runtime.rulesets import Rulesets
from tests.helpers import T0, event, load, run, write_ruleset

CHANNELS = builtin_channels().names()


def fraction(salt: str, contact: str, purpose: str) -> float:
    digest = hashlib.sha256(f"{salt}\x00{contact}\x00{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def remind(**send: Any) -> dict[str, Any]:
    return {
        "name": "remind",
        "when": {"event": "cart_updated"},
        "then": [{"send": {"channel": "log", "template": "cart/a", "after": "20m",
                           "cancel_on": ["purchased"], **send}}],
    }  # fmt: skip


GOAL = {"event": "purchased", "within": "5d", "value": "attributes.value"}
ARMS = [{"name": "a", "weight": 70}, {"name": "b", "weight": 30, "template": "cart/b", "after": "45m"}]


def errors(body: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(InvalidRuleset) as caught:
        parse_ruleset("x.json", json.dumps(body).encode(), CHANNELS)
    return {e.path: e.message for e in caught.value.errors}


def test_the_format_refuses_what_would_make_groups_ambiguous(tmp_path: Path) -> None:
    two_sends = {"rules": [remind(variants=ARMS), {**remind(variants=[ARMS[1], ARMS[0]]), "name": "again"}]}
    found = errors(two_sends)
    assert list(found) == ["$.rules[1].then[0].send.variants"]
    assert "same variants" in found["$.rules[1].then[0].send.variants"]
    found = errors({"rules": [remind(variants=[{"name": "holdout", "weight": 1}])]})
    assert "at least two" in found["$.rules[0].then[0].send.variants"]
    assert "held-out contacts" in found["$.rules[0].then[0].send.variants[0].name"]
    found = errors({"rules": [remind(variants=[{"name": "treatment", "weight": 1}, ARMS[0]])]})
    assert "choose another name" in found["$.rules[0].then[0].send.variants[0].name"]
    found = errors({"rules": [remind(variants=[ARMS[0], {"name": "b", "weight": 1, "channel": "fax"}])]})
    assert "unknown channel `fax`" in found["$.rules[0].then[0].send.variants[1].channel"]
    found = errors({"holdout": "60%", "rules": [remind()]})
    assert "0.5%" in found["$.holdout"] and "50%" in found["$.holdout"]
    found = errors({"goal": {**GOAL, "within": "0m"}, "rules": [remind()]})
    assert found == {"$.goal.within": "duration must be more than zero"}
    for share in ("0%", "0.1%", "50.5%"):
        assert "0.5%" in errors({"holdout": share, "rules": [remind()]})["$.holdout"], share
    empty_in = {**GOAL, "conditions": {"attributes.sku": {"in": []}}}
    folder = write_ruleset(tmp_path, "g", {"goal": empty_in, "rules": [remind()]}).parent
    rulesets = Rulesets(folder, CHANNELS)
    rulesets.reload()  # refused by the compiler, at the goal's own path
    assert [e.path for e in rulesets.errors()] == ["$.goal.conditions.attributes.sku.in"]
    thanks = {**remind(), "when": {"event": "purchased"}}  # the goal's own event: nobody could enter
    assert "no contact can enter" in errors({"goal": GOAL, "rules": [thanks]})["$.goal.event"]
    arm = {"name": "b", "weight": 1, "channel": "sms"}  # an arm's channel is one `check` and /readyz look at
    body = json.dumps({"rules": [remind(variants=[ARMS[0], arm])]}).encode()
    parsed = parse_ruleset("v.json", body, CHANNELS)
    assert channels_used(parsed)["sms"] == ["$.rules[0].then[0].send.variants[1]"]
    parse_ruleset("ok.json", json.dumps({"holdout": "0.5%", "salt": "q4", "goal": GOAL,
                                          "rules": [remind(variants=ARMS)]}).encode(), CHANNELS)  # fmt: skip


def test_held_out_contacts_are_decided_but_never_sent_and_the_share_is_the_hash_s(tmp_path: Path) -> None:
    rulesets = load(write_ruleset(tmp_path, "cart", {"holdout": "10%", "rules": [remind()]}).parent)
    contacts = [f"c{n}" for n in range(2000)]
    events = [event(f"e{n}", "cart_updated", c) for n, c in enumerate(contacts)]
    actions = run(rulesets, events)
    by_contact = {a.contact_id: a for a in actions}
    expected = {c for c in contacts if fraction("cart", c, "holdout") < 0.10}
    assert {c for c, a in by_contact.items() if a.status == "held_out"} == expected
    assert {c for c, a in by_contact.items() if a.status == "sent"} == set(contacts) - expected
    assert all(a.reason == "held_out" and a.variant == "holdout" for a in actions if a.status == "held_out")
    # 10 % of 2,000: within five standard deviations of 200.
    assert abs(len(expected) - 200) < 5 * math.sqrt(2000 * 0.1 * 0.9)
    # A salt of the file's own draws another group.
    rulesets = load(
        write_ruleset(tmp_path, "cart", {"holdout": "10%", "salt": "v2", "rules": [remind()]}).parent
    )
    again = {a.contact_id for a in run(rulesets, events) if a.status == "held_out"}
    assert again == {c for c in contacts if fraction("v2", c, "holdout") < 0.10} and again != expected


def test_arms_follow_their_weights_change_what_is_sent_and_stick(tmp_path: Path) -> None:
    rulesets = load(write_ruleset(tmp_path, "cart", {"rules": [remind(variants=ARMS)]}).parent)
    contacts = [f"c{n}" for n in range(10_000)]
    # Two carts per contact, a day apart: each gets two messages, both of its arm.
    events = [event(f"e{n}-{k}", "cart_updated", c, minutes=k * 1440) for n, c in enumerate(contacts)
              for k in range(2)]  # fmt: skip
    actions = [a for a in run(rulesets, events) if a.status == "sent"]
    assert len(actions) == 20_000
    arms: dict[str, set[str | None]] = {}
    for a in actions:
        arms.setdefault(a.contact_id, set()).add(a.variant)
        due = a.at - (T0 + timedelta(days=0 if a.message_id and "-0/" in a.message_id else 1))
        if a.variant == "b":
            assert (a.template, due) == ("cart/b", timedelta(minutes=45))
        else:
            assert (a.template, due) == ("cart/a", timedelta(minutes=20))
    assert all(len(given) == 1 for given in arms.values())  # sticky
    expected_b = {c for c in contacts if fraction("cart", c, "variant") >= 0.7}
    assert {c for c, given in arms.items() if given == {"b"}} == expected_b
    assert abs(len(expected_b) - 3000) < 5 * math.sqrt(10_000 * 0.3 * 0.7)


def view(contact: str = "c1") -> ContactView:
    return ContactView(contact, {}, {})


def engine_event(event_id: str, type_: str, minutes: float, **attributes: Any) -> EngineEvent:
    return EngineEvent(event_id, type_, "c1", T0 + timedelta(minutes=minutes), attributes)


def test_an_entry_opens_once_per_goal_window_and_converts_once(tmp_path: Path) -> None:
    body = {"holdout": "50%", "goal": GOAL, "rules": [remind(variants=ARMS)]}
    engine = load(write_ruleset(tmp_path, "cart", body).parent).engine()
    contact = view()
    now = T0 + timedelta(days=30)
    first = engine.evaluate(engine_event("u1", "cart_updated", 0), contact, now)
    assert [(e.ruleset, e.rule, e.at) for e in first.entered] == [("cart", "remind", T0)]
    group = first.entered[0].group
    assert group == ("holdout" if fraction("cart", "c1", "holdout") < 0.5 else
                     "a" if fraction("cart", "c1", "variant") < 0.7 else "b")  # fmt: skip
    assert not engine.evaluate(engine_event("u2", "cart_updated", 60), contact, now).entered  # in it
    bought = engine.evaluate(engine_event("p1", "purchased", 120, value=80.5), contact, now)
    assert bought.converted == [Converted("cart", "c1", group, T0, "remind", T0 + timedelta(minutes=120),
                                          80.5, "p1")]  # fmt: skip
    assert not bought.entered  # the goal's event is no entry
    assert not engine.evaluate(engine_event("p2", "purchased", 130), contact, now).converted  # one
    again = engine.evaluate(engine_event("u3", "cart_updated", 200), contact, now)
    assert [e.at for e in again.entered] == [T0 + timedelta(minutes=200)]  # converted: a new entry
    late = engine.evaluate(engine_event("p3", "purchased", 200 + 5 * 1440, value="x"), contact, now)
    assert not late.converted  # the window is over (5 days, end excluded)
    assert engine.evaluate(engine_event("u4", "cart_updated", 200 + 5 * 1440), contact, now).entered


def test_without_a_goal_a_contact_is_in_the_ruleset_while_something_is_pending(tmp_path: Path) -> None:
    engine = load(write_ruleset(tmp_path, "cart", {"rules": [remind()]}).parent).engine()
    contact, now = view(), T0 + timedelta(days=1)
    assert engine.evaluate(engine_event("u1", "cart_updated", 0), contact, now).entered
    assert not engine.evaluate(engine_event("u2", "cart_updated", 5), contact, now).entered  # re-armed
    engine.evaluate(engine_event("p1", "purchased", 10), contact, now)  # cancels the reminder
    assert engine.evaluate(engine_event("u3", "cart_updated", 15), contact, now).entered


def test_a_conversion_goes_to_the_last_message_sent_in_the_entry() -> None:
    conversion = Converted("cart", "c1", "b", T0, "remind", T0 + timedelta(hours=5), 10.0, "p1")

    def message(mid: str, hours: float, status: str = "sent", **fields: Any) -> dict[str, Any]:
        return {"_id": mid, "contact_id": "c1", "ruleset": "cart", "rule": f"r_{mid}", "channel": "push",
                "status": status, "sent_at": T0 + timedelta(hours=hours), **fields}  # fmt: skip

    found = attribute(conversion, [
        message("m1", 1), message("m2", 3, "opened", sent_channel="sms"), message("m3", 4, "bounced"),
        message("m4", 6), message("m5", -1), message("m6", 3.5, ruleset="other"),
        message("m7", 3.5, contact_id="c2"), message("m8", 3.6, "held_out"),
    ])  # fmt: skip
    assert (found.rule, found.channel, found.group, found.message_id) == ("r_m2", "sms", "b", "m2")
    assert attribute(conversion, []).message_id is None
    assert (attribute(conversion, []).rule, attribute(conversion, []).channel) == ("remind", "")


def test_only_a_firing_that_starts_something_is_an_entry_and_old_journeys_are_dropped(tmp_path: Path) -> None:
    emptied = {"name": "emptied", "when": {"event": "cart_emptied"}, "then": [{"cancel": ["*"]}]}
    plain = {**remind(), "name": "plain", "when": {"event": "wishlist"}}
    body = {"goal": GOAL, "rules": [remind(variants=ARMS), emptied, plain]}
    engine = load(write_ruleset(tmp_path, "cart", body).parent).engine()
    contact = view()
    contact.state["journeys"] = {"gone": {"at": 0.0, "until": 9e9, "group": "a", "rule": "r"}}
    contact.state["arms"] = {"gone": "a"}
    now = T0 + timedelta(days=1)
    assert not engine.evaluate(engine_event("x1", "cart_emptied", 0), contact, now).entered  # cancels only
    found = engine.evaluate(engine_event("w1", "wishlist", 1), contact, now)
    assert [e.rule for e in found.entered] == ["plain"]
    # A removed ruleset's journey and arm are dropped with the next entry; this one's are kept.
    assert set(contact.state["journeys"]) == {"cart"} and set(contact.state["arms"]) == {"cart"}
    # The contact's arm labels every message of the ruleset, those of sends without variants too.
    [message] = [e.message for e in found.schedule]
    assert message is not None and message["variant"] == contact.state["arms"]["cart"]
