"""The middlewares: request ids, metrics and JSON errors (`observe`), then access (`authenticate`, by
the access each route has in `rulesvc.web.routes`)."""

from __future__ import annotations

import base64
import binascii
import math
import re
import time
import uuid
from collections.abc import Awaitable, Callable

import structlog
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError
from pymongo.errors import ConnectionFailure, PyMongoError, WriteConcernError

from rulesvc.core.bodies import decoding_problem
from rulesvc.store.keys import INBOX_TOKEN_PREFIX
from rulesvc.web.console.paths import CONSOLE_PREFIX
from rulesvc.web.keys import API_KEY, INBOX_TOKENS, KEYS, LIMITER, METRICS, SETTINGS
from rulesvc.web.routes import access, allowed_methods
from rulesvc.web.views.base import error_response

log = structlog.get_logger(__name__)


_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request id on every log line and response, metrics per route, and JSON for every error."""
    incoming = request.headers.get("X-Request-ID", "")
    request_id = incoming if _REQUEST_ID.match(incoming) else uuid.uuid4().hex
    structlog.contextvars.bind_contextvars(request_id=request_id)
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    metrics = request.app[METRICS]
    started = time.perf_counter()
    try:
        response = await _answer(request, handler)
    finally:
        structlog.contextvars.unbind_contextvars("request_id", "api_key")
    if not request.content.is_eof():
        # A body the answer did not need (refused before it was read) and not all here yet: close the
        # connection after the answer rather than let aiohttp read the rest, which may be broken (a bad
        # gzip stream there was an "Unhandled exception" and a dropped connection).
        request.content.feed_eof()
        response.force_close()
    elapsed = time.perf_counter() - started
    response.headers["X-Request-ID"] = request_id
    metrics.requests.labels(request.method, route, str(response.status)).inc()
    metrics.latency.labels(request.method, route).observe(elapsed)
    if response.status >= 500:
        log.warning(
            "http.response", method=request.method, route=route, status=response.status, request_id=request_id
        )
    return response


def _loopback(request: web.Request) -> bool:
    return (request.remote or "") == "::1" or (request.remote or "").startswith("127.")


@web.middleware
async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Bearer API keys with scopes, by the access of the route in `rulesvc.web.routes`; 401 without a valid
    key, 403 for the wrong scope."""
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else None
    if route is None or route.startswith(CONSOLE_PREFIX):
        return await handler(request)  # the console checks its own sessions (rulesvc.web.console.base)
    allowed = access(request.method, route)
    if allowed in ("public", "signed-by-provider"):
        return await handler(request)
    if allowed == "ops" and (request.app[SETTINGS].open_ops or _loopback(request)):
        return await handler(request)
    scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
    # Segment's routes: the write key as the Basic user (what its libraries send), or a Bearer key.
    segment = allowed == "segment"
    if segment and scheme.lower() == "basic":
        presented = _basic_user(presented.strip())
    else:
        presented = presented.strip() if scheme.lower() == "bearer" else ""
    if segment:
        allowed = "ingest"
    inbox = allowed == "inbox"
    if inbox:
        bearer_token = presented if presented.startswith(f"{INBOX_TOKEN_PREFIX}.") else ""
        token = request.query.get("token") or bearer_token
        if token:
            contact_id = request.match_info["contact_id"]
            refused = await request.app[INBOX_TOKENS].check(token, contact_id)
            if refused is not None:
                challenge = {"WWW-Authenticate": 'Bearer realm="rulesvc"'} if refused.status == 401 else None
                return error_response(refused.status, refused.message, challenge)
            wait = request.app[LIMITER].check(f"inbox:{contact_id}")  # each page as an API key would be
            if wait is not None:
                seconds = str(max(1, math.ceil(wait)))
                return error_response(429, "rate limit for this inbox exceeded", {"Retry-After": seconds})
            return await handler(request)
    key = await request.app[KEYS].verify(presented) if presented else None
    if key is None:
        what = "API key or inbox token" if inbox else "write key (API key)" if segment else "API key"
        realm = 'Basic realm="rulesvc"' if segment else 'Bearer realm="rulesvc"'
        return error_response(401, f"missing or invalid {what}", {"WWW-Authenticate": realm})
    if key.scope != "admin" and inbox:
        return error_response(
            403,
            f"an `{key.scope}` key opens an inbox only with that contact's inbox token: mint one with "
            "POST /v1/contacts/{contact_id}/inbox-token and send it as `Authorization: Bearer <token>`",
        )
    looking = key.scope == "read" and allowed == "admin" and request.method in ("GET", "HEAD")
    if key.scope != "admin" and allowed != "ingest" and not looking:
        return error_response(403, f"an `{key.scope}` key may not {request.method} {route}; use an admin key")
    if key.scope == "read" and allowed == "ingest":
        return error_response(403, f"a `read` key may not {request.method} {route}; use an ingest key")
    request[API_KEY] = key
    wait = request.app[LIMITER].check(key.key_id)
    if wait is not None:
        seconds = str(max(1, math.ceil(wait)))
        return error_response(429, "rate limit for this API key exceeded", {"Retry-After": seconds})
    structlog.contextvars.bind_contextvars(api_key=key.key_id)
    return await handler(request)


def _basic_user(credentials: str) -> str:
    """The user name of HTTP Basic credentials (Segment's write key); empty when they are not Basic's."""
    try:
        decoded = base64.b64decode(credentials, validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return ""
    return decoded.partition(":")[0].strip()


def storage_unavailable(exc: PyMongoError) -> bool:
    """Errors that say "not now" rather than "never": a lost or paused server, a missed deadline
    (NetworkTimeout, ServerSelectionTimeoutError, ExecutionTimeout, WTimeoutError all have `timeout`),
    a failover, a transaction the server asks to retry."""
    return (
        isinstance(exc, ConnectionFailure | WriteConcernError)
        or exc.timeout
        or exc.has_error_label("TransientTransactionError")
        or exc.has_error_label("RetryableWriteError")
    )


async def _answer(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        reason = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else exc.reason
        headers = {k: v for k, v in exc.headers.items() if k == "Allow"}
        if isinstance(exc, web.HTTPMethodNotAllowed):
            headers["Allow"] = allowed_methods(request.path) or headers.get("Allow", "")
        return error_response(exc.status, reason, headers)
    except PyMongoError as exc:
        if not storage_unavailable(exc):
            log.exception("mongodb.error")
            return error_response(500, "internal error")
        # Unreachable, paused or too slow (the deadline of RULESVC_MONGODB_TIMEOUT_SECONDS): nothing of
        # this request was acknowledged, so the client retries.
        log.error("mongodb.unavailable", error=type(exc).__name__, timeout=exc.timeout)
        return error_response(503, "storage unavailable, retry later", {"Retry-After": "1"})
    except RequestPayloadError:
        return _undecodable_body(request)
    except Exception as exc:
        problem = decoding_problem(exc)  # JSON nested too deeply, or not UTF-8, met by any decoder
        if problem is not None:
            return error_response(400, problem)
        if isinstance(exc, ConnectionResetError) and _client_gone(request):
            log.info("http.client_gone", method=request.method, path=request.path)
            return web.Response(status=CLIENT_CLOSED_REQUEST)
        if isinstance(exc, OverflowError):
            # A number or a time from the request too large to compute with (a duration of 10^40 weeks)
            # that no check caught: the client's to fix; logged with where, so a check gets added.
            log.warning("http.out_of_range", method=request.method, path=request.path, exc_info=True)
            return error_response(400, "a number or time in the request is out of range")
        log.exception("http.unhandled")
        return error_response(500, "internal error")


# A client that went away before its request was read: no error of ours, counted apart (as nginx does).
CLIENT_CLOSED_REQUEST = 499


def _client_gone(request: web.Request) -> bool:
    return request.transport is None or request.transport.is_closing()


def _undecodable_body(request: web.Request) -> web.Response:
    """A body aiohttp could not decompress (a broken gzip or deflate stream): 400, and the connection
    closes, since where a next request would begin in it is unknown."""
    request.content.feed_eof()  # read no more of it: aiohttp would fail again draining it after the answer
    encoding = request.headers.get("Content-Encoding", "")
    response = error_response(400, f"request body is not valid `{encoding}` data (Content-Encoding)")
    response.force_close()
    return response
