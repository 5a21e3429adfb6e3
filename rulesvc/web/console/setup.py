"""Adding the console to the app: each page module has its `ROUTES`; `setup_console` puts every one
behind the session check (`base.guarded`), but the login form's."""

from __future__ import annotations

from collections.abc import AsyncIterator
from importlib import resources

import pymongo
from aiohttp import web

from rulesvc.store.console_sessions import ConsoleSessions
from rulesvc.web.console import channels, contacts, login, messages, overview, rulesets, try_it
from rulesvc.web.console.base import (
    SESSIONS,
    TEMPLATES,
    ConsoleRoute,
    console_url,
    environment,
    guarded,
)
from rulesvc.web.console.paths import CONSOLE_PREFIX
from rulesvc.web.keys import SETTINGS, STORE

PAGES = [login, overview, rulesets, contacts, messages, try_it, channels]

STATIC_TYPES = {".css": "text/css", ".js": "text/javascript", ".svg": "image/svg+xml", ".png": "image/png"}


def _static_files() -> dict[str, bytes]:
    folder = resources.files("rulesvc.web.console") / "static"
    return {f.name: f.read_bytes() for f in folder.iterdir() if f.name[f.name.rfind(".") :] in STATIC_TYPES}


def static_handler(files: dict[str, bytes]) -> ConsoleRoute:
    """The package's own CSS and scripts, only to a logged-in browser (the login page inlines its CSS)."""

    async def serve(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        body = files.get(name)
        if body is None:
            raise web.HTTPNotFound(text=f"no static file `{name}`")
        suffix = name[name.rfind(".") :]
        return web.Response(
            body=body, content_type=STATIC_TYPES[suffix], headers={"Cache-Control": "private, max-age=3600"}
        )

    return ConsoleRoute("GET", "/static/{name}", serve)


async def sessions_ctx(app: web.Application) -> AsyncIterator[None]:
    sessions = ConsoleSessions(app[STORE].db["console_sessions"])
    with pymongo.timeout(max(120.0, app[SETTINGS].mongodb_timeout_seconds)):
        await sessions.ensure_indexes()
    app[SESSIONS] = sessions
    yield


def setup_console(app: web.Application) -> None:
    app[TEMPLATES] = environment()
    app.cleanup_ctx.append(sessions_ctx)
    for route in login.PUBLIC_ROUTES:
        app.router.add_route(route.method, console_url(route.path), route.handler)
    guarded_routes = [route for page in PAGES for route in page.ROUTES]
    guarded_routes.append(static_handler(_static_files()))
    for route in guarded_routes:
        method = route.method
        handler = guarded(route)
        if method == "GET":
            app.router.add_get(console_url(route.path), handler)
        else:
            app.router.add_route(method, console_url(route.path), handler)
    app.router.add_get(CONSOLE_PREFIX, _to_home)
    app.router.add_get(console_url("/{tail:.*}"), guarded(ConsoleRoute("GET", "/{tail}", login.not_found)))


async def _to_home(request: web.Request) -> web.StreamResponse:
    return web.HTTPSeeOther(console_url("/"))
