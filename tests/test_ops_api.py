"""Health, readiness, metrics, the OpenAPI document, request ids and JSON errors."""

from __future__ import annotations

from typing import Any

import msgspec
from aiohttp import web
from openapi_spec_validator import validate

from rulesvc.config import Settings
from rulesvc.store.mongod import EmbeddedMongod, free_port
from rulesvc.web.app import create_app
from tests.helpers import eventually


async def test_healthz_and_readyz(client: Any) -> None:
    assert (await client.get("/healthz")).status == 200
    resp = await client.get("/readyz")
    assert resp.status == 200
    assert (await resp.json())["checks"]["mongodb"] == "ok"


async def test_metrics_count_events_and_requests(client: Any) -> None:
    await client.post("/v1/events", json=[{"id": "a", "type": "t", "contact_id": "c"}] * 2)
    await client.post("/v1/events", json=[{"id": "b", "type": "t"}])
    text = await (await client.get("/metrics")).text()
    assert 'rulesvc_events_total{outcome="accepted"} 1.0' in text
    assert 'rulesvc_events_total{outcome="duplicate"} 1.0' in text
    assert 'rulesvc_events_total{outcome="rejected"} 1.0' in text
    assert 'rulesvc_http_requests_total{method="POST",route="/v1/events",status="202"} 1.0' in text
    assert 'rulesvc_http_request_duration_seconds_bucket{le="0.5",method="POST",route="/v1/events"}' in text
    assert "rulesvc_inbox_pending 1.0" in text


async def test_request_id_echoed_or_generated(client: Any) -> None:
    resp = await client.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert resp.headers["X-Request-ID"] == "abc-123"
    resp = await client.get("/healthz", headers={"X-Request-ID": "bad id\twith spaces"})
    assert len(resp.headers["X-Request-ID"]) == 32


async def test_unknown_route_and_method_are_json(client: Any) -> None:
    resp = await client.get("/v1/nothing")
    assert resp.status == 404
    assert (await resp.json())["error"] == "Not Found"
    resp = await client.delete("/v1/events")
    assert resp.status == 405
    assert resp.headers["Allow"] == "POST"


async def test_openapi_document_is_valid_and_complete(client: Any) -> None:
    resp = await client.get("/openapi.json")
    assert resp.status == 200
    doc = await resp.json()
    validate(doc)  # OpenAPI 3.1 schema check
    assert doc["openapi"] == "3.1.0"
    app: web.Application = client.server.app
    routes = {
        (r.method.lower(), r.resource.canonical)
        for r in app.router.routes()
        if r.resource is not None and r.method != "HEAD" and not r.resource.canonical.startswith("/console")
    }  # the console's pages are HTML for people (docs/console.md), not the API
    documented = {(m, p) for p, item in doc["paths"].items() for m in item if m != "parameters"}
    assert routes == documented
    event = doc["components"]["schemas"]["Event"]
    assert set(event["required"]) == {"id", "type"}


async def test_mongodb_down_gives_503_not_500(make_client: Any, settings: Settings, tmp_path: Any) -> None:
    own = EmbeddedMongod(tmp_path / "own", port=free_port())
    own.start()
    try:
        client = await make_client(create_app(msgspec.structs.replace(settings, mongodb_uri=own.uri)))
        event = {"id": "o1", "type": "cart_updated", "contact_id": "c1"}
        assert (await client.post("/v1/events", json=event)).status == 202
        own.stop()
        resp = await client.get("/readyz")
        assert resp.status == 503
        assert (await resp.json())["checks"]["mongodb"].startswith("unreachable")
        resp = await client.post("/v1/events", json={**event, "id": "o2"})
        assert resp.status == 503
        assert resp.headers["Retry-After"] == "1"
        assert (await client.get("/healthz")).status == 200
        own.start()
        resp = await client.post("/v1/events", json={**event, "id": "o2"})
        assert resp.status == 202  # recovered without a restart
        assert (await client.get("/readyz")).status == 200
        events = await (await client.get("/v1/contacts/c1/events")).json()
        assert {e["id"] for e in events["events"]} == {"o1", "o2"}
    finally:
        own.stop()


async def test_mongodb_stopped_mid_load_acknowledges_nothing_falsely(
    make_client: Any, settings: Settings, tmp_path: Any
) -> None:
    import asyncio

    own = EmbeddedMongod(tmp_path / "load", port=free_port())
    own.start()
    try:
        # A deadline shorter than the outage: within it, PyMongo would ride the outage out (and answer 202).
        app = create_app(msgspec.structs.replace(settings, mongodb_uri=own.uri, mongodb_timeout_seconds=1.0))
        client = await make_client(app)
        outcomes: dict[str, int] = {}
        retry_after: set[str] = set()
        stop = asyncio.Event()
        answers: list[int] = []  # in the order they came

        async def load(worker: int) -> None:
            n = 0
            while not stop.is_set() and n < 400:  # listed back below, 500 at most
                event = {"id": f"w{worker}-{n}", "type": "cart_updated", "contact_id": f"c{worker}"}
                resp = await client.post("/v1/events", json=event)
                outcomes[event["id"]] = resp.status
                answers.append(resp.status)
                if resp.status == 503:
                    retry_after.add(resp.headers["Retry-After"])
                n += 1
                await asyncio.sleep(0.05)

        async def answered(status: int, after: int) -> None:
            async def seen() -> bool:
                return status in answers[after:]

            await eventually(seen)

        async def outage() -> None:
            # Each step waits for what the load saw, not for a time: up, then down, then up again.
            await answered(202, 0)
            own.stop()
            await answered(503, len(answers))
            own.start()  # in this thread: mongod's parent-death signal is tied to the starting thread
            await answered(202, len(answers))
            stop.set()

        await asyncio.gather(outage(), *(load(w) for w in range(3)))
        assert set(outcomes.values()) <= {202, 503}  # never a 500
        assert 503 in outcomes.values() and 202 in outcomes.values() and retry_after == {"1"}
        acknowledged = {i for i, status in outcomes.items() if status == 202}
        stored = set()
        for worker in range(3):
            body = await (await client.get(f"/v1/contacts/c{worker}/events", params={"limit": "500"})).json()
            stored |= {e["id"] for e in body["events"]}
        assert acknowledged <= stored  # nothing acknowledged was lost
    finally:
        own.stop()
