"""The app factory: settings, channels, cleanup contexts, middlewares, and the routes of `web.routes`."""

from __future__ import annotations

from aiohttp import web

from rulesvc.channels import ChannelRegistry
from rulesvc.config import Settings
from rulesvc.metrics import Metrics
from rulesvc.plugins import PluginReport, log_settings_problems
from rulesvc.runtime.segment import load_mapping
from rulesvc.web.console.setup import setup_console
from rulesvc.web.keys import (
    CHANNELS,
    LIMITER,
    METRICS,
    OPENAPI,
    PLUGINS,
    SEGMENT_MAPPING,
    SEND_POLICY,
    SETTINGS,
    TEST_SENDS,
)
from rulesvc.web.lifecycle import (
    backtests_ctx,
    embedded_mongod_ctx,
    engine_ctx,
    load_channels,
    mongo_ctx,
    send_policy,
    simulator_ctx,
)
from rulesvc.web.middlewares import authenticate, observe
from rulesvc.web.ratelimit import RateLimiter
from rulesvc.web.routes import openapi_document, setup_routes

TEST_SENDS_PER_MINUTE = 10  # per channel and process


def create_app(
    settings: Settings, channels: ChannelRegistry | None = None, plugins: list[PluginReport] | None = None
) -> web.Application:
    """`channels` (and the `plugins` that gave them) replace the installed plugins, for tests."""
    app = web.Application(middlewares=[observe, authenticate], client_max_size=settings.max_body_bytes)
    app[SETTINGS] = settings
    app[LIMITER] = RateLimiter(settings.rate_limit)
    app[TEST_SENDS] = RateLimiter(TEST_SENDS_PER_MINUTE / 60, burst=TEST_SENDS_PER_MINUTE)
    if channels is None:
        channels, reports = load_channels(settings)
        log_settings_problems(channels)
    else:
        reports = plugins or [PluginReport("test", "given", sorted(channels.names()))]
    app[CHANNELS] = channels
    app[SEND_POLICY] = send_policy(settings)
    app[PLUGINS] = reports
    app[METRICS] = Metrics()
    app[SEGMENT_MAPPING] = load_mapping(settings)  # ConfigError for a broken file: start-up stops
    app.cleanup_ctx.append(embedded_mongod_ctx)
    app.cleanup_ctx.append(mongo_ctx)
    app.cleanup_ctx.append(engine_ctx)
    app.cleanup_ctx.append(simulator_ctx)
    app.cleanup_ctx.append(backtests_ctx)
    setup_routes(app)
    if settings.console:
        setup_console(app)
    app[OPENAPI] = openapi_document()
    return app
