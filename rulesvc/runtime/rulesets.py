"""The loaded rulesets: read from the rulesets folder, compiled, swapped in atomically, hot-reloaded.

A ruleset's name is its file name without `.json`. A valid change goes live as one swap; an invalid one
leaves the previous version running and its errors listed. State lives in MongoDB, so a reload loses no
contact state.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import structlog
import watchfiles

from rulesvc.core.engine import CompiledRuleset, CompileError, Engine, RuleIndex
from rulesvc.core.ruleformat import (
    InvalidRuleset,
    Rule,
    RulesetError,
    RulesetFile,
    channels_used,
    guaranteed,
    listened_events,
    locate_errors,
    parse_ruleset,
    send_actions,
)
from rulesvc.runtime.templates import Templates
from rulesvc.runtime.waiting import wait_any

log = structlog.get_logger(__name__)

RULESET_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")  # use with fullmatch: `$` lets a final newline in
NOT_RULESETS = frozenset({"schema.json"})


def version_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:12]


@dataclass
class RulesetStatus:
    """What `GET /v1/rulesets` shows: the live version and, if the last edit was refused, why."""

    name: str
    file: str
    status: Literal["loaded", "error"]
    version: str | None = None
    loaded_at: datetime | None = None
    events: list[str] = field(default_factory=list)
    errors: list[RulesetError] = field(default_factory=list)


def ruleset_files(directory: Path) -> dict[str, Path]:
    if not directory.is_dir():
        return {}
    return {p.stem: p for p in sorted(directory.glob("*.json")) if p.name not in NOT_RULESETS}


def folder_problem(directory: Path) -> str | None:
    """Why a rulesets folder gives no rulesets, with its absolute path: a service started in another
    directory finds none, and says so rather than serving while it sends nothing."""
    where = directory.absolute()
    if not directory.is_dir():
        return f"the rulesets folder {where} does not exist"
    if not ruleset_files(directory):
        return f"no rulesets in {where}"
    return None


def write_source(directory: Path, name: str, data: bytes) -> Path:
    """Atomically: the watcher (and a reload) sees the old file or the new one, never half of it."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    temporary = directory / f".{name}.json.{os.getpid()}.tmp"  # not *.json: never taken for a ruleset
    try:
        with temporary.open("wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def read_source(path: Path) -> bytes:
    """A regular file's bytes only: a FIFO (or a device) named `x.json` would block the reader forever,
    and the API reads folders an admin names. Opened without blocking, then checked, then read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        with open(fd, "rb") as file:
            if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
                raise InvalidRuleset([RulesetError(path.name, "$", "cannot read: not a regular file")])
            return file.read()
    except OSError as exc:
        raise InvalidRuleset([RulesetError(path.name, "$", f"cannot read: {exc.strerror}")]) from exc


def template_check(templates: Templates | None) -> Callable[[str], str | None] | None:
    """What the validator asks of each send's template: why it cannot be used, or None."""
    if templates is None:
        return None

    def problem(name: str) -> str | None:
        return None if templates.parts(name) else f"template `{name}` not found in {templates.directory}"

    return problem


def compile_source(
    path: Path, data: bytes, channels: frozenset[str], templates: Templates | None = None
) -> CompiledRuleset:
    """Parse, validate and compile one file: the one validation `check`, the loader, `simulate` and
    `PUT /v1/rulesets/{name}` share. Every problem comes out as InvalidRuleset, even one the checks
    missed and the compiler chokes on: a bug there must cost one ruleset, never the watcher or a request."""
    try:
        return _compile(path, data, channels, templates)
    except InvalidRuleset:
        raise
    except Exception as exc:
        log.exception("ruleset.compile_failed", file=path.name)
        error = RulesetError(path.name, "$", f"cannot be compiled: {type(exc).__name__}: {exc}")
        raise InvalidRuleset([error]) from exc


def _compile(
    path: Path, data: bytes, channels: frozenset[str], templates: Templates | None
) -> CompiledRuleset:
    if not RULESET_NAME.fullmatch(path.stem) or path.name in NOT_RULESETS:
        raise InvalidRuleset(
            [RulesetError(path.name, "$", "file name must be lower case letters, digits and _")]
        )
    source = parse_ruleset(path.name, data, channels, template_check(templates))
    try:
        return CompiledRuleset.compile(path.stem, version_hash(data), source)
    except CompileError as exc:
        raise InvalidRuleset(locate_errors(path.name, data, [(exc.path, str(exc))])) from exc


def check_file(
    path: Path,
    channels: frozenset[str],
    templates: Templates | None = None,
    warnings: list[RulesetError] | None = None,
    unconfigured: dict[str, str] | None = None,
) -> list[RulesetError]:
    """What loading would find. Into `warnings`: params a template needs that a send may not give (see
    `param_warnings`), and sends on a channel in `unconfigured` (name -> why): valid, but such
    messages would fail or be suppressed."""
    try:
        data = read_source(path)
        compiled = compile_source(path, data, channels, templates)
    except InvalidRuleset as exc:
        return exc.errors
    if warnings is not None:
        found: list[tuple[str, str]] = []
        if templates is not None:
            found.extend((e.path, e.message) for e in param_warnings(path.name, compiled.source, templates))
        for channel, wheres in channels_used(compiled.source).items():
            if unconfigured and channel in unconfigured:  # said once per file, at its first send
                more = f" (and {len(wheres) - 1} more send(s) in this file)" if len(wheres) > 1 else ""
                said = f"channel `{channel}` is not configured ({unconfigured[channel]})"
                found.append((wheres[0], f"{said}: messages on it are suppressed{more}"))
        warnings.extend(locate_errors(path.name, data, found))
    compiled.free()
    return []


def param_warnings(file: str, source: RulesetFile, templates: Templates) -> list[RulesetError]:
    """Where a template prints a param (without a default or a guard) that its send does not give, or
    gives from a path the rule's conditions do not require: such messages fail with template_error."""
    found: list[RulesetError] = []
    for where, send, rule in send_actions(source):
        # The send as written, and each A/B arm with its own template and its params over the send's.
        versions = [(where, send.template, send.params)]
        versions += [(f"{where}.variants[{k}]", v.template or send.template, {**send.params, **v.params})
                     for k, v in enumerate(send.variants) if v.template or v.params]  # fmt: skip
        for at, template, params in versions:
            for part, names in templates.used_params(template).items():
                for name in names:
                    problem = _param_problem(params, name, rule)
                    if problem is not None:
                        path = f"{at}.params" + (f".{name}" if name in params else "")
                        shown = f"template `{template}.{part}` prints `params.{name}`"
                        found.append(RulesetError(file, path, f"{shown}, {problem}"))
    return found


def _param_problem(params: dict[str, Any], name: str, rule: Rule) -> str | None:
    if name not in params:
        return "which this send does not give: every such message fails with template_error"
    value = params[name]
    if value is None:
        return "which is null: every such message fails with template_error"
    if not isinstance(value, str) or not value.startswith("$") or value.startswith("$$"):
        return None
    path = value[1:]
    if guaranteed(path, rule):
        return None
    condition = json.dumps({path: {"exists": True}})
    return (
        f"which comes from `{path}`, which the rule's conditions do not require: a message without it "
        f"fails with template_error (add a condition `{condition}` or `| default(...)` in the template)"
    )


class Rulesets:
    """With `templates`, a ruleset naming a template that does not exist is refused, as `check` refuses
    it; the refused files are tried again at every reload, so adding the template loads it."""

    def __init__(self, directory: Path, channels: frozenset[str], templates: Templates | None = None) -> None:
        self.directory = directory
        self.channels = channels
        self.templates = templates
        self.live: dict[str, CompiledRuleset] = {}
        self.status: dict[str, RulesetStatus] = {}
        self.index = RuleIndex([])
        self._engine = Engine(self.index)
        self.loaded_once = False

    def reload(self) -> bool:
        """Synchronous on purpose: the swap happens between two events, never during one."""
        files = ruleset_files(self.directory)
        changed = False
        for name in list(self.live):
            if name not in files:
                self.live.pop(name).free()
                self.status.pop(name, None)
                log.info("ruleset.unloaded", ruleset=name)
                changed = True
        for name in list(self.status):
            if name not in files:
                self.status.pop(name)
        retired: list[CompiledRuleset] = []
        for name, path in files.items():
            result = self._load(name, path)
            if result is not None:
                old = self.live.get(name)
                self.live[name] = result
                if old is not None:
                    retired.append(old)
                changed = True
        if changed:
            self.index = RuleIndex(list(self.live.values()))
            self._engine = Engine(self.index)
        for old in retired:  # freed only after the new index replaced every reference to it
            old.free()
        self.loaded_once = True
        return changed

    def _load(self, name: str, path: Path) -> CompiledRuleset | None:
        try:
            data = read_source(path)
            current = self.live.get(name)
            if current is not None and current.version == version_hash(data):
                status = self.status[name]
                status.status, status.errors = "loaded", []  # an error was fixed by undoing the edit
                return None
            compiled = self.validate(path, data)
        except InvalidRuleset as exc:
            self._refuse(name, path, exc.errors)
            return None
        version = compiled.version
        events = listened_events(compiled.source)
        self.status[name] = RulesetStatus(name, path.name, "loaded", version, datetime.now(UTC), events)
        log.info("ruleset.loaded", ruleset=name, version=version, events=events)
        return compiled

    def validate(self, path: Path, data: bytes) -> CompiledRuleset:
        """The loader's own validation, for a file not yet written too (`PUT /v1/rulesets/{name}`)."""
        return compile_source(path, data, self.channels, self.templates)

    def _refuse(self, name: str, path: Path, errors: list[RulesetError]) -> None:
        previous = self.status.get(name)
        said_before = previous is not None and previous.status == "error" and previous.errors == errors
        self.status[name] = RulesetStatus(
            name,
            path.name,
            "error",
            previous.version if previous and name in self.live else None,
            previous.loaded_at if previous and name in self.live else None,
            previous.events if previous and name in self.live else [],
            errors,
        )
        if said_before:  # retried at every reload: logged once per change, not per retry
            return
        for error in errors:
            log.error(
                "ruleset.invalid",
                ruleset=name,
                file=error.file,
                line=error.line,
                column=error.column,
                path=error.path,
                message=error.message,
                kept_version=self.status[name].version,
            )

    def engine(self) -> Engine:
        """The engine over the rulesets live now; take one per batch so a reload never splits a batch."""
        return self._engine

    def errors(self) -> list[RulesetError]:
        return [e for s in self.status.values() for e in s.errors]

    def _watched(self) -> list[Path]:
        """The rulesets folder (its templates folder included) and the templates folder if elsewhere."""
        paths = [self.directory.resolve()]
        if self.templates is not None and self.templates.directory.is_dir():
            templates = self.templates.directory.resolve()
            if not templates.is_relative_to(paths[0]):
                paths.append(templates)
        return paths

    def _relevant(self, _: watchfiles.Change, changed: str) -> bool:
        """A ruleset file, or anything in the templates folder: a missing template may have appeared."""
        path = Path(changed)
        if path.parent == self.directory.resolve():
            return path.suffix == ".json"
        return self.templates is not None and path.is_relative_to(self.templates.directory.resolve())

    async def watch(self, stop: asyncio.Event, debounce_ms: int = 100) -> None:
        """Reload on every change of a ruleset or a template; a missing folder is waited for."""
        while not stop.is_set():
            if not self.directory.is_dir():
                await wait_any(stop, seconds=1.0)
                continue
            try:
                async for _ in watchfiles.awatch(
                    *self._watched(),
                    watch_filter=self._relevant,
                    stop_event=stop,
                    debounce=debounce_ms,
                    step=50,
                    recursive=True,
                ):
                    self.reload()
            except FileNotFoundError:
                await wait_any(stop, seconds=1.0)
            # awatch returns when the folder itself goes away: reload to unload its rulesets
            self.reload()
