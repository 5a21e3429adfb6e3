"""What every view uses: JSON responses and errors, the body with its limits, query parameters."""

from __future__ import annotations

import functools
import types
from datetime import UTC, datetime
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

import msgspec
import msgspec.inspect as mi
from aiohttp import web

from rulesvc.core.bodies import utf8_problem
from rulesvc.core.ids import id_problem
from rulesvc.web.keys import QUERY, SETTINGS
from rulesvc.web.schemas import ErrorBody, enum_values

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


class QueryRejected(Exception):
    """A query parameter the route does not take, or a value it does not allow: 422 with the name and
    what is allowed (the known names, or the values of an enum)."""

    def __init__(self, message: str, field: str, allowed: list[str] | None = None) -> None:
        super().__init__(message)
        self.message, self.field, self.allowed = message, field, allowed

    def response(self) -> web.Response:
        return json_response(ErrorBody(self.message, self.field, self.allowed), 422)


Q = TypeVar("Q", bound=msgspec.Struct)


def _shown(raw: str) -> str:
    return f"`{raw[:80]}`" + ("..." if len(raw) > 80 else "")


def _plain_type(kind: mi.Type) -> mi.Type:
    """The type of a parameter without its `None` (absent) and its metadata."""
    if isinstance(kind, mi.UnionType):
        kind = next(t for t in kind.types if not isinstance(t, mi.NoneType))
    return kind.type if isinstance(kind, mi.Metadata) else kind


def _present(hint: Any) -> Any:
    if get_origin(hint) in (Union, types.UnionType):
        (hint,) = [a for a in get_args(hint) if a is not type(None)]
    return hint


def _refusal(name: str, raw: str, kind: mi.Type, hint: Any) -> QueryRejected:
    """Why `raw` is not a value of the parameter, in words, from its declared type."""
    allowed = enum_values(hint)
    if allowed is not None:
        return QueryRejected(
            f"query parameter `{name}`: {_shown(raw)} is not one of {', '.join(allowed)}", name, allowed
        )
    if isinstance(kind, mi.IntType):
        bounds = f" between {kind.ge} and {kind.le}" if kind.ge is not None and kind.le is not None else ""
        return QueryRejected(f"query parameter `{name}` must be an integer{bounds}, got {_shown(raw)}", name)
    if isinstance(kind, mi.BoolType):
        return QueryRejected(f"query parameter `{name}` must be true or false, got {_shown(raw)}", name)
    if isinstance(kind, mi.DateTimeType):
        try:
            msgspec.convert(raw, datetime)
        except msgspec.ValidationError:
            pass
        else:
            return QueryRejected(f"query parameter `{name}` needs a time zone offset, e.g. Z", name)
        return QueryRejected(
            f"query parameter `{name}` must be an RFC 3339 time such as 2026-11-26T09:30:00Z, "
            f"got {_shown(raw)}",
            name,
        )
    return QueryRejected(f"query parameter `{name}`: {_shown(raw)} is not allowed", name)


@functools.cache
def _declared(spec: type[msgspec.Struct]) -> tuple[mi.StructType, dict[str, Any]]:
    """A query struct's fields and annotations, read once per struct rather than per request."""
    info = mi.type_info(spec)
    assert isinstance(info, mi.StructType)
    return info, get_type_hints(spec, include_extras=True)


def parse_query(request: web.Request, spec: type[Q]) -> Q:
    """The request's query parameters as the route's declared struct, or QueryRejected: an unknown name
    (a typo such as `limt` must not be ignored), a name given twice, a value of the wrong kind."""
    info, hints = _declared(spec)
    if not request.query and not any(f.required for f in info.fields):
        return spec()  # the common case (every POST /v1/events), without a look at the types
    fields = {f.encode_name: f for f in info.fields}
    values: dict[str, Any] = {}
    for name in request.query:
        field = fields.get(name)
        if field is None:
            known = sorted(fields)
            takes = f"this route takes {', '.join(known)}" if known else "this route takes none"
            raise QueryRejected(f"unknown query parameter {_shown(name)}: {takes}", name, known)
        raws = request.query.getall(name)
        if len(raws) > 1:
            raise QueryRejected(f"query parameter `{name}` is given {len(raws)} times; give it once", name)
        raw = raws[0]
        kind = _plain_type(field.type)
        # Lax for numbers and booleans written as text; strict for times, which lax mode would also read
        # from a number of seconds (`before=0.5`), where the document promises RFC 3339.
        strict = isinstance(kind, mi.DateTimeType)
        try:  # as the type without its `None`: in lax mode the text "null" would pass for an absent value
            value = msgspec.convert(raw, _present(hints[field.name]), strict=strict)
        except msgspec.ValidationError:
            raise _refusal(name, raw, kind, hints[field.name]) from None
        if isinstance(value, datetime):
            try:
                value = value.astimezone(UTC)  # 9999-12-31T23:59:59-23:59 is in no year a datetime can hold
            except OverflowError:
                raise QueryRejected(f"query parameter `{name}` is out of range", name) from None
        values[field.name] = value
    for field in info.fields:
        if field.required and field.name not in values:
            allowed = enum_values(hints[field.name])
            one_of = f": one of {', '.join(allowed)}" if allowed else ""
            raise QueryRejected(
                f"query parameter `{field.encode_name}` is required{one_of}", field.name, allowed
            )
    return spec(**values)


def query_of(request: web.Request, spec: type[Q]) -> Q:
    """The query parameters the route table's wrapper parsed (`web.routes`): the view names the struct it
    expects, and a table that declares another one fails here, in every test of the route."""
    parsed = request[QUERY]
    if not isinstance(parsed, spec):
        raise TypeError(f"route declares {type(parsed).__name__}, its view reads {spec.__name__}")
    return parsed


def contact_id_of(request: web.Request) -> str:
    """The path's contact id, held to the same rule as the `contact_id` of events."""
    contact_id = request.match_info["contact_id"]
    problem = id_problem(contact_id, "contact_id")
    if problem is not None:
        raise web.HTTPBadRequest(text=problem)
    return contact_id


class ApiError(Exception):
    """An operation's refusal (`web/views/<resource>.py`): the status and body its route answers with,
    which the HTTP adapter sends as JSON and the console shows on a page."""

    def __init__(self, status: int, body: msgspec.Struct, headers: dict[str, str] | None = None) -> None:
        super().__init__(getattr(body, "error", ""))
        self.status, self.body, self.headers = status, body, headers

    @property
    def message(self) -> str:
        return str(getattr(self.body, "error", ""))

    def response(self) -> web.Response:
        return json_response(self.body, self.status, self.headers)


def refuse(status: int, message: str) -> ApiError:
    return ApiError(status, ErrorBody(message))
