"""The OpenAPI 3.1 document, generated from the route table (`rulesvc.web.routes`): each route carries its
operation, and the components are the msgspec types that validate requests, turned into JSON schemas.

The helpers here build the operations' common parts (references, JSON bodies, errors, parameters)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, Protocol, get_type_hints

import msgspec
import msgspec.inspect as mi

from rulesvc.core.ids import ID_PATTERN, ID_RULE, MAX_ID_LENGTH
from rulesvc.web.schemas import enum_values

Schema = dict[str, Any]


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def json_body(schema: Schema, description: str) -> Schema:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def error(description: str) -> Schema:
    return json_body(ref("ErrorBody"), description)


def links(body: Schema, **targets: tuple[str, dict[str, str]]) -> Schema:
    """A response with OpenAPI links: where one of its values (or the request's) feeds another operation,
    named `link_name=(operationId, {parameter: runtime expression})`; clients and stateful testers follow
    them."""
    return {
        **body,
        "links": {name: {"operationId": op, "parameters": params} for name, (op, params) in targets.items()},
    }


def contact_id_param() -> Schema:
    return {
        "name": "contact_id",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "minLength": 1, "maxLength": MAX_ID_LENGTH, "pattern": ID_PATTERN},
        "description": ID_RULE,
    }


INBOX_ACCESS = (
    " Open with that contact's inbox token (`Authorization: Bearer <token>` or `?token=`), or an admin key."
)

# The document's security schemes; each operation's `security` follows from its route's access.
SECURITY_SCHEMES: Schema = {
    "apiKey": {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "rsk_<id>_<secret>",
        "description": "An API key (`rulesvc keys create --scope admin|ingest`). The role an operation "
        "names is the scope it needs: `admin` may call every operation; `ingest` may post events and mint "
        "inbox tokens (what a shop's backend needs). Another scope's key is 403.",
    },
    "writeKey": {
        "type": "http",
        "scheme": "basic",
        "description": "Segment's write key: an `ingest` or `admin` API key as the user name, the password "
        "empty (what Segment's and RudderStack's libraries send). Segment's routes only.",
    },
    "inboxToken": {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "rsi.<contact, base64url>.<expiry, Unix seconds>.<signature>",
        "description": "A contact's inbox token (POST /v1/contacts/{contact_id}/inbox-token): opens that "
        "contact's in-app inbox only, until it expires.",
    },
    "inboxTokenQuery": {
        "type": "apiKey",
        "in": "query",
        "name": "token",
        "description": "The inbox token as the `token` query parameter, where a page cannot set headers.",
    },
}
# Query parameters that are credentials: documented as security schemes only, never as parameters.
_CREDENTIAL_PARAMETERS = {s["name"] for s in SECURITY_SCHEMES.values() if s.get("in") == "query"}
_SECURITY: dict[str, list[Schema]] = {
    "public": [],
    "signed-by-provider": [],  # the provider's own signature, checked by the channel (see `description`)
    "ops": [{}, {"apiKey": ["admin"]}],  # open on loopback (or with RULESVC_OPEN_OPS)
    "ingest": [{"apiKey": ["ingest"]}, {"apiKey": ["admin"]}],
    "segment": [{"writeKey": []}, {"apiKey": ["ingest"]}, {"apiKey": ["admin"]}],
    "inbox": [{"inboxToken": []}, {"inboxTokenQuery": []}, {"apiKey": ["admin"]}],
    "admin": [{"apiKey": ["admin"]}],
    "personal-data": [{"apiKey": ["admin"]}],
}
_ACCESS_NOTE = {
    "personal-data": " Only an admin key: a `read` key may look at everything else, not at a data subject's "
    "whole data.",
    "ops": " Open from loopback (everywhere with RULESVC_OPEN_OPS); elsewhere it needs an admin key.",
    "signed-by-provider": " No API key: the request carries the provider's own signature (e.g. Twilio's "
    "`X-Twilio-Signature`, Standard Webhooks' `webhook-signature`), which the channel verifies; 401 when "
    "it does not.",
}
_RETRY_AFTER: Schema = {
    "description": "seconds to wait before retrying",
    "schema": {"type": "integer", "minimum": 1},
}
_CHALLENGE: Schema = {"description": 'Bearer realm="rulesvc"', "schema": {"type": "string"}}


def query(name: str, schema: Schema, description: str) -> Schema:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


def _struct_info(spec: type[msgspec.Struct]) -> mi.StructType:
    info = mi.type_info(spec)
    assert isinstance(info, mi.StructType)
    return info


def query_parameters(spec: type[msgspec.Struct]) -> list[Schema]:
    """The operation's query parameters from the struct that also checks them (`Route.query`): names,
    enums, ranges, formats and defaults come from one declaration."""
    (schema,), components = msgspec.json.schema_components([spec], ref_template="#/components/schemas/{name}")
    struct = components[schema["$ref"].rsplit("/", 1)[1]]
    required = set(struct.get("required", []))
    hints = get_type_hints(spec, include_extras=True)
    declared = {f.encode_name: hints[f.name] for f in _struct_info(spec).fields}
    parameters = []
    for name, prop in struct.get("properties", {}).items():
        prop = dict(prop)
        if "anyOf" in prop:  # `X | None = None`: absent, never null, in a query string
            (inner,) = [p for p in prop.pop("anyOf") if p != {"type": "null"}]
            prop = {**inner, **prop}
        values = enum_values(declared[name])
        if values is not None:
            prop["enum"] = values  # in the declared order (a lifecycle), as the 422 lists them
        if prop.get("default", 0) is None:
            del prop["default"]
        description = prop.pop("description", "")
        parameters.append({**query(name, prop, description), "required": name in required})
    return parameters


def _with_headers(response: Schema, headers: Schema) -> Schema:
    return {**response, "headers": headers}


def access_responses(
    access: str, has_body: bool, media_types: Iterable[str], path_names: Iterable[str]
) -> dict[str, Schema]:
    """The answers an operation can give whatever it does, from its route's access, whether it takes a
    body and its path parameters: the router, the authentication middleware, the body reader and the
    storage stand before every handler."""
    responses: dict[str, Schema] = {}
    bad: list[str] = []
    if has_body:
        bad.append(
            "malformed JSON (with the byte position), a body that is not UTF-8, broken compression, or a "
            "number or time too large to compute with"
        )
    if "contact_id" in path_names:
        bad.append("a contact id in the path that breaks the id rule")
    if bad:
        responses["400"] = error("; ".join(bad) + " (a bad query parameter is 422)")
    if path_names:
        responses["404"] = error("no such route: a path parameter outside its values or pattern")
    if access not in ("public", "signed-by-provider"):
        where = " (not on loopback)" if access == "ops" else ""
        what = "API key or inbox token" if access == "inbox" else "API key"
        responses["401"] = _with_headers(
            error(f"no {what}, or one that is invalid, expired or revoked{where}"),
            {
                "WWW-Authenticate": {**_CHALLENGE, "required": True}
                | ({"description": 'Basic realm="rulesvc"'} if access == "segment" else {})
            },
        )
        if access == "inbox":
            responses["403"] = error(
                "an inbox token for another contact, or an ingest key without the contact's token"
            )
        elif access not in ("ingest", "segment"):  # an ingest route takes both scopes
            responses["403"] = error(f"an `ingest` or `read` key: this operation needs an `admin` key{where}")
        else:
            responses["403"] = error("a `read` key: posting needs an `ingest` or `admin` key")
        responses["429"] = _with_headers(
            error("the rate limit of this API key or inbox (RULESVC_RATE_LIMIT) is exceeded"),
            {"Retry-After": {**_RETRY_AFTER, "required": True}},
        )
    if access != "public":  # a key, a token or a callback's outcomes are read from or written to MongoDB
        responses["503"] = _with_headers(
            error("storage unavailable (MongoDB unreachable or too slow); retry after Retry-After seconds"),
            {"Retry-After": _RETRY_AFTER},
        )
    if has_body or access == "signed-by-provider":  # a provider's report is a body in its own format
        responses["413"] = error("the body is over the limit (RULESVC_MAX_BODY_BYTES)")
    if has_body:
        responses["415"] = error(f"a body whose Content-Type is not {' or '.join(media_types)}")
    return responses


def _merged(status: str, generated: Schema, declared: Schema) -> Schema:
    """A status the operation declares itself and the generated one: both descriptions, either body,
    and the generated headers as optional (only one of the two cases sends them)."""
    generated_schema = generated.get("content", {}).get("application/json", {}).get("schema")
    declared_schema = declared.get("content", {}).get("application/json", {}).get("schema")
    merged = {**declared, "description": f"{declared['description']}; or {generated['description']}"}
    if generated_schema is not None and declared_schema is not None and generated_schema != declared_schema:
        merged["content"] = {"application/json": {"schema": {"anyOf": [declared_schema, generated_schema]}}}
    if "headers" in generated:
        # a 429 always says when to retry; another status only in the generated case
        headers = {k: {**v, "required": v.get("required", False) and status == "429"}
                   for k, v in generated["headers"].items()}  # fmt: skip
        merged["headers"] = {**headers, **declared.get("headers", {})}
    return merged


def _date_times(kind: mi.Type, schema: Schema, components: dict[str, Schema], seen: set[str]) -> None:
    """Add `format: date-time` where msgspec's schema has a plain string for a datetime (msgspec says
    so only for `tz=True` ones; every time the API reads or writes is RFC 3339)."""
    if isinstance(kind, mi.Metadata):
        kind = kind.type
    if isinstance(kind, mi.DateTimeType):
        if schema.get("type") == "string":
            schema.setdefault("format", "date-time")
    elif isinstance(kind, mi.UnionType):
        others = [t for t in kind.types if not isinstance(t, mi.NoneType)]
        branches = schema.get("anyOf", [schema])
        if len(others) == 1:
            for branch in branches:
                if branch.get("type") != "null":
                    _date_times(others[0], branch, components, seen)
    elif isinstance(kind, mi.ListType | mi.SetType | mi.FrozenSetType | mi.VarTupleType):
        if isinstance(schema.get("items"), dict):
            _date_times(kind.item_type, schema["items"], components, seen)
    elif isinstance(kind, mi.DictType):
        if isinstance(schema.get("additionalProperties"), dict):
            _date_times(kind.value_type, schema["additionalProperties"], components, seen)
    elif isinstance(kind, mi.StructType):
        name = kind.cls.__name__
        if name in components and name not in seen:
            seen.add(name)
            properties = components[name].get("properties", {})
            for f in kind.fields:
                if f.encode_name in properties:
                    _date_times(f.type, properties[f.encode_name], components, seen)


class Documented(Protocol):
    """What the document needs of a route (`web.routes.Route` is one): the table imports this module,
    so this module knows routes only by their shape."""

    @property
    def method(self) -> str: ...
    @property
    def types(self) -> tuple[Any, ...]: ...
    @property
    def parameters(self) -> list[Schema] | None: ...
    @property
    def operation(self) -> Schema: ...
    @property
    def query(self) -> type[msgspec.Struct] | None: ...
    @property
    def documented_path(self) -> str: ...
    @property
    def access(self) -> str: ...


def document(routes: Iterable[Documented]) -> bytes:
    """The document of the routes of the table, with a component for each type they refer to."""
    paths: dict[str, Schema] = {}
    types: list[Any] = []
    for route in routes:
        item = paths.setdefault(route.documented_path, {})
        if route.parameters is not None:
            item.setdefault("parameters", route.parameters)
        operation = dict(route.operation)
        body = operation.get("requestBody")
        path_names = re.findall(r"\{(\w+)\}", route.documented_path)
        generated = access_responses(
            route.access, body is not None, body["content"] if body else (), path_names
        )
        if route.query is not None:
            parameters = [p for p in query_parameters(route.query) if p["name"] not in _CREDENTIAL_PARAMETERS]
            if parameters:
                operation["parameters"] = parameters
            generated["422"] = error(
                "a query parameter this operation does not take, or a value it does not allow"
            )
        declared = operation.get("responses", {})
        responses = {**generated, **declared}
        for status in generated.keys() & declared.keys():
            responses[status] = _merged(status, generated[status], declared[status])
        operation["responses"] = dict(sorted(responses.items()))
        looking = route.access == "admin" and route.method == "GET"  # a `read` key may look
        operation["security"] = (
            [*_SECURITY[route.access], {"apiKey": ["read"]}] if looking else _SECURITY[route.access]
        )
        if route.access in _ACCESS_NOTE:
            operation["description"] = (operation.get("description", "") + _ACCESS_NOTE[route.access]).strip()
        item[route.method.lower()] = operation
        types += [t for t in route.types if t not in types]
    _, components = msgspec.json.schema_components(types, ref_template="#/components/schemas/{name}")
    seen: set[str] = set()
    for t in types:
        _date_times(mi.type_info(t), {}, components, seen)
    doc = {
        "openapi": "3.1.0",
        "info": {
            "title": "rulesvc",
            "version": "0.1.0",
            "description": "Real-time trigger marketing: post events, manage contacts, read what was sent.",
        },
        "servers": [{"url": "/"}],
        "paths": paths,
        "components": {"schemas": components, "securitySchemes": SECURITY_SCHEMES},
    }
    return msgspec.json.encode(doc)
