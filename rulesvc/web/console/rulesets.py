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


@dataclass
class RuleFunnel:
    """One rule's counts over the window, all groups added up: entries, per channel what became of the
    messages, why some were not sent, and the outcomes."""

    rule: str
    total: dict[str, int]
    channels: list[ChannelCounts]
    suppressed: list[tuple[str, int]]  # reason code, count; most first
    other_reasons: list[tuple[str, str, int]] = field(default_factory=list)  # status, reason, count
    steps: list[tuple[str, float]] = field(default_factory=list)


COUNTED = ("entered", "scheduled", "sent", "suppressed", "held_out", "cancelled", "postponed", "failed",
           "dead", "uncertain", "delivered", "opened", "clicked", "bounced", "converted")  # fmt: skip


def _add(into: dict[str, int], funnel: Funnel) -> None:
    for status in COUNTED:
        into[status] = into.get(status, 0) + int(getattr(funnel, status))


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
        channels = [ChannelCounts(c, counts) for c, counts in sorted(by_channel.items())]
        steps: list[tuple[str, float]] = [("Entered", total.get("entered", 0))]
        steps += [(f"Sent on {c.channel}", c.counts.get("sent", 0)) for c in channels]
        steps += [
            ("Suppressed", total.get("suppressed", 0)),
            ("Held out", total.get("held_out", 0)),
            ("Delivered", total.get("delivered", 0)),
            ("Opened", total.get("opened", 0)),
            ("Clicked", total.get("clicked", 0)),
            ("Converted", total.get("converted", 0)),
        ]
        shown = [(label, n) for label, n in steps if n or label in ("Entered", "Converted")]
        found.append(RuleFunnel(name, total, channels, suppressed, others, shown))
    return found


def window_start(span: timedelta, now: datetime) -> datetime:
    """As `GET /v1/stats` ends a window by default: at the end of the current hour."""
    end = now.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    return end - span


async def rulesets_page(request: web.Request) -> web.StreamResponse:
    rulesets = request.app[RULESETS]
    listed = ruleset_list(rulesets).rulesets
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
        folder=str(rulesets.directory.absolute()),
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
    ConsoleRoute("POST", "/rulesets/check", check_candidate, change=False, title="Check a ruleset"),
    ConsoleRoute("GET", "/rulesets/{name}", ruleset_page, title="Ruleset"),
]
