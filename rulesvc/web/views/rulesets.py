"""The rulesets loaded, one in detail, a reload, and a ruleset written through the API (validated as the
loader does). Operations (`ruleset_list`, `ruleset_detail`, `check_ruleset`) return the routes' bodies;
the views adapt them to HTTP, and the console calls them directly."""

from __future__ import annotations

import asyncio

import msgspec
from aiohttp import web

from rulesvc.core.ruleformat import InvalidRuleset, RulesetError, listened_events
from rulesvc.core.rulesummary import goal_of, rules_of, variants_of
from rulesvc.runtime.rulesets import (
    NOT_RULESETS,
    RULESET_NAME,
    Rulesets,
    RulesetStatus,
    read_source,
    write_source,
)
from rulesvc.web.keys import RULESETS
from rulesvc.web.schemas import (
    RulesetChecked,
    RulesetDetail,
    RulesetErrorBody,
    RulesetInfo,
    RulesetList,
    RulesetPutQuery,
    RulesetRejected,
)
from rulesvc.web.views.base import (
    JSON_TYPES,
    ApiError,
    error_response,
    json_response,
    query_of,
    read_body,
    refuse,
)

NAME_RULE = (
    "ruleset name must be lower case letters, digits and _, starting with a letter (at most 64), and not"
    " `schema`"
)


def _error_body(e: RulesetError) -> RulesetErrorBody:
    return RulesetErrorBody(e.file, e.line, e.column, e.path, e.message)


def _info(s: RulesetStatus) -> RulesetInfo:
    return RulesetInfo(
        s.name, s.file, s.status, s.version, s.loaded_at, s.events, [_error_body(e) for e in s.errors]
    )


def name_problem(name: str) -> str | None:
    return None if RULESET_NAME.fullmatch(name) and f"{name}.json" not in NOT_RULESETS else NAME_RULE


def ruleset_list(rulesets: Rulesets) -> RulesetList:
    return RulesetList(
        [_info(s) for s in sorted(rulesets.status.values(), key=lambda s: s.name)],
        str(rulesets.directory.absolute()),
    )


async def ruleset_detail(rulesets: Rulesets, name: str) -> RulesetDetail:
    """The live version's rules in words and the file's current text (read off the event loop), or
    ApiError 404."""
    status = rulesets.status.get(name)
    if status is None:
        raise refuse(404, f"no ruleset `{name}`: there is no {name}.json in {rulesets.directory.absolute()}")
    live = rulesets.live.get(name)
    source = live.source if live is not None else None
    text, problem = None, None
    try:
        data = await asyncio.to_thread(read_source, rulesets.directory / status.file)
        text = data.decode("utf-8", "replace")
    except InvalidRuleset as exc:
        problem = "; ".join(e.message for e in exc.errors)
    info = _info(status)
    return RulesetDetail(
        *msgspec.structs.astuple(info),
        description=source.description if source is not None else "",
        timeout=source.timeout if source is not None else None,
        holdout=source.holdout if source is not None else None,
        variants=variants_of(source) if source is not None else [],
        goal=goal_of(source) if source is not None else None,
        rules=rules_of(source) if source is not None else [],
        source=text,
        source_error=problem,
    )


def check_ruleset(rulesets: Rulesets, name: str, body: bytes) -> RulesetChecked | RulesetRejected:
    """What `rulesvc check` and the loader would say of `body` as `<name>.json`: its every error, or
    what it would listen to. Writes nothing."""
    problem = name_problem(name)
    if problem is not None:
        return RulesetRejected(problem, [RulesetErrorBody(f"{name}.json", None, None, "$", problem)])
    try:
        compiled = rulesets.validate(rulesets.directory / f"{name}.json", body)
    except InvalidRuleset as exc:
        return _rejected(name, exc.errors)
    checked = RulesetChecked(True, name, compiled.version, listened_events(compiled.source))
    compiled.free()
    return checked


def _rejected(name: str, errors: list[RulesetError]) -> RulesetRejected:
    said = f"ruleset `{name}` has {len(errors)} error(s); nothing changed"
    return RulesetRejected(said, [_error_body(e) for e in errors])


async def get_rulesets(request: web.Request) -> web.Response:
    return json_response(ruleset_list(request.app[RULESETS]))


async def get_ruleset(request: web.Request) -> web.Response:
    try:
        return json_response(await ruleset_detail(request.app[RULESETS], request.match_info["name"]))
    except ApiError as exc:
        return exc.response()


async def reload_rulesets(request: web.Request) -> web.Response:
    request.app[RULESETS].reload()
    return json_response(ruleset_list(request.app[RULESETS]))


async def put_ruleset(request: web.Request) -> web.Response:
    """Validated with the loader's own checks (its channels, its templates) before anything is written;
    then written to `<rulesets_dir>/<name>.json` and loaded at once."""
    name = request.match_info["name"]
    if name_problem(name) is not None:
        return error_response(400, NAME_RULE)
    dry_run = query_of(request, RulesetPutQuery).dry_run
    if request.content_type not in JSON_TYPES:
        return error_response(415, f"unsupported content type `{request.content_type}`; use application/json")
    body = await read_body(request)
    rulesets = request.app[RULESETS]
    checked = check_ruleset(rulesets, name, body)
    if isinstance(checked, RulesetRejected):
        return json_response(checked, 422)
    if dry_run:
        return json_response(checked)
    try:
        write_source(rulesets.directory, name, body)
    except OSError as exc:
        return error_response(503, f"cannot write {rulesets.directory / name}.json: {exc.strerror}")
    rulesets.reload()
    status = rulesets.status.get(name)
    if status is None:  # removed again between the write and the reload
        return error_response(409, f"ruleset `{name}` was removed while it was written; try again")
    if status.status == "error":  # changed again between the write and the reload
        return json_response(_rejected(name, status.errors), 422)
    return json_response(_info(status))
