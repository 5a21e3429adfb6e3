"""`POST /v1/simulate`: the live rulesets on a virtual clock, in the simulator process."""

from __future__ import annotations

from aiohttp import web

from rulesvc.replay.simulate import Limits
from rulesvc.web.keys import RULESETS, SETTINGS, SIMULATOR
from rulesvc.web.views.base import JSON_TYPES, error_response, read_body


async def post_simulate(request: web.Request) -> web.Response:
    """Runs in the worker's simulator process, within the size limits and the time budget: the worker's
    event loop (its inbox, schedule and leases) goes on meanwhile."""
    if request.content_type not in JSON_TYPES:
        return error_response(415, f"unsupported content type `{request.content_type}`; use application/json")
    body = await read_body(request)
    settings = request.app[SETTINGS]
    limits = Limits(settings.simulate_max_events, settings.simulate_max_contacts)
    live = request.app[RULESETS].live.values()
    status, answer, headers = await request.app[SIMULATOR].run(live, body, limits)
    return web.Response(body=answer, status=status, content_type="application/json", headers=headers)
