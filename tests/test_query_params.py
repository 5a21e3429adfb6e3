"""Every route's query parameters are checked: an unknown name (a typo such as `limt`), a value outside an
enum, a number or time that is not one: 422 with what is allowed, never a silent 200. The route table is
iterated, so a route added later is covered without a change here; the OpenAPI document declares the same
enums and formats. Hypothesis throws random query strings at the GET routes of a running service."""

from __future__ import annotations

import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any, get_args
from urllib.parse import quote

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rulesvc.core.messages import MessageStatus
from rulesvc.store.mongod import EmbeddedMongod
from rulesvc.web.routes import ROUTES, Route, openapi_document
from tests.service import ServiceProcess

Client = Any
STATUSES = list(get_args(MessageStatus))
DOC = msgspec.json.decode(openapi_document())
CHECKED = [r for r in ROUTES if r.query is not None]


def concrete(route: Route) -> str:
    """A path that reaches the route's handler: each placeholder filled with a valid value."""
    fills = {"contact_id": "c-1", "message_id": "m-1", "action": "retry", "name": "log"}
    return re.sub(r"\{(\w+)(:[^}]*)?\}", lambda m: fills.get(m.group(1), "x"), route.path)


def documented(route: Route) -> list[dict[str, Any]]:
    """The route's query parameters as the OpenAPI document gives them."""
    operation = DOC["paths"][route.documented_path][route.method.lower()]
    return [p for p in operation.get("parameters", []) if p["in"] == "query"]


def test_every_route_but_provider_callbacks_is_checked() -> None:
    assert [(r.method, r.path) for r in ROUTES if r.query is None] == [
        ("POST", "/v1/channels/{name}/callbacks")
    ]


def test_the_document_declares_enums_and_formats() -> None:
    by_path = {(r.method, r.path): r for r in ROUTES}
    params = {p["name"]: p for p in documented(by_path["GET", "/v1/messages"])}
    assert params["status"]["required"] is False
    assert params["status"]["schema"]["enum"] == STATUSES
    reasons = params["reason"]["schema"]["enum"]
    assert {"no_consent", "channel_not_configured", "frequency_cap", "cancelled_by_operator"} <= set(reasons)
    assert params["before"]["schema"] == {"type": "string", "format": "date-time"}
    assert params["limit"]["schema"] == {"type": "integer", "minimum": 1, "maximum": 500, "default": 50}
    contact = {p["name"]: p for p in documented(by_path["GET", "/v1/contacts/{contact_id}/messages"])}
    assert contact["status"]["required"] is False and contact["status"]["schema"]["enum"] == STATUSES


def credentials(route: Route) -> list[str]:
    """Query parameters the document gives as security schemes (the inbox's `token`), not parameters."""
    schemes = DOC["components"]["securitySchemes"]
    operation = DOC["paths"][route.documented_path][route.method.lower()]
    named = {name for requirement in operation["security"] for name in requirement}
    return [schemes[n]["name"] for n in sorted(named) if schemes[n].get("in") == "query"]


@pytest.mark.parametrize("route", CHECKED, ids=lambda r: f"{r.method} {r.path}")
async def test_unknown_parameter_gets_422_listing_the_known_ones(client: Client, route: Route) -> None:
    known = sorted([p["name"] for p in documented(route)] + credentials(route))
    resp = await client.request(route.method, concrete(route), params={"limt": "5"})
    body = await resp.json()
    assert resp.status == 422, body
    assert body["field"] == "limt" and body["allowed"] == known
    takes = ", ".join(known) if known else "none"
    assert body["error"] == f"unknown query parameter `limt`: this route takes {takes}"


@pytest.mark.parametrize(
    "route", [r for r in CHECKED if any("enum" in p["schema"] for p in documented(r))], ids=lambda r: r.path
)
async def test_unknown_enum_value_gets_422_listing_the_allowed_ones(client: Client, route: Route) -> None:
    for param in documented(route):
        if "enum" not in param["schema"]:
            continue
        values = param["schema"]["enum"]
        resp = await client.request(route.method, concrete(route), params={param["name"]: "bogus"})
        body = await resp.json()
        assert resp.status == 422, body
        assert body == {
            "error": f"query parameter `{param['name']}`: `bogus` is not one of {', '.join(values)}",
            "field": param["name"],
            "allowed": values,
        }


async def test_messages_status_and_reason_bogus(client: Client) -> None:
    resp = await client.get("/v1/messages", params={"status": "bogus"})
    assert resp.status == 422
    assert (await resp.json())["allowed"] == STATUSES
    resp = await client.get("/v1/messages", params={"reason": "bogus"})
    body = await resp.json()
    assert resp.status == 422 and body["field"] == "reason" and "no_consent" in body["allowed"]
    assert (await client.get("/v1/messages")).status == 200  # every status, newest first
    for status in STATUSES:
        assert (await client.get("/v1/messages", params={"status": status})).status == 200


@pytest.mark.parametrize(
    ("params", "error"),
    [
        ({"limit": "abc"}, "query parameter `limit` must be an integer between 1 and 500, got `abc`"),
        ({"limit": "0"}, "query parameter `limit` must be an integer between 1 and 500, got `0`"),
        ({"limit": "501"}, "query parameter `limit` must be an integer between 1 and 500, got `501`"),
        ({"before": "soon"},
         "query parameter `before` must be an RFC 3339 time such as 2026-11-26T09:30:00Z, got `soon`"),
        ({"before": "2026-01-01T00:00:00"}, "query parameter `before` needs a time zone offset, e.g. Z"),
        ({"limit": ["5", "6"]}, "query parameter `limit` is given 2 times; give it once"),
        ({"before": "null"},
         "query parameter `before` must be an RFC 3339 time such as 2026-11-26T09:30:00Z, got `null`"),
    ],
)  # fmt: skip
async def test_malformed_values_get_422(client: Client, params: dict[str, Any], error: str) -> None:
    query = "&".join(
        f"{k}={quote(v)}" for k, vs in params.items() for v in (vs if isinstance(vs, list) else [vs])
    )
    resp = await client.get(f"/v1/contacts/c-1/events?{query}")
    body = await resp.json()
    assert (resp.status, body["error"], body["field"]) == (422, error, next(iter(params)))


async def test_inbox_token_in_the_query_still_opens_the_inbox(client: Client) -> None:
    token = (await (await client.post("/v1/contacts/c-1/inbox-token")).json())["token"]
    del client.session.headers["Authorization"]
    resp = await client.get("/v1/contacts/c-1/inbox", params={"token": token, "limit": "3"})
    assert (resp.status, await resp.json()) == (200, {"messages": []})


@pytest.fixture(scope="module")
def service(mongod: EmbeddedMongod, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    workdir = tmp_path_factory.mktemp("query")
    env = {"MONGODB_URI": mongod.uri, "RULESVC_DATABASE": "query_fuzz", "RULESVC_RATE_LIMIT": "0"}
    process = ServiceProcess(workdir, env=env)
    process.start()
    process.key = process.cli("keys", "create", "--scope", "admin", "--name", "q").stdout.splitlines()[-1]
    yield process
    process.stop()


NAMES = [*sorted({p["name"] for r in CHECKED for p in documented(r)}), "limt", "", "x[]", "status%00"]
VALUES = st.one_of(
    st.sampled_from(["", "0", "-1", "1", "500", "1e3", "2026-01-01T00:00:00Z", "dead", "9" * 40]),
    st.text(max_size=40),
)
PAIRS = st.lists(st.tuples(st.sampled_from(NAMES) | st.text(max_size=10), VALUES), max_size=4)
RAW = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="#"), max_size=60
)
GETS = [r for r in CHECKED if r.method == "GET"]


@given(route=st.sampled_from(GETS), pairs=PAIRS, raw=RAW, use_raw=st.booleans())
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
def test_random_query_strings_never_get_a_server_error(
    service: ServiceProcess, route: Route, pairs: list[tuple[str, str]], raw: str, use_raw: bool
) -> None:
    query = raw if use_raw else "&".join(f"{quote(k)}={quote(v)}" for k, v in pairs)
    request = urllib.request.Request(f"{service.url}{concrete(route)}?{query}")
    request.add_header("Authorization", f"Bearer {service.key}")
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            status, body = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read()
    assert status < 500, (query, status, body)
    if status >= 400:
        assert msgspec.json.decode(body)["error"], body
