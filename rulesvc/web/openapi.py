"""The OpenAPI 3.1 document, generated from the route table (`rulesvc.web.routes`): each route carries its
operation, and the components are the msgspec types that validate requests, turned into JSON schemas.

The helpers here build the operations' common parts (references, JSON bodies, errors, parameters)."""

from __future__ import annotations

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
INBOX_REFUSED = {
    "401": error("no credentials, or an inbox token that is invalid or expired"),
    "403": error("an inbox token for another contact, or an ingest key without the contact's token"),
}


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


def document(routes: Iterable[Documented]) -> bytes:
    """The document of the routes of the table, with a component for each type they refer to."""
    paths: dict[str, Schema] = {}
    types: list[Any] = []
    for route in routes:
        item = paths.setdefault(route.documented_path, {})
        if route.parameters is not None:
            item.setdefault("parameters", route.parameters)
        operation = dict(route.operation)
        if route.query is not None:
            parameters = query_parameters(route.query)
            if parameters:
                operation["parameters"] = parameters
            operation["responses"] = {
                "422": error("a query parameter this operation does not take, or a value it does not allow"),
                **operation.get("responses", {}),
            }
        item[route.method.lower()] = operation
        types += [t for t in route.types if t not in types]
    _, components = msgspec.json.schema_components(types, ref_template="#/components/schemas/{name}")
    doc = {
        "openapi": "3.1.0",
        "info": {
            "title": "rulesvc",
            "version": "0.1.0",
            "description": "Real-time trigger marketing: post events, manage contacts, read what was sent.",
        },
        "servers": [{"url": "/"}],
        "paths": paths,
        "components": {"schemas": components},
    }
    return msgspec.json.encode(doc)
