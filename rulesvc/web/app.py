"""The HTTP API: the app factory, its middlewares and handlers."""

from __future__ import annotations

import asyncio
import math
import os
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import msgspec
import pymongo
import structlog
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError
from pymongo import AsyncMongoClient
from pymongo.errors import ConnectionFailure, PyMongoError, WriteConcernError

from rulesvc.channels import CallbackChannel, ChannelRegistry, ManagedChannel, deduplicates
from rulesvc.config import Settings
from rulesvc.core.contacts import ContactRejected, decode_contact
from rulesvc.core.events import (
    MESSAGE_EVENT_TYPES,
    Event,
    EventError,
    EventsAccepted,
    EventsRejected,
    MalformedBody,
    TooManyEvents,
    decode_json_body,
    decode_ndjson_body,
    split_validation_error,
)
from rulesvc.core.ids import id_problem
from rulesvc.core.messages import MessageList
from rulesvc.core.ruleformat import RulesetError
from rulesvc.default_plugins.builtin import BUILTIN_PLUGINS
from rulesvc.metrics import CONTENT_TYPE_LATEST, Metrics
from rulesvc.plugins import PluginReport, load_plugins
from rulesvc.replay.simulate import Limits, Simulator
from rulesvc.replay.simulate import SimulateRejected as SimulateRejected
from rulesvc.runtime.dispatcher import Dispatcher, SendPolicy, parse_quiet_hours, quiet_channels, send_timeout
from rulesvc.runtime.fanout import CatalogFanout
from rulesvc.runtime.inbox import Inbox
from rulesvc.runtime.jobs import run_job
from rulesvc.runtime.rulesets import Rulesets
from rulesvc.runtime.scheduler import Scheduler
from rulesvc.runtime.templates import Templates
from rulesvc.store.db import Doc, Store, contact_from_doc, message_from_doc
from rulesvc.store.keys import (
    DEFAULT_INBOX_TOKEN_TTL,
    INBOX_TOKEN_PREFIX,
    TTL_RULE,
    ApiKey,
    InboxTokens,
    Keys,
    hand_out_first_key,
    inbox_token_ttl,
)
from rulesvc.store.mongod import EmbeddedMongod
from rulesvc.web import openapi
from rulesvc.web.bodies import decoding_problem, utf8_problem
from rulesvc.web.ratelimit import RateLimiter
from rulesvc.web.schemas import (
    CallbacksAccepted,
    ChannelInfo,
    ChannelList,
    ErrorBody,
    EventList,
    EventRecord,
    Health,
    InboxAction,
    InboxItem,
    InboxList,
    InboxToken,
    InboxTokenRequest,
    PluginInfo,
    QuarantineActed,
    QuarantineAction,
    QuarantinedEvent,
    QuarantineList,
    RulesetErrorBody,
    RulesetInfo,
    RulesetList,
)

log = structlog.get_logger(__name__)

SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", Metrics)
MONGO_URI = web.AppKey("mongo_uri", str)
STORE = web.AppKey("store", Store)
EMBEDDED_MONGOD = web.AppKey("embedded_mongod", EmbeddedMongod)
CHANNELS = web.AppKey("channels", ChannelRegistry)
PLUGINS = web.AppKey("plugins", list[PluginReport])
KEYS = web.AppKey("keys", Keys)
FANOUT = web.AppKey("fanout", CatalogFanout)
LIMITER = web.AppKey("limiter", RateLimiter)

OPS_ROUTES = frozenset({"/healthz", "/readyz", "/metrics"})
# The deadline of the start-up's schema work (index builds), which may take longer than a request's.
START_UP_SECONDS = 120.0
# What a shop's backend needs; everything else is admin.
INGEST_ROUTES = frozenset({("POST", "/v1/events"), ("POST", "/v1/contacts/{contact_id}/inbox-token")})
# A contact's in-app inbox: with that contact's inbox token (what a page holds), or with an admin key.
INBOX_ROUTES = frozenset(
    {("GET", "/v1/contacts/{contact_id}/inbox"), ("POST", "/v1/contacts/{contact_id}/inbox/{message_id}")}
)
INBOX_TOKENS = web.AppKey("inbox_tokens", InboxTokens)
API_KEY = web.RequestKey("api_key", ApiKey)  # the key a request came with, if it came with one
SIGNED_BY_PROVIDER = frozenset({"/v1/channels/{name}/callbacks"})
RULESETS = web.AppKey("rulesets", Rulesets)
INBOX = web.AppKey("inbox", Inbox)
SIMULATOR = web.AppKey("simulator", Simulator)
SCHEDULER = web.AppKey("scheduler", Scheduler)

JSON_TYPES = frozenset({"application/json"})
NDJSON_TYPES = frozenset({"application/x-ndjson", "application/ndjson", "application/jsonl"})
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


def _plain(value: Any) -> Any:
    """PyMongo reads integers beyond 32 bits as `Int64`, an int subclass msgspec will not encode: an
    event with such a value (a price in cents, an order number) must still be readable back."""
    if isinstance(value, int):
        return int(value)
    raise NotImplementedError(f"cannot encode {type(value).__name__}")


_encoder = msgspec.json.Encoder(enc_hook=_plain)


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=_encoder.encode(body), status=status, content_type="application/json", headers=headers
    )


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return json_response(ErrorBody(message), status, headers)


# --- middlewares -------------------------------------------------------------------------------------


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
    """Bearer API keys with scopes; 401 without a valid key, 403 for the wrong scope."""
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else None
    if route is None or route == "/openapi.json" or route in SIGNED_BY_PROVIDER:
        return await handler(request)
    if route in OPS_ROUTES and (request.app[SETTINGS].open_ops or _loopback(request)):
        return await handler(request)
    scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
    presented = presented.strip() if scheme.lower() == "bearer" else ""
    inbox = (request.method, route) in INBOX_ROUTES
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
        what = "API key or inbox token" if inbox else "API key"
        return error_response(
            401, f"missing or invalid {what}", {"WWW-Authenticate": 'Bearer realm="rulesvc"'}
        )
    if key.scope != "admin" and inbox:
        return error_response(
            403,
            f"an `{key.scope}` key opens an inbox only with that contact's inbox token: mint one with "
            "POST /v1/contacts/{contact_id}/inbox-token and send it as `Authorization: Bearer <token>`",
        )
    if key.scope != "admin" and (request.method, route) not in INGEST_ROUTES:
        return error_response(403, f"an `{key.scope}` key may not {request.method} {route}; use an admin key")
    request[API_KEY] = key
    wait = request.app[LIMITER].check(key.key_id)
    if wait is not None:
        seconds = str(max(1, math.ceil(wait)))
        return error_response(429, "rate limit for this API key exceeded", {"Retry-After": seconds})
    structlog.contextvars.bind_contextvars(api_key=key.key_id)
    return await handler(request)


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
        return error_response(exc.status, reason, {k: v for k, v in exc.headers.items() if k == "Allow"})
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


# --- helpers -----------------------------------------------------------------------------------------


async def read_body(request: web.Request) -> bytes:
    """The whole body, or a 4xx: over the size limit (413), a broken compression (400, in `_answer`),
    not UTF-8 where JSON or NDJSON is declared (400, with the byte where it breaks)."""
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise web.HTTPRequestEntityTooLarge(
            max_size=request.app[SETTINGS].max_body_bytes,
            actual_size=request.content_length or 0,
            text=f"request body over the limit of {request.app[SETTINGS].max_body_bytes} bytes",
        ) from exc
    if request.content_type in JSON_TYPES or request.content_type in NDJSON_TYPES:
        problem = utf8_problem(body)
        if problem is not None:
            raise web.HTTPBadRequest(text=problem)
    return body


def query_int(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise web.HTTPBadRequest(text=f"query parameter `{name}` must be an integer") from None
    if not low <= value <= high:
        raise web.HTTPBadRequest(text=f"query parameter `{name}` must be between {low} and {high}")
    return value


def query_time(request: web.Request, name: str) -> datetime | None:
    raw = request.query.get(name)
    if raw is None:
        return None
    try:
        value = msgspec.convert(raw, datetime)
    except msgspec.ValidationError:
        raise web.HTTPBadRequest(text=f"query parameter `{name}` must be an RFC 3339 time") from None
    if value.tzinfo is None:
        raise web.HTTPBadRequest(text=f"query parameter `{name}` needs a time zone offset")
    try:
        return value.astimezone(UTC)  # 9999-12-31T23:59:59-23:59 is in no year a datetime can hold
    except OverflowError:
        raise web.HTTPBadRequest(text=f"query parameter `{name}` is out of range") from None


def contact_id_of(request: web.Request) -> str:
    """The path's contact id, held to the same rule as the `contact_id` of events."""
    contact_id = request.match_info["contact_id"]
    problem = id_problem(contact_id, "contact_id")
    if problem is not None:
        raise web.HTTPBadRequest(text=problem)
    return contact_id


# --- handlers ----------------------------------------------------------------------------------------


async def foreign_outcomes(store: Store, events: list[Event]) -> list[EventError]:
    """An outcome event from an ingest key must name a message of its own contact: a bounce or block
    report marks an address invalid or suppresses a channel for good, so it may not be made up for anyone.
    (Providers report through their signed callbacks; admin keys are trusted.) One query per batch."""
    outcomes = [(i, e) for i, e in enumerate(events) if e.type in MESSAGE_EVENT_TYPES]
    if not outcomes:
        return []
    named = {e.attributes.get("message_id") for _, e in outcomes}
    wanted = [m for m in named if isinstance(m, str)]
    owners = {
        d["_id"]: d["contact_id"]
        for d in await store.messages.find({"_id": {"$in": wanted}}, {"contact_id": 1}).to_list()
    }
    errors: list[EventError] = []
    for index, event in outcomes:
        message_id = event.attributes.get("message_id")
        if not isinstance(message_id, str):
            reason = f"required for `{event.type}` from an ingest key: the id of the message it reports on"
        elif owners.get(message_id) != event.contact_id:
            reason = f"contact `{event.contact_id}` has no message `{message_id}`"
        else:
            continue
        errors.append(EventError(index, "$.attributes.message_id", reason))
    return errors


async def post_events(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    metrics = request.app[METRICS]
    if request.content_type in JSON_TYPES:
        decode = decode_json_body
    elif request.content_type in NDJSON_TYPES:
        decode = decode_ndjson_body
    else:
        return error_response(
            415,
            f"unsupported content type `{request.content_type}`; "
            "use application/json or application/x-ndjson",
        )
    body = await read_body(request)
    try:
        events, errors = decode(body, settings.max_batch_events)
    except MalformedBody as exc:
        return error_response(400, f"malformed JSON: {exc}")
    except TooManyEvents as exc:
        return error_response(413, str(exc))
    if not events and not errors:
        return error_response(422, "no events in the request body")
    key = request.get(API_KEY)
    if not errors and key is not None and key.scope != "admin":
        errors = await foreign_outcomes(request.app[STORE], events)
    if errors:
        metrics.events.labels("rejected").inc(len({e.index for e in errors}))
        return json_response(
            EventsRejected(f"{len({e.index for e in errors})} invalid event(s); none stored", errors), 422
        )
    result = await request.app[STORE].insert_events(events)
    if INBOX in request.app and result.accepted:
        request.app[INBOX].wake.set()
        if any(e.contact_id is None for e in events):
            request.app[FANOUT].wake.set()
    metrics.events.labels("accepted").inc(result.accepted)
    metrics.events.labels("duplicate").inc(result.duplicates)
    return json_response(EventsAccepted(result.accepted, result.duplicates), 202)


async def put_contact(request: web.Request) -> web.Response:
    if request.content_type not in JSON_TYPES:
        return error_response(415, f"unsupported content type `{request.content_type}`; use application/json")
    contact_id = contact_id_of(request)
    body = await read_body(request)
    try:
        contact, errors = decode_contact(body)
    except msgspec.DecodeError as exc:
        return error_response(400, f"malformed JSON: {exc}")
    if errors or contact is None:
        return json_response(ContactRejected("invalid contact; nothing changed", errors), 422)
    store = request.app[STORE]
    doc = await store.put_contact(contact_id, contact)
    created = doc["created_at"] == doc["updated_at"]
    return json_response(contact_from_doc(doc), 201 if created else 200)


async def get_contact(request: web.Request) -> web.Response:
    doc = await request.app[STORE].get_contact(contact_id_of(request))
    if doc is None:
        return error_response(404, "no such contact")
    return json_response(contact_from_doc(doc))


async def get_contact_messages(request: web.Request) -> web.Response:
    limit = query_int(request, "limit", 50, 1, 500)
    before = query_time(request, "before")
    status = request.query.get("status")
    docs = await request.app[STORE].contact_messages(contact_id_of(request), limit + 1, before, status)
    messages = [message_from_doc(d) for d in docs[:limit]]
    next_before = messages[-1].created_at if len(docs) > limit else None
    return json_response(MessageList(messages, next_before))


async def get_contact_events(request: web.Request) -> web.Response:
    limit = query_int(request, "limit", 50, 1, 500)
    before = query_time(request, "before")
    docs = await request.app[STORE].contact_events(contact_id_of(request), limit, before)
    records = [msgspec.convert({"id": d.pop("_id"), **d}, EventRecord) for d in docs]
    return json_response(EventList(records))


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


async def simulator_ctx(app: web.Application) -> AsyncIterator[None]:
    """The simulator process starts at the first simulation; it stops with the app."""
    app[SIMULATOR] = Simulator(app[SETTINGS].simulate_budget_seconds)
    try:
        yield
    finally:
        await app[SIMULATOR].close()


def channel_list(app: web.Application) -> ChannelList:
    infos = []
    for channel in app[CHANNELS].all():
        try:
            configured, detail = channel.status()
        except Exception as exc:
            configured, detail = False, f"status check failed: {type(exc).__name__}: {exc}"
        lease = timedelta(seconds=app[SETTINGS].lease_seconds)
        infos.append(
            ChannelInfo(channel.name, configured, detail, deduplicates(channel),
                        isinstance(channel, CallbackChannel), round(send_timeout(channel, lease), 3))
        )  # fmt: skip
    plugins = [PluginInfo(p.name, p.source, p.channels, p.jobs, p.error) for p in app[PLUGINS]]
    return ChannelList(infos, plugins)


async def get_channels(request: web.Request) -> web.Response:
    return json_response(channel_list(request.app))


async def channel_callback(request: web.Request) -> web.Response:
    """A provider reports outcomes; each becomes a message_* event, so rules can branch on it."""
    name = request.match_info["name"]
    channel = request.app[CHANNELS].get(name)
    if channel is None or not isinstance(channel, CallbackChannel):
        return error_response(404, f"channel `{name}` takes no callbacks")
    outcomes = await channel.callback(request)
    store = request.app[STORE]
    accepted = await store.record_outcomes(name, outcomes)
    if accepted:
        request.app[INBOX].wake.set()
    return json_response(CallbacksAccepted(accepted))


_INBOX_TOKEN_REQUEST = msgspec.json.Decoder(InboxTokenRequest)


async def post_inbox_token(request: web.Request) -> web.Response:
    """The shop's backend mints a token for the signed-in customer and hands it to the page."""
    contact_id = contact_id_of(request)
    body = await read_body(request)
    ttl = DEFAULT_INBOX_TOKEN_TTL
    if body.strip():
        if request.content_type not in JSON_TYPES:
            return error_response(
                415, f"unsupported content type `{request.content_type}`; use application/json"
            )
        try:
            asked = inbox_token_ttl(_INBOX_TOKEN_REQUEST.decode(body).ttl)
        except msgspec.ValidationError as exc:
            path, message = split_validation_error(exc)
            return json_response(SimulateRejected(message, path), 422)
        except msgspec.DecodeError as exc:
            return error_response(400, f"malformed JSON: {exc}")
        if asked is None:
            return json_response(SimulateRejected(TTL_RULE, "$.ttl"), 422)
        ttl = asked
    token, expires_at = await request.app[INBOX_TOKENS].mint(contact_id, ttl)
    return json_response(InboxToken(token, contact_id, expires_at))


async def get_inbox(request: web.Request) -> web.Response:
    contact_id = contact_id_of(request)
    limit = query_int(request, "limit", 20, 1, 100)
    docs = await request.app[STORE].inapp_messages(contact_id, limit)
    items = [
        InboxItem(
            d["_id"],
            d["template"],
            d.get("content", {}),
            d.get("sent_at"),
            d.get("shown_at"),
            d.get("params", {}),
        )
        for d in docs
    ]
    return json_response(InboxList(items))


_INBOX_ACTION = msgspec.json.Decoder(InboxAction)


async def post_inbox_action(request: web.Request) -> web.Response:
    contact_id = contact_id_of(request)
    try:
        action = _INBOX_ACTION.decode(await read_body(request))
    except msgspec.ValidationError as exc:
        path, message = split_validation_error(exc)
        return json_response(SimulateRejected(message, path), 422)
    except msgspec.DecodeError as exc:
        return error_response(400, f"malformed JSON: {exc}")
    found = await request.app[STORE].inapp_action(contact_id, request.match_info["message_id"], action.action)
    if not found:
        return error_response(404, "no such in-app message for this contact")
    request.app[INBOX].wake.set()
    return web.Response(status=204)


async def get_messages(request: web.Request) -> web.Response:
    status = request.query.get("status")
    if status is None:
        raise web.HTTPBadRequest(text="query parameter `status` is required, e.g. status=dead")
    limit = query_int(request, "limit", 50, 1, 500)
    before = query_time(request, "before")
    docs = await request.app[STORE].messages_by_status(status, limit + 1, before)
    messages = [message_from_doc(d) for d in docs[:limit]]
    next_before = messages[-1].created_at if len(docs) > limit else None
    return json_response(MessageList(messages, next_before))


def quarantined_from_doc(doc: Doc) -> QuarantinedEvent:
    return QuarantinedEvent(
        id=doc["_id"],
        type=doc["type"],
        time=doc["time"],
        received_at=doc["received_at"],
        quarantined_at=doc["quarantined_at"],
        stage=doc.get("stage", "inbox"),
        attempts=doc.get("attempts", 0),
        error=doc.get("error", ""),
        contact_id=doc.get("contact_id"),
        attributes=doc.get("attributes") or {},
    )


async def get_quarantine(request: web.Request) -> web.Response:
    limit = query_int(request, "limit", 50, 1, 500)
    before = query_time(request, "before")
    docs = await request.app[STORE].quarantined(limit + 1, before)
    events = [quarantined_from_doc(d) for d in docs[:limit]]
    next_before = events[-1].quarantined_at if len(docs) > limit else None
    return json_response(QuarantineList(events, next_before))


async def post_quarantine_action(request: web.Request) -> web.Response:
    action = request.match_info["action"]
    try:
        body = msgspec.json.decode(await read_body(request) or b"{}", type=QuarantineAction)
    except msgspec.ValidationError as exc:
        path, message = split_validation_error(exc)
        raise web.HTTPUnprocessableEntity(text=f"{path}: {message}") from None
    except msgspec.DecodeError as exc:
        raise web.HTTPBadRequest(text=f"malformed JSON: {exc}") from None
    if (body.ids is None) == (not body.all):
        raise web.HTTPUnprocessableEntity(text='give either "ids": [...] or "all": true')
    count = await request.app[STORE].release_quarantined(body.ids, action, datetime.now(UTC))
    log.info("quarantine.released", action=action, count=count, all=body.all)
    if action == "retry":
        if INBOX in request.app:
            request.app[INBOX].wake.set()
        if FANOUT in request.app:
            request.app[FANOUT].wake.set()
        return json_response(QuarantineActed(retried=count))
    return json_response(QuarantineActed(dropped=count))


async def healthz(request: web.Request) -> web.Response:
    return json_response(Health("ok"))


async def readyz(request: web.Request) -> web.Response:
    """503 when the service cannot do its work; 200 "degraded" when it works but something needs a look
    (a backlog, quarantined events), so a load balancer keeps it while an operator is told why."""
    checks: dict[str, str] = {}
    store = request.app[STORE]
    settings = request.app[SETTINGS]
    degraded = False
    try:
        await store.ping()
        checks["mongodb"] = "ok"
        now = datetime.now(UTC)
        oldest = await store.oldest_pending()
        lag = (now - oldest).total_seconds() if oldest is not None else 0.0
        checks["inbox"] = f"oldest unprocessed event waited {lag:.0f} s"
        if lag > settings.degraded_lag_seconds:
            degraded = True
            checks["inbox"] += f", over the {settings.degraded_lag_seconds:g} s threshold"
        window = timedelta(hours=settings.degraded_quarantine_hours)
        total, recent = await store.quarantine_summary(now - window)
        checks["quarantine"] = f"{total} event(s) quarantined"
        if recent:
            degraded = True
            checks["quarantine"] += (
                f", {recent} in the last {settings.degraded_quarantine_hours:g} h;"
                " see GET /v1/events/quarantine"
            )
    except PyMongoError as exc:
        checks["mongodb"] = f"unreachable: {type(exc).__name__}"
    rulesets = request.app.get(RULESETS)
    if rulesets is None or not rulesets.loaded_once:
        checks["rulesets"] = "not loaded yet"
        ok = False
    else:
        ok = checks["mongodb"] == "ok"
        errors = rulesets.errors()
        checks["rulesets"] = f"{len(rulesets.live)} loaded" + (
            f"; {len(errors)} error(s), previous versions kept: " + "; ".join(map(str, errors))
            if errors
            else ""
        )
    status: Literal["ok", "degraded", "unavailable"] = (
        "unavailable" if not ok else "degraded" if degraded else "ok"
    )
    return json_response(Health(status, checks), 200 if ok else 503)


async def metrics(request: web.Request) -> web.Response:
    metrics = request.app[METRICS]
    try:
        metrics.inbox_pending.set(await request.app[STORE].pending_count())
        total, _ = await request.app[STORE].quarantine_summary(datetime.now(UTC))
        metrics.quarantine_size.set(total)
    except PyMongoError:
        pass
    return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def openapi_json(request: web.Request) -> web.Response:
    return web.Response(body=openapi.document(), content_type="application/json")


# --- resources ---------------------------------------------------------------------------------------


async def embedded_mongod_ctx(app: web.Application) -> AsyncIterator[None]:
    """Starts the embedded mongod when no MONGODB_URI is given; stopped last, after everything else."""
    settings = app[SETTINGS]
    if settings.mongodb_uri:
        app[MONGO_URI] = settings.mongodb_uri
        yield
        return
    # Blocking on purpose: it runs once at start-up in the main thread, which mongod's parent-death
    # signal is tied to.
    mongod = EmbeddedMongod(settings.data_dir, settings.mongod_bin, cache_gb=settings.mongod_cache_gb)
    mongod.start()
    app[EMBEDDED_MONGOD] = mongod
    app[MONGO_URI] = mongod.uri
    stop = asyncio.Event()
    keeper = asyncio.create_task(mongod.keep_running(stop), name="mongod-keeper")  # restarts it if it dies
    try:
        yield
    finally:
        stop.set()
        await keeper  # a restart in progress finishes first, so the stop below stops that mongod too
        mongod.stop()


async def mongo_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
        app[MONGO_URI],
        tz_aware=True,
        serverSelectionTimeoutMS=3000,
        appname="rulesvc",
        # Every operation has a deadline: a paused or lost server costs a request a 503, never a hang.
        timeoutMS=settings.mongodb_timeout_seconds * 1000,
    )
    store = Store(client, settings.database, timedelta(days=settings.event_retention_days))
    with pymongo.timeout(max(START_UP_SECONDS, settings.mongodb_timeout_seconds)):
        await store.ensure_schema()  # an index build on a large collection takes longer than a request
    app[STORE] = store
    app[KEYS] = Keys(store.api_keys)
    app[INBOX_TOKENS] = InboxTokens(store.db["secrets"])
    log.info("store.ready", database=settings.database)
    if not settings.mongodb_uri:
        await hand_out_first_key(app[KEYS])
    try:
        yield
    finally:
        await client.close()


async def engine_ctx(app: web.Application) -> AsyncIterator[None]:
    """Rulesets (hot-reloaded), the inbox and the scheduler run for as long as the app serves."""
    settings = app[SETTINGS]
    channels = app[CHANNELS]
    rulesets = Rulesets(Path(settings.rulesets_dir), channels.names())
    rulesets.reload()
    templates = Templates(Path(settings.templates_dir or Path(settings.rulesets_dir) / "templates"))
    dispatcher = Dispatcher(app[STORE], channels, templates, send_policy(settings))
    for channel in channels.all():
        if isinstance(channel, ManagedChannel):
            await channel.start()
    lease = timedelta(seconds=settings.lease_seconds)
    scheduler = Scheduler(app[STORE], dispatcher, lambda: set(rulesets.live), lease=lease)
    quarantined = app[METRICS].events_quarantined

    def count_quarantined(stage: str) -> None:
        quarantined.labels(stage).inc()

    inbox = Inbox(
        app[STORE],
        rulesets,
        lease=timedelta(seconds=settings.lease_seconds),
        on_scheduled=scheduler.due_soon,
        on_quarantined=count_quarantined,
    )
    scheduler.on_timer_event = inbox.wake.set
    fanout = CatalogFanout(
        app[STORE], lease=lease, on_copies=inbox.wake.set, on_quarantined=count_quarantined
    )
    app[RULESETS], app[INBOX], app[SCHEDULER], app[FANOUT] = rulesets, inbox, scheduler, fanout
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(rulesets.watch(stop), name="rulesets-watch"),
        asyncio.create_task(inbox.run(stop), name="inbox"),
        asyncio.create_task(scheduler.run(stop), name="scheduler"),
        asyncio.create_task(fanout.run(stop), name="catalog-fanout"),
        *(
            asyncio.create_task(run_job(job, app[STORE], stop), name=f"job-{job.name}")
            for job in channels.jobs
        ),
    ]
    try:
        yield
    finally:
        stop.set()  # loops finish the batch in hand, then return
        done, pending = await asyncio.wait(tasks, timeout=settings.shutdown_grace_seconds)
        for task in pending:
            task.cancel()
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                log.error("engine.task_failed", task=task.get_name(), error=repr(task.exception()))
        for compiled in rulesets.live.values():
            compiled.free()
        for channel in channels.all():
            if isinstance(channel, ManagedChannel):
                await channel.close()


def send_policy(settings: Settings) -> SendPolicy:
    quiet_start, quiet_end = parse_quiet_hours(settings.quiet_hours)
    return SendPolicy(
        frequency_caps=dict(settings.frequency_caps),
        quiet_start=quiet_start,
        quiet_end=quiet_end,
        default_timezone=settings.default_timezone,
        max_attempts=settings.max_attempts,
        retry_base=timedelta(seconds=settings.retry_base_seconds),
        retry_max=timedelta(seconds=settings.retry_max_seconds),
        lease=timedelta(seconds=settings.lease_seconds),
        quiet_channels=quiet_channels(settings.channels, dict(os.environ)),
    )


def load_channels(settings: Settings) -> tuple[ChannelRegistry, list[PluginReport]]:
    return load_plugins(BUILTIN_PLUGINS, settings.channels, settings.plugins)


def create_app(settings: Settings, channels: ChannelRegistry | None = None) -> web.Application:
    app = web.Application(middlewares=[observe, authenticate], client_max_size=settings.max_body_bytes)
    app[SETTINGS] = settings
    app[LIMITER] = RateLimiter(settings.rate_limit)
    if channels is None:
        channels, reports = load_channels(settings)
    else:
        reports = [PluginReport("test", "given", sorted(channels.names()))]
    app[CHANNELS] = channels
    app[PLUGINS] = reports
    app[METRICS] = Metrics()
    app.cleanup_ctx.append(embedded_mongod_ctx)
    app.cleanup_ctx.append(mongo_ctx)
    app.cleanup_ctx.append(engine_ctx)
    app.cleanup_ctx.append(simulator_ctx)
    app.router.add_post("/v1/events", post_events)
    app.router.add_put("/v1/contacts/{contact_id}", put_contact)
    app.router.add_get("/v1/contacts/{contact_id}", get_contact)
    app.router.add_get("/v1/contacts/{contact_id}/messages", get_contact_messages)
    app.router.add_get("/v1/contacts/{contact_id}/events", get_contact_events)
    app.router.add_get("/v1/rulesets", get_rulesets)
    app.router.add_post("/v1/rulesets/reload", reload_rulesets)
    app.router.add_post("/v1/simulate", post_simulate)
    app.router.add_post("/v1/contacts/{contact_id}/inbox-token", post_inbox_token)
    app.router.add_get("/v1/contacts/{contact_id}/inbox", get_inbox)
    app.router.add_post("/v1/contacts/{contact_id}/inbox/{message_id:.+}", post_inbox_action)
    app.router.add_get("/v1/messages", get_messages)
    app.router.add_get("/v1/channels", get_channels)
    app.router.add_post("/v1/channels/{name}/callbacks", channel_callback)
    app.router.add_get("/v1/events/quarantine", get_quarantine)
    app.router.add_post("/v1/events/quarantine/{action:retry|drop}", post_quarantine_action)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", openapi_json)
    return app
