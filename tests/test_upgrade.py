"""Upgrading in place: a database written by rulesvc 0.1.0 (tests/upgrade/release_0_1_0.json, built by that
release's own code: see tests/upgrade/build_fixture.py) is served by this release after `rulesvc serve`
upgrades it at start, with its pending sends, contact state, history, quarantine, identity links and
erasures intact; and a database newer than the code is refused with a clear message."""

from __future__ import annotations

import contextlib
import shutil
import time
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from bson import json_util
from pymongo import MongoClient

from rulesvc.store.migrations import SCHEMA_VERSION
from rulesvc.store.mongod import EmbeddedMongod, free_port
from tests.helpers import wait_for
from tests.service import ServiceProcess
from tests.smtp_server import smtp_server

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parent.parent
FIXTURE = Path(__file__).parent / "upgrade" / "release_0_1_0.json"
Doc = dict[str, Any]


def shifted(value: Any, by: timedelta) -> Any:
    """The fixture as if written `by` ago rather than when it was built: its TTLs, due times and
    tombstones keep their meaning on whatever day the test runs."""
    if isinstance(value, datetime):
        return value + by
    if isinstance(value, dict):
        return {k: shifted(v, by) for k, v in value.items()}
    if isinstance(value, list):
        return [shifted(v, by) for v in value]
    return value


def restore(uri: str, database: str) -> tuple[Doc, timedelta]:
    data = json_util.loads(FIXTURE.read_text())
    by = datetime.now(UTC) - data["built_at"].replace(tzinfo=UTC) - timedelta(minutes=5)
    with MongoClient(uri, tz_aware=True) as client:
        db = client[database]
        for name, collection in data["collections"].items():
            db.create_collection(name)
            if collection["indexes"]:
                db.command({"createIndexes": name, "indexes": collection["indexes"]})
            if collection["documents"]:
                db[name].insert_many([shifted(d, by) for d in collection["documents"]])
    return data["collections"], by


def service_on(tmp_path: Path, mongod: EmbeddedMongod, database: str, smtp_port: int) -> ServiceProcess:
    rulesets = tmp_path / "rulesets"
    shutil.copytree(ROOT / "rulesets", rulesets, dirs_exist_ok=True)
    return ServiceProcess(tmp_path, env={
        "MONGODB_URI": mongod.uri, "RULESVC_DATABASE": database,
        "RULESVC_RULESETS_DIR": str(rulesets), "RULESVC_QUIET_HOURS": "",
        "RULESVC_CHANNEL_EMAIL_HOST": "127.0.0.1", "RULESVC_CHANNEL_EMAIL_PORT": str(smtp_port),
        "RULESVC_CHANNEL_EMAIL_SECURITY": "none", "RULESVC_CHANNEL_EMAIL_FROM": "Shop <shop@example.com>",
    })  # fmt: skip


def ids(docs: Iterable[Doc]) -> set[str]:
    return {d["_id"] for d in docs}


def test_a_database_of_release_0_1_0_is_upgraded_and_served(tmp_path: Path, mongod: EmbeddedMongod) -> None:
    database = f"upgrade_{uuid.uuid4().hex[:8]}"
    old, _ = restore(mongod.uri, database)
    old_events = old["events"]["documents"]
    smtp = contextlib.ExitStack()
    box, smtp_port = smtp.enter_context(smtp_server())
    service = service_on(tmp_path, mongod, database, smtp_port)
    service.key = service.cli("keys", "create", "--scope", "admin", "--name", "t").stdout.splitlines()[-1]
    try:
        service.start()
        status = service.cli("migrate", "--status")
        assert status.returncode == 0, status.stderr
        assert f"schema {SCHEMA_VERSION}; this release: {SCHEMA_VERSION}" in status.stdout
        assert "up to date" in status.stdout
        with service.db() as db:
            schema = db.meta.find_one({"_id": "schema"}) or {}
            assert schema.get("version", 0) == SCHEMA_VERSION
            assert [a["name"] for a in schema["applied"]] == ["event_queue", "drop_unused_indexes"]
            # The indexes 0.1.0 kept on events for its undecided ones, and the one nobody read, are gone.
            assert set(db.events.index_information()) == {"_id_", "events_ttl", "events_by_contact"}
            assert "leases_until" not in db.leases.index_information()

        # The events a crash left undecided are decided now, once; the quarantined one stays aside.
        def waiting() -> int:
            code, overview = service.request("GET", "/v1/overview")
            assert code == 200, overview
            return int(overview["inbox"]["waiting"])

        wait_for(lambda: waiting() == 0, what="the undecided events of 0.1.0 decided")
        code, quarantine = service.request("GET", "/v1/events/quarantine")
        assert code == 200
        assert [(e["id"], e["error"]) for e in quarantine["events"]] == [
            ("bad-cy", "ValueError: planted by the fixture")
        ]

        # History: every stored event of every contact is still listed, with its type and time.
        by_contact: dict[str, list[Doc]] = {}
        for event in old_events:
            if event["contact_id"]:
                by_contact.setdefault(event["contact_id"], []).append(event)
        for contact, events in by_contact.items():
            code, history = service.request("GET", f"/v1/contacts/{contact}/events?limit=100")
            assert code == 200, history
            listed = {e["id"]: e["type"] for e in history["events"]}
            assert {e["_id"]: e["type"] for e in events}.items() <= listed.items(), contact

        # Profiles and consent as 0.1.0 stored them.
        for doc in old["contacts"]["documents"]:
            code, contact = service.request("GET", f"/v1/contacts/{doc['_id']}")
            assert code == 200, contact
            assert contact.get("email") == doc.get("email")
            assert (contact.get("consent") or {}) == (doc.get("consent") or {})

        # The sends 0.1.0 scheduled go out when they come due, each once; what it sent and cancelled stays.
        with service.db() as db:
            waited = ids(db.schedule.find({"status": "pending"}, {"_id": 1}).to_list())
            assert ids(d for d in old["schedule"]["documents"] if d["status"] == "pending") <= waited
            db.schedule.update_many({"status": "pending"}, {"$set": {"due_at": datetime.now(UTC)}})
            busy = {"status": {"$in": ["pending", "running"]}}
            wait_for(lambda: db.schedule.count_documents(busy) == 0, what="every due send made")
        code, ann = service.request("GET", "/v1/contacts/ann/messages")
        assert code == 200
        sent = [m for m in ann["messages"] if m["status"] == "sent" and m["channel"] == "email"]
        assert "checkout_abandon/email" in {m["template"] for m in sent}
        code, bob = service.request("GET", "/v1/contacts/bob/messages")
        old_messages = old["messages"]["documents"]
        old_bob = {(m["template"], m["status"]) for m in old_messages if m["contact_id"] == "bob"}
        assert old_bob <= {(m["template"], m["status"]) for m in bob["messages"]}
        code, cy = service.request("GET", "/v1/contacts/cy/messages")
        assert ("checkout_abandon/email", "suppressed", "no_consent") in {
            (m["template"], m["status"], m.get("reason")) for m in cy["messages"]
        }
        wait_for(lambda: len(box.messages) >= 2, what="the reminders mailed")
        mail = [m for _, _, m in box.messages]
        message_ids = [str(m["Message-ID"]) for m in mail]
        assert len(message_ids) == len(set(message_ids)), "a message was sent twice"
        assert "ann@example.com" in {str(m["To"]) for m in mail}
        assert "cy@example.com" not in {str(m["To"]) for m in mail}

        # The visitor 0.1.0 linked still resolves to its contact; the erased one stays erased.
        track = {"type": "track", "event": "Product Viewed", "anonymousId": "v-1", "messageId": "after-1",
                 "properties": {"product_id": "vase"}}  # fmt: skip
        assert service.request("POST", "/v1/track", track)[0] == 200

        def on_eve() -> set[str]:
            return {e["id"] for e in service.request("GET", "/v1/contacts/eve/events")[1]["events"]}

        wait_for(lambda: "after-1" in on_eve(), what="the visitor's event on eve")
        erased_at = next(iter(old["tombstones"]["documents"]))["erased_at"]
        before = (erased_at.replace(tzinfo=UTC) - timedelta(hours=1)).isoformat()
        late = {"id": "zed-late", "contact_id": "zed", "type": "product_viewed", "time": before}
        code, answer = service.request("POST", "/v1/events", late)
        assert code == 202 and answer.get("erased") == 1, answer
    finally:
        service.stop()
        smtp.close()


def test_an_operators_command_never_upgrades_a_database_with_data(
    tmp_path: Path, mongod: EmbeddedMongod
) -> None:
    """0.1.0 may still serve it: a look at the quarantine with the new binary refuses, changing nothing."""
    database = f"look_{uuid.uuid4().hex[:8]}"
    restore(mongod.uri, database)
    service = service_on(tmp_path, mongod, database, free_port())
    looked = service.cli("events", "quarantine", "list")
    assert looked.returncode == 1
    assert "has schema version 0; this rulesvc" in looked.stderr and "rulesvc migrate" in looked.stderr
    with MongoClient(mongod.uri) as client:
        db = client[database]
        assert "meta" not in db.list_collection_names()
        assert "inbox_pending" in db.events.index_information()  # 0.1.0's indexes still there
        assert db.events.count_documents({"state": "pending"}) == 3


def test_a_database_newer_than_the_code_is_refused(tmp_path: Path, mongod: EmbeddedMongod) -> None:
    database = f"newer_{uuid.uuid4().hex[:8]}"
    with MongoClient(mongod.uri) as client:
        client[database].meta.insert_one({"_id": "schema", "version": SCHEMA_VERSION + 1})
        client[database].events.insert_one({"_id": "e", "contact_id": "c", "type": "x"})
    service = service_on(tmp_path, mongod, database, free_port())
    for workers in (1, 2):  # alone, and as a supervisor of workers: one message, no crash loop
        service.workers = workers
        with pytest.raises(RuntimeError) as exited:
            service.start(timeout=60)
        text = str(exited.value)
        assert "service exited with 1" in text
        assert f"schema version {SCHEMA_VERSION + 1}, written by a newer rulesvc" in text
        assert "Traceback" not in text
    migrate = service.cli("migrate")
    assert migrate.returncode == 1
    assert "written by a newer rulesvc" in migrate.stderr
    with MongoClient(mongod.uri) as client:
        # nothing was created in a database this release does not know
        assert set(client[database].list_collection_names()) == {"meta", "events"}
        assert [ix["name"] for ix in client[database].events.list_indexes()] == ["_id_"]


def test_an_older_release_started_after_the_upgrade_is_reported_and_its_events_taken_back(
    tmp_path: Path, mongod: EmbeddedMongod
) -> None:
    """0.1.0 checks no schema version: started again on an upgraded database, it creates its indexes over
    `events` and stores the events it accepts its way (`state: pending`), which this release does not
    decide. Health says so; once it is stopped, `rulesvc migrate` hands its undecided events to this
    release. Here 0.1.0's writes are replayed from the fixture its own code wrote (its index definitions
    and a purchase stored as it stores one)."""
    database = f"upgrade_{uuid.uuid4().hex[:8]}"
    old, _ = restore(mongod.uri, database)
    smtp = contextlib.ExitStack()
    box, smtp_port = smtp.enter_context(smtp_server())
    service = service_on(tmp_path, mongod, database, smtp_port)
    service.key = service.cli("keys", "create", "--scope", "admin", "--name", "t").stdout.splitlines()[-1]
    older = "an older rulesvc (0.1.0) has started on database"
    try:
        service.start()
        code, health = service.request("GET", "/v1/overview")
        assert code == 200 and not any(older in r for r in health["health"]["reasons"]), health["health"]
        # 0.1.0 starts on the database again and accepts an order for dee.
        old_indexes = [i for i in old["events"]["indexes"] if i["name"] in ("inbox_pending", "inbox_oldest")]
        purchase = next(e for e in old["events"]["documents"] if e["type"] == "purchased")
        now = datetime.now(UTC)
        attributes = {**purchase["attributes"], "order_id": "O-010"}
        order = {**purchase, "_id": "by-0.1.0", "contact_id": "dee", "time": now, "received_at": now,
                 "state": "pending", "attributes": attributes}  # fmt: skip
        order.pop("processed_at", None)
        old_leases = old["leases"]["indexes"]  # 0.1.0 makes `leases_until` again too
        with service.db() as db:
            db.command({"createIndexes": "events", "indexes": old_indexes})
            db.command({"createIndexes": "leases", "indexes": old_leases})
            db.events.insert_one(order)

        def reasons() -> list[str]:
            code, overview = service.request("GET", "/v1/overview")
            assert code == 200, overview
            return list(overview["health"]["reasons"])

        said = wait_for(lambda: [r for r in reasons() if older in r], what="health naming the older release")
        assert "events.inbox_pending" in said[0] and "rulesvc migrate" in said[0]
        status = service.cli("migrate", "--status")
        assert status.returncode == 0 and older in status.stdout, status
        time.sleep(2)  # the order is not this release's to decide yet: no confirmation goes out
        assert not [m for _, _, m in box.messages if str(m["To"]) == "dee@example.com"]

        # Run at once, `rulesvc migrate` suspects 0.1.0 still runs (it just stored an event): refused.
        early = service.cli("migrate")
        assert early.returncode == 1 and "is it still running? Stop it first" in early.stderr, early
        # 0.1.0 stopped, the operator runs `rulesvc migrate --force`: the order is decided here, once.
        taken = service.cli("migrate", "--force")
        assert taken.returncode == 0, taken.stderr
        assert (
            "taken back from the older release: 1 undecided event(s) queued for this one, 0 quarantined"
            in (taken.stdout)
        )
        wait_for(lambda: [m for _, _, m in box.messages if str(m["To"]) == "dee@example.com"],
                 what="dee's order confirmation")  # fmt: skip
        assert not [r for r in reasons() if older in r]
        with service.db() as db:
            assert not {"inbox_pending", "inbox_oldest"} & set(db.events.index_information())
            assert "leases_until" not in db.leases.index_information()
        again = service.cli("migrate")
        assert again.returncode == 0 and "taken back" not in again.stdout
        time.sleep(1)
        mails = [m for _, _, m in box.messages if str(m["To"]) == "dee@example.com"]
        assert (
            len(mails) == 1
            and "O-010" in str(mails[0]["Subject"]) + mails[0].get_body(("plain",)).get_content()
        )
    finally:
        service.stop()
        smtp.close()
