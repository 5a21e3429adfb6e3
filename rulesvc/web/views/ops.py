"""Health, readiness, metrics and the OpenAPI document."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Literal

from aiohttp import web
from pymongo.errors import PyMongoError

from rulesvc.metrics import CONTENT_TYPE_LATEST
from rulesvc.store.messages import Messages
from rulesvc.store.schedule import Schedule
from rulesvc.web.keys import METRICS, OPENAPI, RULESETS, SETTINGS, STORE
from rulesvc.web.schemas import Health
from rulesvc.web.views.base import json_response


async def healthz(request: web.Request) -> web.Response:
    return json_response(Health("ok"))


async def readyz(request: web.Request) -> web.Response:
    """503 when the service cannot do its work; 200 "degraded" when it works but something needs a look
    (a backlog, quarantined events), so a load balancer keeps it while an operator is told why."""
    checks: dict[str, str] = {}
    store = request.app[STORE]
    settings = request.app[SETTINGS]
    degraded = False
    try:
        await store.ping()
        checks["mongodb"] = "ok"
        now = datetime.now(UTC)
        oldest = await store.oldest_pending()
        lag = (now - oldest).total_seconds() if oldest is not None else 0.0
        checks["inbox"] = f"oldest unprocessed event waited {lag:.0f} s"
        if lag > settings.degraded_lag_seconds:
            degraded = True
            checks["inbox"] += f", over the {settings.degraded_lag_seconds:g} s threshold"
        window = timedelta(hours=settings.degraded_quarantine_hours)
        total, recent = await store.quarantine_summary(now - window)
        checks["quarantine"] = f"{total} event(s) quarantined"
        if recent:
            degraded = True
            checks["quarantine"] += (
                f", {recent} in the last {settings.degraded_quarantine_hours:g} h;"
                " see GET /v1/events/quarantine"
            )
    except PyMongoError as exc:
        checks["mongodb"] = f"unreachable: {type(exc).__name__}"
    rulesets = request.app.get(RULESETS)
    if rulesets is None or not rulesets.loaded_once:
        checks["rulesets"] = "not loaded yet"
        ok = False
    else:
        ok = checks["mongodb"] == "ok"
        errors = rulesets.errors()
        checks["rulesets"] = f"{len(rulesets.live)} loaded" + (
            f"; {len(errors)} error(s), previous versions kept: " + "; ".join(map(str, errors))
            if errors
            else ""
        )
    status: Literal["ok", "degraded", "unavailable"] = (
        "unavailable" if not ok else "degraded" if degraded else "ok"
    )
    return json_response(Health(status, checks), 200 if ok else 503)


async def metrics(request: web.Request) -> web.Response:
    metrics = request.app[METRICS]
    store = request.app[STORE]
    try:
        now = datetime.now(UTC)
        metrics.inbox_pending.set(await store.pending_count())
        oldest = await store.oldest_pending()
        metrics.inbox_lag.set(0.0 if oldest is None else max(0.0, (now - oldest).total_seconds()))
        metrics.quarantine_size.set(await store.quarantine_size())
        due, first_due = await Schedule(store).due_sends(now)
        metrics.due_messages.set(due)
        metrics.due_oldest_age.set(0.0 if first_due is None else max(0.0, (now - first_due).total_seconds()))
        metrics.dead_letters.set(await Messages(store).count_status("dead"))
    except PyMongoError:
        pass  # the last values stay; /readyz says MongoDB is away
    return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def openapi_json(request: web.Request) -> web.Response:
    return web.Response(body=request.app[OPENAPI], content_type="application/json")
