"""The route table says who may call each route; `authenticate` and the OpenAPI document both use it."""

from __future__ import annotations

from rulesvc.web.routes import ROUTES, access


def test_each_route_once_with_its_access() -> None:
    assert len({(r.method, r.documented_path) for r in ROUTES}) == len(ROUTES)
    assert access("GET", "/healthz") == access("HEAD", "/healthz") == "ops"
    assert access("GET", "/metrics") == access("GET", "/readyz") == "ops"
    assert access("POST", "/v1/events") == "ingest"
    assert access("POST", "/v1/contacts/{contact_id}/inbox-token") == "ingest"
    assert access("GET", "/v1/contacts/{contact_id}/inbox") == "inbox"
    assert access("POST", "/v1/contacts/{contact_id}/inbox/{message_id}") == "inbox"
    assert access("POST", "/v1/channels/{name}/callbacks") == "signed-by-provider"
    assert access("GET", "/openapi.json") == "public"
    assert access("GET", "/v1/contacts/{contact_id}") == "admin"
    assert access("POST", "/v1/rulesets/reload") == "admin"
    assert access("GET", "/v1/messages/{message_id}") == "admin"
    assert access("POST", "/v1/messages/{message_id}/{action}") == "admin"


def test_documented_path_drops_placeholder_patterns() -> None:
    paths = {r.path: r.documented_path for r in ROUTES}
    assert paths["/v1/events/quarantine/{action:retry|drop}"] == "/v1/events/quarantine/{action}"
    assert paths["/v1/messages/{message_id:.+}/{action:retry|cancel}"] == "/v1/messages/{message_id}/{action}"
    assert paths["/v1/contacts/{contact_id}/inbox/{message_id:.+}"] == (
        "/v1/contacts/{contact_id}/inbox/{message_id}"
    )
