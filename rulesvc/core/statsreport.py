"""What `GET /v1/stats` and `rulesvc stats` show: the funnel of a ruleset added up from its hourly counts,
and, for a ruleset with a holdout or A/B arms, each group's conversion rate and the uplift between groups.

Pure: the store adds the shards up (`store.stats.Stats.totals`), one row per rule, group and channel
(and bucket), read here as `Tally`s; the statistics are `core.uplift`'s. The view and the command share
this, so both say the same numbers in the same words.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

import msgspec

from rulesvc.core import uplift
from rulesvc.core.ruleformat import HOLDOUT_GROUP, NAME_PATTERN, TREATMENT_GROUP, RulesetFile, arms

# The statuses a count may have (core/funnel.py COUNTED), in funnel order: a reader sees each, zeros too.
STATUSES = (
    "entered",
    "scheduled",
    "sent",
    "suppressed",
    "held_out",
    "cancelled",
    "postponed",
    "retried",
    "failed",
    "dead",
    "uncertain",
    "dismissed",
    "delivered",
    "opened",
    "clicked",
    "replied",
    "bounced",
    "blocked",
    "converted",
)
Unit = Literal["hour", "day"]


@dataclass
class Tally:
    """Counts added up over shards (and hours): of one rule, group and channel, or of one bucket."""

    counts: dict[str, int] = field(default_factory=dict)
    reasons: dict[str, dict[str, int]] = field(default_factory=dict)
    revenue: float = 0.0
    revenue_sq: float = 0.0

    def add(self, other: Tally) -> None:
        for status, n in other.counts.items():
            self.counts[status] = self.counts.get(status, 0) + n
        for status, by in other.reasons.items():
            mine = self.reasons.setdefault(status, {})
            for reason, n in by.items():
                mine[reason] = mine.get(reason, 0) + n
        self.revenue += other.revenue
        self.revenue_sq += other.revenue_sq


@dataclass(frozen=True)
class Cell:
    """One rule, group (`variant` in the counts: `holdout`, an arm, or "") and channel, and its tally."""

    rule: str
    variant: str
    channel: str
    tally: Tally


def tally_of(row: Mapping[str, Any]) -> Tally:
    """A row of `store.stats.Stats.totals` (`counts`, `reasons`, `revenue`, `revenue_sq`)."""
    return Tally(
        {s: int(n) for s, n in row.get("counts", {}).items()},
        {s: {r: int(n) for r, n in by.items()} for s, by in row.get("reasons", {}).items()},
        float(row.get("revenue", 0.0)),
        float(row.get("revenue_sq", 0.0)),
    )


def cells_of(rows: Iterable[Mapping[str, Any]]) -> list[Cell]:
    return [Cell(str(r["rule"]), str(r["variant"]), str(r["channel"]), tally_of(r)) for r in rows]


def buckets_of(rows: Iterable[Mapping[str, Any]]) -> list[tuple[datetime, Tally]]:
    """Rows that carry their bucket (`at`), added up per bucket, in time order."""
    buckets: dict[datetime, Tally] = {}
    for row in rows:
        buckets.setdefault(row["at"], Tally()).add(tally_of(row))
    return sorted(buckets.items(), key=lambda item: item[0])


class Funnel(msgspec.Struct, kw_only=True):
    """Counts by status. Messages count in the hour their fate was decided (outcomes: when reported),
    entries and conversions in the hour of the event. `reasons`: status -> reason code -> count (why
    messages were suppressed, cancelled, postponed, failed...)."""

    entered: int = 0
    scheduled: int = 0
    sent: int = 0
    suppressed: int = 0
    held_out: int = 0
    cancelled: int = 0
    postponed: int = 0
    retried: int = 0  # a provider's temporary error: tried again later (once per retry)
    failed: int = 0
    dead: int = 0
    uncertain: int = 0
    dismissed: int = 0  # dead or uncertain, then given up on by an operator (counted there already)
    delivered: int = 0
    opened: int = 0
    clicked: int = 0
    replied: int = 0
    bounced: int = 0
    blocked: int = 0
    converted: int = 0
    revenue: float | None = 0.0  # null only beyond what a float holds (values of 1e308 added up)
    reasons: dict[str, dict[str, int]] = msgspec.field(default_factory=dict)


def funnel_of(tally: Tally) -> Funnel:
    counts = {s: int(tally.counts.get(s, 0)) for s in STATUSES}
    reasons = {s: dict(sorted(by.items())) for s, by in sorted(tally.reasons.items()) if by}
    return Funnel(**counts, revenue=_finite(round(tally.revenue, 6)), reasons=reasons)


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


class StatsWindow(msgspec.Struct):
    """[from, to): counts are hourly, so every hour that overlaps it is counted whole."""

    from_: datetime = msgspec.field(name="from")
    to: datetime


class FunnelRow(msgspec.Struct):
    """One rule, group and channel. `variant`: `holdout`, an A/B arm, or "" (no test); `channel`: ""
    for entries and for conversions credited to the entry (held-out or unmessaged contacts)."""

    rule: str
    variant: str
    channel: str
    funnel: Funnel


class SeriesPoint(msgspec.Struct):
    at: datetime  # the bucket's start (UTC hour, or UTC day)
    funnel: Funnel


class Interval(msgspec.Struct):
    low: float
    high: float


class Estimate(msgspec.Struct):
    """A number with its 95 % interval; null where undefined, and `why` says why."""

    value: float | None
    ci: Interval | None
    why: str | None = None


class GroupStats(msgspec.Struct, kw_only=True):
    """One group of contacts: `holdout`, an A/B arm, or `treatment` (every contact not held out).
    Rates are per entry: conversions / entries; revenue per entry counts an entry without a conversion
    as 0."""

    group: str
    entries: int
    conversions: int
    conversion_rate: float | None  # None without entries
    conversion_rate_ci: Interval | None  # Wilson score, 95 %
    revenue: float | None  # null only beyond what a float holds
    revenue_per_entry: float | None


class Comparison(msgspec.Struct, kw_only=True):
    """`group` against `baseline` (the holdout, or the first arm); differences are group - baseline.
    `absolute_uplift`: in rate (0.012 = 1.2 points, Newcombe); `relative_uplift`: rate ratio - 1
    (0.41 = +41 %, Katz log); `revenue_per_entry_difference`: Welch. Below the minimum sample the
    numbers are still given, with `enough_data` false, `significant` false and a note."""

    group: str
    baseline: str
    enough_data: bool
    significant: bool  # the absolute uplift's interval excludes 0, with enough data
    absolute_uplift: Estimate
    relative_uplift: Estimate
    revenue_per_entry_difference: Estimate
    note: str | None = None


class StatsReport(msgspec.Struct, kw_only=True):
    ruleset: str
    rule: str | None
    window: StatsWindow
    by: Unit | None
    funnel: Funnel
    rows: list[FunnelRow]
    series: list[SeriesPoint] | None
    groups: list[GroupStats]
    comparisons: list[Comparison]
    method: str | None  # how the intervals are computed; None when there is nothing to compare
    # Per group, below either: a comparison says "not enough data" (core/uplift.py says why these).
    minimum_entries: int
    minimum_conversions: int


@dataclass(frozen=True)
class Design:
    """What the ruleset tests, as far as it is known: its holdout, its arms in their declared order.
    A removed ruleset's design comes from the counts alone."""

    holdout: bool = False
    arms: tuple[str, ...] = ()


def design_of(configured: Design | None, cells: Iterable[Cell]) -> Design:
    """The configured design, widened by what the counts show (a holdout or an arm since removed
    still has contacts in the window); arms seen only in the counts come after, by name."""
    seen = {c.variant for c in cells if c.variant}
    holdout = (configured is not None and configured.holdout) or HOLDOUT_GROUP in seen
    declared = list(configured.arms) if configured is not None else []
    extra = sorted(seen - set(declared) - {HOLDOUT_GROUP})
    return Design(holdout, tuple(declared + extra))


def _group_tally(cells: Iterable[Cell], variants: set[str]) -> Tally:
    total = Tally()
    for c in cells:
        if c.variant in variants:
            total.add(c.tally)
    return total


DEFAULT_SPAN = timedelta(days=7)
# A series of more points than this is refused (422 on `by`): a year by hour is a page no one reads.
MAX_POINTS = 5000
UNIT_LENGTH = {"hour": timedelta(hours=1), "day": timedelta(days=1)}


@dataclass(frozen=True)
class WindowProblem:
    field: str
    message: str


def stats_window(
    start: datetime | None, end: datetime | None, by: Unit | None, now: datetime
) -> StatsWindow | WindowProblem:
    """[from, to): by default the 7 days up to the end of the current hour (so this hour's counts are
    in); a start at or after the end, or a series of more than MAX_POINTS buckets, is refused."""
    try:
        if end is None:
            end = now.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
        if start is None:
            start = end - DEFAULT_SPAN
    except OverflowError:  # an end in the first week of the year 1, less 7 days
        return WindowProblem("to", "is too early for a 7-day window; give its start as well")
    if start >= end:
        return WindowProblem("from", "the window is empty: its start is not before its end")
    if by is not None and (end - start) / UNIT_LENGTH[by] > MAX_POINTS:
        return WindowProblem(
            "by",
            f"a series by {by} over this window has more than {MAX_POINTS} points: use a shorter window"
            + (" or by=day" if by == "hour" else ""),
        )
    return StatsWindow(start, end)


def name_problem(name: str, what: str) -> str | None:
    """Why `name` cannot name a ruleset or rule (`what`), as the ruleset format says."""
    if re.fullmatch(NAME_PATTERN, name) is None:
        return f"must be a {what} name: a lower case letter, then lower case letters, digits and _"
    return None


def design_of_source(source: RulesetFile) -> Design:
    """What a loaded ruleset tests: its holdout, its arms in declared order."""
    return Design(source.holdout is not None, tuple(v.name for v in arms(source)))


TOO_LARGE = "revenue too large to compute with"


@dataclass(frozen=True)
class Totals:
    """A group's totals for `core.uplift`. Revenue beyond a float's range (values near 1e308 added up)
    is not known: the rates are still compared, revenue is not."""

    group: uplift.Group
    revenue_known: bool


def totals_of(name: str, tally: Tally) -> Totals:
    known = math.isfinite(tally.revenue) and math.isfinite(tally.revenue_sq)
    entries, conversions = (max(0, int(tally.counts.get(s, 0))) for s in ("entered", "converted"))
    if not known:
        return Totals(uplift.Group(name, entries, conversions), False)
    return Totals(uplift.Group(name, entries, conversions, tally.revenue, max(0.0, tally.revenue_sq)), True)


def _interval(found: uplift.Interval | None) -> Interval | None:
    return Interval(found.low, found.high) if found is not None else None


def _estimate(found: uplift.Estimate) -> Estimate:
    return Estimate(found.value, _interval(found.interval), found.why or None)


def group_stats(totals: Totals) -> GroupStats:
    group = totals.group
    rated = 0 < group.entries and group.conversions <= group.entries
    known = totals.revenue_known
    return GroupStats(
        group=group.name,
        entries=group.entries,
        conversions=group.conversions,
        conversion_rate=group.conversions / group.entries if rated else None,
        conversion_rate_ci=_interval(uplift.wilson(group.conversions, group.entries)) if rated else None,
        revenue=_finite(round(group.revenue, 6)) if known else None,
        revenue_per_entry=_finite(group.revenue / group.entries) if known and group.entries else None,
    )


def comparison(totals: Totals, baseline: Totals) -> Comparison:
    found = uplift.compare(totals.group, baseline.group)
    revenue = _estimate(found.revenue_per_entry_difference)
    if not (totals.revenue_known and baseline.revenue_known):
        revenue = Estimate(None, None, TOO_LARGE)
    return Comparison(
        group=totals.group.name,
        baseline=baseline.group.name,
        enough_data=found.enough_data,
        significant=found.significant,
        absolute_uplift=_estimate(found.absolute_uplift),
        relative_uplift=_estimate(found.relative_uplift),
        revenue_per_entry_difference=revenue,
        note=found.note or None,
    )


def groups_of(design: Design, cells: Sequence[Cell]) -> list[Totals]:
    """The groups a test compares, in reading order: `treatment` (every contact not held out: with a
    holdout), each arm as declared, `holdout`."""
    groups = []
    if design.holdout:
        others = {c.variant for c in cells} - {HOLDOUT_GROUP}
        groups.append(totals_of(TREATMENT_GROUP, _group_tally(cells, others)))
    groups.extend(totals_of(arm, _group_tally(cells, {arm})) for arm in design.arms)
    if design.holdout:
        groups.append(totals_of(HOLDOUT_GROUP, _group_tally(cells, {HOLDOUT_GROUP})))
    return groups


def comparisons_of(design: Design, groups: Sequence[Totals]) -> list[Comparison]:
    """With a holdout: the treatment, then each arm, against it (what the flow causes); with two arms or
    more: each arm against the first (which arm wins)."""
    by_name = {g.group.name: g for g in groups}
    found = []
    if design.holdout:
        holdout = by_name[HOLDOUT_GROUP]
        found.append(comparison(by_name[TREATMENT_GROUP], holdout))
        found.extend(comparison(by_name[arm], holdout) for arm in design.arms)
    if len(design.arms) > 1:
        first = by_name[design.arms[0]]
        found.extend(comparison(by_name[arm], first) for arm in design.arms[1:])
    return found


def build(
    ruleset: str,
    rule: str | None,
    window: StatsWindow,
    by: Unit | None,
    cells: Sequence[Cell],
    buckets: Sequence[tuple[datetime, Tally]] | None,
    configured: Design | None,
) -> StatsReport:
    """The report of `cells` (one per rule, group and channel, shards and hours added up) and, with
    `by`, of each bucket; `configured`: the loaded ruleset's holdout and arms (None: not loaded)."""
    total = Tally()
    for c in cells:
        total.add(c.tally)
    rows = [
        FunnelRow(c.rule, c.variant, c.channel, funnel_of(c.tally))
        for c in sorted(cells, key=lambda c: (c.rule, c.variant, c.channel))
    ]
    design = design_of(configured, cells)
    groups = groups_of(design, cells)
    return StatsReport(
        ruleset=ruleset,
        rule=rule,
        window=window,
        by=by,
        funnel=funnel_of(total),
        rows=rows,
        series=None if buckets is None else [SeriesPoint(at, funnel_of(t)) for at, t in buckets],
        groups=[group_stats(g) for g in groups],
        # One rule's entries and the conversions credited to it are not two groups' outcomes (a holdout's
        # conversions go to the entry rule, a messaged contact's to its last message's): whole ruleset only.
        comparisons=[] if rule is not None else comparisons_of(design, groups),
        method=uplift.METHOD if groups else None,
        minimum_entries=uplift.MIN_ENTRIES,
        minimum_conversions=uplift.MIN_CONVERSIONS,
    )


def _pct(rate: float | None) -> str:
    return "-" if rate is None else f"{rate * 100:.1f} %"


def _rate(g: GroupStats) -> str:
    ci = g.conversion_rate_ci
    return _pct(g.conversion_rate) + (f" ({ci.low * 100:.1f}-{ci.high * 100:.1f})" if ci else "")


def _signed(value: float | None, unit: str, scale: float = 100.0, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value * scale:+.{digits}f}{unit}"


def _range(ci: Interval | None, unit: str, scale: float = 100.0, digits: int = 1) -> str:
    if ci is None:
        return ""
    return f" ({ci.low * scale:.{digits}f}{unit} to {ci.high * scale:.{digits}f}{unit})"


def comparison_line(c: Comparison, groups: dict[str, GroupStats]) -> str:
    """`treatment 4.1 % (3.6-4.7) vs holdout 2.9 % (2.0-4.1): +1.2 pts (0.1 to 2.3), +41 % (3 % to
    93 %), revenue per entry +0.35 (-0.10 to 0.80) — significant`."""
    a, r, m = c.absolute_uplift, c.relative_uplift, c.revenue_per_entry_difference
    verdict = "significant" if c.significant else "not significant" if c.enough_data else "not enough data"
    return (
        f"{c.group} {_rate(groups[c.group])} vs {c.baseline} {_rate(groups[c.baseline])}: "
        f"{_signed(a.value, ' pts')}{_range(a.ci, '')}, "
        f"{_signed(r.value, ' %', digits=0)}{_range(r.ci, ' %', digits=0)}, "
        f"revenue per entry {_signed(m.value, '', 1.0, 2)}{_range(m.ci, '', 1.0, 2)} — {verdict}"
    )


def _table(header: list[str], lines: list[list[str]], left: int) -> list[str]:
    """Columns as wide as their widest cell: the first `left` ones names (left-aligned), then numbers."""
    rows = [header, *lines]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    cells = [enumerate(zip(row, widths, strict=True)) for row in rows]
    return ["  " + "  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in row) for row in cells]


def _money(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def report_text(report: StatsReport) -> str:
    """The report as a person reads it in a terminal: the funnel, the rows, the series, the groups and
    what the comparisons say."""
    w = report.window
    scope = f" rule {report.rule}" if report.rule else ""
    out = [f"{report.ruleset}{scope}: {w.from_:%Y-%m-%d %H:%M} to {w.to:%Y-%m-%d %H:%M} UTC", ""]
    f = report.funnel
    out.append("funnel")
    for status in STATUSES:
        n = getattr(f, status)
        why = {r: k for r, k in f.reasons.get(status, {}).items() if r != status}  # held_out: held_out
        said = ", ".join(f"{reason} {k}" for reason, k in sorted(why.items(), key=lambda i: (-i[1], i[0])))
        out.append(f"  {status:<11} {n:>9}" + (f"   ({said})" if said else ""))
    out.append(f"  {'revenue':<11} {_money(f.revenue):>9}")
    shown = [s for s in STATUSES if any(getattr(r.funnel, s) for r in report.rows)]
    if report.rows:
        out += ["", "per rule, group and channel"]
        header = ["rule", "group", "channel", *shown, "revenue"]
        lines = [
            [r.rule, r.variant or "-", r.channel or "-", *(str(getattr(r.funnel, s)) for s in shown),
             _money(r.funnel.revenue)]
            for r in report.rows
        ]  # fmt: skip
        out += _table(header, lines, 3)
    if report.series is not None:
        shown = [s for s in STATUSES if any(getattr(p.funnel, s) for p in report.series)] or ["entered"]
        out += ["", f"by {report.by} (UTC)"]
        stamp = "%Y-%m-%d %H:00" if report.by == "hour" else "%Y-%m-%d"
        lines = [
            [f"{p.at:{stamp}}", *(str(getattr(p.funnel, s)) for s in shown), _money(p.funnel.revenue)]
            for p in report.series
        ]
        out += _table(["at", *shown, "revenue"], lines, 1)
    if report.groups:
        out += ["", "groups (rates per entry, 95 % intervals)"]
        header = ["group", "entries", "conversions", "rate", "revenue", "per entry"]
        lines = [
            [g.group, str(g.entries), str(g.conversions), _rate(g), _money(g.revenue),
             "-" if g.revenue_per_entry is None else f"{g.revenue_per_entry:.2f}"]
            for g in report.groups
        ]  # fmt: skip
        out += _table(header, lines, 1)
        by_name = {g.group: g for g in report.groups}
        out += ["", "comparisons"]
        for c in report.comparisons:
            out.append("  " + comparison_line(c, by_name))
            if c.note:
                out.append(f"    {c.note}")
        out += ["", f"method: {report.method}"]
    return "\n".join(out) + "\n"
