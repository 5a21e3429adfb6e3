"""`GET /v1/overview`: what an on-call person looks at first, in one answer (the console's front page)."""

from __future__ import annotations

from datetime import UTC, datetime

from aiohttp import web
from pymongo.errors import PyMongoError

from rulesvc.core import overview as counts
from rulesvc.store.messages import Messages
from rulesvc.store.overview import OverviewReads
from rulesvc.store.schedule import Schedule
from rulesvc.web.keys import STORE
from rulesvc.web.overview_schemas import (
    ChannelMessages,
    DueQueue,
    InboxLag,
    Overview,
    Throughput,
    ThroughputPoint,
)
from rulesvc.web.views.base import json_response
from rulesvc.web.views.channels import channel_list, channels_of, read_sends
from rulesvc.web.views.ops import readiness


async def overview(app: web.Application, now: datetime | None = None) -> Overview:
    """Readiness as /readyz says it, throughput now and over 24 h, the inbox's and the due queue's
    backlog, the last 24 h's messages by channel and status, quarantine and dead letters, channels and
    plugins. The parts MongoDB gives are left empty when it does not answer (health says so)."""
    now = now or datetime.now(UTC)
    health = await readiness(app)
    store = app[STORE]
    reads = OverviewReads(store)
    since = now - counts.DAY
    result = Overview(now, health, None, int(counts.BUCKET.total_seconds()), [], None, None,
                      since, [], store.count_stats, None, None, [], [])  # fmt: skip
    sends = None
    try:
        start = counts.now_window_start(now)
        accepted = await reads.accepted_since(start)
        decided = await reads.decided_since(start)
        seconds = round((now - start).total_seconds())  # the rates over the span shown, so they agree
        result.now = Throughput(seconds, accepted, decided, counts.per_second(accepted, seconds),
                                counts.per_second(decided, seconds))  # fmt: skip
        first = counts.series_start(now)
        points = counts.series(
            await reads.accepted_by_quarter(first), await reads.decided_by_quarter(first), now
        )
        result.series = [ThroughputPoint(p.at, p.accepted, p.decided, p.accepted_per_second,
                                         p.decided_per_second) for p in points]  # fmt: skip
        oldest = await store.oldest_pending()
        lag = 0.0 if oldest is None else max(0.0, (now - oldest).total_seconds())
        result.inbox = InboxLag(await store.pending_count(), oldest, round(lag, 3))
        due, first_due = await Schedule(store).due_sends(now)
        late = 0.0 if first_due is None else max(0.0, (now - first_due).total_seconds())
        result.due = DueQueue(due, first_due, round(late, 3), await reads.due_between(now, now + counts.HOUR))
        sends = await read_sends(app, now)
        result.messages = [ChannelMessages(c, n) for c, n in sends.counts.items()]
        result.quarantined = await store.quarantine_size()
        result.dead_letters = await Messages(store).count_status("dead")
    except PyMongoError:  # what was read stays; health names MongoDB as unreachable
        listing = channel_list(app, None, sends)  # without asking it again
    else:
        listing = await channels_of(app, sends)
    result.channels, result.plugins = listing.channels, listing.plugins
    return result


async def get_overview(request: web.Request) -> web.Response:
    return json_response(await overview(request.app))
