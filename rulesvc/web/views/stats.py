"""`GET /v1/stats`: a ruleset's funnel over a window, per rule, group and channel, optionally per hour or
day, and for a ruleset with a holdout or A/B arms the groups' conversion rates and uplift."""

from __future__ import annotations

from datetime import UTC, datetime

from aiohttp import web

from rulesvc.core.statsreport import (
    Design,
    StatsReport,
    StatsWindow,
    Unit,
    WindowProblem,
    buckets_of,
    build,
    cells_of,
    design_of_source,
    name_problem,
    stats_window,
)
from rulesvc.store.stats import Stats
from rulesvc.web.keys import RULESETS, STORE
from rulesvc.web.stats_schemas import StatsQuery
from rulesvc.web.views.base import ApiError, QueryRejected, json_response, query_of, refuse


async def read_report(
    reads: Stats,
    ruleset: str,
    rule: str | None,
    window: StatsWindow,
    by: Unit | None,
    configured: Design | None,
) -> StatsReport:
    """The report from the store's sums: what the view and `rulesvc stats` both answer."""
    cells = cells_of(await reads.totals(ruleset, rule, window.from_, window.to))
    buckets = None
    if by is not None:
        buckets = buckets_of(await reads.totals(ruleset, rule, window.from_, window.to, by))
    return build(ruleset, rule, window, by, cells, buckets, configured)


async def stats_report(app: web.Application, query: StatsQuery) -> StatsReport:
    """The operation behind `GET /v1/stats`: QueryRejected for a name or window the route refuses (422),
    ApiError 404 for a ruleset neither loaded nor ever counted."""
    for value, what in ((query.ruleset, "ruleset"), (query.rule, "rule")):
        problem = name_problem(value, what) if value is not None else None
        if problem is not None:
            raise QueryRejected(f"query parameter `{what}` {problem}", what)
    window = stats_window(query.from_, query.to, query.by, datetime.now(UTC))
    if isinstance(window, WindowProblem):
        raise QueryRejected(f"query parameter `{window.field}`: {window.message}", window.field)
    live = app[RULESETS].live.get(query.ruleset)
    reads = Stats(app[STORE])
    if live is None and not await reads.exists(query.ruleset):
        raise refuse(404, f"no ruleset `{query.ruleset}`: none is loaded and none was ever counted")
    configured = design_of_source(live.source) if live is not None else None
    return await read_report(reads, query.ruleset, query.rule, window, query.by, configured)


async def get_stats(request: web.Request) -> web.Response:
    try:
        return json_response(await stats_report(request.app, query_of(request, StatsQuery)))
    except ApiError as exc:
        return exc.response()
