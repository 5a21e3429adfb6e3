"""Junk a buggy client or an attacker posts: every body route answers a 4xx with a JSON message, never a 5xx.

The list is kept (each entry was a 500, a reset connection or a stalled worker once, or is a near relative);
the routes are read from the app's router, so a new body route is covered without a change here."""

from __future__ import annotations

import asyncio
import gzip
import logging
import re
import zlib
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from rulesvc.store.mongod import EmbeddedMongod
from tests.helpers import eventually
from tests.service import ServiceProcess

EVENT = b'{"id": "e-1", "type": "product_viewed", "contact_id": "c-1"'
DEEP = 5000

JUNK: dict[str, bytes] = {
    "open brackets": b"[" * DEEP,
    "open objects": b'{"a":' * DEEP,
    "deep array": b"[" * DEEP + b"]" * DEEP,
    "deep object": b'{"a":' * DEEP + b"1" + b"}" * DEEP,
    "deep attribute": EVENT + b', "attributes": {"a": ' + b"[" * DEEP + b"]" * DEEP + b"}}",
    "deep in an array of events": b"["
    + EVENT
    + b', "attributes": {"a": '
    + b"[" * DEEP
    + b"]" * DEEP
    + b"}}]",
    "not UTF-8": b"\xff\xfe\xfd",
    "not UTF-8 in a string": b'{"id": "\xff"}',
    "not UTF-8 in an event": EVENT[:-1] + b'\xc3\x28"}',
    "not UTF-8 in a key": b'{"\xe2\x28\xa1": 1}',
    "lone surrogate": b'{"id": "\\ud800", "type": "x", "contact_id": "c"}',
    "NUL bytes": b"\x00" * 16,
    "empty": b"",
    "null": b"null",
    "number": b"1e999",
    "string": b'"x"',
    "empty array": b"[]",
    "array of null": b"[null]",
    "truncated": b'{"id":',
    "trailing garbage": b'{"action": "shown"} x',
    "huge integer": b"1" * 5000,
    "long array": b"[" + b"1," * 200_000 + b"1]",
    "event in year 9999, far west": EVENT + b', "time": "9999-12-31T23:59:59-23:59"}',
    "event in year 1, east": EVENT + b', "time": "0001-01-01T00:00:00+01:00"}',
    "event in year 9999": EVENT + b', "time": "9999-12-31T23:59:59Z"}',
    "attribute time 1e300": EVENT + b', "attributes": {"expires_at": 1e300}}',
    "simulation in year 9999": b'{"events": [' + EVENT + b', "time": "9999-12-31T23:59:59Z"}]}',
    "simulation until year 9999": b'{"events": [], "until": "9999-12-31T23:59:59-23:59"}',
    "simulation with a deep attribute": b'{"events": ['
    + EVENT
    + b', "attributes": {"a": '
    + b"[" * DEEP
    + b"]" * DEEP
    + b"}}]}",
    "simulation with a list as message_id": b'{"events": [{"id": "e", "type": "message_opened", '
    b'"contact_id": "c", "attributes": {"message_id": [1]}}]}',
    "contact with a deep attribute": b'{"attributes": {"a": ' + b"[" * DEEP + b"]" * DEEP + b"}}",
    "contact with a huge expirationTime": b'{"webpush_subscriptions": [{"endpoint": "https://p.example/x", '
    b'"keys": {"p256dh": "a", "auth": "b"}, "expirationTime": 18446744073709551615}]}',
    "inbox action junk": b'{"action": ["shown"]}',
    "a duration beyond any calendar": b'{"ttl": "7291473567w904644316818540407494d1m"}',
}

NDJSON_JUNK: dict[str, bytes] = {
    "not UTF-8 on line 2": EVENT + b"}\n\xff\xfe\n",
    "deep on line 2": EVENT + b"}\n" + b"[" * DEEP + b"\n",
    "year 9999 on line 1": EVENT + b', "time": "9999-12-31T23:59:59-23:59"}\n',
    "blank lines only": b"\n\n\r\n",
}

SAMPLE_PARAMS = {"contact_id": "c-junk", "message_id": "m-junk", "action": "retry", "name": "log"}


def body_routes(app: web.Application) -> list[tuple[str, str]]:
    """(method, path) of every API route that takes a body, with sample values in its path parameters."""
    routes = []
    for route in app.router.routes():
        if route.method not in ("POST", "PUT", "PATCH") or route.resource is None:
            continue
        if route.resource.canonical.startswith("/console"):
            continue  # HTML forms for people, junk-tested in tests/console/test_console_fuzz.py
        path = re.sub(
            r"\{(\w+)(?::[^}]*)?\}", lambda m: SAMPLE_PARAMS.get(m.group(1), "x"), route.resource.canonical
        )
        routes.append((route.method, path))
    return sorted(routes)


async def post_junk(
    client: TestClient[Any, Any], body: bytes, content_type: str, **headers: str
) -> list[str]:
    """Every body route's answer to this body; the failures (5xx, or an error without a JSON message)."""
    failures = []
    for method, path in body_routes(client.app):
        resp = await client.request(
            method, path, data=body, headers={"Content-Type": content_type, **headers}
        )
        text = await resp.text()
        if resp.status >= 500:
            failures.append(f"{method} {path}: {resp.status} {text[:200]}")
        elif resp.status >= 400 and not (resp.content_type == "application/json" and '"error"' in text):
            failures.append(f"{method} {path}: {resp.status} without a JSON error: {text[:200]}")
    return failures


@pytest.fixture
async def junk_client(client: TestClient[Any, Any]) -> TestClient[Any, Any]:
    assert len(body_routes(client.app)) >= 5  # events, contacts, simulate, inbox actions, ...
    return client


@pytest.mark.parametrize("name", sorted(JUNK))
async def test_json_junk_gets_a_4xx_everywhere(junk_client: TestClient[Any, Any], name: str) -> None:
    assert await post_junk(junk_client, JUNK[name], "application/json") == []


@pytest.mark.parametrize("name", sorted(NDJSON_JUNK))
async def test_ndjson_junk_gets_a_4xx(junk_client: TestClient[Any, Any], name: str) -> None:
    resp = await junk_client.post(
        "/v1/events", data=NDJSON_JUNK[name], headers={"Content-Type": "application/x-ndjson"}
    )
    body = await resp.json()
    assert 400 <= resp.status < 500 and body["error"], body


async def test_the_answers_say_what_is_wrong(client: TestClient[Any, Any]) -> None:
    """Not only no 500: the status and message a client can act on."""
    cases = [
        ("/v1/events", JUNK["open brackets"], 400, "nested too deeply"),
        ("/v1/events", JUNK["deep attribute"], 400, "nested too deeply"),
        ("/v1/contacts/c-1", JUNK["contact with a deep attribute"], 400, "nested too deeply"),
        ("/v1/simulate", JUNK["simulation with a deep attribute"], 400, "nested too deeply"),
        ("/v1/events", JUNK["not UTF-8 in an event"], 400, "not valid UTF-8"),
        ("/v1/contacts/c-1", JUNK["not UTF-8 in a key"], 400, "not valid UTF-8"),
        ("/v1/simulate", JUNK["not UTF-8"], 400, "not valid UTF-8: invalid start byte (byte 0)"),
        ("/v1/contacts/c-1/inbox/m-1", JUNK["not UTF-8 in a string"], 400, "not valid UTF-8"),
        ("/v1/simulate", JUNK["simulation in year 9999"], 422, "between 1970"),
        ("/v1/simulate", JUNK["simulation until year 9999"], 422, "between 1970"),
    ]
    for path, body, status, message in cases:
        method = "PUT" if path.startswith("/v1/contacts/c-1") and "inbox" not in path else "POST"
        resp = await client.request(method, path, data=body, headers={"Content-Type": "application/json"})
        answer = await resp.json()
        assert resp.status == status and message in answer["error"], (path, resp.status, answer)
    resp = await client.post("/v1/simulate", data=JUNK["simulation in year 9999"], headers=_json())
    assert (await resp.json())["path"] == "$.events[0].time"
    resp = await client.post(
        "/v1/events",
        data=NDJSON_JUNK["not UTF-8 on line 2"],
        headers={"Content-Type": "application/x-ndjson"},
    )
    assert resp.status == 400 and "UTF-8" in (await resp.json())["error"]


def _json() -> dict[str, str]:
    return {"Content-Type": "application/json"}


@pytest.mark.parametrize(
    ("before", "message"),
    [
        ("9999-12-31T23:59:59-23:59", "is out of range"),
        ("0001-01-01T00:00:00+01:00", "is out of range"),
        ("not a time", "must be an RFC 3339 time"),
        ("2026-01-01T00:00:00", "needs a time zone offset"),
    ],
)
async def test_times_in_query_parameters_that_overflow_get_422(
    client: TestClient[Any, Any], before: str, message: str
) -> None:
    for path, params in [
        ("/v1/contacts/c-1/messages", {}),
        ("/v1/contacts/c-1/events", {}),
        ("/v1/messages", {"status": "dead"}),
        ("/v1/events/quarantine", {}),
    ]:
        resp = await client.get(path, params={"before": before, **params})
        body = await resp.json()
        assert resp.status == 422 and f"query parameter `before` {message}" in body["error"], (path, body)
        assert body["field"] == "before"


@pytest.mark.parametrize(
    ("encoding", "body", "message"),
    [
        ("gzip", b"\x1f\x8b\x08\x00" + b"garbage" * 20, "not valid `gzip` data"),
        ("deflate", b"garbage" * 20, "not valid `deflate` data"),
        ("deflate", zlib.compress(b'{"id": "e-1"}' * 2000)[:-40] + b"x" * 40, "not valid `deflate` data"),
        # a few bytes decompress before the stream breaks: whichever check meets it first answers
        ("gzip", gzip.compress(b'[{"id": "e"}]')[:12] + b"\xff" * 4000, "not valid"),
    ],
    ids=["gzip garbage", "deflate garbage", "deflate broken at the end", "gzip broken early"],
)
async def test_a_broken_compressed_body_gets_400(
    client: TestClient[Any, Any], encoding: str, body: bytes, message: str
) -> None:
    for path in ["/v1/events", "/v1/simulate"]:
        resp = await client.post(path, data=body, headers={**_json(), "Content-Encoding": encoding})
        answer = await resp.json()
        assert resp.status == 400 and message in answer["error"], answer
    # The connection it came on was closed; the service goes on answering on new ones.
    assert (await client.get("/v1/rulesets")).status == 200


async def test_a_broken_compressed_body_refused_before_reading_is_no_error(
    client: TestClient[Any, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """Refused before its body is read (no key, a GET): the answer stands, nothing is logged as an error."""
    broken = {"Content-Encoding": "gzip", **_json()}
    body = b"\x1f\x8b\x08\x00" + b"garbage" * 20
    resp = await client.post("/v1/events", data=body, headers={**broken, "Authorization": "Bearer nope"})
    assert resp.status == 401
    resp = await client.get("/v1/rulesets", data=body, headers=broken)
    assert resp.status == 200
    assert (await client.get("/v1/rulesets")).status == 200
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_compressed_bodies_work_and_a_compression_bomb_gets_413(client: TestClient[Any, Any]) -> None:
    ok = gzip.compress(b'{"id": "z-1", "type": "product_viewed", "contact_id": "c-1"}')
    resp = await client.post("/v1/events", data=ok, headers={**_json(), "Content-Encoding": "gzip"})
    assert resp.status == 202, await resp.text()
    bomb = gzip.compress(b"[" + b" " * (8 * 1024 * 1024) + b"]")
    resp = await client.post("/v1/events", data=bomb, headers={**_json(), "Content-Encoding": "gzip"})
    assert resp.status == 413 and "over the limit" in (await resp.json())["error"]


@pytest.mark.slow
async def test_a_client_that_disconnects_mid_body_is_no_error(mongod: EmbeddedMongod, tmp_path: Path) -> None:
    """Logged at info as client_gone, counted as 499 (as nginx does): neither `http.unhandled` nor a 500.
    A real service process: aiohttp's test server cancels a handler whose client went away, `serve` not."""
    service = ServiceProcess(tmp_path, env={"MONGODB_URI": mongod.uri, "RULESVC_DATABASE": "junk_disconnect"})
    service.start()
    try:
        service.key = service.cli("keys", "create", "--scope", "admin").stdout.splitlines()[-1]
        head = (
            f"POST /v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {service.key}\r\n"
            "Expect: 100-continue\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n"
        ).encode()
        for _ in range(3):
            reader, writer = await asyncio.open_connection("127.0.0.1", service.port)
            writer.write(head)
            # "100 Continue": the service is handling the request; it gets part of the body, then nothing.
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 100")
            writer.write(b'[{"id": "e-1", "type": ')
            await writer.drain()
            writer.close()
            await writer.wait_closed()

        async def all_seen() -> bool:
            return sum(e["event"] == "http.client_gone" for e in service.log_lines()) == 3

        await eventually(all_seen)
        async with aiohttp.ClientSession() as session, session.get(f"{service.url}/metrics") as resp:
            metrics = await resp.text()
    finally:
        service.stop()
    lines = service.log_lines()
    assert not [e for e in lines if e.get("level") in ("error", "critical") or e["event"] == "http.unhandled"]
    assert 'route="/v1/events",status="499"} 3.0' in metrics
    assert 'status="500"' not in metrics
