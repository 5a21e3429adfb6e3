"""The channels and plugins loaded, and the providers' signed outcome callbacks."""

from __future__ import annotations

from datetime import timedelta

from aiohttp import web

from rulesvc.channels import CallbackChannel, deduplicates
from rulesvc.runtime.dispatcher import send_timeout
from rulesvc.web.keys import CHANNELS, INBOX, PLUGINS, SETTINGS, STORE
from rulesvc.web.schemas import CallbacksAccepted, ChannelInfo, ChannelList, PluginInfo
from rulesvc.web.views.base import error_response, json_response


def channel_list(app: web.Application) -> ChannelList:
    infos = []
    for channel in app[CHANNELS].all():
        try:
            configured, detail = channel.status()
        except Exception as exc:
            configured, detail = False, f"status check failed: {type(exc).__name__}: {exc}"
        lease = timedelta(seconds=app[SETTINGS].lease_seconds)
        infos.append(
            ChannelInfo(channel.name, configured, detail, deduplicates(channel),
                        isinstance(channel, CallbackChannel), round(send_timeout(channel, lease), 3))
        )  # fmt: skip
    plugins = [PluginInfo(p.name, p.source, p.channels, p.jobs, p.error) for p in app[PLUGINS]]
    return ChannelList(infos, plugins)


async def get_channels(request: web.Request) -> web.Response:
    return json_response(channel_list(request.app))


async def channel_callback(request: web.Request) -> web.Response:
    """A provider reports outcomes; each becomes a message_* event, so rules can branch on it."""
    name = request.match_info["name"]
    channel = request.app[CHANNELS].get(name)
    if channel is None or not isinstance(channel, CallbackChannel):
        return error_response(404, f"channel `{name}` takes no callbacks")
    outcomes = await channel.callback(request)
    store = request.app[STORE]
    accepted = await store.record_outcomes(name, outcomes)
    if accepted:
        request.app[INBOX].wake.set()
    return json_response(CallbacksAccepted(accepted))
