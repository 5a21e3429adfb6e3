"""Loading plugins: built-in ones first, then every installed distribution's `rulesvc` entry points.

A plugin that fails to import or to register is reported and skipped; the others load.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from typing import Any

import pluggy
import structlog

from rulesvc import hookspecs
from rulesvc.channels import (
    JOB,
    MESSAGE_CHANNEL,
    ChannelRegistry,
    ChannelSettingsError,
    Misconfigured,
    kind_of,
    settings_table,
)
from rulesvc.default_plugins.builtin import BUILTIN_PLUGINS

log = structlog.get_logger(__name__)

ENTRY_POINT_GROUP = "rulesvc"


@dataclass
class Provided:
    """One thing a plugin registered: a channel or a job (the object itself, to ask its status)."""

    name: str
    kind: str  # "message channel", "audience sync", "job"
    thing: Any
    job: bool = False


@dataclass
class PluginReport:
    name: str
    source: str  # "built-in" or the distribution that provides it
    channels: list[str] = field(default_factory=list)
    jobs: list[str] = field(default_factory=list)
    error: str | None = None
    provides: list[Provided] = field(default_factory=list)
    settings_errors: list[str] = field(default_factory=list)


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

    read: set[str] = set()  # the [channels.NAME] sections some plugin asked for

    def config(name: str) -> dict[str, Any]:
        read.add(name)
        return channel_config(name, channel_settings or {}, env)

    registry = ChannelRegistry()
    by_name = {r.name: r for r in reports}

    def collect(hook: Any, kind: str) -> list[tuple[PluginReport | None, list[Any]]]:
        """Each plugin's registrations for one hook; a plugin that fails is reported, not loaded. Wrong
        settings are no failure of the plugin: its channel or job stays listed, not configured."""
        found = []
        for impl in hook.get_hookimpls():
            report = by_name.get(impl.plugin_name)
            registered: list[Any] = []
            try:
                impl.function(register=registered.append, config=config)
            except ChannelSettingsError as exc:
                registered.append(_placeholder(exc, kind))
                registry.settings_errors.extend((exc.channel, p) for p in exc.problems)
                if report is not None:
                    report.settings_errors.extend(exc.problems)
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
                report.provides.append(Provided(channel.name, kind_of(channel, MESSAGE_CHANNEL), channel))
    for report, jobs in collect(pm.hook.register_jobs, "jobs"):
        registry.jobs.extend(jobs)
        if report is not None:
            report.jobs.extend(j.name for j in jobs)
            report.provides.extend(Provided(j.name, kind_of(j, JOB), j, job=True) for j in jobs)
    known = read | registry.names()
    registry.settings_warnings = unknown_channel_settings(channel_settings or {}, env, known)
    return registry, reports


def current_parts(report: PluginReport, registry: ChannelRegistry) -> list[Provided]:
    """What a plugin provides that is in use: a channel a later plugin replaced (a built-in placeholder
    for an installed plugin's channel) is left out."""
    return [p for p in report.provides if p.job or registry.get(p.name) is p.thing]


def _placeholder(exc: ChannelSettingsError, hook_kind: str) -> Misconfigured:
    """Stands for the channel or job whose settings are wrong, under its own name and kind."""
    name = str(getattr(exc.owner, "name", exc.channel))
    kind = kind_of(exc.owner, JOB if hook_kind == "jobs" else MESSAGE_CHANNEL)
    return Misconfigured(name, exc.problems, kind, bool(getattr(exc.owner, "deduplicates", False)))


def _did_you_mean(name: str, known: set[str]) -> str:
    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
    return f"; did you mean `{close[0]}`?" if close else "; no loaded plugin reads them"


def unknown_channel_settings(
    configured: dict[str, dict[str, Any]], environ: dict[str, str], known: set[str]
) -> list[tuple[str, str]]:
    """`[channels.emial]` or RULESVC_CHANNEL_EMIAL_HOST: settings no loaded plugin reads (a typo, or a
    plugin not installed), each with the closest channel that exists."""
    warnings = [
        (name, f"settings for unknown channel `{name}`{_did_you_mean(name, known)}")
        for name in sorted(configured)
        if name not in known
    ]
    prefix = "RULESVC_CHANNEL_"
    for key in sorted(environ):
        if not key.startswith(prefix) or any(key.startswith(f"{prefix}{n.upper()}_") for n in known):
            continue
        name = key[len(prefix) :].partition("_")[0].lower()
        warnings.append((name, f"settings for unknown channel `{name}` ({key}){_did_you_mean(name, known)}"))
    return warnings


def settings_problems(registry: ChannelRegistry) -> list[str]:
    """Every wrong channel setting (`channels.email.port: expected an integer, got "abc"`), then a
    `warning: ` line for each section no plugin reads. `rulesvc check` fails on the first kind only."""
    return [p for _, p in registry.settings_errors] + [f"warning: {w}" for _, w in registry.settings_warnings]


def log_settings_problems(registry: ChannelRegistry) -> None:
    """At start-up: one error line per wrong setting, one warning per unknown section. The problems
    never hold a secret's value (see `rulesvc.channels.read_settings`)."""
    for channel, problem in registry.settings_errors:
        log.error("channel.settings_invalid", channel=channel, problem=problem)
    for channel, warning in registry.settings_warnings:
        log.warning("channel.settings_unknown", channel=channel, problem=warning)


def channel_settings_reference() -> str:
    """Markdown: a `### channels.NAME` section with a table per plugin channel or job that declares its
    `settings_type`, from the installed plugins. docs/ paste it; a test keeps them equal."""
    _, reports = load_plugins(BUILTIN_PLUGINS, {}, None, {})
    sections: dict[str, str] = {}
    for report in reports:
        for part in report.provides:
            settings_type = getattr(part.thing, "settings_type", None)
            if settings_type is None:
                continue
            name = str(getattr(part.thing, "settings_name", part.name))
            heading = f"### channels.{name}\n\n{part.kind.capitalize()} of `{report.source.split()[0]}`"
            doc = (settings_type.__doc__ or "").strip()
            sections[name] = f"{heading}. {doc}\n\n{settings_table(name, settings_type)}\n"
    return "\n".join(sections[n] for n in sorted(sections))


def builtin_channels() -> ChannelRegistry:
    """Only the built-ins, without entry points: what `check` and the tests use."""
    registry, _ = load_plugins(BUILTIN_PLUGINS, only=[])
    return registry
