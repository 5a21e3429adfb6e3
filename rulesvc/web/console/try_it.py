"""The Try it pages: simulate events for a made-up or a real contact on the live rulesets (what would go
out, and when; nothing is sent or stored), and backtest a candidate rulesets folder against the stored
events of a window, with its progress and then its report.

Data from the API's operations: `views.simulate` (`POST /v1/simulate`), `views.backtests`
(`/v1/backtests`) and `views.contacts` (a stored contact's profile)."""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
from aiohttp import web

from rulesvc.core.ids import id_problem
from rulesvc.web.backtest_schemas import BacktestConflict, BacktestJob, BacktestRejected, BacktestRequest
from rulesvc.web.console.base import ConsoleRoute, error_page, form_of, render, see_other
from rulesvc.web.keys import RULESETS
from rulesvc.web.views.backtests import backtest_job, backtest_list, start_backtest
from rulesvc.web.views.base import ApiError
from rulesvc.web.views.contacts import get_contact_op
from rulesvc.web.views.rulesets import ruleset_list
from rulesvc.web.views.simulate import simulate

# README's quick start event, and a made-up contact reachable by email, push and SMS, who agreed to all three.
EXAMPLE_EVENTS = (
    '{"id": "evt-1", "type": "cart_updated", "contact_id": "c-42", "attributes": {"value": 59.90}}\n'
)
EXAMPLE_CONTACT = json.dumps(
    {
        "contact_id": "c-42",
        "email": "ada@example.com",
        "phone": "+4915112345678",
        "push_tokens": ["example-device-token"],
        "consent": {"email": True, "push": True, "sms": True},
        "timezone": "Europe/Berlin",
    },
    indent=2,
)
BACKTEST_WINDOWS = {"24h": "last 24 hours", "7d": "last 7 days", "14d": "last 14 days", "30d": "last 30 days"}
RUNNING = frozenset({"queued", "running"})


@dataclass(frozen=True)
class Step:
    """A line of the simulated timeline: an event, or an action it led to (`after`: how long after
    the event before it, as `+20 min`)."""

    at: datetime
    event: dict[str, Any] | None = None
    action: Any = None  # the simulation's action (`SimAction` of `POST /v1/simulate`)
    after: str = ""
    cause: str = ""


def offset_text(delta: timedelta) -> str:
    """`+20 min`, `+12 h`, `+1 d 2 h`, `at once`."""
    seconds = int(delta.total_seconds())
    if seconds <= 0:
        return "at once"
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60), ("s", 1)):
        if seconds >= size:
            parts.append(f"{seconds // size} {unit}")
            seconds %= size
    return "+" + " ".join(parts[:2])


def parse_events(text: str) -> list[Any]:
    """A JSON array, one JSON object, or one object per line (NDJSON); ValueError says where not."""
    stripped = text.strip()
    if not stripped:
        raise ValueError("give at least one event")
    try:
        whole = json.loads(stripped)
    except json.JSONDecodeError:
        whole = None
    else:
        return whole if isinstance(whole, list) else [whole]
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            found.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ValueError(f"line {number}, column {exc.colno}: not JSON ({exc.msg})") from None
    return found


def event_moment(event: Any, default: datetime) -> datetime:
    raw = event.get("time") if isinstance(event, dict) else None
    if isinstance(raw, str):
        try:
            parsed = datetime.fromisoformat(raw.replace("Z", "+00:00"))
        except ValueError:
            return default
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    if isinstance(raw, int | float) and not isinstance(raw, bool):
        try:
            return datetime.fromtimestamp(raw, UTC)
        except (OverflowError, ValueError, OSError):
            return default
    return default


def timeline(events: list[dict[str, Any]], actions: list[Any], started: datetime) -> list[Step]:
    """Events and actions in time order; each action said relative to the event before it (found by
    bisection: a simulation may hold thousands of both)."""
    timed = sorted(
        ((event_moment(e, started), i, e) for i, e in enumerate(events)), key=lambda t: (t[0], t[1])
    )
    moments = [at for at, _, _ in timed]
    steps: list[tuple[datetime, int, Step]] = [(at, 0, Step(at, event=e)) for at, _, e in timed]
    for action in actions:
        found = bisect.bisect_right(moments, action.at)
        if found:
            at, _, e = timed[found - 1]
            cause = f"{e.get('type', '?')} {e.get('id', '')}".strip()
            steps.append(
                (action.at, 1, Step(action.at, action=action, after=offset_text(action.at - at), cause=cause))
            )
        else:
            steps.append((action.at, 1, Step(action.at, action=action)))
    return [s for _, _, s in sorted(steps, key=lambda t: (t[0], t[1]))]


async def _real_contact(app: web.Application, contact_id: str) -> dict[str, Any]:
    """The stored profile as a simulated contact, through the contacts operation (`GET /v1/contacts/{id}`)."""
    problem = id_problem(contact_id, "contact id")
    if problem is not None:
        raise ValueError(problem)
    contact = await get_contact_op(app, contact_id)
    if contact is None:
        raise ValueError(f"no stored contact `{contact_id}`")
    profile: dict[str, Any] = msgspec.to_builtins(contact)
    for stored_only in ("email_invalid", "created_at", "updated_at"):
        profile.pop(stored_only, None)
    profile["contact_id"] = contact_id
    return profile


async def try_page(request: web.Request) -> web.StreamResponse:
    return render(
        request,
        "try.html",
        nav="try",
        events_text=EXAMPLE_EVENTS,
        contact_text=EXAMPLE_CONTACT,
        who="made_up",
        real_id="",
        steps=None,
        problem=None,
        problem_path=None,
    )


async def run_simulation(request: web.Request) -> web.StreamResponse:
    """Changes nothing (a simulation sends and stores nothing): a read-only session may run one too."""
    form = form_of(request)
    events_text = form.get("events", "")
    contact_text = form.get("contact", "")
    who = "real" if form.get("who") == "real" else "made_up"
    real_id = form.get("real_contact", "").strip()
    context: dict[str, Any] = {
        "nav": "try", "events_text": events_text, "contact_text": contact_text, "who": who,
        "real_id": real_id, "steps": None, "problem": None, "problem_path": None,
    }  # fmt: skip
    try:
        events = parse_events(events_text)
        contacts: list[Any] = []
        if who == "real":
            if not real_id:
                raise ValueError("give the id of a stored contact, or choose a made-up contact")
            contacts = [await _real_contact(request.app, real_id)]
            events = [{**e, "contact_id": real_id} if isinstance(e, dict) and "contact_id" in e else e
                      for e in events]  # fmt: skip
        elif contact_text.strip():
            profile = json.loads(contact_text)
            contacts = profile if isinstance(profile, list) else [profile]
        try:
            body = json.dumps({"events": events, "contacts": contacts}, allow_nan=False).encode()
        except ValueError:
            raise ValueError(
                "a number is not finite (NaN, Infinity or beyond 1e308): JSON has none"
            ) from None
    except json.JSONDecodeError as exc:
        context["problem"] = f"The contact is not JSON: line {exc.lineno}, column {exc.colno}: {exc.msg}"
        return render(request, "try.html", status=422, **context)
    except ValueError as exc:
        context["problem"] = str(exc)
        return render(request, "try.html", status=422, **context)
    except RecursionError:
        context["problem"] = "the JSON is nested too deeply"
        return render(request, "try.html", status=422, **context)
    started = datetime.now(UTC)
    try:
        result = await simulate(request.app, body)
    except ApiError as exc:
        context["problem"] = exc.message
        context["problem_path"] = getattr(exc.body, "path", None)  # a SimulateRejected names the field
        return render(request, "try.html", status=exc.status if exc.status < 500 else 422, **context)
    shown = [e for e in events if isinstance(e, dict)]
    context["steps"] = timeline(shown, result.actions, started)
    return render(request, "try.html", **context)


@dataclass(frozen=True)
class RuleChange:
    label: str
    baseline: int
    candidate: int
    change: int


def rule_changes(job: BacktestJob) -> list[RuleChange]:
    """Sent per ruleset and rule, baseline against candidate: what the bar chart of changes shows."""
    sums: dict[str, list[int]] = {}
    for row in job.report.rows if job.report is not None else []:
        counts = sums.setdefault(f"{row.ruleset} · {row.rule}", [0, 0])
        counts[0] += row.baseline.sent
        counts[1] += row.candidate.sent
    return [RuleChange(label, b, c, c - b) for label, (b, c) in sorted(sums.items())]


@dataclass(frozen=True)
class ChangeBar:
    label: str
    change: int
    x: float
    width: float
    y: float
    colour: str


@dataclass(frozen=True)
class ChangeChart:
    """Bars left (fewer sent) or right (more sent) of a zero line: one per rule that changed."""

    width: int
    height: int
    zero: float
    label_width: int
    bar_height: int
    bars: list[ChangeBar]


def change_chart(changes: list[RuleChange], width: int = 720, label_width: int = 260) -> ChangeChart:
    changed = [c for c in changes if c.change]
    bar_height, gap = 20, 8
    largest = max((abs(c.change) for c in changed), default=1) or 1
    lows = any(c.change < 0 for c in changed)
    highs = any(c.change > 0 for c in changed)
    room = width - label_width - 60
    zero = label_width + (room / 2 if lows and highs else room - 40 if lows else 0) + 10
    scale = (room / 2 if lows and highs else room - 40) / largest
    bars = []
    for i, c in enumerate(changed):
        w = round(abs(c.change) * scale, 1)
        x = zero if c.change > 0 else zero - w
        bars.append(
            ChangeBar(
                c.label,
                c.change,
                round(x, 1),
                w,
                i * (bar_height + gap),
                "#009E73" if c.change > 0 else "#D55E00",
            )
        )
    height = max(1, len(changed)) * (bar_height + gap)
    return ChangeChart(width, height, round(zero, 1), label_width, bar_height, bars)


def _row_label(row: Any) -> str:
    """A report row (`Row` of the backtest report) as `ruleset · rule · channel · group`."""
    return " · ".join(p for p in (row.ruleset, row.rule, row.channel or "", row.variant or "") if p)


async def backtests_page(request: web.Request) -> web.StreamResponse:
    return await _backtests(request)


async def _backtests(
    request: web.Request,
    status: int = 200,
    problem: str | None = None,
    problems: list[Any] | None = None,
    running_id: str | None = None,
    folder: str = "",
    window: str = "7d",
) -> web.StreamResponse:
    listed = await backtest_list(request.app)
    return render(
        request,
        "backtests.html",
        status=status,
        nav="try",
        jobs=listed.backtests,
        windows=BACKTEST_WINDOWS,
        problem=problem,
        problems=problems or [],
        running_id=running_id,
        folder=folder,
        window=window,
        live_folder=ruleset_list(request.app[RULESETS]).folder,
    )


async def start(request: web.Request) -> web.StreamResponse:
    form = form_of(request)
    folder = form.get("folder", "").strip()
    window = form.get("window", "7d")
    if window not in BACKTEST_WINDOWS:
        return await _backtests(
            request, 422, f"choose a window: {', '.join(BACKTEST_WINDOWS)}", folder=folder
        )
    try:
        asked = msgspec.convert({"since": window, "rulesets_dir": folder or None}, BacktestRequest)
    except msgspec.ValidationError as exc:
        return await _backtests(request, 422, str(exc), folder=folder, window=window)
    try:
        job = await start_backtest(request.app, asked)
    except ApiError as exc:
        body = exc.body
        if isinstance(body, BacktestRejected):
            return await _backtests(request, 422, body.error, body.errors, folder=folder, window=window)
        if isinstance(body, BacktestConflict):
            return await _backtests(request, 409, body.error, running_id=body.running.id, folder=folder,
                                    window=window)  # fmt: skip
        return await _backtests(request, exc.status, exc.message, folder=folder, window=window)
    return await see_other(request, f"/console/try/backtests/{job.id}", "Backtest started.")


async def backtest_page(request: web.Request) -> web.StreamResponse:
    try:
        job = await backtest_job(request.app, request.match_info["job_id"])
    except ApiError as exc:
        return error_page(request, exc.status, exc.message)
    report = job.report
    return render(
        request,
        "backtest.html",
        nav="try",
        job=job,
        running=job.status in RUNNING,
        report=report,
        changes=rule_changes(job),
        chart=change_chart(rule_changes(job)),
        row_label=_row_label,
    )


ROUTES = [
    ConsoleRoute("GET", "/try", try_page, title="Try it"),
    # As POST /v1/simulate (and the check below as PUT ?dry_run): an admin's. A simulation runs the
    # simulator process for up to its budget, a check compiles in the event loop: not for read sessions.
    ConsoleRoute("POST", "/try", run_simulation, change=True, title="Try it"),
    ConsoleRoute("GET", "/try/backtests", backtests_page, title="Backtests"),
    ConsoleRoute("POST", "/try/backtests", start, change=True, title="Start a backtest"),
    ConsoleRoute("GET", "/try/backtests/{job_id}", backtest_page, title="Backtest"),
]
