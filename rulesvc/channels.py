"""Channels deliver what rules decide. Until a channel's plugin is installed, its sends are recorded only.

The built-in `log` channel records a message in the contact's history as `sent` and delivers nothing;
it stands in for every standard channel that no plugin provides yet, so rulesets can be written,
simulated and tested before the providers are set up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol

STANDARD_CHANNELS = ("email", "sms", "push", "webpush", "inapp", "ads", "webhook")


@dataclass(frozen=True)
class Delivery:
    status: Literal["sent", "failed"]
    reason: str | None = None


class Channel(Protocol):
    name: str
    configured: bool

    async def send(self, message: dict[str, Any], contact: dict[str, Any]) -> Delivery: ...


class LogChannel:
    """Records only: the message history is the whole delivery."""

    configured = True

    def __init__(self, name: str = "log") -> None:
        self.name = name

    async def send(self, message: dict[str, Any], contact: dict[str, Any]) -> Delivery:
        return Delivery(
            "sent", None if self.name == "log" else "recorded only: no plugin for this channel yet"
        )


class ChannelRegistry:
    def __init__(self) -> None:
        self._channels: dict[str, Channel] = {}

    def register(self, channel: Channel) -> None:
        self._channels[channel.name] = channel

    def get(self, name: str) -> Channel | None:
        return self._channels.get(name)

    def names(self) -> frozenset[str]:
        return frozenset(self._channels)


def builtin_channels() -> ChannelRegistry:
    registry = ChannelRegistry()
    registry.register(LogChannel())
    for name in STANDARD_CHANNELS:
        registry.register(LogChannel(name))
    return registry
