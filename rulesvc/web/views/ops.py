"""Health, readiness, metrics and the OpenAPI document."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Literal

from aiohttp import web
from pymongo.errors import PyMongoError

from rulesvc.channels import ChannelRegistry, status_of
from rulesvc.core.masking import mask_credentials
from rulesvc.core.ruleformat import channels_used
from rulesvc.metrics import CONTENT_TYPE_LATEST
from rulesvc.runtime.rulesets import Rulesets, folder_problem
from rulesvc.store.messages import Messages
from rulesvc.store.migrations import older_release_seen, stored_version
from rulesvc.store.schedule import Schedule
from rulesvc.web.keys import CHANNELS, METRICS, OPENAPI, RULESETS, SETTINGS, STORE
from rulesvc.web.schemas import Health
from rulesvc.web.views.base import json_response


async def healthz(request: web.Request) -> web.Response:
    return json_response(Health("ok"))


async def readyz(request: web.Request) -> web.Response:
    health = await readiness(request.app)
    return json_response(health, 503 if health.status == "unavailable" else 200)


async def readiness(app: web.Application) -> Health:
    """`unavailable` when the service cannot do its work (MongoDB away, rulesets not loaded yet): /readyz
    answers 503; `degraded` when it works but something needs a look (no rulesets, refused rulesets,
    channels the rulesets send on that are not configured, a backlog, quarantined events), so a load
    balancer keeps it while an operator is told why: one sentence per problem in `reasons`. The
    overview (`GET /v1/overview`, the console) shows the same."""
    checks: dict[str, str] = {}
    problems: list[str] = []  # the service works, but not as it should
    failures: list[str] = []  # the service cannot work
    store = app[STORE]
    settings = app[SETTINGS]
    try:
        await store.ping()
        checks["mongodb"] = "ok"
        now = datetime.now(UTC)
        oldest = await store.oldest_pending()
        if oldest is None:
            checks["inbox"] = "no unprocessed events"
        else:
            lag = (now - oldest).total_seconds()
            checks["inbox"] = f"oldest unprocessed event waited {lag:.0f} s"
            if lag > settings.degraded_lag_seconds:
                checks["inbox"] += f", over the {settings.degraded_lag_seconds:g} s threshold"
                problems.append(
                    f"the oldest unprocessed event waited {lag:.0f} s, over the "
                    f"{settings.degraded_lag_seconds:g} s threshold (RULESVC_DEGRADED_LAG_SECONDS)"
                )
        window = timedelta(hours=settings.degraded_quarantine_hours)
        total, recent = await store.quarantine_summary(now - window)
        checks["quarantine"] = f"{total} event(s) quarantined"
        if recent:
            checks["quarantine"] += (
                f", {recent} in the last {settings.degraded_quarantine_hours:g} h;"
                " see GET /v1/events/quarantine"
            )
            problems.append(
                f"{recent} event(s) quarantined in the last {settings.degraded_quarantine_hours:g} h;"
                " see GET /v1/events/quarantine"
            )
        version = await stored_version(store)
        older = await older_release_seen(store, version)
        checks["schema"] = f"version {version}" + ("; an older release writes here" if older else "")
        if older:
            problems.append(older)
    except PyMongoError as exc:
        checks["mongodb"] = f"unreachable: {type(exc).__name__}"
        failures.append(f"MongoDB is unreachable ({type(exc).__name__})")
    rulesets = app.get(RULESETS)
    if rulesets is None or not rulesets.loaded_once:
        checks["rulesets"] = "not loaded yet"
        failures.append("the rulesets are not loaded yet")
    else:
        checks["rulesets"], found = _rulesets_check(rulesets)
        problems += found
        checks["channels"], found = _channels_check(rulesets, app[CHANNELS])
        problems += found
    status: Literal["ok", "degraded", "unavailable"] = (
        "unavailable" if failures else "degraded" if problems else "ok"
    )
    return Health(status, checks, failures + problems)


def _rulesets_check(rulesets: Rulesets) -> tuple[str, list[str]]:
    problems: list[str] = []
    errors = rulesets.errors()
    summary = f"{len(rulesets.live)} loaded" + (
        f"; {len(errors)} error(s), previous versions kept: " + "; ".join(map(str, errors)) if errors else ""
    )
    if not rulesets.live:
        why = folder_problem(rulesets.directory)
        if why is None:
            why = f"every ruleset in {rulesets.directory.absolute()} was refused"
        problems.append(f"no rulesets loaded: {why}; events are accepted but nothing is sent")
    for state in sorted(rulesets.status.values(), key=lambda s: s.name):
        if state.status == "error" and state.errors:
            kept = "its previous version runs" if state.name in rulesets.live else "not loaded"
            more = f" (and {len(state.errors) - 1} more)" if len(state.errors) > 1 else ""
            problems.append(f"ruleset `{state.name}` refused ({kept}): {state.errors[0]}{more}")
    return summary, problems


def _channels_check(rulesets: Rulesets, registry: ChannelRegistry) -> tuple[str, list[str]]:
    """The channels the live rulesets' sends (and their fallbacks) may use that cannot send: such sends
    are suppressed, so an operator hears of it here before the first message goes missing. One reason
    per channel, naming the rulesets that use it."""
    used: dict[str, list[str]] = {}  # channel -> rulesets
    for name, compiled in sorted(rulesets.live.items()):
        for channel_name in channels_used(compiled.source):
            used.setdefault(channel_name, []).append(name)
    if not used:
        return "no ruleset sends", []
    problems: list[str] = []
    unusable: list[str] = []
    for channel_name, users in sorted(used.items()):
        channel = registry.get(channel_name)
        if channel is None:
            configured, detail = False, "no installed plugin provides it"
        else:
            configured, detail = status_of(channel)  # as GET /v1/channels says it
            detail = mask_credentials(detail)
        if configured:
            continue
        unusable.append(f"{channel_name} ({', '.join(users)})")
        senders = users[0] + " sends" if len(users) == 1 else f"{', '.join(users[:-1])} and {users[-1]} send"
        problems.append(f"{senders} on `{channel_name}`, which is not configured: {detail}")
    if not unusable:
        return f"{len(used)} used, all configured", []
    return "not configured: " + "; ".join(unusable), problems


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
