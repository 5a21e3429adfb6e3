"""What the app runs while it serves (aiohttp cleanup contexts): the embedded mongod, the MongoDB client
and store, the engine's loops (rulesets, inbox, scheduler, fan-out, jobs) and the simulator process."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pymongo
import structlog
from aiohttp import web
from pymongo import AsyncMongoClient

from rulesvc.channels import ChannelRegistry, ManagedChannel
from rulesvc.config import Settings
from rulesvc.core.sendpolicy import SendPolicy
from rulesvc.default_plugins.builtin import BUILTIN_PLUGINS
from rulesvc.plugins import PluginReport, load_plugins
from rulesvc.replay.simulate import Simulator
from rulesvc.runtime import shopify_privacy
from rulesvc.runtime.backtests import BacktestRunner
from rulesvc.runtime.dispatcher import Dispatcher, parse_quiet_hours, quiet_channels
from rulesvc.runtime.fanout import CatalogFanout
from rulesvc.runtime.identity import merge_loop
from rulesvc.runtime.inbox import Inbox
from rulesvc.runtime.jobs import run_job
from rulesvc.runtime.privacy import TombstoneCache
from rulesvc.runtime.rulesets import Rulesets
from rulesvc.runtime.scheduler import Scheduler
from rulesvc.runtime.templates import Templates
from rulesvc.store.backtest_jobs import BacktestJobs
from rulesvc.store.db import Store
from rulesvc.store.keys import hand_out_first_key
from rulesvc.store.migrations import SCHEMA_VERSION, older_release_seen, prepare
from rulesvc.store.mongod import EmbeddedMongod
from rulesvc.web.keys import (
    BACKTESTS,
    CHANNELS,
    EMBEDDED_MONGOD,
    FANOUT,
    INBOX,
    INBOX_TOKENS,
    KEYS,
    METRICS,
    MONGO_URI,
    RULESETS,
    SCHEDULER,
    SEND_POLICY,
    SETTINGS,
    SHOPIFY_PRIVACY,
    SIMULATOR,
    STORE,
    TOMBSTONES,
)

log = structlog.get_logger(__name__)


# The deadline of the start-up's schema work (index builds), which may take longer than a request's.
START_UP_SECONDS = 120.0


async def simulator_ctx(app: web.Application) -> AsyncIterator[None]:
    """The simulator process starts at the first simulation; it stops with the app. It applies the
    service's send rules with its channels."""
    app[SIMULATOR] = Simulator(app[SETTINGS].simulate_budget_seconds, app[CHANNELS], app[SEND_POLICY])
    try:
        yield
    finally:
        await app[SIMULATOR].close()


async def backtests_ctx(app: web.Application) -> AsyncIterator[None]:
    """Backtest jobs run in processes of their own; the app's stop kills those this worker started and
    cancels their jobs (a restart drops a running backtest)."""
    jobs = BacktestJobs(app[STORE])
    with pymongo.timeout(max(START_UP_SECONDS, app[SETTINGS].mongodb_timeout_seconds)):
        await jobs.ensure_indexes()
    app[BACKTESTS] = BacktestRunner(jobs)
    try:
        yield
    finally:
        await app[BACKTESTS].close()


async def embedded_mongod_ctx(app: web.Application) -> AsyncIterator[None]:
    """Starts the embedded mongod when no MONGODB_URI is given; stopped last, after everything else."""
    settings = app[SETTINGS]
    if settings.mongodb_uri:
        app[MONGO_URI] = settings.mongodb_uri
        yield
        return
    # Blocking on purpose: it runs once at start-up in the main thread, which mongod's parent-death
    # signal is tied to.
    mongod = EmbeddedMongod(settings.data_dir, settings.mongod_bin, cache_gb=settings.mongod_cache_gb)
    mongod.start()
    app[EMBEDDED_MONGOD] = mongod
    app[MONGO_URI] = mongod.uri
    stop = asyncio.Event()
    keeper = asyncio.create_task(mongod.keep_running(stop), name="mongod-keeper")  # restarts it if it dies
    try:
        yield
    finally:
        stop.set()
        await keeper  # a restart in progress finishes first, so the stop below stops that mongod too
        mongod.stop()


async def mongo_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
        app[MONGO_URI],
        tz_aware=True,
        serverSelectionTimeoutMS=3000,
        appname="rulesvc",
        # Every operation has a deadline: a paused or lost server costs a request a 503, never a hang.
        timeoutMS=settings.mongodb_timeout_seconds * 1000,
    )
    store = Store(
        client,
        settings.database,
        timedelta(days=settings.event_retention_days),
        count_stats=settings.stats,
        message_retention=timedelta(days=settings.message_retention_days),
    )
    # An index build on a large collection takes longer than a request, a migration longer still (each of
    # its operations has the client's deadline). Only the service sets the events' TTL to its retention:
    # a CLI process leaves it as it is. A newer schema is refused; an older one upgraded.
    index_seconds = max(START_UP_SECONDS, settings.mongodb_timeout_seconds)
    applied = await prepare(store, change_ttl=True, index_seconds=index_seconds)
    app[STORE] = store
    app[TOMBSTONES] = TombstoneCache(store)
    app[KEYS] = store.keys()
    app[INBOX_TOKENS] = store.inbox_tokens()
    log.info("store.ready", database=settings.database, schema=SCHEMA_VERSION, migrated=applied)
    older = await older_release_seen(store, SCHEMA_VERSION)  # what `prepare` left (or it refused)
    if older:
        log.error("store.older_release", problem=older)  # health says it too, until `rulesvc migrate`
    if not settings.mongodb_uri:
        await hand_out_first_key(app[KEYS])
    try:
        yield
    finally:
        await client.close()


async def engine_ctx(app: web.Application) -> AsyncIterator[None]:
    """Rulesets (hot-reloaded), the inbox and the scheduler run for as long as the app serves."""
    settings = app[SETTINGS]
    channels = app[CHANNELS]
    templates = templates_of(settings)
    rulesets = Rulesets(Path(settings.rulesets_dir), channels.names(), templates)
    rulesets.reload()
    dispatcher = Dispatcher(app[STORE], channels, templates, app[SEND_POLICY])
    for channel in channels.all():
        if isinstance(channel, ManagedChannel):
            await channel.start()
    lease = timedelta(seconds=settings.lease_seconds)
    count_fate = app[METRICS].count_fate  # each message outcome, as the log line tells it
    count_flow = app[METRICS].count_flow  # the funnel's counts, once committed
    scheduler = Scheduler(
        app[STORE],
        dispatcher,
        lambda: set(rulesets.live),
        lease=lease,
        on_fate=count_fate,
        on_counts=count_flow,
    )
    quarantined = app[METRICS].events_quarantined

    def count_quarantined(stage: str) -> None:
        quarantined.labels(stage).inc()

    inbox = Inbox(
        app[STORE],
        rulesets,
        lease=timedelta(seconds=settings.lease_seconds),
        on_scheduled=scheduler.due_soon,
        on_quarantined=count_quarantined,
        on_fate=count_fate,
        on_counts=count_flow,
    )
    scheduler.on_timer_event = inbox.wake.set
    fanout = CatalogFanout(
        app[STORE],
        lease=lease,
        on_copies=inbox.wake.set,
        on_quarantined=count_quarantined,
        decider=inbox if settings.fanout_direct else None,
    )
    app[RULESETS], app[INBOX], app[SCHEDULER], app[FANOUT] = rulesets, inbox, scheduler, fanout
    stop = asyncio.Event()
    app[SHOPIFY_PRIVACY] = asyncio.Event()
    tasks = [
        asyncio.create_task(rulesets.watch(stop), name="rulesets-watch"),
        asyncio.create_task(inbox.run(stop), name="inbox"),
        asyncio.create_task(scheduler.run(stop), name="scheduler"),
        asyncio.create_task(fanout.run(stop), name="catalog-fanout"),
        asyncio.create_task(
            merge_loop(app[STORE], stop, count_fate, tombstone=app[SETTINGS].erasure_tombstone),
            name="identity-merges",
        ),
        asyncio.create_task(
            shopify_privacy.run(app[STORE], stop, app[SHOPIFY_PRIVACY]), name="shopify-privacy"
        ),
        *(
            asyncio.create_task(run_job(job, app[STORE], stop), name=f"job-{job.name}")
            for job in channels.jobs
        ),
    ]
    try:
        yield
    finally:
        stop.set()  # loops finish the batch in hand, then return
        done, pending = await asyncio.wait(tasks, timeout=settings.shutdown_grace_seconds)
        for task in pending:
            task.cancel()
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                log.error("engine.task_failed", task=task.get_name(), error=repr(task.exception()))
        for compiled in rulesets.live.values():
            compiled.free()
        for channel in channels.all():
            if isinstance(channel, ManagedChannel):
                await channel.close()


def send_policy(settings: Settings) -> SendPolicy:
    quiet_start, quiet_end = parse_quiet_hours(settings.quiet_hours)
    return SendPolicy(
        frequency_caps=dict(settings.frequency_caps),
        quiet_start=quiet_start,
        quiet_end=quiet_end,
        default_timezone=settings.default_timezone,
        max_attempts=settings.max_attempts,
        retry_base=timedelta(seconds=settings.retry_base_seconds),
        retry_max=timedelta(seconds=settings.retry_max_seconds),
        lease=timedelta(seconds=settings.lease_seconds),
        quiet_channels=quiet_channels(settings.channels, dict(os.environ)),
    )


def templates_of(settings: Settings, rulesets_dir: str | None = None) -> Templates:
    """RULESVC_TEMPLATES_DIR, else the rulesets folder's `templates` (of `rulesets_dir` when a command
    is given another folder): the setting wins, so `check` judges with the templates the service uses."""
    if settings.templates_dir:
        return Templates(Path(settings.templates_dir))
    return Templates(Path(rulesets_dir or settings.rulesets_dir) / "templates")


def load_channels(settings: Settings) -> tuple[ChannelRegistry, list[PluginReport]]:
    return load_plugins(BUILTIN_PLUGINS, settings.channels, settings.plugins)
