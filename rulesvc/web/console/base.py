"""What every console page uses: its route, the session check in front of it (login, CSRF, read-only),
rendering with autoescaped templates, and the answers after a change (303 with a notice) or an error.

Pages get their data from the API's own operations (`rulesvc.web.views`), never from the store: what a
page shows is what the matching `GET /v1/...` returns.
"""

from __future__ import annotations

import hmac
import math
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote, urlsplit

import jinja2
import structlog
from aiohttp import web
from multidict import MultiDict, MultiDictProxy

from rulesvc.core.reasons import REASONS
from rulesvc.store.console_sessions import ConsoleSession, ConsoleSessions
from rulesvc.web.console.charts import bar_chart, interval_chart, line_chart, stacked_bars
from rulesvc.web.console.paths import CONSOLE_PREFIX
from rulesvc.web.keys import KEYS, LIMITER, SETTINGS

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
log = structlog.get_logger(__name__)

COOKIE = "rulesvc_console"
LOGIN_COOKIE = "rulesvc_console_login"  # the login form's double-submit token (no session yet)
CSRF_FIELD = "csrf_token"
SAFE_METHODS = frozenset({"GET", "HEAD"})

SESSIONS = web.AppKey("console_sessions", ConsoleSessions)
TEMPLATES = web.AppKey("console_templates", jinja2.Environment)
SESSION = web.RequestKey("console_session", ConsoleSession)
TOKEN = web.RequestKey("console_token", str)
NOTICE = web.RequestKey("console_notice", str)
FORM = web.RequestKey("console_form", MultiDictProxy[str])


@dataclass(frozen=True)
class ConsoleRoute:
    method: str
    path: str  # under CONSOLE_PREFIX: "/contacts/{contact_id}"
    handler: Handler
    # Changes something: an admin session only (a read session gets 403). Unset: every method but GET
    # does, so a new form that forgets to say so is closed to read sessions rather than open.
    change: bool | None = None
    title: str = ""


def form_of(request: web.Request) -> MultiDictProxy[str]:
    """The POSTed form, read once by the session check (its CSRF token is in it)."""
    return request[FORM]


def console_url(path: str) -> str:
    return CONSOLE_PREFIX + path


def _relative(moment: datetime | None, now: datetime | None = None) -> str:
    if moment is None:
        return ""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    seconds = ((now or datetime.now(UTC)) - moment).total_seconds()
    ahead, seconds = seconds < 0, abs(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60), ("s", 1)):
        if seconds >= size or unit == "s":
            amount = f"{int(seconds // size)} {unit}"
            return f"in {amount}" if ahead else f"{amount} ago"
    return ""  # pragma: no cover - the loop always returns


def _utc(moment: datetime | None) -> str:
    if moment is None:
        return ""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _iso(moment: datetime | None) -> str:
    if moment is None:
        return ""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _number(value: float | int | None, digits: int = 0) -> str:
    if value is None:
        return "\u2013"  # an en dash: no value
    return f"{value:,.{digits}f}"


def reason_text(code: str | None) -> str:
    """The sentence for a reason code, for a person; the code itself stays beside it on the page."""
    if not code:
        return ""
    known = REASONS.get(code)
    return known[1] if known else code.replace("_", " ")


def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("rulesvc.web.console", "templates"),
        autoescape=True,  # every page is HTML: nothing a contact or an event carries becomes markup
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["urlpart"] = lambda value: quote(str(value), safe="")
    env.filters["utc"] = _utc
    env.filters["iso"] = _iso
    env.filters["ago"] = _relative
    env.filters["number"] = _number
    env.filters["reason_text"] = reason_text
    env.globals["console"] = console_url
    env.globals.update(
        line_chart=line_chart, bar_chart=bar_chart, stacked_bars=stacked_bars, interval_chart=interval_chart
    )
    return env


def _security_headers(response: web.StreamResponse, style_nonce: str | None = None) -> None:
    styles = f"'self' 'nonce-{style_nonce}'" if style_nonce else "'self'"
    response.headers.setdefault(
        "Content-Security-Policy",
        f"default-src 'none'; style-src {styles}; script-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    )
    response.headers.setdefault("X-Frame-Options", "DENY")
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "same-origin")
    response.headers.setdefault("Cache-Control", "no-store")


def render(request: web.Request, template: str, status: int = 200, **context: Any) -> web.Response:
    session = request.get(SESSION)
    page = (
        request.app[TEMPLATES]
        .get_template(template)
        .render(
            session=session,
            csrf_token=session.csrf if session else "",
            can_change=session is not None and session.scope == "admin",
            notice=request.get(NOTICE),
            nav=context.pop("nav", ""),
            path=request.path_qs,
            **context,
        )
    )
    response = web.Response(text=page, status=status, content_type="text/html", charset="utf-8")
    _security_headers(response, context.get("style_nonce"))
    return response


def error_page(request: web.Request, status: int, message: str, **context: Any) -> web.Response:
    return render(request, "error.html", status=status, status_code=status, message=message, **context)


async def see_other(request: web.Request, location: str, notice: str | None = None) -> web.Response:
    """Post/Redirect/Get: the page after a change, with `notice` shown on it once."""
    if notice and TOKEN in request:
        await request.app[SESSIONS].notify(request[TOKEN], notice)
    response = web.HTTPSeeOther(location)
    _security_headers(response)
    return web.Response(status=303, headers=response.headers)


def safe_next(target: str | None) -> str:
    """Where to go after login: a console page of this host only (no `//evil`, no scheme)."""
    default = console_url("/")
    if not target or not target.startswith(CONSOLE_PREFIX + "/") or target.startswith("//"):
        return default
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or "\\" in target:
        return default
    return target


def same_origin(request: web.Request) -> bool:
    """A state change must come from a page of this host: `Origin` (every modern browser sends it on a
    POST), else `Referer`; a request with neither is a script's, whose CSRF token still has to match.
    Behind a proxy that terminates TLS the service sees `http`, the browser says `https`: with
    RULESVC_CONSOLE_SECURE_COOKIES both are this host; RULESVC_CONSOLE_ORIGIN names it outright."""
    origin = request.headers.get("Origin")
    if origin is None:
        referer = request.headers.get("Referer")
        if referer is None:
            return True
        parts = urlsplit(referer)
        origin = f"{parts.scheme}://{parts.netloc}"
    settings = request.app[SETTINGS]
    if settings.console_origin:
        return origin == settings.console_origin.rstrip("/")
    schemes = ("http", "https") if settings.console_secure_cookies else (request.scheme,)
    return origin in {f"{scheme}://{request.host}" for scheme in schemes}


def tokens_match(presented: str, expected: str) -> bool:
    """Constant-time, and for any text: `compare_digest` refuses a non-ASCII str (a 500, not a 403)."""
    return hmac.compare_digest(presented.encode(), expected.encode())


def secure_cookies(request: web.Request) -> bool:
    return request.secure or request.app[SETTINGS].console_secure_cookies


def session_lifetime(request: web.Request) -> timedelta:
    return timedelta(hours=request.app[SETTINGS].console_session_hours)


def guarded(route: ConsoleRoute) -> Handler:
    """The page behind the session check: no session, the login page (GET) or 401 (anything else); a
    change without this session's CSRF token from this origin, 403; a change in a read session, 403."""

    async def handler(request: web.Request) -> web.StreamResponse:
        token = request.cookies.get(COOKIE, "")
        found = await request.app[SESSIONS].find(token) if token else None
        if found is not None and not await request.app[KEYS].still_active(found[0].key_id):
            await request.app[SESSIONS].close(token)
            found = None
        if found is None:
            if request.method in SAFE_METHODS:
                return web.HTTPSeeOther(console_url("/login") + "?next=" + quote(request.path_qs, safe=""))
            return error_page(request, 401, "Your session has ended. Log in again, then repeat the change.")
        session = found[0]
        request[SESSION], request[TOKEN] = session, token
        if found[1]:
            request[NOTICE] = found[1]
        # The key's own rate limit, as on the API, and its id on every log line of the request.
        wait = request.app[LIMITER].check(session.key_id)
        if wait is not None:
            limited = error_page(request, 429, "Too many requests from this key. Wait a moment, then reload.")
            limited.headers["Retry-After"] = str(max(1, math.ceil(wait)))
            return limited
        structlog.contextvars.bind_contextvars(api_key=session.key_id)
        if request.method not in SAFE_METHODS:
            posted = await request.post()
            request[FORM] = MultiDictProxy(MultiDict((k, v) for k, v in posted.items() if isinstance(v, str)))
            presented = request[FORM].get(CSRF_FIELD, "")
            if not same_origin(request) or not tokens_match(presented, session.csrf):
                return error_page(
                    request,
                    403,
                    "This form is out of date or came from another site. Reload the page and try again.",
                )
            change = route.change if route.change is not None else True
            if change and session.scope != "admin":
                return error_page(request, 403, "A read-only session can look but not change anything.")
            if change:  # who changed what, from the console (the API's requests are logged by route)
                log.info("console.change", method=request.method, path=request.path, api_key=session.key_id)
        response = await route.handler(request)
        _security_headers(response)
        return response

    return handler


def login_token() -> str:
    return secrets.token_urlsafe(24)
