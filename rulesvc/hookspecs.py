"""The hooks a rulesvc plugin can implement. Built-in plugins register first, then entry points."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from rulesvc.channels import Channel, Job

hookspec = pluggy.HookspecMarker("rulesvc")
hookimpl = pluggy.HookimplMarker("rulesvc")


@hookspec
def register_channels(register: Callable[[Channel], None], config: Callable[[str], dict[str, Any]]) -> None:
    """Register channels; `config(name)` is a channel's settings: [channels.NAME], RULESVC_CHANNEL_NAME_*.
    Read them with `rulesvc.channels.read_settings`: a ChannelSettingsError it raises is reported as
    wrong settings, and the channel is listed as not configured."""


@hookspec
def register_jobs(register: Callable[[Job], None], config: Callable[[str], dict[str, Any]]) -> None:
    """Register background jobs (e.g. an ads audience sync); one process at a time runs each."""
