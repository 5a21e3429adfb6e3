"""A rule's counts in words, each with its unit: the messages by fate add up to the messages made, and
those scheduled but not decided yet are `waiting` (counts by hand here)."""

from __future__ import annotations

from rulesvc.web.console.rulesets import fates_of, messages_line, outcomes_line


def test_messages_by_fate_with_waiting() -> None:
    # 8 messages made; 4 suppressed when due, 1 sent, 3 not due yet.
    counts = {"entered": 4, "scheduled": 8, "suppressed": 4, "sent": 1, "delivered": 1}
    assert fates_of(counts)["waiting"] == 3
    assert messages_line(counts) == "8 messages: 3 waiting, 1 sent, 4 suppressed"
    assert outcomes_line(counts) == "Of 1 message sent: 1 delivered, 0 opened, 0 clicked"


def test_decided_in_the_window_but_scheduled_before_it() -> None:
    # Counts are by hour: a window may hold a message's fate without its scheduling.
    counts = {"scheduled": 1, "sent": 2, "dead": 1}
    assert fates_of(counts)["waiting"] == 0
    assert messages_line(counts) == "3 messages: 2 sent, 1 failed"
