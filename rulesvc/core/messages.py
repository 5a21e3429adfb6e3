"""A contact's message history: one record per message a rule decided to send, with its fate."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec

from rulesvc.core.reasons import REASONS

REASON_DOC = "why the message is not (or not yet) sent: a reason code (docs/channels.md, 'Reason codes')"
DETAIL_DOC = "the reason in words: which channel, what the provider answered"

MessageStatus = Literal[
    "scheduled",
    "sending",
    "uncertain",  # the send was interrupted and may have arrived; not sent again
    "sent",
    "failed",
    "suppressed",
    "held_out",  # the contact is in the ruleset's holdout group: decided as sent, not sent
    "cancelled",
    "dead",
    "delivered",
    "opened",
    "clicked",
    "bounced",
    "blocked",
    "replied",
]

# A provider was handed it and did not refuse it: the statuses a message may have after a real send.
SENT_STATUSES = frozenset({"sent", "delivered", "opened", "clicked", "replied"})


class Message(msgspec.Struct, omit_defaults=True, kw_only=True):
    message_id: str
    contact_id: str
    ruleset: str
    rule: str
    channel: str
    template: str
    status: MessageStatus
    # Why it is not (or not yet) sent: a stable code (docs/channels.md lists them), to filter and count
    # by; `detail` is the sentence for a person (which channel, what the provider said).
    reason: Annotated[str, msgspec.Meta(description=REASON_DOC, examples=sorted(REASONS))] | None = None
    detail: Annotated[str, msgspec.Meta(description=DETAIL_DOC)] | None = None
    transactional: bool = False
    variant: str | None = None  # the contact's A/B arm in the ruleset
    held_out: bool = False  # the contact is in the ruleset's holdout group: this message is never sent
    created_at: datetime
    due_at: datetime | None = None
    sent_at: datetime | None = None
    sent_channel: str | None = None  # the channel used: `channel`, or a fallback
    fallback: list[str] = msgspec.field(default_factory=list)  # tried in turn when `channel` cannot send
    attempt: int = 0
    provider_id: str | None = None
    params: dict[str, Any] = msgspec.field(default_factory=dict)
    outcomes: dict[str, datetime] = msgspec.field(default_factory=dict)
    cancelled_at: datetime | None = None
    retries: int = 0  # times an operator sent it again (POST /v1/messages/{id}/retry)
    retried_at: datetime | None = None


class MessageList(msgspec.Struct):
    """`next_before` and `next_before_id` together ask for the next page (`before`, `before_id`)."""

    messages: list[Message]
    next_before: datetime | None = None
    next_before_id: str | None = None

    @classmethod
    def page(cls, messages: list[Message], more: bool) -> MessageList:
        if not more or not messages:
            return cls(messages)
        return cls(messages, messages[-1].created_at, messages[-1].message_id)


@dataclass(frozen=True)
class Fate:
    """One outcome of one message, as its log line and the metrics tell it: ids and codes only, never
    the contact's addresses or the message's content."""

    message_id: str
    contact_id: str
    ruleset: str
    rule: str
    channel: str | None  # the channel used, else the one the rule named
    status: str  # sent, failed, suppressed, postponed, retry, dead, uncertain, cancelled, scheduled, ...
    reason: str | None = None
    attempt: int = 0
    latency: float | None = None  # seconds of the provider call, for a send
    variant: str | None = None  # the contact's arm in the ruleset, if it has variants
    held_out: bool = False  # the contact is in the ruleset's holdout


def fate_of(doc: dict[str, Any], status: str, reason: str | None = None) -> Fate:
    """The fate of a stored message (its document, or the part of it with these fields)."""
    return Fate(str(doc["_id"]), str(doc.get("contact_id")), str(doc.get("ruleset")), str(doc.get("rule")),
                doc.get("sent_channel") or doc.get("channel"), status, reason,
                int(doc.get("attempt") or 0), variant=doc.get("variant"),
                held_out=bool(doc.get("held_out")))  # fmt: skip
