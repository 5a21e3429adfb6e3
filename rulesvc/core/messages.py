"""A contact's message history: one record per message a rule decided to send, with its fate."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

import msgspec

MessageStatus = Literal[
    "scheduled",
    "sending",
    "uncertain",  # the send was interrupted and may have arrived; not sent again
    "sent",
    "failed",
    "suppressed",
    "cancelled",
    "dead",
    "delivered",
    "opened",
    "clicked",
    "bounced",
    "blocked",
    "replied",
]


class Message(msgspec.Struct, omit_defaults=True, kw_only=True):
    message_id: str
    contact_id: str
    ruleset: str
    rule: str
    channel: str
    template: str
    status: MessageStatus
    reason: str | None = None
    transactional: bool = False
    created_at: datetime
    due_at: datetime | None = None
    sent_at: datetime | None = None
    sent_channel: str | None = None  # the channel used: `channel`, or a fallback
    attempt: int = 0
    provider_id: str | None = None
    params: dict[str, Any] = msgspec.field(default_factory=dict)
    outcomes: dict[str, datetime] = msgspec.field(default_factory=dict)


class MessageList(msgspec.Struct):
    messages: list[Message]
    next_before: datetime | None = None
