"""What every view uses: JSON responses and errors, the body with its limits, query parameters."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import msgspec
from aiohttp import web

from rulesvc.core.bodies import utf8_problem
from rulesvc.core.ids import id_problem
from rulesvc.web.keys import SETTINGS
from rulesvc.web.schemas import ErrorBody

JSON_TYPES = frozenset({"application/json"})

NDJSON_TYPES = frozenset({"application/x-ndjson", "application/ndjson", "application/jsonl"})


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


def query_bool(request: web.Request, name: str) -> bool:
    raw = request.query.get(name)
    if raw is None:
        return False
    if raw.lower() not in ("true", "false", "1", "0"):
        raise web.HTTPBadRequest(text=f"query parameter `{name}` must be true or false")
    return raw.lower() in ("true", "1")
