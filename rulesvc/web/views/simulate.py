"""`POST /v1/simulate`: the live rulesets on a virtual clock, in the simulator process. `simulate` is the
operation (the console's Try it page calls it); the view passes the simulator's answer on as it is."""

from __future__ import annotations

import msgspec
from aiohttp import web

from rulesvc.replay.simulate import Limits, SimulateRejected, SimulateResult
from rulesvc.web.keys import RULESETS, SETTINGS, SIMULATOR
from rulesvc.web.schemas import ErrorBody
from rulesvc.web.views.base import JSON_TYPES, ApiError, error_response, read_body

_RESULT = msgspec.json.Decoder(SimulateResult)


async def simulate_answer(app: web.Application, body: bytes) -> tuple[int, bytes, dict[str, str]]:
    """Runs in the worker's simulator process, within the size limits and the time budget: the worker's
    event loop (its inbox, schedule and leases) goes on meanwhile. (status, JSON body, headers)."""
    settings = app[SETTINGS]
    limits = Limits(settings.simulate_max_events, settings.simulate_max_contacts)
    live = app[RULESETS].live.values()
    return await app[SIMULATOR].run(live, body, limits)


async def simulate(app: web.Application, body: bytes) -> SimulateResult:
    """The result of a `POST /v1/simulate` body (a `SimulateRequest` as JSON), or ApiError with the
    route's status and body (`SimulateRejected` with the field path, or `ErrorBody`)."""
    status, answer, headers = await simulate_answer(app, body)
    if status == 200:
        return _RESULT.decode(answer)
    said = msgspec.json.decode(answer)
    refusal = msgspec.convert(said, SimulateRejected if "path" in said else ErrorBody)
    raise ApiError(status, refusal, headers)


async def post_simulate(request: web.Request) -> web.Response:
    if request.content_type not in JSON_TYPES:
        return error_response(415, f"unsupported content type `{request.content_type}`; use application/json")
    status, answer, headers = await simulate_answer(request.app, await read_body(request))
    return web.Response(body=answer, status=status, content_type="application/json", headers=headers)
