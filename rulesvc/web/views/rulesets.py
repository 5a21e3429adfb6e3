"""The rulesets loaded, a reload, and a ruleset written through the API (validated as the loader does)."""

from __future__ import annotations

from aiohttp import web

from rulesvc.core.ruleformat import InvalidRuleset, RulesetError, listened_events
from rulesvc.runtime.rulesets import NOT_RULESETS, RULESET_NAME, Rulesets, RulesetStatus, write_source
from rulesvc.web.keys import RULESETS
from rulesvc.web.schemas import (
    RulesetChecked,
    RulesetErrorBody,
    RulesetInfo,
    RulesetList,
    RulesetPutQuery,
    RulesetRejected,
)
from rulesvc.web.views.base import JSON_TYPES, error_response, json_response, query_of, read_body

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


def ruleset_list(rulesets: Rulesets) -> RulesetList:
    return RulesetList([_info(s) for s in sorted(rulesets.status.values(), key=lambda s: s.name)])


async def get_rulesets(request: web.Request) -> web.Response:
    return json_response(ruleset_list(request.app[RULESETS]))


async def reload_rulesets(request: web.Request) -> web.Response:
    request.app[RULESETS].reload()
    return json_response(ruleset_list(request.app[RULESETS]))


def _rejected(name: str, errors: list[RulesetError]) -> web.Response:
    said = f"ruleset `{name}` has {len(errors)} error(s); nothing changed"
    return json_response(RulesetRejected(said, [_error_body(e) for e in errors]), 422)


async def put_ruleset(request: web.Request) -> web.Response:
    """Validated with the loader's own checks (its channels, its templates) before anything is written;
    then written to `<rulesets_dir>/<name>.json` and loaded at once."""
    name = request.match_info["name"]
    if not RULESET_NAME.fullmatch(name) or f"{name}.json" in NOT_RULESETS:
        return error_response(400, NAME_RULE)
    dry_run = query_of(request, RulesetPutQuery).dry_run
    if request.content_type not in JSON_TYPES:
        return error_response(415, f"unsupported content type `{request.content_type}`; use application/json")
    body = await read_body(request)
    rulesets = request.app[RULESETS]
    try:
        compiled = rulesets.validate(rulesets.directory / f"{name}.json", body)
    except InvalidRuleset as exc:
        return _rejected(name, exc.errors)
    version, events = compiled.version, listened_events(compiled.source)
    compiled.free()
    if dry_run:
        return json_response(RulesetChecked(True, name, version, events))
    try:
        write_source(rulesets.directory, name, body)
    except OSError as exc:
        return error_response(503, f"cannot write {rulesets.directory / name}.json: {exc.strerror}")
    rulesets.reload()
    status = rulesets.status.get(name)
    if status is None:  # removed again between the write and the reload
        return error_response(409, f"ruleset `{name}` was removed while it was written; try again")
    if status.status == "error":  # changed again between the write and the reload
        return _rejected(name, status.errors)
    return json_response(_info(status))
