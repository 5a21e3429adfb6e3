"""The sentences the console shows for a message's fate, and the per-ruleset "why" answers: written out
here in full, as a person reads them."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from rulesvc.core.messages import Message
from rulesvc.web.console.why import answers, sentence
from rulesvc.web.contact_schemas import EventSeen, RulesetState

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
