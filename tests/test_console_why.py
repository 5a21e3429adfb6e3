"""The sentences the console shows for a message's fate, and the per-ruleset "why" answers: written out
here in full, as a person reads them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec

from rulesvc.core.messages import Message
from rulesvc.web.console.why import answers, event_state, sentence, will_not_send
from rulesvc.web.contact_schemas import ChannelState, EventSeen, RulesetState
from rulesvc.web.schemas import EventRecord

T = datetime(2026, 11, 27, 12, 3, tzinfo=UTC)


def msg(status: str, **fields: Any) -> Message:
    base: dict[str, Any] = {"message_id": "e1/cart_abandon/remind/1", "contact_id": "c1",
                            "ruleset": "cart_abandon", "rule": "remind", "channel": "email",
                            "template": "cart_abandon/email", "created_at": T}  # fmt: skip
    return Message(status=status, **{**base, **fields})  # type: ignore[arg-type]


def test_sentences() -> None:
    cases = [
        (msg("suppressed", reason="no_consent", detail="email: no marketing consent"),
         "not sent: the contact has no email consent"),
        (msg("suppressed", reason="no_consent", channel="push",
             detail="push: no marketing consent; email: no marketing consent"),
         "not sent: the contact has no push consent"),
        (msg("suppressed", reason="frequency_cap", detail="frequency cap: 3 email message(s) a day reached"),
         "not sent: the daily cap of email marketing messages for the contact was reached"),
        (msg("suppressed", reason="unreachable", detail="sms: no phone number", channel="sms"),
         "not sent: no usable sms address for the contact (no phone number)"),
        (msg("cancelled", reason="cancelled_by_event", detail="cancelled by purchased", cancelled_at=T),
         "cancelled by purchased at 2026-11-27 12:03 UTC"),
        (msg("cancelled", reason="cancelled_by_operator", cancelled_at=T),
         "cancelled by an operator at 2026-11-27 12:03 UTC"),
        (msg("held_out", reason="held_out"), None),
        (msg("sent", sent_at=T, sent_channel="sms"),
         "sent on sms (instead of email) at 2026-11-27 12:03 UTC"),
        (msg("clicked", sent_at=T), "sent on email at 2026-11-27 12:03 UTC, clicked"),
        (msg("scheduled", due_at=T), "waiting: due 2026-11-27 12:03 UTC"),
        (msg("dead", reason="provider_error", attempt=6, detail="gave up after 6 attempts: HTTP 500: "),
         "not sent: gave up after 6 attempts: HTTP 500; Retry sends it again"),
    ]  # fmt: skip
    for message, expected in cases:
        if expected is not None:
            assert sentence(message) == expected, message
    held = msg("held_out", reason="held_out")
    assert sentence(held, "5%") == (
        "held out: the contact is in the 5 % holdout of cart_abandon; decided, never sent"
    )


def test_answers_per_ruleset() -> None:
    states = [
        RulesetState("cart_abandon", "", False, "5%", [EventSeen("cart_updated", 2, T)], []),
        RulesetState("price_drop", "", False, None, [EventSeen("price_changed", 0, None)], []),
        RulesetState("lifecycle", "holdout", True, "5%", [EventSeen("signed_up", 1, T)], []),
    ]
    history = [msg("suppressed", reason="no_consent"), msg("sent", sent_at=T)]
    found = {a.ruleset: a for a in answers(states, history)}
    assert next(a.ruleset for a in answers(states, history)) == "cart_abandon"  # what decided something first
    assert found["cart_abandon"].summary == "1 sent, 1 not sent"
    assert (
        found["price_drop"].summary == "no message: this contact never did what it listens to (price_changed)"
    )
    assert found["lifecycle"].summary.startswith("no message: the contact did some of what it listens to")
    assert found["cart_abandon"].heard == ["cart_updated (2 times, last 2026-11-27 12:03 UTC)"]


def test_a_cut_history_does_not_claim_no_message() -> None:
    states = [RulesetState("price_drop", "", False, None, [EventSeen("price_changed", 4, T)], [])]
    (answer,) = answers(states, [msg("sent", sent_at=T)] * 3, complete=False)[1:]
    assert answer.summary.startswith("no message among the newest 3: the contact did some")


def event(kind: str, age: timedelta, state: str = "done", **fields: Any) -> EventRecord:
    """An event of `kind` that arrived at T, `age` after its own time."""
    return EventRecord(f"{kind}-{age}", kind, T - age, "c1", state=state, received_at=T, **fields)


CART = RulesetState("cart_abandon", "", False, None, [EventSeen("cart_updated", 1, T)], [], timeout="12h")


def test_an_event_older_than_the_timeout_was_ignored() -> None:
    (answer,) = answers([CART], [], events=[event("cart_updated", timedelta(hours=13))])
    assert answer.summary == "no message: ignored: older than 12h when it arrived"
    assert answer.notes == ["cart_updated at 2026-11-26 23:03 UTC: ignored: older than 12h when it arrived"]
    # In time: then no rule's conditions held.
    (answer,) = answers([CART], [], events=[event("cart_updated", timedelta(hours=11))])
    assert answer.summary.startswith("no message: the contact did some of what it listens to")
    assert answer.notes == []
    # Two events counted, one listed: the other may have been in time; the note still names the old one.
    twice = msgspec.structs.replace(CART, listens_to=[EventSeen("cart_updated", 2, T)])
    (answer,) = answers([twice], [], events=[event("cart_updated", timedelta(hours=13))])
    assert answer.summary.startswith("no message: the contact did some")
    assert len(answer.notes) == 1


def test_an_event_waiting_or_set_aside_says_so() -> None:
    (answer,) = answers([CART], [], events=[event("cart_updated", timedelta(0), "pending")])
    assert answer.summary == "no message yet: 1 of its events waiting for the rules"
    assert answer.notes == ["cart_updated at 2026-11-27 12:03 UTC: waiting for the rules"]
    quarantined = event("cart_updated", timedelta(0), "quarantined", attempts=3, error="KeyError: 'sku'")
    (answer,) = answers([CART], [], events=[quarantined])
    assert answer.summary == "no message: cart_updated set aside after 3 failures: KeyError: 'sku'"
    assert event_state(quarantined) == "set aside after 3 failures: KeyError: 'sku'"
    # One decided in time beside it: no rule's conditions held then; the note still names the other.
    twice = msgspec.structs.replace(CART, listens_to=[EventSeen("cart_updated", 2, T)])
    (answer,) = answers([twice], [], events=[quarantined, event("cart_updated", timedelta(hours=1))])
    assert answer.summary.startswith("no message: the contact did some of what it listens to")
    assert answer.notes == [
        "cart_updated at 2026-11-27 12:03 UTC: set aside after 3 failures: KeyError: 'sku'"
    ]


def channel(name: str, blocked_by: str | None = None, why: str | None = None, **fields: Any) -> ChannelState:
    base: dict[str, Any] = {"configured": True, "consent": True, "consent_needed": True,
                            "suppressed": False, "reachable": True, "unreachable": None, "cap": None,
                            "sent_today": None}  # fmt: skip
    return ChannelState(name, blocked_by=blocked_by, why=why, **{**base, **fields})


def test_a_pending_send_on_a_blocked_channel_will_not_be_sent() -> None:
    no_consent = channel("email", "no_consent", "email: no marketing consent", consent=False)
    waiting = msg("scheduled", due_at=T)
    assert will_not_send(waiting, [no_consent]) == (
        "will not be sent as things stand: the contact has no email consent"
    )
    assert will_not_send(msgspec.structs.replace(waiting, transactional=True), [no_consent]) is None
    # A fallback that can send takes it; one that cannot adds its own reason.
    with_push = msgspec.structs.replace(waiting, fallback=["push"])
    assert will_not_send(with_push, [no_consent, channel("push")]) is None
    assert will_not_send(with_push, [no_consent]) == (
        "will not be sent as things stand: the contact has no email consent; "
        "no plugin provides the push channel"
    )
    texted = msgspec.structs.replace(waiting, channel="sms", transactional=True)
    no_phone = channel("sms", "no_consent", "sms: no marketing consent", consent=None, reachable=False,
                       unreachable="no phone number")  # fmt: skip
    assert will_not_send(texted, [no_phone]) == (
        "will not be sent as things stand: no usable sms address for the contact (no phone number)"
    )
    off = channel("sms", "channel_not_configured", "sms: not configured", configured=False)
    assert (
        will_not_send(texted, [off]) == "will not be sent as things stand: the sms channel is not configured"
    )
