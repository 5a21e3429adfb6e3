"""The bodies of `/v1/backtests`: the request (decoded and checked here, then by the one ruleset
validator), the job as the API shows it, and the refusals."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

import msgspec

from rulesvc.core.durations import DURATION_PATTERN
from rulesvc.core.ids import Id
from rulesvc.replay.backtest import Report, Window

MAX_CONTACTS = 10_000

Since = Annotated[
    str,
    msgspec.Meta(
        pattern=DURATION_PATTERN,
        description="the window: this long back from `until` (or now), e.g. 14d, 36h; not with `from`. "
        "Default 14d",
    ),
]
From = Annotated[datetime, msgspec.Meta(tz=True, description="the window's start, RFC 3339 with offset")]
Until = Annotated[datetime, msgspec.Meta(tz=True, description="the window's end (default now), RFC 3339")]
Folder = Annotated[
    str, msgspec.Meta(min_length=1, max_length=4096, description="an absolute path to a folder on the server")
]
# Each ruleset is kept as the bytes sent, for the validator (which reports line and column in them).
RulesetSource = Annotated[
    msgspec.Raw, msgspec.Meta(extra_json_schema={"$ref": "#/components/schemas/RulesetFile"})
]
RulesetName = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]


class BacktestRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The window (`since`, or `from` and `until`), the baseline (the live rulesets, or `baseline_dir`)
    and the candidate: the baseline with `rulesets` replacing or adding rulesets by name and `remove`
    dropping some, or the folder `rulesets_dir`; neither: the baseline itself (its replay against what
    the service recorded is the finding)."""

    since: Since | None = None
    from_: From | None = msgspec.field(default=None, name="from")
    until: Until | None = None
    rulesets: (
        Annotated[
            dict[RulesetName, RulesetSource],
            msgspec.Meta(description="ruleset name -> the ruleset file's JSON: replaces or adds by name"),
        ]
        | None
    ) = None
    remove: (
        Annotated[list[RulesetName], msgspec.Meta(description="baseline rulesets the candidate drops")] | None
    ) = None
    rulesets_dir: Folder | None = None
    baseline_dir: Folder | None = None
    contacts: (
        Annotated[
            list[Id],
            msgspec.Meta(max_length=MAX_CONTACTS, description="only these contacts (default: every one "
                         "with events in the window)"),
        ]
        | None
    ) = None  # fmt: skip
    examples: Annotated[
        int, msgspec.Meta(ge=0, le=50, description="contacts shown each way (gain, lose) and mismatches")
    ] = 5


class BacktestProblem(msgspec.Struct, omit_defaults=True):
    """One thing wrong with the request: `path` in the request; for a ruleset of a folder, `file`,
    `line` and `column` in that file, and `message` as `rulesvc check` prints it."""

    path: str
    message: str
    file: str | None = None
    line: int | None = None
    column: int | None = None


class BacktestRejected(msgspec.Struct):
    error: str
    errors: list[BacktestProblem]


class BacktestProgress(msgspec.Struct):
    replayed: int  # events replayed so far (each through both versions)
    total: int  # events in the window
    contacts: int  # contacts done
    percent: float
    elapsed_seconds: float
    eta_seconds: float | None  # null until there is a rate


class BacktestAsked(msgspec.Struct):
    """What the job replays: the window, both versions' labels, and the options."""

    window: Window
    baseline: str
    candidate: str
    contacts: int | None  # how many contacts were named; null: every contact with events in the window
    examples: int


class BacktestLinks(msgspec.Struct):
    """Where to follow the job: `get` (GET: status, progress, report), `cancel` (POST)."""

    get: str
    cancel: str


Status = Literal["queued", "running", "done", "failed", "lost", "cancelled"]


class BacktestJob(msgspec.Struct):
    """A backtest job. `lost`: its process stopped answering (a restart of the service drops a running
    backtest). `report` only when `done` (and not in listings); `error` when failed, lost or cancelled."""

    id: str
    status: Status
    request: BacktestAsked
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    heartbeat_at: datetime | None
    owner: str  # the worker that started it: host:pid
    progress: BacktestProgress | None
    cancel_requested: bool
    error: str | None
    links: BacktestLinks
    report: Report | None = None


class BacktestList(msgspec.Struct):
    backtests: list[BacktestJob]


class BacktestConflict(msgspec.Struct):
    """409: a backtest runs already (one at a time per service); it is `running`, with its progress."""

    error: str
    running: BacktestJob


class BacktestEnded(msgspec.Struct):
    """409 to a cancel: the job has ended; its status."""

    error: str
    status: Status
