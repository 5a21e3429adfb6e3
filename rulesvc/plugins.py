"""Loading plugins: built-in ones first, then every installed distribution's `rulesvc` entry points.

A plugin that fails to import or to register is reported and skipped; the others load.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import pluggy
import structlog

from rulesvc import hookspecs
from rulesvc.channels import ChannelRegistry
from rulesvc.default_plugins.builtin import BUILTIN_PLUGINS

log = structlog.get_logger(__name__)

ENTRY_POINT_GROUP = "rulesvc"


@dataclass
class PluginReport:
    name: str
    source: str  # "built-in" or the distribution that provides it
    channels: list[str] = field(default_factory=list)
    jobs: list[str] = field(default_factory=list)
    error: str | None = None


def channel_config(
    name: str, configured: dict[str, dict[str, Any]], environ: dict[str, str]
) -> dict[str, Any]:
    """`[channels.NAME]` from the TOML file, then `RULESVC_CHANNEL_NAME_KEY` variables (lower-cased keys)."""
    values = dict(configured.get(name, {}))
    prefix = f"RULESVC_CHANNEL_{name.upper()}_"
    for key, value in environ.items():
        if key.startswith(prefix):
            values[key[len(prefix) :].lower()] = value
    return values


def load_plugins(
    builtins: list[tuple[str, object]],
    channel_settings: dict[str, dict[str, Any]] | None = None,
    only: list[str] | None = None,
    environ: dict[str, str] | None = None,
) -> tuple[ChannelRegistry, list[PluginReport]]:
    """`only` (RULESVC_PLUGINS) names the entry-point plugins allowed to load; built-ins always load."""
    env = dict(os.environ if environ is None else environ)
    pm = pluggy.PluginManager("rulesvc")
    pm.add_hookspecs(hookspecs)
    reports: list[PluginReport] = []
    for name, plugin in builtins:
        pm.register(plugin, name=name)
        reports.append(PluginReport(name, "built-in"))
    try:
        pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    except Exception as exc:  # one broken distribution must not take the others down
        log.error("plugins.entry_point_failed", error=repr(exc))
        reports.append(PluginReport("entry points", "installed", error=repr(exc)))
    for plugin, dist in pm.list_plugin_distinfo():
        name = pm.get_name(plugin) or "?"
        if only is not None and name not in only:
            pm.unregister(plugin)
            continue
        reports.append(PluginReport(name, f"{dist.project_name} {dist.version}"))

    def config(name: str) -> dict[str, Any]:
        return channel_config(name, channel_settings or {}, env)

    registry = ChannelRegistry()
    by_name = {r.name: r for r in reports}

    def collect(hook: Any, kind: str) -> list[tuple[PluginReport | None, list[Any]]]:
        """Each plugin's registrations for one hook; a plugin that fails is reported, not loaded."""
        found = []
        for impl in hook.get_hookimpls():
            report = by_name.get(impl.plugin_name)
            registered: list[Any] = []
            try:
                impl.function(register=registered.append, config=config)
            except Exception as exc:
                log.error(f"plugins.register_{kind}_failed", plugin=impl.plugin_name, error=repr(exc))
                if report is not None:
                    report.error = f"{type(exc).__name__}: {exc}"
                continue
            found.append((report, registered))
        return found

    for report, channels in collect(pm.hook.register_channels, "channels"):
        for channel in channels:
            registry.register(channel)  # later plugins override earlier ones of the same name
            if report is not None:
                report.channels.append(channel.name)
    for report, jobs in collect(pm.hook.register_jobs, "jobs"):
        registry.jobs.extend(jobs)
        if report is not None:
            report.jobs.extend(j.name for j in jobs)
    return registry, reports


def builtin_channels() -> ChannelRegistry:
    """Only the built-ins, without entry points: what `check` and the tests use."""
    registry, _ = load_plugins(BUILTIN_PLUGINS, only=[])
    return registry
