"""The overview: what the engine does now and over the last day (placeholder until its page lands)."""

from __future__ import annotations

from aiohttp import web

from rulesvc.web.console.base import ConsoleRoute, render


async def overview(request: web.Request) -> web.StreamResponse:
    return render(request, "overview.html", nav="overview")


ROUTES = [ConsoleRoute("GET", "/", overview, title="Overview")]
