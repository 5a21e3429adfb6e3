"""What the overview counts, as pure arithmetic: the 24 h throughput series in UTC quarter hours, rates
per second, messages by channel and status from the funnel's counters, a channel's error rate. The
store counts (rulesvc.store.overview); this turns counts into what a person reads."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

BUCKET: Final = timedelta(minutes=15)
BUCKETS: Final = 96  # 24 h of quarter hours, the last one the current quarter so far
MINUTE: Final = timedelta(minutes=1)
DAY: Final = timedelta(hours=24)
HOUR: Final = timedelta(hours=1)  # the due queue looks this far ahead

# A send attempt's end as the funnel counts it: `sent`, or given up (`failed`: the provider said no;
# `dead`: retries ran out). `retried` and `uncertain` are neither yet.
FAILED_STATUSES: Final = ("failed", "dead")


def bucket_start(at: datetime, width: timedelta = BUCKET) -> datetime:
    """The start of the UTC bucket `at` falls in (buckets counted from the Unix epoch)."""
    at = at.astimezone(UTC) if at.tzinfo else at.replace(tzinfo=UTC)
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    return epoch + ((at - epoch) // width) * width


def series_start(now: datetime) -> datetime:
    """Where the 24 h series begins: `BUCKETS` buckets up to and including the one `now` is in."""
    return bucket_start(now) - (BUCKETS - 1) * BUCKET


@dataclass(frozen=True)
class Point:
    """One bucket: its start, how many events were accepted and decided in it, and those as rates per
    second over the part of the bucket that has passed (the whole bucket but for the current one)."""

    at: datetime
    accepted: int
    decided: int
    accepted_per_second: float
    decided_per_second: float


def series(accepted: Mapping[datetime, int], decided: Mapping[datetime, int], now: datetime) -> list[Point]:
    """Every bucket of the last 24 h, empty ones as zeros (a gap in a chart is a quiet quarter hour, not
    missing data); counts keyed by bucket start (as `bucket_start` gives it), others ignored."""
    start = series_start(now)
    points = []
    for i in range(BUCKETS):
        at = start + i * BUCKET
        seconds = min(BUCKET, now - at).total_seconds()
        a, d = int(accepted.get(at, 0)), int(decided.get(at, 0))
        points.append(Point(at, a, d, per_second(a, seconds), per_second(d, seconds)))
    return points


def now_window_start(now: datetime) -> datetime:
    """ "Now" is the last whole minute and the current one so far (60 to 120 s): events decided are
    counted per minute, and accepted ones over the same span, so the two rates compare."""
    return bucket_start(now, MINUTE) - MINUTE


def per_second(count: int, seconds: float) -> float:
    """A count over a span as a rate, to 3 decimals; 0 over an empty span."""
    return round(count / seconds, 3) if seconds > 0 else 0.0


def by_channel(rows: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, int]]:
    """Counter rows (`channel`, `counts {status: n}`) added up per channel and status, channels and
    statuses sorted; a row without a channel (an entry, a conversion credited to no message) is not a
    message and is left out, as are zero counts."""
    out: dict[str, dict[str, int]] = {}
    for row in rows:
        channel = str(row.get("channel") or "")
        if not channel:
            continue
        counts = out.setdefault(channel, {})
        for status, n in (row.get("counts") or {}).items():
            if isinstance(n, int) and not isinstance(n, bool) and n:
                counts[status] = counts.get(status, 0) + n
    return {c: dict(sorted(out[c].items())) for c in sorted(out) if out[c]}


@dataclass(frozen=True)
class SendHealth:
    """A channel's sends over a window: sent, given up (failed or dead), and the share given up among
    those that ended (None: none ended)."""

    sent: int
    failed: int
    error_rate: float | None


def send_health(counts: Mapping[str, int]) -> SendHealth:
    sent = int(counts.get("sent", 0))
    failed = sum(int(counts.get(s, 0)) for s in FAILED_STATUSES)
    ended = sent + failed
    return SendHealth(sent, failed, round(failed / ended, 4) if ended else None)
