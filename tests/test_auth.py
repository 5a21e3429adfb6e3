"""API keys: 401 without a valid key, 403 for the wrong scope, open health on loopback, no key in logs."""

from __future__ import annotations

import secrets
from typing import Any

from rulesvc.config import Settings
from rulesvc.web.app import create_app
from rulesvc.web.keys import KEYS

EVENT = {"id": "e1", "type": "cart_updated", "contact_id": "c1"}


async def test_no_or_bad_key_is_401(aiohttp_client: Any, settings: Settings) -> None:
    client = await aiohttp_client(create_app(settings))
    for method, path in [("POST", "/v1/events"), ("GET", "/v1/contacts/c1"), ("GET", "/v1/rulesets"),
                         ("POST", "/v1/simulate"), ("GET", "/v1/messages?status=dead")]:  # fmt: skip
        resp = await client.request(method, path, json=EVENT)
        assert resp.status == 401, path
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        assert (await resp.json())["error"] == "missing or invalid API key"
    real, _ = await client.server.app[KEYS].create("admin")
    forged = real[:-4] + "AAAA"
    for header in ["Bearer rsk_nope", f"Bearer {forged}", f"Basic {real}", real]:
        assert (await client.post("/v1/events", json=EVENT, headers={"Authorization": header})).status == 401
    assert (
        await client.post("/v1/events", json=EVENT, headers={"Authorization": f"Bearer {real}"})
    ).status == 202


async def test_ingest_scope_posts_events_and_mints_inbox_tokens_only(
    make_client: Any, settings: Settings
) -> None:
    client = await make_client(create_app(settings), scope="ingest")
    assert (await client.post("/v1/events", json=EVENT)).status == 202
    assert (await client.post("/v1/contacts/c1/inbox-token")).status == 200
    for method, path in [("PUT", "/v1/contacts/c1"), ("GET", "/v1/contacts/c1"), ("GET", "/v1/rulesets"),
                         ("POST", "/v1/rulesets/reload"), ("GET", "/v1/channels")]:  # fmt: skip
        resp = await client.request(method, path, json={})
        assert resp.status == 403, path
        assert "use an admin key" in (await resp.json())["error"]


async def test_revoked_key_stops_working(aiohttp_client: Any, settings: Settings) -> None:
    client = await aiohttp_client(create_app(settings))
    keys = client.server.app[KEYS]
    key, record = await keys.create("admin")
    headers = {"Authorization": f"Bearer {key}"}
    assert (await client.get("/v1/rulesets", headers=headers)).status == 200
    assert await keys.revoke(record.key_id)
    assert (await client.get("/v1/rulesets", headers=headers)).status == 401
    assert not await keys.revoke(record.key_id)
    listed = await keys.list()
    assert [k["_id"] for k in listed] == [record.key_id] and "hash" not in listed[0]


async def test_open_without_a_key(aiohttp_client: Any, settings: Settings, db: Any) -> None:
    client = await aiohttp_client(create_app(settings))
    for path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):  # the test client is on loopback
        assert (await client.get(path)).status == 200, path
    # Provider callbacks carry the provider's signature, not our key.
    assert (await client.post("/v1/channels/log/callbacks", json={})).status == 404
    stored = await db.api_keys.find_one({})
    assert stored is None  # nothing was created behind the user's back when MONGODB_URI is set


async def test_unknown_keys_do_not_grow_the_cache_without_bound(
    aiohttp_client: Any, settings: Settings
) -> None:
    """A scanner presenting random keys used to add a cache entry per key, for good (+2.5 MB per 30k)."""
    client = await aiohttp_client(create_app(settings))
    keys = client.server.app[KEYS]
    keys.cache_entries = 50  # the default is 4096; a small bound keeps the test fast
    real, _ = await keys.create("admin")
    for i in range(400):
        forged = f"rsk_{secrets.token_hex(6)}_{secrets.token_urlsafe(32)}"
        resp = await client.get("/v1/rulesets", headers={"Authorization": f"Bearer {forged}"})
        assert resp.status == 401
        assert len(keys._cache) <= 50
        if i % 100 == 0:  # a real key keeps working all along, from the cache or the database
            assert (
                await client.get("/v1/rulesets", headers={"Authorization": f"Bearer {real}"})
            ).status == 200
    assert (await client.get("/v1/rulesets", headers={"Authorization": f"Bearer {real}"})).status == 200
