"""`/v1/backtests` and `rulesvc backtest`: a small stored history whose outcome is worked out here from its
own construction (who put what in a cart, who bought how soon, who consented), replayed by the real app
in a process of its own; and a real `rulesvc serve --workers 2`, where the POST, the GETs and a second
POST land on either worker, and a job's process or its worker is killed."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest

from rulesvc.config import Settings
from rulesvc.store.db import Store
from rulesvc.store.mongod import EmbeddedMongod, live_children, pid_alive
from rulesvc.web.app import create_app
from tests.helpers import counts_per_worker, eventually, wait_for
from tests.service import ServiceProcess
from tests.test_api_contract import check_against_document
from tests.webhook_flow import SECRET, Receiver

Client = Any
NOW = datetime.now(UTC).replace(microsecond=0)
CART_AT = NOW - timedelta(days=3)


def remind(after: str) -> dict[str, Any]:
    send = {"channel": "webhook", "template": "cart", "after": after, "cancel_on": ["purchased"]}
    return {"name": "remind", "when": {"event": "cart_updated"}, "then": [{"send": send}]}


THANKS = {"name": "thanks", "when": {"event": "purchased"},
          "then": [{"send": {"channel": "webhook", "template": "thanks"}}]}  # fmt: skip


@dataclass(frozen=True)
class Shopper:
    contact_id: str
    consent: bool | None  # None: no stored profile at all
    bought_after: int | None  # minutes after the cart; None: never bought


SHOPPERS = [
    Shopper("c1", True, None),
    Shopper("c2", True, 10),
    Shopper("c3", True, 30),
    Shopper("c4", False, None),
    Shopper("c5", None, None),
]


def remind_outcomes(delay: int) -> dict[str, int]:
    """What a reminder `delay` minutes after each cart becomes, from the rule's text: cancelled by a
    purchase before it is due, else sent with consent, else suppressed (no_consent)."""
    found = {"sent": 0, "cancelled": 0, "no_consent": 0}
    for s in SHOPPERS:
        if s.bought_after is not None and s.bought_after < delay:
            found["cancelled"] += 1
        elif s.consent:
            found["sent"] += 1
        else:
            found["no_consent"] += 1
    return found


def events() -> list[dict[str, Any]]:
    docs = []
    for s in SHOPPERS:
        docs.append({"_id": f"cart-{s.contact_id}", "type": "cart_updated", "contact_id": s.contact_id,
                     "time": CART_AT, "attributes": {"value": 50}})  # fmt: skip
        if s.bought_after is not None:
            bought = CART_AT + timedelta(minutes=s.bought_after)
            docs.append({"_id": f"buy-{s.contact_id}", "type": "purchased", "contact_id": s.contact_id,
                         "time": bought, "attributes": {"value": 50}})  # fmt: skip
    # Outside the window (14 days): never replayed.
    docs.append({"_id": "old", "type": "cart_updated", "contact_id": "c1", "time": NOW - timedelta(days=20),
                 "attributes": {"value": 1}})  # fmt: skip
    return docs


def as_stored(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """As the inbox leaves them once evaluated (as received, out of its queue): the live service has
    nothing more to do with them."""
    return [{**d, "received_at": NOW} for d in docs]


def write_rulesets(folder: Path, rulesets: dict[str, dict[str, Any]]) -> Path:
    (folder / "templates").mkdir(parents=True, exist_ok=True)
    for name in ("cart", "thanks"):
        (folder / "templates" / f"{name}.body").write_text(f"{name} {{{{ contact.contact_id }}}}")
    for name, body in rulesets.items():
        (folder / f"{name}.json").write_text(json.dumps(body))
    return folder


@pytest.fixture
def shop(settings: Settings, receiver: Receiver) -> Settings:
    write_rulesets(Path(settings.rulesets_dir), {"cart": {"rules": [remind("20m")]}})
    return msgspec.structs.replace(settings, channels={"webhook": {"url": receiver.url, "secret": SECRET}})


async def stored_history(client: Client, db: Any) -> None:
    for s in SHOPPERS:
        if s.consent is not None:
            profile = {"consent": {"webhook": s.consent}}
            assert (await client.put(f"/v1/contacts/{s.contact_id}", json=profile)).status == 201
    await db.events.insert_many(as_stored(events()))


async def dump(db: Any) -> dict[str, list[Any]]:
    names = ("events", "contacts", "schedule", "messages", "interests", "products", "audience_changes")
    return {n: await db[n].find({}).sort("_id", 1).to_list() for n in names}


async def finished(client: Client, job_id: str, timeout: float = 120) -> dict[str, Any]:
    found: dict[str, Any] = {}

    async def ended() -> bool:
        resp = await client.get(f"/v1/backtests/{job_id}")
        assert resp.status == 200
        found.update(await resp.json())
        return found["status"] not in ("queued", "running")

    await eventually(ended, timeout)
    return found


def row(report: dict[str, Any], rule: str) -> dict[str, Any]:
    [found] = [r for r in report["rows"] if r["rule"] == rule]
    return found


async def test_a_backtest_job_reports_what_the_candidate_would_change_and_touches_nothing(
    make_client: Any, shop: Settings, db: Any, receiver: Receiver
) -> None:
    client = await make_client(create_app(shop))
    await stored_history(client, db)
    before = await dump(db)
    candidate = {"cart": {"rules": [remind("45m"), THANKS]}}
    resp = await client.post("/v1/backtests", json={"since": "14d", "rulesets": candidate})
    job = await resp.json()
    assert resp.status == 202, job
    check_against_document("POST", "/v1/backtests", 202, job)
    assert resp.headers["Location"] == f"/v1/backtests/{job['id']}" == job["links"]["get"]
    assert job["status"] == "queued"
    assert job["request"]["candidate"] == "the baseline with cart replaced"
    assert job["request"]["baseline"] == f"live rulesets ({Path(shop.rulesets_dir).absolute()})"

    done = await finished(client, job["id"])
    assert done["status"] == "done", done
    check_against_document("GET", "/v1/backtests/{job_id}", 200, done)  # the report as documented
    report = done["report"]
    in_window = [d for d in events() if d["_id"] != "old"]
    assert report["events"] == len(in_window) == done["progress"]["replayed"] == done["progress"]["total"]
    assert done["progress"]["percent"] == 100
    assert report["contacts"] == len(SHOPPERS)
    base, cand = remind_outcomes(20), remind_outcomes(45)
    remind_row = row(report, "remind")
    for side, expected in (("baseline", base), ("candidate", cand)):
        tally = remind_row[side]
        assert (tally["sent"], tally["cancelled"], tally["suppressed"]) == (
            expected["sent"],
            expected["cancelled"],
            {"no_consent": expected["no_consent"]},
        ), side
    assert remind_row["sent_change"] == cand["sent"] - base["sent"] == -1
    buyers_with_consent = sum(1 for s in SHOPPERS if s.bought_after is not None and s.consent)
    assert row(report, "thanks")["candidate"]["sent"] == buyers_with_consent
    assert row(report, "thanks")["baseline"]["decided"] == 0
    # c2 gains a thank-you; c3 gains one and loses its reminder (bought at 30 minutes: before 45).
    changes = report["changes"]
    assert (changes["gaining"], changes["losing"]) == (2, 1)
    assert [e["contact_id"] for e in changes["lost_examples"]] == ["c3"]
    # The service recorded no message in the window: every replayed one is a finding.
    assert report["recorded"]["recorded"] == 0
    assert report["recorded"]["only_replayed"] == sum(base.values())

    assert await dump(db) == before
    assert receiver.got == [] and not receiver.raw
    listed = await (await client.get("/v1/backtests")).json()
    check_against_document("GET", "/v1/backtests", 200, listed)
    assert [j["id"] for j in listed["backtests"]] == [job["id"]]
    assert listed["backtests"][0]["report"] is None and listed["backtests"][0]["status"] == "done"


async def test_a_backtest_is_for_admins(make_client: Any, shop: Settings) -> None:
    app = create_app(shop)
    client = await make_client(app, "ingest")
    for method, path in (("POST", "/v1/backtests"), ("GET", "/v1/backtests"), ("GET", "/v1/backtests/x"),
                         ("POST", "/v1/backtests/x/cancel")):  # fmt: skip
        resp = await client.request(method, path, json={})
        assert resp.status == 403, (method, path)
        resp = await client.request(method, path, json={}, headers={"Authorization": ""})
        assert resp.status == 401, (method, path)


async def refused(client: Client, body: Any) -> list[dict[str, Any]]:
    resp = await client.post("/v1/backtests", json=body)
    answer = await resp.json()
    assert resp.status == 422, answer
    check_against_document("POST", "/v1/backtests", 422, answer)
    return answer["errors"]  # type: ignore[no-any-return]


def paths(errors: list[dict[str, Any]]) -> list[str]:
    return [e["path"] for e in errors]


async def test_bad_requests_are_422_with_the_path_of_every_problem(
    make_client: Any, shop: Settings, tmp_path: Path
) -> None:
    client = await make_client(create_app(shop))
    iso = lambda t: t.isoformat()  # noqa: E731
    assert paths(await refused(client, {"since": "2d", "from": iso(NOW - timedelta(days=3))})) == ["$.from"]
    empty = await refused(
        client, {"from": iso(NOW - timedelta(days=2)), "until": iso(NOW - timedelta(days=3))}
    )
    assert paths(empty) == ["$.until"] and "empty" in empty[0]["message"]
    old = await refused(client, {"since": "100d"})  # the default retention is 90 days
    assert paths(old) == ["$.since"] and "retention" in old[0]["message"]
    assert paths(await refused(client, {"from": iso(NOW - timedelta(days=91))})) == ["$.from"]
    future = await refused(client, {"since": "1d", "until": iso(NOW + timedelta(days=1))})
    assert paths(future) == ["$.until"] and "future" in future[0]["message"]
    assert paths(await refused(client, {"since": "2 days"})) == ["$.since"]
    assert paths(await refused(client, {"from": "0001-01-01T00:00:00+23:59"})) == ["$.from"]
    assert paths(await refused(client, {"until": "0001-01-01T00:00:00Z"})) == ["$.until"]
    assert paths(await refused(client, {"from": "2026-11-01T10:00:00"})) == ["$.from"]  # no offset
    assert paths(await refused(client, {"examples": 51})) == ["$.examples"]
    assert paths(await refused(client, {"contacts": [f"c{i}" for i in range(10_001)]})) == ["$.contacts"]
    assert paths(await refused(client, {"contacts": ["a b"]})) == ["$.contacts[0]"]
    assert paths(await refused(client, {"sinse": "2d"})) == ["$"]

    # The candidate, through the one validator: every error, under the ruleset's name.
    bad = {"rules": [{"name": "r", "when": {"event": "x"}, "then": [{"send": {"channel": "pigeon",
                                                                           "template": "cart"}}]},
                     {"name": "r", "when": {"event": "y"}, "then": [{"set_flag": "f"}]}]}  # fmt: skip
    errors = await refused(client, {"rulesets": {"cart": bad, "Bad": {"rules": []}}})
    assert set(paths(errors)) == {
        "$.rulesets.cart.rules[0].then[0].send.channel",
        "$.rulesets.cart.rules[1].name",
        "$.rulesets.Bad",
    }, errors
    missing = await refused(client, {"rulesets": {"cart": {"rules": [remind("5m") | {"then": [
        {"send": {"channel": "webhook", "template": "nope"}}]}]}}})  # fmt: skip
    assert paths(missing) == ["$.rulesets.cart.rules[0].then[0].send.template"]
    assert paths(await refused(client, {"remove": ["nothing"]})) == ["$.remove[0]"]
    both = await refused(client, {"rulesets_dir": str(tmp_path), "remove": ["cart"]})
    assert paths(both) == ["$.rulesets_dir"]
    assert paths(await refused(client, {"rulesets_dir": "relative/folder"})) == ["$.rulesets_dir"]
    assert paths(await refused(client, {"baseline_dir": str(tmp_path / "none")})) == ["$.baseline_dir"]
    for odd in ("/tmp/a\x00b", "/" + "x" * 300, "/etc/passwd"):  # refused by the system, or a file
        assert paths(await refused(client, {"rulesets_dir": odd})) == ["$.rulesets_dir"], odd
    folder = write_rulesets(tmp_path / "candidate", {"cart": {"rules": [remind("45m")]}})
    (folder / "broken.json").write_text('{"rules": [')
    [broken] = await refused(client, {"rulesets_dir": str(folder)})
    assert (broken["path"], broken["file"], broken["line"]) == (
        "$.rulesets_dir",
        str(folder / "broken.json"),
        1,
    )
    assert broken["message"].startswith("broken.json:1:")
    resp = await client.post("/v1/backtests", data=b"{", headers={"Content-Type": "application/json"})
    assert resp.status == 400
    assert (await client.get("/v1/backtests/nope")).status == 404
    assert (await client.post("/v1/backtests/nope/cancel")).status == 404
    assert (await (await client.get("/v1/backtests")).json()) == {"backtests": []}  # nothing started


async def test_a_fifo_in_a_folder_is_refused_without_blocking(
    make_client: Any, shop: Settings, tmp_path: Path
) -> None:
    """A folder is read off the worker's loop, and only its regular files: a FIFO named `x.json` would
    block its reader until something wrote to it."""
    client = await make_client(create_app(shop))
    folder = write_rulesets(tmp_path / "candidate", {"cart": {"rules": [remind("45m")]}})
    fifo = folder / "x.json"
    os.mkfifo(fifo)

    released = threading.Event()

    def release() -> None:  # a reader stuck on it (the bug) gets its end of file: the test ends, failed
        released.set()
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass  # no reader: nothing to release

    watchdog = threading.Timer(10, release)
    watchdog.start()
    try:
        [problem] = await refused(client, {"rulesets_dir": str(folder)})
    finally:
        watchdog.cancel()
    assert not released.is_set(), "the request waited on the FIFO"
    assert (problem["path"], problem["file"]) == ("$.rulesets_dir", str(fifo)), problem
    assert "not a regular file" in problem["message"]


# A history that takes a backtest several seconds (about 15,000 events/s here), so it is still running
# when a test acts on it.
MANY = (15_000, 10)


def many_events(contacts: int, per_contact: int) -> list[dict[str, Any]]:
    return [
        {"_id": f"e{c}-{n}", "type": "cart_updated", "contact_id": f"m{c}",
         "time": NOW - timedelta(days=5, minutes=-n * 7), "attributes": {"value": n}}
        for c in range(contacts) for n in range(per_contact)
    ]  # fmt: skip


async def test_one_backtest_at_a_time_and_a_running_one_is_cancelled(
    make_client: Any, shop: Settings, db: Any
) -> None:
    client = await make_client(create_app(shop))
    await db.events.insert_many(as_stored(many_events(*MANY)))
    total = MANY[0] * MANY[1]
    first = await (await client.post("/v1/backtests", json={"since": "7d"})).json()
    resp = await client.post("/v1/backtests", json={"since": "2d"})
    conflict = await resp.json()
    assert resp.status == 409, conflict
    assert conflict["running"]["id"] == first["id"] and first["id"] in conflict["error"]

    async def replaying() -> bool:
        job = await (await client.get(f"/v1/backtests/{first['id']}")).json()
        return job["status"] == "running" and (job["progress"] or {}).get("replayed", 0) > 0

    await eventually(replaying)
    resp = await client.post("/v1/backtests", json={})
    conflict = await resp.json()
    assert resp.status == 409
    check_against_document("POST", "/v1/backtests", 409, conflict)
    progress = conflict["running"]["progress"]
    assert progress["total"] == total and 0 < progress["replayed"] <= total
    assert 0 < progress["percent"] <= 100
    resp = await client.post(f"/v1/backtests/{first['id']}/cancel")
    assert resp.status == 200 and (await resp.json())["cancel_requested"] is True
    job = await finished(client, first["id"])
    assert (job["status"], job["error"]) == ("cancelled", "cancelled by an operator"), job
    assert job["progress"]["replayed"] < total  # it stopped part-way
    resp = await client.post(f"/v1/backtests/{first['id']}/cancel")
    assert resp.status == 200  # cancelled already: nothing more to do
    # The next one may start now, and finishes.
    resp = await client.post("/v1/backtests", json={"since": "7d", "contacts": ["m1", "m2"]})
    second = await resp.json()
    assert resp.status == 202, second
    done = await finished(client, second["id"])
    assert (done["status"], done["report"]["events"], done["report"]["contacts"]) == ("done", 20, 2)
    resp = await client.post(f"/v1/backtests/{second['id']}/cancel")
    ended = await resp.json()
    assert resp.status == 409 and ended["status"] == "done"
    check_against_document("POST", "/v1/backtests/{job_id}/cancel", 409, ended)


async def test_stopping_the_service_cancels_its_running_backtest(
    aiohttp_client: Any, shop: Settings, db: Any
) -> None:
    app = create_app(shop)
    client = await aiohttp_client(app)
    from rulesvc.web.keys import BACKTESTS, KEYS

    key, _ = await app[KEYS].create("admin", "tests")
    client.session.headers["Authorization"] = f"Bearer {key}"
    await db.events.insert_many(as_stored(many_events(4000, 10)))
    job = await (await client.post("/v1/backtests", json={"since": "7d"})).json()
    pid = wait_for(lambda: app[BACKTESTS].pid(job["id"]), what="the job's process")
    await client.close()  # the app's cleanup runs
    assert not pid_alive(pid)
    stored = await db.backtests.find_one({"_id": job["id"]})
    assert (stored["status"], stored["error"]) == ("cancelled", "the service stopped")
    assert "active" not in stored


# --- the command ---------------------------------------------------------------------------------------


def rulesvc(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MONGODB_URI": settings.mongodb_uri or "", "RULESVC_DATABASE": settings.database,
           "RULESVC_RULESETS_DIR": settings.rulesets_dir, "RULESVC_QUIET_HOURS": "",
           "RULESVC_CHANNEL_WEBHOOK_URL": "http://127.0.0.1:9/hook",
           "RULESVC_CHANNEL_WEBHOOK_SECRET": SECRET}  # fmt: skip
    return subprocess.run([sys.executable, "-m", "rulesvc", "backtest", *args], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip


async def test_the_command_prints_the_table_or_json(shop: Settings, db: Any, tmp_path: Path) -> None:
    result = rulesvc(shop, "--since", "14d")  # no service has run on it: nothing to replay, nothing built
    assert result.returncode == 1 and "no service has run on the database" in result.stderr, result.stderr
    assert await db.list_collection_names() == []
    await Store(db.client, db.name, timedelta(days=shop.event_retention_days)).ensure_schema()
    for s in SHOPPERS:
        if s.consent is not None:
            await db.contacts.insert_one({"_id": s.contact_id, "consent": {"webhook": s.consent}})
    await db.events.insert_many(as_stored(events()))
    candidate = write_rulesets(tmp_path / "candidate", {"cart": {"rules": [remind("45m")]}})
    before = await dump(db)
    base, cand = remind_outcomes(20), remind_outcomes(45)

    result = rulesvc(shop, "--since", "14d", "--rulesets", str(candidate), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    remind_row = row(report, "remind")
    assert (remind_row["baseline"]["sent"], remind_row["candidate"]["sent"]) == (base["sent"], cand["sent"])
    assert remind_row["candidate"]["cancelled"] == cand["cancelled"]
    assert report["candidate"]["label"] == str(candidate)

    result = rulesvc(shop, "--rulesets", str(candidate), "--contacts", "c1,c3")
    assert result.returncode == 0, result.stderr
    # c1 is reminded by both; c3 only by the baseline (bought at 30 minutes).
    assert re.search(r"^cart/remind\s+webhook\s+2\s+1\s+-1\s", result.stdout, re.M), result.stdout
    assert "2 contacts" in result.stdout
    assert "replayed 3 of 3 events" in result.stderr  # no terminal: plain progress lines

    # Without --rulesets: the live folder against itself and what was recorded.
    result = rulesvc(shop, "--json")
    assert result.returncode == 0, result.stderr
    same = row(json.loads(result.stdout), "remind")
    assert same["baseline"] == same["candidate"] and same["sent_change"] == 0

    (candidate / "broken.json").write_text('{"rules": [')
    result = rulesvc(shop, "--rulesets", str(candidate))
    assert result.returncode == 1 and "broken.json:1:" in result.stderr and not result.stdout
    result = rulesvc(shop, "--since", "2d", "--from", NOW.isoformat())
    assert result.returncode == 2 and "not allowed with" in result.stderr  # a usage error
    result = rulesvc(shop, "--from", (NOW - timedelta(days=100)).isoformat())
    assert result.returncode == 1 and "--from: " in result.stderr and "retention" in result.stderr
    assert await dump(db) == before


# --- a real service with two workers ---------------------------------------------------------------------


@pytest.mark.slow
def test_two_workers_share_one_job_and_a_dead_one_is_failed_or_lost(
    mongod: EmbeddedMongod, tmp_path: Path, receiver: Receiver
) -> None:
    rulesets = write_rulesets(tmp_path / "rulesets", {"cart": {"rules": [remind("20m")]}})
    env = {"MONGODB_URI": mongod.uri, "RULESVC_DATABASE": f"bt_{os.getpid()}", "RULESVC_RATE_LIMIT": "0",
           "RULESVC_RULESETS_DIR": str(rulesets), "RULESVC_CHANNEL_WEBHOOK_URL": receiver.url,
           "RULESVC_CHANNEL_WEBHOOK_SECRET": SECRET, "RULESVC_QUIET_HOURS": ""}  # fmt: skip
    metrics_dir = tmp_path / "metrics"
    env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    service = ServiceProcess(tmp_path, env=env, workers=2)
    service.start()
    try:
        service.key = service.cli("keys", "create", "--scope", "admin").stdout.splitlines()[-1]
        with service.db() as db:
            db.events.insert_many(as_stored(many_events(*MANY)))

        def job_of(job_id: str) -> dict[str, Any]:
            status, job = service.request("GET", f"/v1/backtests/{job_id}")
            assert status == 200, job
            return job  # type: ignore[no-any-return]

        def stored(job_id: str) -> dict[str, Any]:
            with service.db() as db:
                return db.backtests.find_one({"_id": job_id}) or {}

        status, first = service.request("POST", "/v1/backtests", {"since": "7d"})
        assert status == 202, first
        # Each request is a new connection: the kernel spreads them over both workers.
        seen = [service.request("POST", "/v1/backtests", {"since": "1d"}) for _ in range(8)]
        assert all(s == 409 and b["running"]["id"] == first["id"] for s, b in seen), seen
        assert all(job_of(first["id"])["id"] == first["id"] for _ in range(8))
        assert service.proc is not None
        assert int(first["owner"].rsplit(":", 1)[1]) in live_children(service.proc.pid)
        answered = counts_per_worker(metrics_dir, "rulesvc_http_requests_total", "/v1/backtests")
        assert len([n for n in answered.values() if n]) == 2, answered  # both workers answered some

        # Its process killed: the worker that watched it fails the job with the exit code.
        child = wait_for(lambda: stored(first["id"]).get("process"), what="the job's process")
        os.kill(child, signal.SIGKILL)
        failed = wait_for(lambda: (j := job_of(first["id"]))["status"] == "failed" and j, what="failed")
        assert "exit code -9" in failed["error"]

        # Its worker killed: nobody is left to say so; the heartbeat stops, and it is lost.
        status, second = service.request("POST", "/v1/backtests", {"since": "7d"})
        assert status == 202, second
        child = wait_for(lambda: stored(second["id"]).get("process"), what="the second job's process")
        worker = int(second["owner"].rsplit(":", 1)[1])
        os.kill(worker, signal.SIGKILL)
        wait_for(lambda: not pid_alive(child), what="the job's process gone with its worker")
        t0 = time.monotonic()

        def lost_job() -> dict[str, Any] | None:
            try:
                job = job_of(second["id"])
            except (ConnectionError, urllib.error.URLError):  # one the killed worker had been given
                return None
            return job if job["status"] == "lost" else None

        lost = wait_for(lost_job, timeout=90, what="lost")
        assert time.monotonic() - t0 > 10  # a heartbeat is not lost at once
        assert "restart" in lost["error"]
        status, third = service.request("POST", "/v1/backtests", {"since": "1d"})
        assert status == 202, third
        listed = service.request("GET", "/v1/backtests")[1]["backtests"]
        assert [j["id"] for j in listed][:3] == [third["id"], second["id"], first["id"]]
        assert receiver.got == []
    finally:
        service.stop()
