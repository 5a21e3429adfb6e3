"""The overview (`/console/`): what the engine does now and over the last day, for the person on call.
Its data is `GET /v1/overview`'s (rulesvc.web.views.overview), shown as plots where a person would
rather look, big numbers where one number says it, and health in sentences."""

from __future__ import annotations

from datetime import datetime

from aiohttp import web

from rulesvc.web.console.base import ConsoleRoute, error_page, render
from rulesvc.web.overview_schemas import Overview
from rulesvc.web.schemas import NoQuery
from rulesvc.web.views.base import QueryRejected, parse_query
from rulesvc.web.views.overview import overview as read_overview

# What became of the messages (a message ends in one of these), in the order a bar shows them; the
# outcomes reported later (delivered, opened, ...) are counts of sent ones, in the table only.
FATES = ("sent", "failed", "dead", "uncertain", "suppressed", "cancelled", "held_out")
FATE_WORDS = {
    "sent": "Sent",
    "failed": "Failed",
    "dead": "Gave up (dead)",
    "uncertain": "Uncertain",
    "suppressed": "Suppressed",
    "cancelled": "Cancelled",
    "held_out": "Held out",
}
HEALTH_WORDS = {
    "ok": "Working normally",
    "degraded": "Working, but something needs a look",
    "unavailable": "Not working: events are stored only when MongoDB answers, and nothing is decided or sent",
}
CHECK_WORDS = {
    "mongodb": "Database (MongoDB)",
    "inbox": "Events waiting",
    "quarantine": "Quarantine",
    "rulesets": "Rulesets",
    "channels": "Channels the rulesets use",
}


def throughput_series(view: Overview) -> dict[str, list[tuple[datetime, float]]]:
    return {
        "Events accepted per second": [(p.at, p.accepted_per_second) for p in view.series],
        "Events decided per second": [(p.at, p.decided_per_second) for p in view.series],
    }


def fate_bars(view: Overview) -> list[tuple[str, dict[str, float]]]:
    """Per channel, its messages by what became of them (channels with none left out)."""
    bars = []
    for row in view.messages:
        parts = {FATE_WORDS[f]: float(row.counts.get(f, 0)) for f in FATES if row.counts.get(f)}
        if parts:
            bars.append((row.channel, parts))
    return bars


def statuses_of(view: Overview) -> list[str]:
    """The statuses the table has columns for: the fates first, then the outcomes and the rest."""
    seen = {s for row in view.messages for s in row.counts}
    return [s for s in FATES if s in seen] + sorted(seen - set(FATES))


async def overview_page(request: web.Request) -> web.StreamResponse:
    try:  # as its API route, it takes no query parameters: a typo is said, not ignored
        parse_query(request, NoQuery)
    except QueryRejected as exc:
        return error_page(request, 422, exc.message)
    view = await read_overview(request.app)
    return render(
        request,
        "overview.html",
        nav="overview",
        view=view,
        health_words=HEALTH_WORDS[view.health.status],
        check_words=CHECK_WORDS,
        throughput=throughput_series(view),
        any_events=any(p.accepted or p.decided for p in view.series),
        fate_bars=fate_bars(view),
        statuses=statuses_of(view),
        fate_words=FATE_WORDS,
    )


ROUTES = [ConsoleRoute("GET", "/", overview_page, title="Overview")]
