"""A message's fate in one sentence a marketer understands ("not sent: the contact has no email consent",
"cancelled by purchase at 12:03 UTC"), and a contact's per-ruleset answer to "why did they not get it".
Pure: from the API's own bodies (Message, ContactState), no I/O."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from rulesvc.core import reasons
from rulesvc.core.durations import parse_duration
from rulesvc.core.messages import Message
from rulesvc.web.contact_schemas import ChannelState, RulesetState
from rulesvc.web.schemas import EventRecord

PENDING = frozenset({"scheduled", "sending"})
SENT = frozenset({"sent", "delivered", "opened", "clicked", "replied"})


def as_json(value: Any) -> str:
    """A value from an event or a message, as indented JSON for a page: anything JSON has no word for (a
    time, a number type of the database) as its text, never an error."""
    return json.dumps(value, indent=2, ensure_ascii=False, default=str, sort_keys=True)


def hm(moment: datetime | None) -> str:
    return "" if moment is None else moment.strftime("%Y-%m-%d %H:%M UTC")


def _channel_of(message: Message) -> str:
    """The channel a suppression is about: the one its detail starts with (`email: no marketing
    consent`), else the one the rule named."""
    head, sep, _ = (message.detail or "").partition(":")
    return head if sep and head and " " not in head else message.channel


def not_sent(message: Message) -> str:
    """Why a suppressed message was not sent, from its reason code and the channel it concerns."""
    return reason_sentence(message.reason, _channel_of(message), message.detail or "")


def reason_sentence(code: str | None, channel: str, detail: str) -> str:
    """A send policy's reason code in words, about one channel (`detail`: the sentence it came with)."""
    sentences = {
        reasons.NO_CONSENT: f"the contact has no {channel} consent",
        reasons.UNREACHABLE: f"no usable {channel} address for the contact"
        + (f" ({detail.split(': ', 1)[-1]})" if detail else ""),
        reasons.SUPPRESSION_LIST: f"the contact is on the {channel} suppression list",
        reasons.FREQUENCY_CAP: f"the daily cap of {channel} marketing messages for the contact was reached",
        reasons.CHANNEL_NOT_CONFIGURED: f"the {channel} channel is not configured",
        reasons.CHANNEL_NOT_INSTALLED: f"no plugin provides the {channel} channel",
        reasons.CHANNEL_ERROR: f"the {channel} channel failed its checks",
        reasons.GUARD_FAILED: "the offer no longer holds" + (f" ({detail})" if detail else ""),
    }
    if code in sentences:
        return sentences[code]
    return reasons.REASONS[code][1] if code in reasons.REASONS else (detail or "no reason recorded")


def sentence(message: Message, holdout: str | None = None) -> str:
    """What happened to the message, for a person: the status in words with its reason and times."""
    status, at = message.status, message.cancelled_at
    used = message.sent_channel or message.channel
    fallback = f" (instead of {message.channel})" if used != message.channel else ""
    if status == "scheduled":
        if message.reason == reasons.QUIET_HOURS:
            return f"waiting for the end of quiet hours in the contact's time zone: due {hm(message.due_at)}"
        if message.retries and message.attempt == 0:
            return f"to be sent again (retried by an operator): due {hm(message.due_at)}"
        if message.attempt:
            return f"waiting to try again after attempt {message.attempt} failed: due {hm(message.due_at)}"
        return f"waiting: due {hm(message.due_at)}"
    if status == "sending":
        return f"being handed to the {used} provider now"
    if status in SENT:
        sent = f"sent on {used}{fallback} at {hm(message.sent_at)}"
        outcome = {"delivered": "delivered", "opened": "opened", "clicked": "clicked", "replied": "replied"}
        return sent + (f", {outcome[status]}" if status in outcome else "")
    if status == "suppressed":
        return "not sent: " + not_sent(message)
    if status == "held_out":
        share = f"the {holdout.replace('%', ' %')} holdout" if holdout else "the holdout group"
        return f"held out: the contact is in {share} of {message.ruleset}; decided, never sent"
    if status == "cancelled":
        when = f" at {hm(at)}" if at else ""
        if message.reason == reasons.CANCELLED_BY_EVENT:
            return f"{message.detail or 'cancelled by an event'}{when}"
        if message.reason == reasons.CANCELLED_BY_RULE:
            return f"{message.detail or 'cancelled by a rule'}{when}"
        if message.reason == reasons.REARMED:
            return f"replaced by a newer send when its trigger came again{when}"
        if message.reason == reasons.RULESET_REMOVED:
            return f"cancelled: its ruleset was removed{when}"
        if message.reason == reasons.CANCELLED_BY_OPERATOR:
            return f"{message.detail or 'cancelled by an operator'}{when}"
        return f"cancelled{when}"
    why = reasons.REASONS.get(message.reason or "", ("", message.detail or ""))[1]
    detail = f" ({message.detail})" if message.detail and message.detail != why else ""
    if status == "dead":
        said = (message.detail or "").strip().rstrip(":").strip()
        if said.startswith("gave up"):  # the scheduler's own words, with the provider's last answer
            return f"not sent: {said}; Retry sends it again"
        return f"not sent: gave up after {message.attempt} attempts: {why}{detail}; Retry sends it again"
    if status == "failed":
        return f"failed: {why}{detail}"
    if status == "uncertain":
        return (
            "may have arrived: the send was interrupted and is not repeated on its own; Retry sends it again"
        )
    if status == "bounced":
        return f"bounced on {used}: the address is marked invalid"
    if status == "blocked":
        return f"blocked: the recipient opted out of {used}; the channel is suppressed for the contact"
    return status


@dataclass
class RulesetAnswer:
    """One ruleset on the contact page's "why" panel: what it decided for the contact, and if nothing,
    which of the events it listens to the contact did (or never did)."""

    ruleset: str
    group: str
    holdout: str | None
    sent: list[Message] = field(default_factory=list)
    pending: list[Message] = field(default_factory=list)
    not_sent: list[Message] = field(default_factory=list)
    heard: list[str] = field(default_factory=list)  # "cart_updated (3 times, last ...)"
    never: list[str] = field(default_factory=list)  # event types the contact never sent
    notes: list[str] = field(default_factory=list)  # its events not decided, or ignored as too old
    summary: str = ""


def answers(
    rulesets: list[RulesetState],
    messages: list[Message],
    complete: bool = True,
    events: list[EventRecord] | None = None,
) -> list[RulesetAnswer]:
    """Per loaded ruleset (and any ruleset only the history names), rulesets that decided something
    for the contact first. `complete` false: `messages` are only the newest, so "no message" says so.
    `events`: the contact's newest events, for those of a ruleset still waiting, set aside or too old."""
    found: list[RulesetAnswer] = []
    by_ruleset: dict[str, list[Message]] = {}
    for m in messages:
        by_ruleset.setdefault(m.ruleset, []).append(m)
    known = {r.ruleset for r in rulesets}
    states = list(rulesets) + [
        RulesetState(name, "", False, None, [], []) for name in sorted(set(by_ruleset) - known)
    ]
    for state in states:
        mine = by_ruleset.get(state.ruleset, [])
        answer = RulesetAnswer(state.ruleset, state.group, state.holdout)
        answer.sent = [m for m in mine if m.status in SENT]
        answer.pending = [m for m in mine if m.status in PENDING]
        answer.not_sent = [m for m in mine if m.status not in SENT and m.status not in PENDING]
        for seen in state.listens_to:
            if seen.count:
                times = "once" if seen.count == 1 else f"{seen.count} times"
                answer.heard.append(f"{seen.type} ({times}, last {hm(seen.last_at)})")
            else:
                answer.never.append(seen.type)
        answer.summary = _summary(state, answer, mine)
        heard = [e for e in events or [] if e.type in {s.type for s in state.listens_to}]
        answer.notes = [f"{e.type} at {hm(e.time)}: {note}" for e in heard if (note := event_note(e, state))]
        if not mine and heard:
            answer.summary = _undecided(state, heard) or answer.summary
        if not mine and not complete:
            answer.summary = answer.summary.replace(
                "no message:", f"no message among the newest {len(messages)}:"
            )
        found.append(answer)
    found.sort(key=lambda a: (not (a.sent or a.pending or a.not_sent), a.ruleset))
    return found


def _summary(state: RulesetState, answer: RulesetAnswer, mine: list[Message]) -> str:
    parts = []
    if answer.sent:
        parts.append(f"{len(answer.sent)} sent")
    if answer.pending:
        parts.append(f"{len(answer.pending)} waiting")
    if answer.not_sent:
        parts.append(f"{len(answer.not_sent)} not sent")
    if mine:
        return ", ".join(parts)
    if not state.listens_to:
        return "no message: this ruleset is no longer loaded"
    if not answer.heard:
        never = ", ".join(answer.never)
        return f"no message: this contact never did what it listens to ({never})"
    return (
        "no message: the contact did some of what it listens to, but no rule's conditions held then "
        "(or a rule fires only once per period)"
    )


def event_state(event: EventRecord) -> str | None:
    """An event the rules have not decided: still waiting, or set aside (quarantined, or dropped)."""
    if event.state == "pending":
        return "waiting for the rules"
    if event.state == "quarantined":
        return f"set aside after {event.attempts or 0} failures: {event.error or 'no error recorded'}"
    if event.state == "dropped":
        return "set aside, then dropped by an operator: never decided"
    return None


def too_old(event: EventRecord, state: RulesetState) -> str | None:
    """The ruleset's `timeout` ignored the event (rulesvc.core.engine: it starts nothing there)."""
    if state.timeout is None or event.received_at is None or event.state not in (None, "done"):
        return None
    try:
        limit = parse_duration(state.timeout)
    except ValueError:
        return None
    if event.received_at - event.time > limit:
        return f"ignored: older than {state.timeout} when it arrived"
    return None


def event_note(event: EventRecord, state: RulesetState) -> str | None:
    return event_state(event) or too_old(event, state)


def _undecided(state: RulesetState, heard: list[EventRecord]) -> str | None:
    """The summary of a ruleset with no message whose events were not (yet) decided or too old; None
    when one of them was decided in time (then no rule's conditions held), or some are not in `heard`."""
    if sum(s.count for s in state.listens_to) != len(heard):
        return None
    old = [too_old(e, state) for e in heard]
    if any(e.state in (None, "done") and not o for e, o in zip(heard, old, strict=True)):
        return None
    for e in heard:
        if e.state == "quarantined":
            return f"no message: {e.type} {event_state(e)}"
    waiting = [e for e in heard if e.state == "pending"]
    if waiting:
        return f"no message yet: {len(waiting)} of its events waiting for the rules"
    return f"no message: {old[0]}" if all(old) else None


def will_not_send(message: Message, channels: list[ChannelState]) -> str | None:
    """A pending send that no channel it may use (its own, then its fallbacks) would take now, as the
    contact's channel states say: "will not be sent as things stand: ..."; None if one would."""
    by_name = {c.channel: c for c in channels}
    why = []
    for name in [message.channel, *message.fallback]:
        state = by_name.get(name)
        if state is None:
            why.append(reason_sentence(reasons.CHANNEL_NOT_INSTALLED, name, ""))
            continue
        code, detail = state.blocked_by, state.why or ""
        if message.transactional and code in (reasons.NO_CONSENT, reasons.FREQUENCY_CAP):
            # Consent and the daily cap are for marketing messages; the rest stops a transactional one too.
            code, detail = None, ""
            if state.suppressed:
                code = reasons.SUPPRESSION_LIST
            elif not state.reachable:
                code, detail = reasons.UNREACHABLE, f"{name}: {state.unreachable or 'no address'}"
        if code is None:
            return None
        why.append(reason_sentence(code, name, detail))
    return "will not be sent as things stand: " + "; ".join(why)
