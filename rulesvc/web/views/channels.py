"""The channels and plugins loaded, and the providers' signed outcome callbacks."""

from __future__ import annotations

import asyncio
import ipaddress
import math
import socket
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from urllib.parse import urlsplit

import msgspec
import structlog
from aiohttp import web
from pymongo.errors import PyMongoError

from rulesvc.channels import MESSAGE_CHANNEL, CallbackChannel, deduplicates, kind_of, status_of
from rulesvc.core.bodies import TOO_DEEP
from rulesvc.core.events import split_validation_error
from rulesvc.core.masking import mask_credentials
from rulesvc.core.overview import DAY, by_channel, send_health
from rulesvc.core.testsend import recipient
from rulesvc.plugins import PluginReport, current_parts
from rulesvc.runtime.dispatcher import send_timeout
from rulesvc.runtime.fate import tell
from rulesvc.runtime.testsend import send_test
from rulesvc.store.jobs import JobRuns
from rulesvc.store.overview import OverviewReads
from rulesvc.web.keys import CHANNELS, INBOX, METRICS, PLUGINS, SETTINGS, STORE, TEST_SENDS
from rulesvc.web.overview_schemas import ChannelTestFailed, ChannelTestRequest, ChannelTestResult
from rulesvc.web.schemas import (
    CallbacksAccepted,
    ChannelInfo,
    ChannelList,
    ErrorBody,
    JobError,
    JobRun,
    PluginInfo,
    PluginPart,
)
from rulesvc.web.views.base import error_response, json_response, read_body

log = structlog.get_logger(__name__)

RUNS_UNKNOWN = "last run unknown: the database did not answer"


@dataclass(frozen=True)
class Sends:
    """The channels' sends, for their listing: the last 24 h's counts by channel and status (the funnel's
    counters of every hour overlapping them), and each channel's last send."""

    counts: dict[str, dict[str, int]]
    last_sent: dict[str, datetime]


def channel_list(
    app: web.Application, runs: dict[str, dict[str, Any]] | None = None, sends: Sends | None = None
) -> ChannelList:
    """Channels and plugins; `runs` are the jobs' last runs and errors by name, `sends` the channels'
    sends (None: not known, the database did not answer)."""
    infos = []
    lease = timedelta(seconds=app[SETTINGS].lease_seconds)
    for channel in app[CHANNELS].all():
        configured, detail = status_of(channel)
        detail = mask_credentials(detail)
        info = ChannelInfo(channel.name, configured, detail, deduplicates(channel),
                           isinstance(channel, CallbackChannel), round(send_timeout(channel, lease), 3),
                           kind_of(channel, MESSAGE_CHANNEL))  # fmt: skip
        if sends is not None:
            info.last_sent_at = sends.last_sent.get(channel.name)
            if app[STORE].count_stats:
                health = send_health(sends.counts.get(channel.name, {}))
                info.sent_24h, info.failed_24h, info.error_rate_24h = (
                    health.sent,
                    health.failed,
                    health.error_rate,
                )
        infos.append(info)
    plugins = [plugin_info(p, app, runs) for p in app[PLUGINS]]
    return ChannelList(infos, plugins)


async def read_sends(app: web.Application, now: datetime) -> Sends:
    """The channels' sends from MongoDB (PyMongoError if it does not answer)."""
    reads = OverviewReads(app[STORE])
    counts = by_channel(await reads.messages_by_channel(now - DAY)) if app[STORE].count_stats else {}
    return Sends(counts, await reads.last_sent(sorted(app[CHANNELS].names())))


async def channels_of(app: web.Application, sends: Sends | None = None) -> ChannelList:
    """`GET /v1/channels`: every channel and plugin, with the jobs' runs and the channels' sends when the
    database answers; without them when not (the listing is for finding out what is wrong). `sends`
    given: those, read once by a caller that needs them too (the overview)."""
    store = app[STORE]
    runs: dict[str, dict[str, Any]] | None = None
    if app[CHANNELS].jobs:
        try:
            runs = await JobRuns.of(store).all()
        except PyMongoError:
            runs = None
    if sends is None:
        try:
            sends = await read_sends(app, datetime.now(UTC))
        except PyMongoError:
            sends = None
    return channel_list(app, runs, sends)


def plugin_info(
    report: PluginReport, app: web.Application, runs: dict[str, dict[str, Any]] | None
) -> PluginInfo:
    parts = []
    for part in current_parts(report, app[CHANNELS]):
        configured, detail = status_of(part.thing)
        detail = mask_credentials(detail)
        last_run = last_error = None
        if part.job and runs is None:
            detail = f"{detail}; {RUNS_UNKNOWN}"
        elif part.job:
            doc = runs.get(part.name, {}) if runs else {}
            last_run = msgspec.convert(doc["last_run"], JobRun) if "last_run" in doc else None
            last_error = msgspec.convert(doc["last_error"], JobError) if "last_error" in doc else None
            if last_error is not None:  # an exception's text often names the URL it called
                last_error = msgspec.structs.replace(last_error, message=mask_credentials(last_error.message))
        parts.append(PluginPart(part.name, part.kind, configured, detail, last_run, last_error))
    return PluginInfo(
        report.name, report.source, report.channels, report.jobs, report.error, parts, report.settings_errors
    )


async def get_channels(request: web.Request) -> web.Response:
    return json_response(await channels_of(request.app))


TrialAnswer = tuple[int, ChannelTestResult | ChannelTestFailed | ErrorBody]


async def channel_test_send(app: web.Application, name: str, body: ChannelTestRequest) -> TrialAnswer:
    """A test send through the channel's plugin, with the fixed test message, to the address in `body`:
    no contact, rule, history or counter is touched. (status, body): 200 sent; 404 no such channel; 409
    not configured; 422 an address the channel cannot use; 502 the provider did not take it, with its
    words."""
    channel = app[CHANNELS].get(name)
    if channel is None:
        known = sorted(app[CHANNELS].names())
        return 404, ErrorBody(f"no channel `{name}`; the channels are {', '.join(known)}")
    configured, detail = status_of(channel)
    if not configured:
        return 409, ErrorBody(f"channel `{name}` is not configured: {mask_credentials(detail)}")
    profile, field, problem = recipient(name, body.to, body.webpush_subscription)
    if problem is None:
        try:
            problem = channel.reachable({"contact_id": "rulesvc-test", **profile})
        except Exception as exc:  # a plugin's check failing is its answer, not the service's error
            problem = f"the channel's address check failed: {type(exc).__name__}: {exc}"
        field = field or ("$.webpush_subscription" if name == "webpush" else "$.to")
        if problem is not None:
            problem = f"the `{name}` channel cannot send to this: {problem}"
    if problem is None and body.webpush_subscription is not None and name == "webpush":
        problem = await _public_host(body.webpush_subscription.endpoint)
        field = "$.webpush_subscription.endpoint"
    if problem is not None:
        return 422, ErrorBody(problem, field)
    wait = app[TEST_SENDS].check(name)
    if wait is not None:
        return 429, ErrorBody(
            f"at most {app[TEST_SENDS].burst:.0f} test sends a minute through a channel; the next in "
            f"{max(1, math.ceil(wait))} s"
        )
    # Who tested what, and where to: the key is on the line already (API or console); the log's own
    # processor masks the address (rulesvc.logs: emails and phone numbers never written whole).
    log.info("channel.test_send_requested", channel=name, to=body.to)
    timeout = send_timeout(channel, timedelta(seconds=app[SETTINGS].lease_seconds))
    sent = await send_test(channel, profile, datetime.now(UTC), timeout)
    delivery = sent.delivery
    if delivery.status == "sent":  # as plain strings: a plugin may hand a str subclass (an email header)
        provider_id = None if delivery.provider_id is None else str(delivery.provider_id)
        reason = None if delivery.reason is None else mask_credentials(str(delivery.reason))
        return 200, ChannelTestResult(name, "sent", sent.message_id, sent.seconds, reason, provider_id)
    said = mask_credentials(str(delivery.reason or "(no reason given)"))
    error = f"the `{name}` provider did not take the test message ({delivery.status}): {said}"
    status: Literal["failed", "retry", "blocked"] = "failed"
    if delivery.status in ("retry", "blocked"):
        status = "retry" if delivery.status == "retry" else "blocked"
    return 502, ChannelTestFailed(error, name, status, said, sent.message_id, sent.seconds)


_TEST_DECODER = msgspec.json.Decoder(ChannelTestRequest)


async def post_channel_test(request: web.Request) -> web.Response:
    raw = await read_body(request)
    body = ChannelTestRequest()
    if raw:  # a body, even of blanks, is JSON as declared; none at all is `{}`
        try:
            body = _TEST_DECODER.decode(raw)
        except msgspec.ValidationError as exc:
            path, message = split_validation_error(exc)
            return json_response(ErrorBody(message, path), 422)
        except msgspec.DecodeError as exc:
            return error_response(400, f"malformed JSON: {exc}")
        except RecursionError:
            return error_response(400, TOO_DEEP)
    status, answer = await channel_test_send(request.app, request.match_info["name"], body)
    return json_response(answer, status)


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


async def _public_host(url: str) -> str | None:
    """Every address the push service's name resolves to is a public one (`127.1`, `0x7f000001`, a name
    pointing into the service's own network: refused), so a test send cannot be made to call inward."""
    host = urlsplit(url).hostname or ""
    try:
        found = await asyncio.get_running_loop().getaddrinfo(host, 443, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return f"`{host}` does not resolve"
    for *_, address in found:
        if not ipaddress.ip_address(str(address[0]).split("%")[0]).is_global:
            return f"`{host}` is not a public push service"
    return None
