"""The rulesets loaded, and a reload."""

from __future__ import annotations

from aiohttp import web

from rulesvc.core.ruleformat import RulesetError
from rulesvc.runtime.rulesets import Rulesets
from rulesvc.web.keys import RULESETS
from rulesvc.web.schemas import RulesetErrorBody, RulesetInfo, RulesetList
from rulesvc.web.views.base import json_response


def _error_body(e: RulesetError) -> RulesetErrorBody:
    return RulesetErrorBody(e.file, e.path, e.message)


def ruleset_list(rulesets: Rulesets) -> RulesetList:
    return RulesetList(
        [
            RulesetInfo(
                s.name, s.file, s.status, s.version, s.loaded_at, s.events, [_error_body(e) for e in s.errors]
            )
            for s in sorted(rulesets.status.values(), key=lambda s: s.name)
        ]
    )


async def get_rulesets(request: web.Request) -> web.Response:
    return json_response(ruleset_list(request.app[RULESETS]))


async def reload_rulesets(request: web.Request) -> web.Response:
    request.app[RULESETS].reload()
    return json_response(ruleset_list(request.app[RULESETS]))
