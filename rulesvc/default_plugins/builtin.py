"""The built-in plugin: the `log` and in-app channels, and placeholders for standard channels.

Placeholders let rulesets name a standard channel before its plugin is installed; an installed plugin's
channel of the same name replaces the placeholder (entry points load after the built-ins).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from rulesvc.channels import (
    STANDARD_CHANNELS,
    Channel,
    ChannelSettings,
    ChannelSettingsError,
    Delivery,
    LogChannel,
    OutboundMessage,
    Unconfigured,
    read_settings,
)
from rulesvc.hookspecs import hookimpl

SAFE_URL = re.compile(r"^(https?://|/(?![/\\]))", re.IGNORECASE)  # not //host or /\host: another site


class InAppChannel:
    """The shop's own pages show these: `GET /v1/contacts/{id}/inbox` lists what to show now."""

    name = "inapp"
    local = True  # stored in the contact's history: a re-run changes nothing
    deduplicates = True
    html = True  # pages show title and body as HTML: template params in them are escaped

    def status(self) -> tuple[bool, str]:
        return True, "stored for the contact's inbox"

    def reachable(self, contact: dict[str, Any]) -> str | None:
        return None

    async def send(self, message: OutboundMessage) -> Delivery:
        if not (message.content.get("title") or message.content.get("body")):
            return Delivery("failed", "template has neither a title nor a body")
        url = message.content.get("url", "")
        if url and not SAFE_URL.match(url):  # a page puts it in a link: no javascript:, data:, ...
            return Delivery("failed", "template_error: `.url` must be an http(s) URL or a path on the shop")
        content = {k: message.content[k] for k in ("title", "body", "url") if k in message.content}
        return Delivery("sent", record={"content": content})


class BuiltinChannels:
    @hookimpl
    def register_channels(
        self, register: Callable[[Channel], None], config: Callable[[str], dict[str, Any]]
    ) -> None:
        """The channels that need no provider, then a placeholder for every other standard channel. Their
        sections take only the common settings (`quiet_hours`): a typo there is an error like anywhere."""
        wrong: list[ChannelSettingsError] = []
        for channel in (LogChannel(), InAppChannel()):
            try:
                read_settings(channel.name, config(channel.name), ChannelSettings, owner=type(channel))
            except ChannelSettingsError as exc:
                wrong.append(exc)
                continue
            register(channel)
        for name in STANDARD_CHANNELS:
            if name != "inapp":
                register(Unconfigured(name))
        if wrong:  # the loader lists it as not configured, with its problems
            raise wrong[0]


BUILTIN_PLUGINS: list[tuple[str, object]] = [("builtin", BuiltinChannels())]
