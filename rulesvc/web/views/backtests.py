"""`/v1/backtests`: start a backtest job (checked here, run in a process of its own), read its progress
and report, list the recent ones, cancel one. One job runs at a time per service, whichever worker
process a request reaches: the job documents in MongoDB decide (`store.backtest_jobs`)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
from aiohttp import web

from rulesvc.config import Settings
from rulesvc.core.bodies import TOO_DEEP
from rulesvc.core.events import split_validation_error
from rulesvc.core.ruleformat import InvalidRuleset
from rulesvc.replay.backtest import Options, Report, Window
from rulesvc.replay.simulate import LiveRuleset
from rulesvc.runtime.backtests import (
    LOST_AFTER,
    Handoff,
    WindowProblem,
    backtest_window,
    compile_folder,
    owner,
    usable_folder,
)
from rulesvc.runtime.rulesets import NOT_RULESETS, RULESET_NAME, Rulesets, compile_source
from rulesvc.store.backtest_jobs import KEEP
from rulesvc.web.backtest_schemas import (
    BacktestAsked,
    BacktestConflict,
    BacktestEnded,
    BacktestJob,
    BacktestLinks,
    BacktestList,
    BacktestProblem,
    BacktestProgress,
    BacktestRejected,
    BacktestRequest,
)
from rulesvc.web.keys import BACKTESTS, MONGO_URI, RULESETS, SETTINGS
from rulesvc.web.lifecycle import templates_of
from rulesvc.web.views.base import ApiError, error_response, json_response, read_body, refuse
from rulesvc.web.views.rulesets import NAME_RULE

_DECODER = msgspec.json.Decoder(BacktestRequest)


def href(job_id: str) -> str:
    return f"/v1/backtests/{job_id}"


def job_body(doc: dict[str, Any], with_report: bool = True) -> BacktestJob:
    """A stored job as the API shows it. A report another version of rulesvc wrote in another shape is
    left out with a sentence, rather than failing the read."""
    progress = doc.get("progress")
    error = doc.get("error")
    report = None
    if with_report and doc.get("report"):
        try:
            report = msgspec.convert(doc["report"], Report)
        except msgspec.ValidationError:
            error = "the report was written by another version of rulesvc and cannot be shown; run it again"
    return BacktestJob(
        id=doc["_id"],
        status=doc["status"],
        request=msgspec.convert(doc["request"], BacktestAsked),
        created_at=doc["created_at"],
        started_at=doc.get("started_at"),
        finished_at=doc.get("finished_at"),
        heartbeat_at=doc.get("heartbeat_at"),
        owner=doc.get("owner", ""),
        progress=msgspec.convert(progress, BacktestProgress) if progress else None,
        cancel_requested=bool(doc.get("cancel_requested")),
        error=error,
        links=BacktestLinks(href(doc["_id"]), href(doc["_id"]) + "/cancel"),
        report=report,
    )


def _rejected(problems: list[BacktestProblem]) -> BacktestRejected:
    said = f"the backtest request has {len(problems)} error(s); nothing started"
    return BacktestRejected(said, problems)


class _Asked:
    """The request checked: both versions as the job's process compiles them, or every problem. Built
    in a thread (`asyncio.to_thread`): it reads folders and compiles rulesets, seconds of work that
    would stop the worker's loop; `live` is the live rulesets as the loop saw them (a reload changes
    `rulesets.live` meanwhile)."""

    def __init__(
        self, asked: BacktestRequest, rulesets: Rulesets, live: dict[str, LiveRuleset], settings: Settings
    ) -> None:
        self.asked = asked
        self.rulesets = rulesets
        self.live = live
        self.settings = settings
        self.problems: list[BacktestProblem] = []
        self.baseline_label, self.baseline = self._baseline()
        self.candidate_label, self.candidate = self._candidate()

    def _folder(self, given: str, field: str) -> Path | None:
        path = Path(given)
        problem = None
        if not path.is_absolute():
            problem = f"give an absolute path (a folder on the server), got `{given[:200]}`"
        else:
            problem = usable_folder(path)
        if problem is not None:
            self.problems.append(BacktestProblem(field, problem))
            return None
        return path

    def _from_folder(self, given: str, field: str) -> tuple[str, dict[str, LiveRuleset]]:
        folder = self._folder(given, field)
        if folder is None:
            return given, {}
        compiled, errors = compile_folder(
            folder, self.rulesets.channels, templates_of(self.settings, str(folder))
        )
        for e in errors:
            self.problems.append(
                BacktestProblem(field, str(e), file=str(folder / e.file), line=e.line, column=e.column)
            )
        found = {c.name: LiveRuleset(c.name, c.version, c.source) for c in compiled}
        for c in compiled:
            c.free()
        return str(folder), found

    def _baseline(self) -> tuple[str, dict[str, LiveRuleset]]:
        if self.asked.baseline_dir is not None:
            return self._from_folder(self.asked.baseline_dir, "$.baseline_dir")
        return f"live rulesets ({self.rulesets.directory.absolute()})", dict(self.live)

    def _candidate(self) -> tuple[str, dict[str, LiveRuleset]]:
        asked = self.asked
        if asked.rulesets_dir is not None:
            if asked.rulesets is not None or asked.remove is not None:
                said = "give either `rulesets_dir` or `rulesets` (with `remove`), not both"
                self.problems.append(BacktestProblem("$.rulesets_dir", said))
                return asked.rulesets_dir, {}
            return self._from_folder(asked.rulesets_dir, "$.rulesets_dir")
        candidate = dict(self.baseline)
        given = asked.rulesets or {}
        for i, name in enumerate(asked.remove or []):
            if name in given:
                said = f"`{name}` is in `rulesets` too: replace it or remove it, not both"
                self.problems.append(BacktestProblem(f"$.remove[{i}]", said))
            elif name not in self.baseline:
                self.problems.append(
                    BacktestProblem(f"$.remove[{i}]", f"no ruleset `{name}` in the baseline")
                )
            candidate.pop(name, None)
        for name, raw in given.items():
            if not RULESET_NAME.fullmatch(name) or f"{name}.json" in NOT_RULESETS:
                self.problems.append(BacktestProblem(f"$.rulesets.{name}", NAME_RULE))
                continue
            try:
                compiled = compile_source(
                    self.rulesets.directory / f"{name}.json",
                    bytes(raw),
                    self.rulesets.channels,
                    self.rulesets.templates,
                )
            except InvalidRuleset as exc:
                for e in exc.errors:
                    self.problems.append(BacktestProblem(f"$.rulesets.{name}{e.path[1:]}", e.message))
                continue
            candidate[name] = LiveRuleset(name, compiled.version, compiled.source)
            compiled.free()
        changes = [
            *(f"{n} {'replaced' if n in self.baseline else 'added'}" for n in sorted(given)),
            *(f"{n} removed" for n in sorted(asked.remove or [])),
        ]
        label = "the baseline" + (f" with {', '.join(changes)}" if changes else " (unchanged)")
        return label, candidate


async def post_backtest(request: web.Request) -> web.Response:
    body = await read_body(request)
    try:
        asked = _DECODER.decode(body)
    except msgspec.ValidationError as exc:
        path, message = split_validation_error(exc)
        return json_response(_rejected([BacktestProblem(path, message)]), 422)
    except msgspec.DecodeError as exc:
        return error_response(400, f"malformed JSON: {exc}")
    except RecursionError:
        return error_response(400, TOO_DEEP)
    try:
        job = await start_backtest(request.app, asked)
    except ApiError as exc:
        return exc.response()
    return json_response(job, 202, headers={"Location": href(job.id)})


async def start_backtest(app: web.Application, asked: BacktestRequest) -> BacktestJob:
    """Checked here (the window, the folders, every ruleset through the one validator), then started as
    a process of its own; the job (queued) at once to follow. ApiError: 422 with every problem, 409 while
    another runs, 503 when no process could be started."""
    settings, runner = app[SETTINGS], app[BACKTESTS]
    now = datetime.now(UTC)
    retention = timedelta(days=settings.event_retention_days)
    window = backtest_window(asked.since, asked.from_, asked.until, now, retention)
    rulesets = app[RULESETS]
    live = {name: LiveRuleset(name, c.version, c.source) for name, c in rulesets.live.items()}
    checked = await asyncio.to_thread(_Asked, asked, rulesets, live, settings)
    problems = checked.problems
    if isinstance(window, WindowProblem):
        problems.insert(0, BacktestProblem(f"$.{window.field}", window.message))
    if problems:
        raise ApiError(422, _rejected(problems))
    assert isinstance(window, Window)
    said = BacktestAsked(window, checked.baseline_label, checked.candidate_label,
                         None if asked.contacts is None else len(asked.contacts), asked.examples)  # fmt: skip
    doc = {"request": msgspec.to_builtins(said, builtin_types=(datetime,)), "owner": owner()}
    job, running = await runner.jobs.create(doc, now, LOST_AFTER)
    if job is None and running is None:  # the running one ended meanwhile: once more
        job, running = await runner.jobs.create(doc, now, LOST_AFTER)
    if job is None:
        body_ = job_body(running, with_report=False) if running is not None else None
        if body_ is None:
            raise refuse(503, "another backtest was starting; try again")
        error = (f"a backtest runs already ({body_.id}, {body_.status}); one runs at a time per service: "
                 "wait for it or cancel it")  # fmt: skip
        raise ApiError(409, BacktestConflict(error, body_), headers={"Location": href(body_.id)})
    handoff = Handoff(
        job_id=job["_id"],
        settings=settings,
        mongo_uri=app[MONGO_URI],
        baseline_label=checked.baseline_label,
        baseline=sorted(checked.baseline.values(), key=lambda r: r.name),
        candidate_label=checked.candidate_label,
        candidate=sorted(checked.candidate.values(), key=lambda r: r.name),
        options=Options(window, asked.contacts, asked.examples),
    )
    try:
        await runner.start(handoff)
    except OSError as exc:
        raise refuse(503, f"the backtest process could not be started: {exc}") from exc
    return job_body(job)


async def backtest_job(app: web.Application, job_id: str) -> BacktestJob:
    """A job with its progress and, when done, its report; ApiError 404."""
    doc = await app[BACKTESTS].jobs.get(job_id, datetime.now(UTC), LOST_AFTER)
    if doc is None:
        raise refuse(404, "no such backtest")
    return job_body(doc)


async def backtest_list(app: web.Application) -> BacktestList:
    docs = await app[BACKTESTS].jobs.recent(KEEP, datetime.now(UTC), LOST_AFTER)
    return BacktestList([job_body(d, with_report=False) for d in docs])


async def cancel_job(app: web.Application, job_id: str) -> BacktestJob:
    """A queued job ends at once; a running one at its next progress write (within about a second).
    ApiError: 404, or 409 for a job that has ended."""
    doc = await app[BACKTESTS].jobs.request_cancel(job_id, datetime.now(UTC), LOST_AFTER)
    if doc is None:
        raise refuse(404, "no such backtest")
    if doc["status"] in ("done", "failed", "lost"):
        error = f"the backtest is {doc['status']}; only a queued or running one can be cancelled"
        raise ApiError(409, BacktestEnded(error, doc["status"]))
    return job_body(doc, with_report=False)


async def get_backtest(request: web.Request) -> web.Response:
    try:
        return json_response(await backtest_job(request.app, request.match_info["job_id"]))
    except ApiError as exc:
        return exc.response()


async def get_backtests(request: web.Request) -> web.Response:
    return json_response(await backtest_list(request.app))


async def cancel_backtest(request: web.Request) -> web.Response:
    try:
        return json_response(await cancel_job(request.app, request.match_info["job_id"]))
    except ApiError as exc:
        return exc.response()
