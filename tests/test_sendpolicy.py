"""The send rules as a pure decision: no mongod, no channel objects, no clock; one call per case."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta
from typing import Any

import pytest

from rulesvc.core.sendpolicy import (
    HELD_OUT_DETAIL,
    QUIET_REASON,
    ChannelFacts,
    Facts,
    SendPolicy,
    Verdict,
    ask,
    capped_candidates,
    check,
    count_since,
    day_start,
    outcome_changes,
)

NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)  # 13:00 in Berlin: outside the usual quiet hours
OK = ChannelFacts()
ALL = {name: OK for name in ("email", "sms", "push", "webpush", "inapp", "log")}
QUIET = SendPolicy(quiet_start=time(21), quiet_end=time(8))
PLAIN = SendPolicy()


def message(channel: str = "push", **extra: Any) -> dict[str, Any]:
    return {"channel": channel, "template": "hello", "params": {}, "transactional": False, "fallback": [],
            **extra}  # fmt: skip


def contact(**extra: Any) -> dict[str, Any]:
    consent = {"email": True, "sms": True, "push": True, "webpush": True}
    return {"_id": "c1", "consent": consent, "timezone": "Europe/Berlin", **extra}


def decide(
    msg: dict[str, Any] | None = None,
    who: dict[str, Any] | None = None,
    channels: dict[str, ChannelFacts] | None = None,
    facts: Facts | None = None,
    now: datetime = NOW,
    policy: SendPolicy = PLAIN,
    **kw: Any,
) -> Verdict:
    return check(msg or message(), who or contact(), ALL if channels is None else channels, facts or Facts(),
                 now, policy, **kw)  # fmt: skip


def test_everything_allows_it() -> None:
    assert decide() == Verdict("send", "push")


# --- consent ---------------------------------------------------------------------------------------------


def test_marketing_needs_consent_for_its_channel() -> None:
    assert decide(who=contact(consent={"email": True})) == Verdict(
        "suppress", reason="no_consent", detail="push: no marketing consent"
    )
    assert decide(who=contact(consent={"push": False})).detail == "push: no marketing consent"
    assert decide(who={"_id": "c1"}).reason == "no_consent"


def test_transactional_needs_no_consent() -> None:
    assert decide(message(transactional=True), {"_id": "c1"}) == Verdict("send", "push")


@pytest.mark.parametrize("channel", ["inapp", "log"])
def test_the_shops_own_channels_need_no_consent(channel: str) -> None:
    assert decide(message(channel), {"_id": "c1"}) == Verdict("send", channel)


# --- the channel: installed, configured, its checks, suppression, reachability ---------------------------


def test_a_channel_not_installed() -> None:
    assert decide(message("sms"), channels={"push": OK}) == Verdict(
        "suppress", reason="channel_not_installed", detail="sms: channel not installed"
    )


def test_a_channel_not_configured_says_why() -> None:
    facts = {"push": ChannelFacts(configured=False, detail="missing setting(s): project_id")}
    verdict = decide(channels=facts)
    assert (verdict.kind, verdict.reason) == ("suppress", "channel_not_configured")
    assert verdict.detail == "push: not configured: missing setting(s): project_id"


def test_a_channel_whose_checks_failed_is_not_used() -> None:
    verdict = decide(channels={"push": ChannelFacts(error="channel error: KeyError")})
    assert (verdict.reason, verdict.detail) == ("channel_error", "push: channel error: KeyError")


def test_suppression_until_it_runs_out() -> None:
    forever = contact(state={"suppressed": {"push": {"since": 0, "until": None}}})
    assert decide(who=forever) == Verdict(
        "suppress", reason="suppression_list", detail="push: contact is on the suppression list"
    )
    later = (NOW + timedelta(hours=1)).timestamp()
    assert decide(who=contact(state={"suppressed": {"push": {"until": later}}})).kind == "suppress"
    over = (NOW - timedelta(seconds=1)).timestamp()
    assert decide(who=contact(state={"suppressed": {"push": {"until": over}}})) == Verdict("send", "push")
    assert decide(who=contact(state={"suppressed": {"email": {"until": None}}})) == Verdict("send", "push")


def test_suppression_applies_to_transactional_messages_too() -> None:
    blocked = contact(state={"suppressed": {"push": {"until": None, "reason": "blocked"}}})
    assert decide(message(transactional=True), blocked).reason == "suppression_list"


def test_unreachable_says_why() -> None:
    facts = {"push": ChannelFacts(unreachable="no push token")}
    assert decide(channels=facts) == Verdict("suppress", reason="unreachable", detail="push: no push token")
    assert decide(message(transactional=True), {"_id": "c1"}, facts).detail == "push: no push token"


def test_the_order_of_the_checks_decides_the_reason() -> None:
    """Not configured before suppression, before consent, before reachability: as the service says it."""
    gone = {"push": ChannelFacts(unreachable="no push token")}
    both = {"_id": "c1", "state": {"suppressed": {"push": {"until": None}}}}
    assert decide(who=both, channels=gone).reason == "suppression_list"
    assert decide(who={"_id": "c1"}, channels=gone).reason == "no_consent"
    off = {"push": ChannelFacts(configured=False, detail="off", unreachable="no push token")}
    assert decide(who=both, channels=off).reason == "channel_not_configured"


# --- fallback --------------------------------------------------------------------------------------------


def test_fallback_in_order_to_the_first_usable_channel() -> None:
    msg = message("push", fallback=["sms", "email"])
    no_token = {**ALL, "push": ChannelFacts(unreachable="no push token")}
    assert decide(msg, channels=no_token) == Verdict("send", "sms")
    no_phone = {**no_token, "sms": ChannelFacts(unreachable="no phone number")}
    assert decide(msg, channels=no_phone) == Verdict("send", "email")
    assert decide(msg, contact(consent={"email": True, "sms": True})) == Verdict("send", "sms")


def test_no_usable_channel_gives_every_reason() -> None:
    msg = message("push", fallback=["sms", "email"])
    channels = {
        "push": ChannelFacts(unreachable="no push token"),
        "email": ChannelFacts(unreachable="no email"),
    }
    who = contact(consent={"push": True, "email": True})
    assert decide(msg, who, channels) == Verdict(  # the code of the channel the rule named
        "suppress",
        reason="unreachable",
        detail="push: no push token; sms: channel not installed; email: no email",
    )


# --- guards ----------------------------------------------------------------------------------------------


def test_a_guard_that_no_longer_holds_suppresses_on_the_chosen_channel() -> None:
    msg = message(guard="price_still_lower", params={"product_id": "p1", "price": 80})
    assert decide(msg, facts=Facts(product={"price": 80})) == Verdict("send", "push")
    assert decide(msg, facts=Facts(product={"price": 95})) == Verdict(
        "suppress", "push", "guard_failed", detail="the price is no longer 80 (now 95)"
    )
    stock = message(guard="still_in_stock", params={"product_id": "p1"})
    assert (
        decide(stock, facts=Facts(product={"in_stock": False})).detail == "the product is out of stock again"
    )
    assert decide(stock, facts=Facts()).detail == "the product is out of stock again"  # unknown product


def test_a_guard_is_checked_before_quiet_hours() -> None:
    msg = message(guard="still_in_stock", params={"product_id": "p1"})
    night = datetime(2026, 11, 20, 23, 0, tzinfo=UTC)
    assert decide(msg, now=night, policy=QUIET).kind == "suppress"


# --- quiet hours -----------------------------------------------------------------------------------------


def test_quiet_hours_postpone_to_the_end_of_the_window_in_the_contacts_zone() -> None:
    evening = datetime(2026, 11, 20, 22, 30, tzinfo=UTC)  # 23:30 in Berlin
    assert decide(now=evening, policy=QUIET) == Verdict(
        "postpone",
        "push",
        "quiet_hours",
        datetime(2026, 11, 21, 7, 0, tzinfo=UTC),  # 08:00 in Berlin
        QUIET_REASON,
    )
    early = datetime(2026, 11, 21, 4, 0, tzinfo=UTC)  # 05:00 in Berlin, the same window
    assert decide(now=early, policy=QUIET).at == datetime(2026, 11, 21, 7, 0, tzinfo=UTC)
    assert decide(now=datetime(2026, 11, 21, 7, 0, tzinfo=UTC), policy=QUIET) == Verdict("send", "push")
    # 23:30 in Berlin is 17:30 in New York: not quiet there.
    new_york = contact(timezone="America/New_York")
    assert decide(who=new_york, now=evening, policy=QUIET) == Verdict("send", "push")


def test_quiet_hours_across_a_daylight_saving_change() -> None:
    autumn = datetime(2026, 10, 24, 22, 0, tzinfo=UTC)  # midnight in Berlin; clocks go back at 03:00
    assert decide(now=autumn, policy=QUIET).at == datetime(2026, 10, 25, 7, 0, tzinfo=UTC)  # 08:00 CET
    spring = datetime(2026, 3, 28, 23, 0, tzinfo=UTC)  # midnight in Berlin; clocks go forward at 02:00
    assert decide(now=spring, policy=QUIET).at == datetime(2026, 3, 29, 6, 0, tzinfo=UTC)  # 08:00 CEST


def test_a_window_within_one_day_and_the_default_zone() -> None:
    lunch = SendPolicy(quiet_start=time(12), quiet_end=time(14), default_timezone="America/New_York")
    noon_ny = datetime(2026, 11, 20, 17, 30, tzinfo=UTC)  # 12:30 in New York
    who = {"_id": "c1", "consent": {"push": True}}  # no zone of its own
    assert decide(who=who, now=noon_ny, policy=lunch).at == datetime(2026, 11, 20, 19, 0, tzinfo=UTC)
    unknown = {**who, "timezone": "Mars/Olympus"}  # an unknown zone counts as UTC
    assert decide(who=unknown, now=datetime(2026, 11, 20, 12, 30, tzinfo=UTC), policy=lunch).at == (
        datetime(2026, 11, 20, 14, 0, tzinfo=UTC)
    )


def test_quiet_hours_spare_transactional_messages_and_channels_that_do_not_interrupt() -> None:
    night = datetime(2026, 11, 20, 23, 0, tzinfo=UTC)
    assert decide(message(transactional=True), now=night, policy=QUIET) == Verdict("send", "push")
    assert decide(message("inapp"), now=night, policy=QUIET) == Verdict("send", "inapp")
    assert decide(now=night) == Verdict("send", "push")  # no quiet hours configured


def test_quiet_hours_apply_to_the_fallback_actually_used() -> None:
    night = datetime(2026, 11, 20, 23, 0, tzinfo=UTC)
    msg = message("push", fallback=["inapp"])
    no_token = {**ALL, "push": ChannelFacts(unreachable="no push token")}
    assert decide(msg, channels=no_token, now=night, policy=QUIET) == Verdict("send", "inapp")


# --- frequency caps --------------------------------------------------------------------------------------

CAPPED = SendPolicy(frequency_caps={"push": 2})


def test_a_cap_suppresses_once_reached() -> None:
    assert decide(policy=CAPPED, facts=Facts(sent_today={"push": 1})) == Verdict("send", "push")
    assert decide(policy=CAPPED, facts=Facts(sent_today={"push": 2})) == Verdict(
        "suppress", "push", "frequency_cap", detail="frequency cap: 2 push message(s) a day reached"
    )
    assert decide(message("email"), policy=CAPPED, facts=Facts(sent_today={"push": 5})) == Verdict(
        "send", "email"
    )


def test_transactional_messages_neither_count_against_nor_stop_at_a_cap() -> None:
    msg = message(transactional=True)
    assert capped_candidates(msg, CAPPED) == []
    assert decide(msg, policy=CAPPED, facts=Facts(sent_today={"push": 9})) == Verdict("send", "push")


def test_the_cap_of_the_fallback_used_counts() -> None:
    msg = message("email", fallback=["push"])
    assert capped_candidates(msg, CAPPED) == ["push"]
    channels = {**ALL, "email": ChannelFacts(unreachable="no email address")}
    assert decide(msg, channels=channels, policy=CAPPED, facts=Facts(sent_today={"push": 2})).detail == (
        "frequency cap: 2 push message(s) a day reached"
    )


def test_caps_count_per_local_day() -> None:
    """Midnight in the contact's zone starts a new day: 23:30 in Auckland counts from its own midnight."""
    late = datetime(2026, 11, 20, 10, 30, tzinfo=UTC)  # 23:30 on the 20th in Auckland (NZDT, +13)
    start = day_start({"timezone": "Pacific/Auckland"}, late, SendPolicy())
    assert start == datetime(2026, 11, 19, 11, 0, tzinfo=UTC)
    sends = [datetime(2026, 11, 19, 10, 59, tzinfo=UTC), datetime(2026, 11, 19, 11, 0, tzinfo=UTC), late]
    assert count_since(sends, start) == 2
    after_midnight = late + timedelta(hours=1)  # 00:30 on the 21st there: a new day
    assert count_since(sends, day_start({"timezone": "Pacific/Auckland"}, after_midnight, SendPolicy())) == 0
    assert day_start({}, late, SendPolicy()) == datetime(2026, 11, 20, 0, 0, tzinfo=UTC)


def test_quiet_hours_come_before_the_cap() -> None:
    both = SendPolicy(frequency_caps={"push": 1}, quiet_start=time(21), quiet_end=time(8))
    night = datetime(2026, 11, 20, 23, 0, tzinfo=UTC)
    assert decide(policy=both, now=night, facts=Facts(sent_today={"push": 1})).kind == "postpone"


# --- a send cut short, completed --------------------------------------------------------------------------


def test_completing_an_interrupted_send_only_chooses_the_channel_again() -> None:
    night = datetime(2026, 11, 20, 23, 0, tzinfo=UTC)
    both = SendPolicy(frequency_caps={"push": 1}, quiet_start=time(21), quiet_end=time(8))
    msg = message(guard="still_in_stock", params={"product_id": "p1"})
    facts = Facts(sent_today={"push": 1})
    assert decide(msg, now=night, policy=both, facts=facts, interrupted=True) == Verdict("send", "push")
    assert decide(msg, {"_id": "c1"}, interrupted=True).reason == "no_consent"


# --- the facts' sources ----------------------------------------------------------------------------------


def test_bad_news_changes_what_later_sends_see() -> None:
    assert outcome_changes("bounced", "email", 5.0) == ({"email_invalid": True}, {})
    assert outcome_changes("bounced", "sms", 5.0) == ({}, {})
    assert outcome_changes("blocked", "sms", 5.0) == ({}, {"sms": {"since": 5.0, "until": None,
                                                                  "reason": "blocked"}})  # fmt: skip
    assert outcome_changes("blocked", None, 5.0) == ({}, {})
    assert outcome_changes("opened", "email", 5.0) == ({}, {})


class _Channel:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail

    def status(self) -> tuple[bool, str]:
        return False, "missing setting(s): host"

    def reachable(self, contact: dict[str, Any]) -> str | None:
        if self.fail:
            raise KeyError("email")
        return None if contact.get("email") else "no email address"


def test_asking_a_channel() -> None:
    assert ask(_Channel(), {}) == ChannelFacts(False, "missing setting(s): host", "no email address")
    seen: list[Exception] = []
    assert ask(_Channel(fail=True), {}, seen.append) == ChannelFacts(error="channel error: KeyError")
    assert isinstance(seen[0], KeyError)


# --- holdout -----------------------------------------------------------------------------------------------


def test_a_held_out_message_meets_every_rule_first_and_is_then_held_not_sent() -> None:
    held = message(held_out=True, fallback=["email"])
    assert decide(held) == Verdict("hold", "push", "held_out", detail=HELD_OUT_DETAIL)
    # What would not have gone out is not "held out": the funnel compares real would-be sends.
    assert decide(held, contact(consent={})).kind == "suppress"
    assert decide(held, now=NOW.replace(hour=22), policy=QUIET).kind == "postpone"
    capped = SendPolicy(frequency_caps={"push": 1})
    assert decide(held, facts=Facts(sent_today={"push": 1}), policy=capped).reason == "frequency_cap"
    # The fallback it would have used is the channel it is held out on.
    assert decide(held, channels={**ALL, "push": ChannelFacts(unreachable="no token")}).channel == "email"
