"""The overview (`/console/`): what the engine does now and over the last day, for the person on call.
Its data is `GET /v1/overview`'s (rulesvc.web.views.overview), shown as plots where a person would
rather look, big numbers where one number says it, and health in sentences."""

from __future__ import annotations

import re
from datetime import datetime

from aiohttp import web

from rulesvc.web.console.base import ConsoleRoute, error_page, render
from rulesvc.web.overview_schemas import Overview
from rulesvc.web.schemas import NoQuery
from rulesvc.web.views.base import QueryRejected, parse_query
from rulesvc.web.views.overview import overview as read_overview

# The funnel's statuses in its order, in words (a channel's row holds those it reached; entries are not
# messages and are counted without a channel).
STATUS_WORDS = {
    "scheduled": "Scheduled",
    "sent": "Sent",
    "suppressed": "Suppressed",
    "held_out": "Held out",
    "cancelled": "Cancelled",
    "postponed": "Postponed",
    "retried": "Retried",
    "failed": "Failed",
    "dead": "Gave up (dead)",
    "uncertain": "Uncertain",
    "delivered": "Delivered",
    "opened": "Opened",
    "clicked": "Clicked",
    "replied": "Replied",
    "bounced": "Bounced",
    "blocked": "Blocked",
    "converted": "Converted",
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


ACCEPTED = "Events accepted per second"
DECIDED = "Events decided per second"
# A ruleset's sends on a channel that cannot send: readiness's sentence names the channel so.
UNCONFIGURED = re.compile(r"on `([^`]+)`, which is not configured")


def throughput_series(view: Overview) -> dict[str, list[tuple[datetime, float]]]:
    """Accepted first, decided (drawn dashed) over it: equal rates show as one line with gaps."""
    return {
        ACCEPTED: [(p.at, p.accepted_per_second) for p in view.series],
        DECIDED: [(p.at, p.decided_per_second) for p in view.series],
    }


def statuses_of(view: Overview) -> list[str]:
    """The statuses the table has columns for, in the funnel's order (any other after them)."""
    seen = {s for row in view.messages for s in row.counts}
    return [s for s in STATUS_WORDS if s in seen] + sorted(seen - set(STATUS_WORDS))


def status_bars(view: Overview) -> list[tuple[str, dict[str, float]]]:
    """One bar per channel and status it reached (never stacked: a message counts in each status it went
    through, so a sum would count it twice); a status has one colour across channels."""
    bars = []
    for row in view.messages:
        for status in statuses_of(view):
            if row.counts.get(status):
                word = STATUS_WORDS.get(status, status.replace("_", " "))
                bars.append((f"{row.channel} · {word}", {word: float(row.counts[status])}))
    return bars


def health_reasons(view: Overview) -> list[tuple[str, str | None]]:
    """Each reason with the channel it says is not configured (None: another problem)."""
    return [(r, m.group(1) if (m := UNCONFIGURED.search(r)) else None) for r in view.health.reasons]


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
        reasons=health_reasons(view),
        throughput=throughput_series(view),
        decided_line=DECIDED,
        any_events=any(p.accepted or p.decided for p in view.series),
        status_bars=status_bars(view),
        statuses=statuses_of(view),
    )


ROUTES = [ConsoleRoute("GET", "/", overview_page, title="Overview")]
