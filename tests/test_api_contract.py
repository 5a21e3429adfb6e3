"""The answers the OpenAPI document promises, checked on the app against the document itself: every
response body validated with `jsonschema` against the schema declared for its status (not by the app's
own types), and the statuses every route can give whatever its handler does (415 for a body of another
type, 405 with the methods of the path's own route)."""

from __future__ import annotations

import re
from typing import Any

import msgspec
import pytest
from jsonschema import Draft202012Validator
from referencing import Registry
from referencing.jsonschema import DRAFT202012

from rulesvc.web.routes import ROUTES, Route, openapi_document

Client = Any
DOC = msgspec.json.decode(openapi_document())
REGISTRY = Registry().with_resource("urn:doc", DRAFT202012.create_resource(DOC))


def check_against_document(method: str, path: str, status: int, body: Any) -> None:
    """The body is what the document declares for this operation and status (jsonschema's judgment)."""
    response = DOC["paths"][path][method.lower()]["responses"][str(status)]
    schema = response["content"]["application/json"]["schema"]
    rooted = msgspec.json.decode(
        msgspec.json.encode(schema).replace(b'"#/components', b'"urn:doc#/components')
    )
    errors = [e.message for e in Draft202012Validator(rooted, registry=REGISTRY).iter_errors(body)]
    assert errors == [], (method, path, status, body)


@pytest.mark.parametrize(
    ("content_type", "body"),
    [("application/json", b"[]"), ("application/x-ndjson", b""), ("application/x-ndjson", b"\n \n")],
)
async def test_an_empty_batch_is_422_with_the_declared_body(
    client: Client, content_type: str, body: bytes
) -> None:
    resp = await client.post("/v1/events", data=body, headers={"Content-Type": content_type})
    answer = await resp.json()
    assert (resp.status, answer) == (422, {"error": "no events in the request body", "errors": []})
    check_against_document("POST", "/v1/events", 422, answer)


def concrete(route: Route) -> str:
    fills = {"contact_id": "c-1", "message_id": "m-1", "action": "retry", "name": "a_ruleset"}
    return re.sub(r"\{(\w+)(:[^}]*)?\}", lambda m: fills.get(m.group(1), "x"), route.path)


BODY_ROUTES = [r for r in ROUTES if "requestBody" in r.operation]


def test_routes_with_bodies_are_the_expected_ones() -> None:
    assert {(r.method, r.documented_path) for r in BODY_ROUTES} == {
        ("POST", "/v1/events"),
        ("PUT", "/v1/contacts/{contact_id}"),
        ("POST", "/v1/contacts/{contact_id}/inbox-token"),
        ("POST", "/v1/contacts/{contact_id}/inbox/{message_id}"),
        ("POST", "/v1/events/quarantine/{action}"),
        ("PUT", "/v1/rulesets/{name}"),
        ("POST", "/v1/simulate"),
        ("POST", "/v1/backtests"),
        ("POST", "/v1/channels/{name}/test"),
        ("POST", "/v1/sources/shopify"),  # Shopify webhooks (issue 18)
    }


@pytest.mark.parametrize("route", BODY_ROUTES, ids=lambda r: f"{r.method} {r.documented_path}")
async def test_a_body_of_another_type_is_415_naming_the_declared_ones(client: Client, route: Route) -> None:
    """What the document declares for the body is what is checked: its media types, before the view."""
    operation = DOC["paths"][route.documented_path][route.method.lower()]
    declared = sorted(operation["requestBody"]["content"])
    resp = await client.request(
        route.method, concrete(route), data=b"a=1", headers={"Content-Type": "application/xml"}
    )
    answer = await resp.json()
    assert resp.status == 415, answer
    assert answer["error"].startswith("unsupported content type `application/xml`; use ")
    assert all(media_type in answer["error"] for media_type in declared)
    check_against_document(route.method, route.documented_path, 415, answer)


async def test_blank_inbox_token_body_is_malformed_json_not_the_default(client: Client) -> None:
    resp = await client.post(
        "/v1/contacts/c-1/inbox-token", data=b"\n", headers={"Content-Type": "application/json"}
    )
    assert resp.status == 400
    check_against_document("POST", "/v1/contacts/{contact_id}/inbox-token", 400, await resp.json())
    resp = await client.post("/v1/contacts/c-1/inbox-token")  # no body at all: the default ttl
    assert resp.status == 200


@pytest.mark.parametrize(
    ("method", "path", "documented"),
    [
        ("DELETE", "/v1/messages/m-1/retry", "/v1/messages/{message_id}/{action}"),
        ("GET", "/v1/rulesets/reload", "/v1/rulesets/reload"),
        ("DELETE", "/v1/rulesets/reload", "/v1/rulesets/reload"),
        ("POST", "/v1/messages/m-1", "/v1/messages/{message_id}"),
        ("DELETE", "/v1/events", "/v1/events"),
    ],
)
async def test_405_allows_the_methods_the_document_gives_the_path(
    client: Client, method: str, path: str, documented: str
) -> None:
    """aiohttp would list every route matching the path (`/v1/messages/m-1/retry` is also message
    `m-1/retry`'s path, `/v1/rulesets/reload` ruleset `reload`'s); the document lists the path's own."""
    resp = await client.request(method, path)
    assert resp.status == 405
    methods = {m.upper() for m in DOC["paths"][documented] if m != "parameters"}
    expected = methods | ({"HEAD"} if "GET" in methods else set())
    assert set(resp.headers["Allow"].split(",")) == expected


async def test_a_number_is_not_a_time_in_the_query(client: Client) -> None:
    """`before=0.5` read as 0.5 s after 1970 was a 200: the document says RFC 3339."""
    for path in ("/v1/contacts/c-1/events", "/v1/events/quarantine"):
        resp = await client.get(path, params={"before": "0.5"})
        answer = await resp.json()
        assert resp.status == 422 and answer["field"] == "before", answer


async def test_authentication_answers_match_the_document(client: Client) -> None:
    """401 carries the challenge the document declares required; 403 for an ingest key on admin routes."""
    del client.session.headers["Authorization"]
    resp = await client.get("/v1/contacts/c-1")
    assert resp.status == 401 and resp.headers["WWW-Authenticate"] == 'Bearer realm="rulesvc"'
    declared = DOC["paths"]["/v1/contacts/{contact_id}"]["get"]["responses"]["401"]["headers"]
    assert declared["WWW-Authenticate"]["required"] is True
    check_against_document("GET", "/v1/contacts/{contact_id}", 401, await resp.json())


async def test_simulate_until_needs_an_offset_as_documented(client: Client) -> None:
    """`until` is `format: date-time` (RFC 3339: with an offset); a time without one is refused by path."""
    assert DOC["components"]["schemas"]["SimulateRequest"]["properties"]["until"]["anyOf"][0]["format"] == (
        "date-time"
    )
    resp = await client.post("/v1/simulate", json={"events": [], "until": "2026-11-27T00:00:00"})
    answer = await resp.json()
    assert resp.status == 422 and answer["path"] == "$.until", answer
    check_against_document("POST", "/v1/simulate", 422, answer)
    resp = await client.post("/v1/simulate", json={"events": [], "until": "2026-11-27T00:00:00Z"})
    assert resp.status == 200, await resp.text()


async def test_a_once_per_beyond_any_time_is_a_ruleset_error(client: Client) -> None:
    """Found by the fuzz run: a `once.per` of trillions of weeks was a 400 "out of range" (the fallback
    for an overflow no check caught) where the document promises 422 with every error of the ruleset."""
    ruleset = {
        "rules": [
            {
                "name": "r",
                "when": {"event": "page_viewed"},
                "once": {"per": "99999999999999w"},
                "then": [{"set_flag": "seen"}],
            }
        ]
    }
    resp = await client.put("/v1/rulesets/huge", params={"dry_run": "true"}, json=ruleset)
    answer = await resp.json()
    assert resp.status == 422, answer
    assert [e["path"] for e in answer["errors"]] == ["$.rules[0].once.per"], answer
    check_against_document("PUT", "/v1/rulesets/{name}", 422, answer)
