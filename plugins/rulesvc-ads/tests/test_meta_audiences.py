"""The ads sync in `meta` mode against a local peer that checks each request as the Graph API's Custom
Audience Users endpoint would (path, method, token, payload schema and row width, at most 10,000 rows, the
upload session's fields). The expected digests come from Meta's own SDK (`CustomAudience.format_params`)
over the raw email and phone, never from the plugin's hashing."""

from __future__ import annotations

import hashlib
import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiohttp import web
from facebook_business.adobjects.customaudience import CustomAudience  # type: ignore[import-untyped]
from rulesvc_ads import AdsSyncIncomplete, AudienceSync
from structlog.testing import capture_logs

from rulesvc.channels import ChannelSettingsError
from rulesvc.config import Settings
from rulesvc.core.audiences import hashed_identifiers
from rulesvc.store.db import Store
from rulesvc.store.jobs import JobData
from rulesvc.web.app import create_app
from tests.helpers import eventually, write_ruleset

HEX64 = re.compile(r"^[0-9a-f]{64}$")
TOKEN = "EAAB-test-access-token"
VERSION = "v26.0"
CARTS, BUYERS = "2385000000000001", "2385000000000002"
NOW = datetime(2026, 11, 27, 8, 0, tzinfo=UTC)


def meta_row(email: str | None, phone: str | None) -> list[str]:
    """The row Meta expects for a person, hashed by Meta's SDK from the raw values; "" for a missing key
    (multi-key schema: each row as wide as the schema)."""
    keys = [(k, v) for k, v in (("EMAIL", email), ("PHONE", phone)) if v is not None]
    params = CustomAudience.format_params([k for k, _ in keys], [[v for _, v in keys]], is_raw=True)
    digests = dict(zip([k for k, _ in keys], params["payload"]["data"][0], strict=True))
    return [digests.get("EMAIL", ""), digests.get("PHONE", "")]


def graph_error(status: int, code: int, **fields: Any) -> tuple[int, dict[str, Any]]:
    return status, {"error": {"message": f"(#{code}) error", "type": "OAuthException", "code": code,
                              "fbtrace_id": "AbC", **fields}}  # fmt: skip


class GraphPeer:
    """`POST|DELETE /{version}/{custom_audience_id}/users` as the Graph API documents it: the parameters
    form-encoded (query string or body), `payload` and `session` as JSON, `access_token` among them."""

    def __init__(self, audiences: set[str], token: str = TOKEN) -> None:
        self.audiences = audiences
        self.token = token
        self.calls: list[dict[str, Any]] = []  # the batches taken
        self.problems: list[str] = []  # what a real Graph API would have refused
        self.fail: list[tuple[int, dict[str, Any]]] = []  # answers given before any check, in turn
        self.fail_at: dict[int, tuple[int, dict[str, Any]]] = {}  # by request number (1-based)
        self.requests = 0
        self.invalid = 0  # num_invalid_entries to report per batch
        self.sessions: dict[int, dict[str, Any]] = {}

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{version}/{audience_id}/users", self.users)
        return app

    def refuse(self, problem: str) -> web.Response:
        self.problems.append(problem)
        return web.json_response(graph_error(400, 100, error_user_msg=problem)[1], status=400)

    async def users(self, request: web.Request) -> web.Response:
        self.requests += 1
        if self.fail:
            status, body = self.fail.pop(0)
            return web.json_response(body, status=status)
        if self.requests in self.fail_at:
            status, body = self.fail_at[self.requests]
            return web.json_response(body, status=status)
        params = dict(request.query) | dict(await request.post())
        if params.get("access_token") != self.token:
            status, body = graph_error(
                400, 190, message="Invalid OAuth access token - Cannot parse access token"
            )
            return web.json_response(body, status=status)
        if request.method not in ("POST", "DELETE"):
            return self.refuse(f"method {request.method}")
        if request.match_info["version"] != VERSION:
            return self.refuse(f"version {request.match_info['version']}")
        audience_id = request.match_info["audience_id"]
        if audience_id not in self.audiences:
            return web.json_response(graph_error(400, 100, error_subcode=33)[1], status=400)
        payload, session = json.loads(str(params["payload"])), json.loads(str(params["session"]))
        if payload.get("schema") != ["EMAIL", "PHONE"]:
            return self.refuse(f"schema {payload.get('schema')}")
        rows = payload["data"]
        if not 1 <= len(rows) <= 10_000:
            return self.refuse(f"{len(rows)} rows")
        for row in rows:
            if len(row) != 2 or not all(v == "" or HEX64.match(v) for v in row) or row == ["", ""]:
                return self.refuse(f"row {row}")
        if problem := self.check_session(session, request.method, audience_id, len(rows)):
            return self.refuse(problem)
        self.calls.append(
            {"method": request.method, "audience": audience_id, "rows": rows, "session": session}
        )
        return web.json_response({
            "audience_id": audience_id, "session_id": str(session["session_id"]), "num_received": len(rows),
            "num_invalid_entries": self.invalid,
            "invalid_entry_samples": {rows[0][0] or rows[0][1]: "invalid"} if self.invalid else {},
        })  # fmt: skip

    def check_session(self, session: dict[str, Any], method: str, audience_id: str, rows: int) -> str | None:
        """Batches of one session in order, for one audience and method, with one estimate, none after the
        last; the last one makes the received rows add up to the estimate."""
        fields = {"session_id": int, "batch_seq": int, "last_batch_flag": bool, "estimated_num_total": int}
        if set(session) != set(fields) or not all(isinstance(session[k], t) for k, t in fields.items()):
            return f"session {session}"
        seen = self.sessions.setdefault(
            session["session_id"], {"next": 1, "rows": 0, "closed": False, "of": (method, audience_id),
                                    "estimate": session["estimated_num_total"]})  # fmt: skip
        if seen["closed"] or session["batch_seq"] != seen["next"] or seen["of"] != (method, audience_id):
            return f"session out of order: {session}"
        if session["estimated_num_total"] != seen["estimate"]:
            return "estimate changed"
        seen["next"] += 1
        seen["rows"] += rows
        if session["last_batch_flag"]:
            seen["closed"] = True
            if seen["rows"] != seen["estimate"]:
                return f"{seen['rows']} rows in a session estimated at {seen['estimate']}"
        return None

    def rows(self, method: str, audience_id: str) -> list[list[str]]:
        return [
            r for c in self.calls if (c["method"], c["audience"]) == (method, audience_id) for r in c["rows"]
        ]


def meta_config(server: Any, **changes: Any) -> dict[str, Any]:
    audiences = {"cart_abandoners": CARTS, "buyers": BUYERS}
    return {"mode": "meta", "graph_url": str(server.make_url("")), "api_version": VERSION,
            "access_token": TOKEN, "audiences": audiences} | changes  # fmt: skip


def meta_job(server: Any, **changes: Any) -> AudienceSync:
    return AudienceSync(meta_config(server, **changes))


@pytest.fixture
async def data(db: Any) -> JobData:
    store = Store(db.client, db.name, timedelta(days=90))
    await store.ensure_schema()
    return JobData(store)


def change(
    contact_id: str, op: str, audience: str = "cart_abandoners", n: int = 0, **extra: Any
) -> dict[str, Any]:
    return {"contact_id": contact_id, "audience": audience, "op": op, "at": NOW + timedelta(seconds=n),
            "synced": False} | extra  # fmt: skip


async def test_adds_and_removals_reach_meta_hashed_as_meta_hashes(
    make_client: Any, aiohttp_server: Any, settings: Settings, db: Any
) -> None:
    """Through the service: rules queue the changes, the job adds (POST) and removes (DELETE); an
    audience without a Meta id keeps its changes queued and the listing names it."""
    peer = GraphPeer({CARTS, BUYERS})
    server = await aiohttp_server(peer.app())
    join = {"name": "join", "when": {"event": "cart_updated"},
            "then": [{"audience": {"add": "cart_abandoners"}}, {"audience": {"add": "vip"}}]}  # fmt: skip
    leave = {
        "name": "leave",
        "when": {"event": "purchased"},
        "then": [{"audience": {"remove": "cart_abandoners"}}],
    }
    write_ruleset(Path(settings.rulesets_dir), "ads", {"rules": [join, leave]})
    channels = {"ads": meta_config(server, interval=0.3)}
    client = await make_client(
        create_app(msgspec.structs.replace(settings, channels=channels, plugins=["ads"]))
    )
    profiles = {"c1": {"email": "Ann@Example.COM", "phone": "+4915112345678"},
                "c2": {"email": "bob@example.com"}, "c3": {"phone": "+16505551212"}}  # fmt: skip
    for cid, profile in profiles.items():
        assert (await client.put(f"/v1/contacts/{cid}", json=profile)).status == 201
    events = [
        {"id": "a", "type": "cart_updated", "contact_id": "c1"},
        {"id": "b", "type": "cart_updated", "contact_id": "c2"},
        {"id": "c", "type": "purchased", "contact_id": "c2", "time": "2099-01-01T00:00:00Z"},
        {"id": "d", "type": "cart_updated", "contact_id": "c3"},
        {"id": "e", "type": "cart_updated", "contact_id": "c4"},  # no email or phone: nothing to match on
    ]
    assert (await client.post("/v1/events", json=events)).status == 202

    async def listed() -> dict[str, Any]:
        body = await (await client.get("/v1/channels")).json()
        [part] = next(p for p in body["plugins"] if p["name"] == "ads")["provides"]
        assert TOKEN not in json.dumps(body)
        return part  # type: ignore[no-any-return]

    async def synced() -> bool:
        queued = await db.audience_changes.count_documents({"synced": False, "audience": "cart_abandoners"})
        part = await listed()
        error = (part["last_error"] or {}).get("message", "")
        return queued == 0 and "vip (4 queued)" in part["detail"] and "vip (4 queued)" in error

    await eventually(synced)
    assert peer.problems == []
    adds = peer.rows("POST", CARTS)
    assert sorted(adds) == sorted(
        [meta_row("Ann@Example.COM", "+4915112345678"), meta_row(None, "+16505551212")]
    )
    assert peer.rows("DELETE", CARTS) == [meta_row("bob@example.com", None)]  # its last change was a removal
    assert await db.audience_changes.count_documents({"synced": False, "audience": "vip"}) == 4
    part = await listed()
    assert part["configured"] is True
    unmapped = "no Meta custom audience id in channels.ads.audiences for: vip (4 queued)"
    assert unmapped in part["detail"]
    assert part["last_error"]["message"].startswith(f"AdsSyncIncomplete: {unmapped}")  # any process's run


async def test_more_than_10000_members_go_in_batches_of_one_session(
    aiohttp_server: Any, data: JobData, db: Any
) -> None:
    peer = GraphPeer({CARTS, BUYERS})
    server = await aiohttp_server(peer.app())
    people = [(f"c{n:05d}", f"Person.{n}@Example.com ", f"+1 (650) 555-{n:04d}") for n in range(10_003)]
    await db.contacts.insert_many(
        [{"_id": cid, "email": email, "phone": phone} for cid, email, phone in people]
    )
    await db.audience_changes.insert_many(
        [change(cid, "add", n=n) for n, (cid, _, _) in enumerate(people)]
        + [change("c00000", "remove", "buyers", 1), change("c00001", "remove", "buyers", 2)]
    )
    job = meta_job(server)
    await job.run(data)

    assert peer.problems == []
    posts = [c for c in peer.calls if c["method"] == "POST"]
    assert [len(c["rows"]) for c in posts] == [10_000, 3]
    assert [(c["session"]["batch_seq"], c["session"]["last_batch_flag"]) for c in posts] == [
        (1, False),
        (2, True),
    ]
    assert {c["session"]["session_id"] for c in posts} == {posts[0]["session"]["session_id"]}
    assert posts[0]["session"]["estimated_num_total"] == 10_003
    expected = CustomAudience.format_params(["EMAIL", "PHONE"], [[e, p] for _, e, p in people], is_raw=True)
    assert sorted(peer.rows("POST", CARTS)) == sorted(expected["payload"]["data"])
    assert sorted(peer.rows("DELETE", BUYERS)) == sorted(meta_row(e, p) for _, e, p in people[:2])
    assert await db.audience_changes.count_documents({"synced": False}) == 0


async def test_a_refused_token_keeps_the_changes_queued_and_says_so(
    aiohttp_server: Any, data: JobData, db: Any
) -> None:
    peer = GraphPeer({CARTS}, token="the-renewed-token")
    server = await aiohttp_server(peer.app())
    await db.contacts.insert_one({"_id": "c1", "email": "ann@example.com"})
    await db.audience_changes.insert_one(change("c1", "add"))
    job = meta_job(server)
    with pytest.raises(AdsSyncIncomplete, match=r"access token refused by Meta \(OAuthException code 190\)"):
        await job.run(data)

    assert peer.calls == [] and peer.requests == 1
    assert await db.audience_changes.count_documents({"synced": False}) == 1
    configured, detail = job.status()
    assert (
        configured and "access token refused by Meta (OAuthException code 190): changes kept queued" in detail
    )
    assert TOKEN not in detail

    renewed = meta_job(server, access_token="the-renewed-token")  # a restart with the new token
    await renewed.run(data)
    assert peer.rows("POST", CARTS) == [meta_row("ann@example.com", None)]
    assert await db.audience_changes.count_documents({"synced": False}) == 0
    assert "refused" not in renewed.status()[1]


async def test_meta_unavailable_mid_session_keeps_the_rest_for_the_next_run(
    aiohttp_server: Any, data: JobData, db: Any
) -> None:
    """The first batch is taken and marked synced; the second gets a transient 500: the rest goes with the
    next run, in a new session. Failures in a row skip runs, doubling; a success resets that."""
    peer = GraphPeer({CARTS})
    server = await aiohttp_server(peer.app())
    emails = [f"p{n}@example.com" for n in range(5)]
    await db.contacts.insert_many([{"_id": f"c{n}", "email": e} for n, e in enumerate(emails)])
    await db.audience_changes.insert_many([change(f"c{n}", "add", n=n) for n in range(5)])
    job = meta_job(server, batch_size=2)
    peer.fail_at[2] = graph_error(500, 2, message="Service temporarily unavailable", is_transient=True)
    with pytest.raises(AdsSyncIncomplete):
        await job.run(data)

    assert [len(c["rows"]) for c in peer.calls] == [2]
    assert await db.audience_changes.count_documents({"synced": False}) == 3
    assert (
        "Meta unavailable (HTTP 500, code 2): 1 failed run(s) in a row, 0 next run(s) skipped"
        in job.status()[1]
    )

    peer.fail = [graph_error(400, 80003, message="too many calls to this ad-account")] * 2
    with pytest.raises(AdsSyncIncomplete, match="rate limited"):
        await job.run(data)  # the next run is tried: rate limited
    assert (
        "rate limited by Meta (code 80003): 2 failed run(s) in a row, 1 next run(s) skipped"
        in job.status()[1]
    )
    requests = peer.requests
    await job.run(data)  # skipped: backoff
    assert peer.requests == requests
    with pytest.raises(AdsSyncIncomplete):
        await job.run(data)  # tried again: rate limited once more, 3 runs skipped
    assert "3 failed run(s) in a row, 3 next run(s) skipped" in job.status()[1]
    for _ in range(4):
        await job.run(data)
    assert peer.problems == []
    assert sorted(peer.rows("POST", CARTS)) == sorted(meta_row(e, None) for e in emails)
    sessions = [c["session"] for c in peer.calls]
    assert [(s["batch_seq"], s["estimated_num_total"]) for s in sessions] == [(1, 5), (1, 3), (2, 3)]
    assert await db.audience_changes.count_documents({"synced": False}) == 0
    assert "failed" not in job.status()[1]


async def test_an_erased_contacts_removal_reaches_meta_from_its_kept_digests(
    aiohttp_server: Any, data: JobData, db: Any
) -> None:
    """Erasure deletes the profile and queues a removal carrying only the digests (design of issue 18);
    Meta still gets the row it can match. Its answer's invalid entries are logged as counts, never the
    samples it quotes."""
    peer = GraphPeer({CARTS})
    peer.invalid = 1
    server = await aiohttp_server(peer.app())
    email, phone = "Erased.Person@Example.com", "+49 151 1234 5678"
    erased = "erased/" + hashlib.sha256(b"c1").hexdigest()
    await db.audience_changes.insert_one(
        change(erased, "remove", identifiers=hashed_identifiers(email, "+4915112345678"))
    )
    job = meta_job(server)
    with capture_logs() as logs:
        await job.run(data)

    row = meta_row(email, phone)
    assert peer.rows("DELETE", CARTS) == [row]
    assert await db.audience_changes.count_documents({"synced": False}) == 0
    [batch] = [entry for entry in logs if entry["event"] == "ads.meta_batch"]
    assert (batch["received"], batch["invalid"]) == (1, 1)
    assert not any(digest in json.dumps(logs, default=str) for digest in row)
    assert "last run: 1 received by Meta, 1 invalid" in job.status()[1]


def test_meta_settings_are_checked() -> None:
    with pytest.raises(ChannelSettingsError) as wrong:
        AudienceSync({"mode": "meta", "api_version": "21.0", "audiences": {"carts": "abc"}})
    assert wrong.value.problems == [
        "channels.ads.access_token: required in `meta` mode (a Meta access token with `ads_management` on "
        "the audiences' ad account)",
        "channels.ads.api_version: expected `vNN.N` (e.g. `v26.0`), got '21.0'",
        "channels.ads.audiences.carts: expected a custom audience's numeric id, got 'abc'",
    ]
    # As the environment gives them: RULESVC_CHANNEL_ADS_AUDIENCES="carts=1,buyers=2"; TOML ids as numbers.
    job = AudienceSync({"mode": "meta", "access_token": "t", "audiences": "carts=1, buyers=2"})
    assert job.audiences == {"carts": "1", "buyers": "2"}
    assert AudienceSync({"mode": "meta", "access_token": "t", "audiences": {"carts": 3}}).audiences == {
        "carts": "3"
    }
    assert job.status() == (
        True,
        "syncs to Meta Custom Audiences (https://graph.facebook.com/v26.0) every 3600 s; "
        "audiences: buyers → 2, carts → 1",
    )
    assert AudienceSync({}).status() == (False, "missing setting(s): base_url, token")  # no section given


async def test_an_audience_meta_refuses_keeps_its_changes_and_the_others_go_on(
    aiohttp_server: Any, data: JobData, db: Any
) -> None:
    peer = GraphPeer({CARTS})  # Meta knows no audience BUYERS: code 100, subcode 33
    server = await aiohttp_server(peer.app())
    await db.contacts.insert_one({"_id": "c1", "email": "ann@example.com"})
    await db.audience_changes.insert_many([change("c1", "add", "buyers"), change("c1", "add", n=1)])
    job = meta_job(server)
    with pytest.raises(
        AdsSyncIncomplete, match="Meta refused audience buyers: HTTP 400, code 100, subcode 33"
    ):
        await job.run(data)
    assert peer.rows("POST", CARTS) == [meta_row("ann@example.com", None)]
    assert [c["audience"] async for c in db.audience_changes.find({"synced": False})] == ["buyers"]


async def test_changes_left_queued_never_crowd_out_a_mapped_audiences(
    aiohttp_server: Any, data: JobData, db: Any
) -> None:
    """Changes of an audience without a Meta id stay queued; once more of them wait than a run reads,
    the older ones filled every read and a mapped audience's change was never sent (found with a read
    limit of 100,000, here 2). Several reads in one run drain a queue longer than one read, too."""
    peer = GraphPeer({CARTS, BUYERS})
    server = await aiohttp_server(peer.app())
    await db.contacts.insert_many([{"_id": f"c{i}", "email": f"p{i}@example.com"} for i in range(4)])
    await db.audience_changes.insert_many(
        [change(f"c{i}", "add", "vip", n=i) for i in range(3)]  # unmapped, the oldest
        + [change("c0", "add", n=3)]
        + [change(f"c{i}", "add", "buyers", n=4 + i) for i in range(1, 4)]
    )
    job = meta_job(server)
    job.read_limit = 2
    with pytest.raises(AdsSyncIncomplete, match=r"channels.ads.audiences for: vip \(3 queued\)"):
        await job.run(data)
    assert peer.rows("POST", CARTS) == [meta_row("p0@example.com", None)]
    assert sorted(peer.rows("POST", BUYERS)) == sorted(
        meta_row(f"p{i}@example.com", None) for i in range(1, 4)
    )
    assert [c["audience"] async for c in db.audience_changes.find({"synced": False})] == ["vip"] * 3
