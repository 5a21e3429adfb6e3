"""Logging in with an API key (exchanged for a session cookie) and out. The key is checked as the API
checks it; only `admin` (may change) and `read` (may look) keys open the console."""

from __future__ import annotations

import math
import secrets
from importlib import resources
from urllib.parse import quote

from aiohttp import web

from rulesvc.web.console.base import (
    COOKIE,
    CSRF_FIELD,
    LOGIN_COOKIE,
    SESSIONS,
    TOKEN,
    ConsoleRoute,
    console_url,
    error_page,
    login_token,
    render,
    safe_next,
    same_origin,
    secure_cookies,
    session_lifetime,
    tokens_match,
)
from rulesvc.web.keys import KEYS, LIMITER

LOGIN_COOKIE_SECONDS = 3600
LOGIN_BODY_BYTES = 16 * 1024  # a key, a token and where to go next: the form is read only below this
# The login page has no session to fetch the stylesheet with: it carries it inline (under a CSP nonce).
_CSS = (resources.files("rulesvc.web.console") / "static" / "console.css").read_text()


def _login_page(request: web.Request, status: int = 200, error: str = "", next_url: str = "") -> web.Response:
    token = login_token()
    nonce = secrets.token_urlsafe(16)
    response = render(
        request,
        "login.html",
        status=status,
        error=error,
        next_url=safe_next(next_url or request.query.get("next")),
        login_token=token,
        style_nonce=nonce,
        inline_css=_CSS,
        logged_out="bye" in request.query,
    )
    response.set_cookie(
        LOGIN_COOKIE, token, max_age=LOGIN_COOKIE_SECONDS, path=console_url("/login"), httponly=True,
        samesite="Strict", secure=secure_cookies(request),
    )  # fmt: skip
    return response


async def login_form(request: web.Request) -> web.StreamResponse:
    return _login_page(request)


async def login(request: web.Request) -> web.StreamResponse:
    """No session yet, so the form's token is checked against its cookie (double submit) and the origin."""
    if request.content_length is None or request.content_length > LOGIN_BODY_BYTES:
        return _login_page(request, 413, "That login form is too large.")  # read nothing of it
    form = await request.post()
    next_url = str(form.get("next", ""))
    presented, expected = str(form.get(CSRF_FIELD, "")), request.cookies.get(LOGIN_COOKIE, "")
    if not expected or not same_origin(request) or not tokens_match(presented, expected):
        return _login_page(request, 403, "This login form is out of date. Try again.", next_url)
    wait = request.app[LIMITER].check(f"console-login:{request.remote}")
    if wait is not None:
        response = _login_page(request, 429, "Too many attempts. Wait a moment.", next_url)
        response.headers["Retry-After"] = str(max(1, math.ceil(wait)))
        return response
    key = await request.app[KEYS].verify(str(form.get("api_key", "")).strip())
    if key is None:
        return _login_page(request, 401, "That is not a valid API key (or it was revoked).", next_url)
    if key.scope not in ("admin", "read"):
        return _login_page(
            request,
            403,
            f"An `{key.scope}` key cannot open the console: use an admin or a read key.",
            next_url,
        )
    lifetime = session_lifetime(request)
    earlier = request.cookies.get(COOKIE)
    if earlier:  # a new login ends the session this browser had
        await request.app[SESSIONS].close(earlier)
    token, _ = await request.app[SESSIONS].open(key.key_id, key.scope, lifetime)
    response = web.Response(status=303, headers={"Location": safe_next(next_url)})
    response.set_cookie(
        COOKIE, token, max_age=int(lifetime.total_seconds()), path=console_url("/"), httponly=True,
        samesite="Strict", secure=secure_cookies(request),
    )  # fmt: skip
    response.del_cookie(LOGIN_COOKIE, path=console_url("/login"))
    return response


async def logout(request: web.Request) -> web.StreamResponse:
    await request.app[SESSIONS].close(request[TOKEN])
    response = web.Response(status=303, headers={"Location": console_url("/login") + "?bye=1"})
    response.del_cookie(COOKIE, path=console_url("/"))
    return response


async def not_found(request: web.Request) -> web.StreamResponse:
    return error_page(request, 404, f"There is no console page at {quote(request.path)}.")


# Login is the one page without a session; logout is a POST with the session's CSRF token.
PUBLIC_ROUTES = [
    ConsoleRoute("GET", "/login", login_form, title="Log in"),
    ConsoleRoute("POST", "/login", login, title="Log in"),
]
ROUTES = [ConsoleRoute("POST", "/logout", logout, change=False)]  # a read session may leave too
