"""The channels and plugins loaded, and the providers' signed outcome callbacks."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import msgspec
from aiohttp import web
from pymongo.errors import PyMongoError

from rulesvc.channels import MESSAGE_CHANNEL, CallbackChannel, deduplicates, kind_of, status_of
from rulesvc.plugins import PluginReport, current_parts
from rulesvc.runtime.dispatcher import send_timeout
from rulesvc.runtime.fate import tell
from rulesvc.store.jobs import JobRuns
from rulesvc.web.keys import CHANNELS, INBOX, METRICS, PLUGINS, SETTINGS, STORE
from rulesvc.web.schemas import (
    CallbacksAccepted,
    ChannelInfo,
    ChannelList,
    JobError,
    JobRun,
    PluginInfo,
    PluginPart,
)
from rulesvc.web.views.base import error_response, json_response

RUNS_UNKNOWN = "last run unknown: the database did not answer"


def channel_list(app: web.Application, runs: dict[str, dict[str, Any]] | None = None) -> ChannelList:
    """Channels and plugins; `runs` are the jobs' last runs and errors by name (None: not known)."""
    infos = []
    lease = timedelta(seconds=app[SETTINGS].lease_seconds)
    for channel in app[CHANNELS].all():
        configured, detail = status_of(channel)
        infos.append(
            ChannelInfo(channel.name, configured, detail, deduplicates(channel),
                        isinstance(channel, CallbackChannel), round(send_timeout(channel, lease), 3),
                        kind_of(channel, MESSAGE_CHANNEL))
        )  # fmt: skip
    plugins = [plugin_info(p, app, runs) for p in app[PLUGINS]]
    return ChannelList(infos, plugins)


def plugin_info(
    report: PluginReport, app: web.Application, runs: dict[str, dict[str, Any]] | None
) -> PluginInfo:
    parts = []
    for part in current_parts(report, app[CHANNELS]):
        configured, detail = status_of(part.thing)
        last_run = last_error = None
        if part.job and runs is None:
            detail = f"{detail}; {RUNS_UNKNOWN}"
        elif part.job:
            doc = runs.get(part.name, {}) if runs else {}
            last_run = msgspec.convert(doc["last_run"], JobRun) if "last_run" in doc else None
            last_error = msgspec.convert(doc["last_error"], JobError) if "last_error" in doc else None
        parts.append(PluginPart(part.name, part.kind, configured, detail, last_run, last_error))
    return PluginInfo(
        report.name, report.source, report.channels, report.jobs, report.error, parts, report.settings_errors
    )


async def get_channels(request: web.Request) -> web.Response:
    runs: dict[str, dict[str, Any]] | None = None
    if request.app[CHANNELS].jobs:
        try:
            runs = await JobRuns.of(request.app[STORE]).all()
        except PyMongoError:  # the listing is for finding out what is wrong: it answers without them
            runs = None
    return json_response(channel_list(request.app, runs))


async def channel_callback(request: web.Request) -> web.Response:
    """A provider reports outcomes; each becomes a message_* event, so rules can branch on it."""
    name = request.match_info["name"]
    channel = request.app[CHANNELS].get(name)
    if channel is None or not isinstance(channel, CallbackChannel):
        return error_response(404, f"channel `{name}` takes no callbacks")
    outcomes = await channel.callback(request)
    store = request.app[STORE]
    accepted, fates = await store.record_outcomes(name, outcomes, on_counts=request.app[METRICS].count_flow)
    tell(fates, request.app[METRICS].count_fate)
    if accepted:
        request.app[INBOX].wake.set()
    return json_response(CallbacksAccepted(accepted))
