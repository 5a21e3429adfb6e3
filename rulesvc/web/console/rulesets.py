"""The Rulesets pages: every ruleset with its rules, file, status and load errors; one ruleset with each
rule's funnel over a window, the uplift of its holdout or A/B test, its file's text, and a panel that
checks a pasted candidate as `rulesvc check` does (writing nothing).

Data from the API's operations: `views.rulesets` (list, detail, check) and `views.stats` (the funnel of
`GET /v1/stats`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Annotated, Literal

import msgspec
from aiohttp import web

from rulesvc.core.statsreport import Funnel, FunnelRow, StatsReport
from rulesvc.web.console.base import ConsoleRoute, error_page, form_of, render
from rulesvc.web.keys import RULESETS
from rulesvc.web.schemas import RulesetChecked, RulesetDetail, RulesetRejected
from rulesvc.web.stats_schemas import StatsQuery
from rulesvc.web.views.base import ApiError, QueryRejected, parse_query
from rulesvc.web.views.rulesets import check_ruleset, ruleset_detail, ruleset_list
from rulesvc.web.views.stats import stats_report

WINDOWS: dict[str, tuple[str, timedelta]] = {
    "24h": ("last 24 hours", timedelta(hours=24)),
    "7d": ("last 7 days", timedelta(days=7)),
    "30d": ("last 30 days", timedelta(days=30)),
}
# The candidate a person pastes: as large as the API takes a ruleset body, no larger.
MAX_CANDIDATE = 1_000_000


class RulesetPageQuery(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    window: Annotated[Literal["24h", "7d", "30d"], msgspec.Meta(description="the funnel's window")] = "7d"


@dataclass
class ChannelCounts:
    channel: str
    counts: dict[str, int]
    fates: dict[str, int]  # FATES' keys present in the rule, waiting first, zeros kept


# What became of a message, in the order a person reads it. `waiting`: scheduled and not decided yet
# (every message counts `scheduled` when made, then once more when its fate is decided). `failed`
# adds up `failed` and `dead` (gave up after retries).
FATES: tuple[tuple[str, str], ...] = (
    ("waiting", "waiting"),
    ("sent", "sent"),
    ("suppressed", "suppressed"),
    ("held_out", "held out"),
    ("cancelled", "cancelled"),
    ("failed", "failed"),
    ("uncertain", "uncertain"),
)
# Each fate's colour (Okabe-Ito, as charts.PALETTE), the same in every rule's chart.
FATE_COLOURS = {"waiting": "#56B4E9", "sent": "#009E73", "suppressed": "#E69F00", "held out": "#CC79A7",
                "cancelled": "#0072B2", "failed": "#D55E00", "uncertain": "#F0E442"}  # fmt: skip
OUTCOME_LABELS = (("delivered", "delivered"), ("opened", "opened"), ("clicked", "clicked"),
                  ("bounced", "bounced"))  # fmt: skip


def fates_of(counts: dict[str, int]) -> dict[str, int]:
    """Messages by fate. Counts are by the hour of each step, so in a window a message decided in it may
    have been scheduled before it: waiting never goes below zero."""
    decided = {
        "sent": counts.get("sent", 0),
        "suppressed": counts.get("suppressed", 0),
        "held_out": counts.get("held_out", 0),
        "cancelled": counts.get("cancelled", 0),
        "failed": counts.get("failed", 0) + counts.get("dead", 0),
        "uncertain": counts.get("uncertain", 0),
    }
    return {"waiting": max(0, counts.get("scheduled", 0) - sum(decided.values())), **decided}


def plural(n: int, one: str, many: str | None = None) -> str:
    return f"{n:,} {one if n == 1 else (many or one + 's')}"


def messages_line(counts: dict[str, int]) -> str:
    """ "8 messages: 4 waiting, 4 suppressed" (fates that are zero left out)."""
    fates = fates_of(counts)
    parts = [f"{fates[key]:,} {label}" for key, label in FATES if fates[key]]
    return plural(sum(fates.values()), "message") + (": " + ", ".join(parts) if parts else "")


def outcomes_line(counts: dict[str, int]) -> str:
    """ "Of 3 messages sent: 2 delivered, 1 opened, 0 clicked" (bounced only when there are some)."""
    shown = [
        f"{counts.get(k, 0):,} {label}" for k, label in OUTCOME_LABELS if k != "bounced" or counts.get(k)
    ]
    return f"Of {plural(counts.get('sent', 0), 'message')} sent: " + ", ".join(shown)


def conversions_line(counts: dict[str, int]) -> str:
    entries = plural(counts.get("entered", 0), "entry", "entries")
    return f"{plural(counts.get('converted', 0), 'conversion')} (of {entries})"


@dataclass
class RuleFunnel:
    """One rule's counts over the window, all groups added up: entries (contacts who started the
    rule), per channel what became of its messages, why some were not sent, outcomes, conversions."""

    rule: str
    total: dict[str, int]
    channels: list[ChannelCounts]
    suppressed: list[tuple[str, int]]  # reason code, count; most first
    other_reasons: list[tuple[str, str, int]] = field(default_factory=list)  # status, reason, count

    @property
    def entries(self) -> str:
        return plural(self.total.get("entered", 0), "entry", "entries")

    @property
    def messages(self) -> str:
        return messages_line(self.total)

    @property
    def outcomes(self) -> str:
        return outcomes_line(self.total)

    @property
    def conversions(self) -> str:
        return conversions_line(self.total)

    @property
    def converted(self) -> str:
        return plural(self.total.get("converted", 0), "conversion")

    @property
    def fate_bars(self) -> list[tuple[str, dict[str, int]]]:
        """One bar per channel, split by fate, for `charts.stacked_bars` (names are the fates' labels)."""
        labels = dict(FATES)
        return [(c.channel, {labels[k]: n for k, n in c.fates.items()}) for c in self.channels]


COUNTED = ("entered", "scheduled", "sent", "suppressed", "held_out", "cancelled", "postponed", "failed",
           "dead", "uncertain", "delivered", "opened", "clicked", "bounced", "converted")  # fmt: skip


def _add(into: dict[str, int], funnel: Funnel) -> None:
    for status in COUNTED:
        into[status] = into.get(status, 0) + int(getattr(funnel, status))


def totals(funnel: Funnel) -> dict[str, int]:
    into: dict[str, int] = {}
    _add(into, funnel)
    return into


def rule_funnels(rows: list[FunnelRow], order: list[str]) -> list[RuleFunnel]:
    """Per rule (in `order`, the file's; rules only in the counts after them), added up over groups."""
    names = list(dict.fromkeys([*order, *(r.rule for r in rows)]))
    found = []
    for name in names:
        mine = [r for r in rows if r.rule == name]
        total: dict[str, int] = {}
        by_channel: dict[str, dict[str, int]] = {}
        reasons: dict[tuple[str, str], int] = {}
        for r in mine:
            _add(total, r.funnel)
            if r.channel:
                _add(by_channel.setdefault(r.channel, {}), r.funnel)
            for status, by in r.funnel.reasons.items():
                for code, n in by.items():
                    if code != status:
                        reasons[(status, code)] = reasons.get((status, code), 0) + n
        suppressed = sorted(
            ((c, n) for (s, c), n in reasons.items() if s == "suppressed"), key=lambda i: -i[1]
        )
        others = sorted(
            ((s, c, n) for (s, c), n in reasons.items() if s != "suppressed" and n),
            key=lambda i: (COUNTED.index(i[0]) if i[0] in COUNTED else 99, -i[2]),
        )
        fates = {c: fates_of(counts) for c, counts in by_channel.items()}
        present = [k for k, _ in FATES if any(f[k] for f in fates.values())]
        channels = [
            ChannelCounts(c, counts, {k: fates[c][k] for k in present})
            for c, counts in sorted(by_channel.items())
        ]
        found.append(RuleFunnel(name, total, channels, suppressed, others))
    return found


def window_start(span: timedelta, now: datetime) -> datetime:
    """As `GET /v1/stats` ends a window by default: at the end of the current hour."""
    end = now.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    return end - span


async def rulesets_page(request: web.Request) -> web.StreamResponse:
    rulesets = request.app[RULESETS]
    found = ruleset_list(rulesets)
    listed = found.rulesets
    details: list[RulesetDetail] = []
    for info in listed:
        try:
            details.append(await ruleset_detail(rulesets, info.name))
        except ApiError:  # removed since the list was read
            continue
    return render(
        request,
        "rulesets.html",
        nav="rulesets",
        rulesets=details,
        folder=found.folder,
    )


async def _ruleset_page(
    request: web.Request,
    name: str,
    window: str,
    candidate: str | None = None,
    checked: RulesetChecked | RulesetRejected | None = None,
    status: int = 200,
) -> web.StreamResponse:
    try:
        detail = await ruleset_detail(request.app[RULESETS], name)
    except ApiError as exc:
        return error_page(request, exc.status, exc.message)
    label, span = WINDOWS[window]
    report: StatsReport | None = None
    stats_problem = None
    try:
        query = StatsQuery(ruleset=name, from_=window_start(span, datetime.now(UTC)))
        report = await stats_report(request.app, query)
    except ApiError as exc:
        stats_problem = exc.message
    except QueryRejected as exc:
        stats_problem = exc.message
    funnels = rule_funnels(report.rows, [r.name for r in detail.rules]) if report is not None else []
    groups = {g.group: g for g in report.groups} if report is not None else {}
    return render(
        request,
        "ruleset.html",
        status=status,
        nav="rulesets",
        ruleset=detail,
        window=window,
        windows=WINDOWS,
        window_label=label,
        report=report,
        stats_problem=stats_problem,
        funnels={f.rule: f for f in funnels},
        fate_colours=FATE_COLOURS,
        overall=RuleFunnel("", totals(report.funnel), [], []) if report is not None else None,
        extra_funnels=[f for f in funnels if f.rule not in {r.name for r in detail.rules}],
        groups=groups,
        candidate=candidate if candidate is not None else (detail.source or ""),
        checked=checked,
        checked_ok=isinstance(checked, RulesetChecked),
    )


async def ruleset_page(request: web.Request) -> web.StreamResponse:
    try:
        query = parse_query(request, RulesetPageQuery)
    except QueryRejected as exc:
        return error_page(request, 422, exc.message)
    return await _ruleset_page(request, request.match_info["name"], query.window)


async def check_candidate(request: web.Request) -> web.StreamResponse:
    """`rulesvc check`'s messages for a pasted candidate, shown on its ruleset's page. Nothing is
    written: the same validation as `PUT /v1/rulesets/{name}?dry_run=true`."""
    form = form_of(request)
    name = form.get("name", "").strip()
    text = form.get("candidate", "")
    rulesets = request.app[RULESETS]
    if name not in rulesets.status:
        return error_page(request, 404, f"no ruleset `{name[:80]}` to check a candidate of")
    if len(text.encode()) > MAX_CANDIDATE:
        checked: RulesetChecked | RulesetRejected = RulesetRejected(
            f"the candidate is over {MAX_CANDIDATE:,} bytes; nothing checked", []
        )
    else:
        checked = check_ruleset(rulesets, name, text.encode())
    status = 422 if isinstance(checked, RulesetRejected) else 200
    window = form.get("window", "7d")
    return await _ruleset_page(
        request, name, window if window in WINDOWS else "7d", candidate=text, checked=checked, status=status
    )


ROUTES = [
    ConsoleRoute("GET", "/rulesets", rulesets_page, title="Rulesets"),
    ConsoleRoute("POST", "/rulesets/check", check_candidate, change=True, title="Check a ruleset"),
    ConsoleRoute("GET", "/rulesets/{name}", ruleset_page, title="Ruleset"),
]
