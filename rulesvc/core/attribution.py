"""Which message of a ruleset a conversion is credited to: the last one the contact actually got.

Last touch within the entry, as Braze and Klaviyo attribute by default: simple to explain and to check
by hand. A held-out contact, or one whose messages were all cancelled or suppressed, converts "on the
entry": its rule, no channel. That is what makes the holdout comparison fair: both groups count every
entry, messaged or not.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from rulesvc.core.engine import Converted
from rulesvc.core.messages import SENT_STATUSES


@dataclass(frozen=True)
class Attribution:
    rule: str
    channel: str  # "" when credited to the entry
    group: str
    message_id: str | None


def attribute(conversion: Converted, messages: Iterable[Mapping[str, Any]]) -> Attribution:
    """`messages`: the contact's messages (documents, or the same fields); those of other contacts or
    rulesets, not sent, or sent outside the entry's window up to the conversion are passed over."""
    best: tuple[datetime, str] | None = None
    chosen: Mapping[str, Any] | None = None
    for message in messages:
        sent_at = message.get("sent_at")
        if (
            message.get("contact_id") != conversion.contact_id
            or message.get("ruleset") != conversion.ruleset
            or message.get("status") not in SENT_STATUSES
            or not isinstance(sent_at, datetime)
            or not conversion.entered_at <= sent_at <= conversion.at
        ):
            continue
        key = (sent_at, str(message.get("_id")))
        if best is None or key > best:
            best, chosen = key, message
    if chosen is None:
        return Attribution(conversion.entry_rule, "", conversion.group, None)
    channel = chosen.get("sent_channel") or chosen.get("channel") or ""
    return Attribution(str(chosen.get("rule")), str(channel), conversion.group, str(chosen.get("_id")))
