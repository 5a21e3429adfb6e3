"""What the funnel counts: each decision and outcome of a ruleset is one `Increment` of an hourly counter
keyed by (hour, ruleset, rule, variant, channel). Pure: the store writes them (rulesvc.store.stats) in
the transaction of the decision they count, and the simulator can count the same way."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from rulesvc.core.messages import Fate
from rulesvc.core.ruleformat import HOLDOUT_GROUP

# Every status a count may have. `postponed` and `retried` count a decision to try again later (quiet
# hours or a cap; a provider's temporary error): a message postponed, then sent, counts once in each.
# `dismissed`: a dead or uncertain message an operator gave up on (it was counted dead or uncertain
# already; counting it `cancelled` too would make it two messages). The others count what a message
# became, or what happened to it (outcomes: once per message).
OUTCOMES: Final = ("delivered", "opened", "clicked", "replied", "bounced", "blocked")
COUNTED: Final = (
    "entered", "scheduled", "sent", "suppressed", "cancelled", "postponed", "retried", "failed", "dead",
    "held_out", "uncertain", "dismissed", *OUTCOMES, "converted",
)  # fmt: skip

# A dispatcher result's kind to the status it counts as (any other kind counts as itself).
KIND_STATUS: Final = {"retry": "retried"}

Key = tuple[str, str, str, str]  # ruleset, rule, variant, channel


@dataclass(frozen=True)
class Increment:
    """One count (`n`) of `status` (and its reason code) at `at`; `revenue` for a conversion."""

    at: datetime
    ruleset: str
    rule: str
    variant: str
    channel: str
    status: str
    reason: str | None = None
    n: int = 1
    revenue: float = 0.0

    @property
    def key(self) -> Key:
        return (self.ruleset, self.rule, self.variant, self.channel)


def hour_of(at: datetime) -> datetime:
    """The UTC hour a count falls in (its document's `hour`)."""
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return at.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def group_label(variant: str | None, held_out: bool) -> str:
    """The `variant` dimension: `holdout` for a held-out contact, else its arm, else ""."""
    return HOLDOUT_GROUP if held_out else (variant or "")


def message_key(message: Mapping[str, Any]) -> Key:
    """A message document's counter key: its group, and the channel used (else the one the rule named)."""
    return (
        str(message.get("ruleset") or ""),
        str(message.get("rule") or ""),
        group_label(message.get("variant"), bool(message.get("held_out"))),
        str(message.get("sent_channel") or message.get("channel") or ""),
    )


def message_increment(
    message: Mapping[str, Any], status: str, at: datetime, reason: str | None = None
) -> Increment:
    return Increment(at, *message_key(message), status=status, reason=reason)


def fate_increment(fate: Fate, at: datetime) -> Increment:
    """A told fate as a count; a dispatcher kind (`retry`) becomes its counted status (`retried`)."""
    group = group_label(fate.variant, fate.held_out)
    status = KIND_STATUS.get(fate.status, fate.status)
    return Increment(at, fate.ruleset, fate.rule, group, fate.channel or "", status, fate.reason)


@dataclass
class Tally:
    """The increments of one document: what one upsert adds."""

    hour: datetime
    key: Key
    counts: dict[str, int] = field(default_factory=dict)
    reasons: dict[str, dict[str, int]] = field(default_factory=dict)
    revenue: float = 0.0
    revenue_sq: float = 0.0


def safe_name(name: str) -> str:
    """A status or reason as a field name: no `.` (a path) nor leading `$` (an operator)."""
    name = name.replace(".", "_")
    return "_" + name[1:] if name.startswith("$") else name or "_"


def tally(increments: Iterable[Increment]) -> list[Tally]:
    """Increments added up per document (hour and key), so a batch writes one upsert per document.
    Each increment's revenue is one conversion's value: `revenue_sq` adds its square (for Welch)."""
    out: dict[tuple[datetime, Key], Tally] = {}
    for inc in increments:
        hour = hour_of(inc.at)
        t = out.get((hour, inc.key))
        if t is None:
            t = out[hour, inc.key] = Tally(hour, inc.key)
        status = safe_name(inc.status)
        t.counts[status] = t.counts.get(status, 0) + inc.n
        if inc.reason:
            per = t.reasons.setdefault(status, {})
            reason = safe_name(inc.reason)
            per[reason] = per.get(reason, 0) + inc.n
        if inc.revenue:
            t.revenue += inc.revenue
            t.revenue_sq += inc.revenue * inc.revenue
    return list(out.values())


def doc_id(t: Tally, shard: str) -> str:
    """A counter document's `_id`: deterministic, and unambiguous whatever the names contain."""
    return json.dumps([t.hour.strftime("%Y-%m-%dT%H"), *t.key, shard], separators=(",", ":"))


def upsert_of(t: Tally, shard: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The filter and update that add a tally to its document (created on first use)."""
    inc: dict[str, Any] = {f"counts.{s}": n for s, n in t.counts.items()}
    for status, per in t.reasons.items():
        inc.update({f"reasons.{status}.{r}": n for r, n in per.items()})
    if t.revenue or t.revenue_sq:
        inc |= {"revenue": t.revenue, "revenue_sq": t.revenue_sq}
    ruleset, rule, variant, channel = t.key
    key = {"hour": t.hour, "ruleset": ruleset, "rule": rule, "variant": variant, "channel": channel,
           "shard": shard}  # fmt: skip
    return {"_id": doc_id(t, shard)}, {"$inc": inc, "$setOnInsert": key}
