"""In-app inbox access: per-contact signed tokens minted by the shop's backend, judged against an HMAC
computed here; an ingest key alone no longer opens anyone's inbox; outcome events from ingest keys must
name a message of their own contact."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec

from rulesvc.config import Settings
from rulesvc.web.app import create_app
from rulesvc.web.keys import KEYS
from rulesvc.web.ratelimit import RateLimiter


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def signed(secret: bytes, contact_id: str, expires: int) -> str:
    """The token as the README documents it, made independently of the service's code."""
    mac = hmac.new(secret, f"{contact_id}\n{expires}".encode(), hashlib.sha256).digest()
    return f"rsi.{b64(contact_id.encode())}.{expires}.{b64(mac)}"


async def server_secret(db: Any) -> bytes:
    doc = await db.secrets.find_one({"_id": "inbox_tokens"})
    return bytes(doc["secret"])


async def test_a_minted_token_opens_its_contacts_inbox_and_no_other(
    aiohttp_client: Any, settings: Settings, db: Any
) -> None:
    client = await aiohttp_client(create_app(settings))
    ingest, _ = await client.server.app[KEYS].create("ingest", "shop backend")
    backend = {"Authorization": f"Bearer {ingest}"}

    # The backend mints a token for its signed-in customer ...
    resp = await client.post("/v1/contacts/c1/inbox-token", json={"ttl": "15m"}, headers=backend)
    assert resp.status == 200
    minted = await resp.json()
    expires_at = datetime.fromisoformat(minted["expires_at"])
    assert minted["contact_id"] == "c1"
    assert timedelta(minutes=14) < expires_at - datetime.now(UTC) <= timedelta(minutes=15, seconds=1)
    # ... which is exactly the documented HMAC over contact id and expiry with the server's secret.
    secret = await server_secret(db)
    assert minted["token"] == signed(secret, "c1", int(expires_at.timestamp()))

    # The page presents it, in the header or the query.
    page = {"Authorization": f"Bearer {minted['token']}"}
    resp = await client.get("/v1/contacts/c1/inbox", headers=page)
    assert resp.status == 200 and (await resp.json()) == {"messages": []}
    assert (await client.get(f"/v1/contacts/c1/inbox?token={minted['token']}")).status == 200
    resp = await client.post("/v1/contacts/c1/inbox/m-1", json={"action": "shown"}, headers=page)
    assert resp.status == 404  # let in; there is just no such message
    # A page that cannot set headers (sendBeacon, a plain fetch) sends text/plain and the query token.
    resp = await client.post(f"/v1/contacts/c1/inbox/m-1?token={minted['token']}", data='{"action": "shown"}',
                             headers={"Content-Type": "text/plain;charset=UTF-8"})  # fmt: skip
    assert resp.status == 404, await resp.text()  # let in and read; there is just no such message
    resp = await client.post(f"/v1/contacts/c1/inbox/m-1?token={minted['token']}", data="<xml/>",
                             headers={"Content-Type": "application/xml"})  # fmt: skip
    assert resp.status == 415

    # Another contact's inbox: refused, in the read and the action.
    for resp in [
        await client.get("/v1/contacts/c2/inbox", headers=page),
        await client.post("/v1/contacts/c2/inbox/m-1", json={"action": "dismissed"}, headers=page),
    ]:
        assert resp.status == 403
        assert (await resp.json())["error"] == "this inbox token is for another contact"
    # The token is nothing but an inbox token: no events, no profile.
    assert (await client.get("/v1/contacts/c1", headers=page)).status == 401
    assert (await client.post("/v1/events", json={}, headers=page)).status == 401


async def test_expired_tampered_and_foreign_tokens_are_refused(
    aiohttp_client: Any, settings: Settings, db: Any
) -> None:
    client = await aiohttp_client(create_app(settings))
    admin, _ = await client.server.app[KEYS].create("admin")
    minted = await (
        await client.post("/v1/contacts/c1/inbox-token", headers={"Authorization": f"Bearer {admin}"})
    ).json()
    secret = await server_secret(db)
    now = int(time.time())
    prefix, contact, expires, signature = minted["token"].split(".")
    flipped = signature[:-2] + ("AA" if signature[-2:] != "AA" else "BB")
    cases = {
        "expired": (signed(secret, "c1", now - 1), 401, "inbox token expired"),
        "expiry moved on": (
            f"{prefix}.{contact}.{int(expires) + 3600}.{signature}",
            401,
            "invalid inbox token",
        ),
        "signature changed": (f"{prefix}.{contact}.{expires}.{flipped}", 401, "invalid inbox token"),
        "contact changed": (f"{prefix}.{b64(b'c2')}.{expires}.{signature}", 401, "invalid inbox token"),
        "another secret": (signed(b"x" * 32, "c1", now + 600), 401, "invalid inbox token"),
        "not a token": ("rsi.garbage", 401, "invalid inbox token"),
        "for another contact": (signed(secret, "c2", now + 600), 403, "for another contact"),
    }
    for name, (token, status, message) in cases.items():
        resp = await client.get("/v1/contacts/c1/inbox", headers={"Authorization": f"Bearer {token}"})
        assert resp.status == status, name
        assert message in (await resp.json())["error"], name
    assert (await client.get("/v1/contacts/c1/inbox")).status == 401
    good = signed(secret, "c1", now + 600)
    assert (
        await client.get("/v1/contacts/c1/inbox", headers={"Authorization": f"Bearer {good}"})
    ).status == 200


async def test_an_ingest_key_alone_no_longer_opens_an_inbox_and_an_admin_key_opens_any(
    aiohttp_client: Any, settings: Settings
) -> None:
    client = await aiohttp_client(create_app(settings))
    ingest, _ = await client.server.app[KEYS].create("ingest")
    admin, _ = await client.server.app[KEYS].create("admin")
    resp = await client.get("/v1/contacts/c1/inbox", headers={"Authorization": f"Bearer {ingest}"})
    assert resp.status == 403
    assert "inbox token" in (await resp.json())["error"]
    resp = await client.post(
        "/v1/contacts/c1/inbox/m-1", json={"action": "shown"}, headers={"Authorization": f"Bearer {ingest}"}
    )
    assert resp.status == 403
    for contact in ("c1", "c2"):
        resp = await client.get(f"/v1/contacts/{contact}/inbox", headers={"Authorization": f"Bearer {admin}"})
        assert resp.status == 200


async def test_token_lifetimes_are_checked(make_client: Any, settings: Settings) -> None:
    client = await make_client(create_app(settings), scope="ingest")
    for body, path in [({"ttl": "0s"}, "$.ttl"), ({"ttl": "31d"}, "$.ttl"), ({"ttl": "soon"}, "$.ttl"),
                       ({"ttl": "34002193335d58405230924d"}, "$.ttl"),  # found by fuzzing: a 500
                       ({"ttl": "1h", "contact": "c2"}, "$")]:  # fmt: skip
        resp = await client.post("/v1/contacts/c1/inbox-token", json=body)
        assert resp.status == 422, body
        assert (await resp.json())["path"] == path
    assert (await client.post("/v1/contacts/c%201/inbox-token")).status == 400
    assert (await client.post("/v1/contacts/c1/inbox-token", data=b"{")).status in (400, 415)


async def test_cli_mints_a_token_the_service_accepts(
    aiohttp_client: Any, settings: Settings, db: Any
) -> None:
    client = await aiohttp_client(create_app(settings))
    env = {**os.environ, "MONGODB_URI": settings.mongodb_uri or "", "RULESVC_DATABASE": settings.database}
    done = subprocess.run(
        [sys.executable, "-m", "rulesvc", "inbox-token", "c-42", "--ttl", "2h"],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    token = done.stdout.strip().splitlines()[-1]
    expires = int(token.split(".")[2])
    assert 7190 < expires - time.time() <= 7201
    assert token == signed(await server_secret(db), "c-42", expires)
    resp = await client.get("/v1/contacts/c-42/inbox", headers={"Authorization": f"Bearer {token}"})
    assert resp.status == 200
    bad = subprocess.run(
        [sys.executable, "-m", "rulesvc", "inbox-token", "c 42"],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert bad.returncode == 1 and "contact_id may not contain whitespace" in bad.stderr
    huge = subprocess.run(
        [sys.executable, "-m", "rulesvc", "inbox-token", "c-42", "--ttl", "99999999999999d"],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert huge.returncode == 1 and "at most 30d" in huge.stderr


async def test_outcome_events_from_an_ingest_key_must_name_a_message_of_that_contact(
    make_client: Any, settings: Settings, db: Any
) -> None:
    app = create_app(settings)
    client = await make_client(app, scope="ingest")
    now = datetime.now(UTC)
    await db.messages.insert_many(
        [
            {
                "_id": "e0/flow/go/0",
                "contact_id": "c1",
                "channel": "email",
                "status": "sent",
                "created_at": now,
            },
            {
                "_id": "e9/flow/go/0",
                "contact_id": "c2",
                "channel": "email",
                "status": "sent",
                "created_at": now,
            },
        ]
    )

    def bounce(event_id: str, **attributes: Any) -> dict[str, Any]:
        return {"id": event_id, "type": "message_bounced", "contact_id": "c1", "attributes": attributes}

    batch = [
        {"id": "v1", "type": "product_viewed", "contact_id": "c1"},
        bounce("b1"),  # names no message: would mark c1's email invalid on the say-so of anyone
        bounce("b2", message_id="e9/flow/go/0"),  # c2's message
        bounce("b3", message_id="nope"),
        bounce("b4", message_id="e0/flow/go/0"),  # fine
    ]
    resp = await client.post("/v1/events", json=batch)
    assert resp.status == 422
    body = await resp.json()
    assert [(e["index"], e["path"]) for e in body["errors"]] == [
        (1, "$.attributes.message_id"),
        (2, "$.attributes.message_id"),
        (3, "$.attributes.message_id"),
    ]
    assert "has no message `e9/flow/go/0`" in body["errors"][1]["message"]
    assert await db.events.count_documents({}) == 0  # nothing of the batch stored
    assert (await client.post("/v1/events", json=[batch[0], batch[4]])).status == 202
    # An admin key (an operator's import, a test) is trusted as before.
    admin, _ = await app[KEYS].create("admin")
    resp = await client.post("/v1/events", json=bounce("b5"), headers={"Authorization": f"Bearer {admin}"})
    assert resp.status == 202


async def test_a_page_is_rate_limited_per_inbox_as_a_key_would_be(
    aiohttp_client: Any, settings: Settings, db: Any
) -> None:
    slow = msgspec.structs.replace(settings, rate_limit=1.0)  # a request a second, bursts of 2
    client = await aiohttp_client(create_app(slow))
    admin, _ = await client.server.app[KEYS].create("admin")
    await client.post("/v1/contacts/c1/inbox-token", headers={"Authorization": f"Bearer {admin}"})
    secret = await server_secret(db)
    expires = int(time.time()) + 600
    page_1 = {"Authorization": f"Bearer {signed(secret, 'c1', expires)}"}
    page_2 = {"Authorization": f"Bearer {signed(secret, 'c2', expires)}"}
    statuses = [(await client.get("/v1/contacts/c1/inbox", headers=page_1)).status for _ in range(3)]
    assert statuses == [200, 200, 429]
    resp = await client.get("/v1/contacts/c1/inbox", headers=page_1)
    assert resp.status == 429 and int(resp.headers["Retry-After"]) >= 1
    assert (await client.get("/v1/contacts/c2/inbox", headers=page_2)).status == 200  # its own bucket


def test_rate_buckets_are_bounded() -> None:
    """One bucket per contact with a page open: bounded like the key cache, the busiest kept."""
    limiter = RateLimiter(rate=1.0, max_buckets=50)
    assert limiter.check("busy") is None and limiter.check("busy") is None
    for i in range(500):
        limiter.check(f"inbox:c{i}")
        limiter.check("busy")  # used all along: never dropped, so never refilled early
        assert len(limiter._buckets) <= 50
    assert limiter.check("busy") is not None
