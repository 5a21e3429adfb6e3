"""Builds `release_0_1_0.json`: a database written by rulesvc 0.1.0 (commit fcbb0cb, schema version 0, the
last release without a `meta` collection), for tests/test_upgrade.py to upgrade.

It must be run with THAT code, never with today's (which writes the new layout):

    git worktree add /tmp/r010 fcbb0cb && cd /tmp/r010
    PYTHONPATH=. python tests/upgrade/build_fixture.py OUT

It drives a real `rulesvc serve` (the shipped rulesets, a real SMTP server) the way a shop would: contacts,
checkouts left open (reminders waiting in the schedule), a purchase (a confirmation sent, its reminders
cancelled), product views (interests, browse reminders), a Segment visitor identified and merged, an
erased contact. Then, with the service stopped, the release's own store code writes what a crash would
leave: undecided events (a contact's and a catalog one) and a quarantined event. Every collection is
dumped with its indexes as MongoDB Extended JSON."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bson import json_util
from pymongo import AsyncMongoClient, MongoClient

from rulesvc.core.events import Event
from rulesvc.store.db import Store
from rulesvc.store.mongod import EmbeddedMongod
from tests.helpers import wait_for
from tests.service import ServiceProcess
from tests.smtp_server import smtp_server

ROOT = Path(__file__).parent.parent.parent


def drive_service(work: Path) -> None:
    rulesets = work / "rulesets"
    shutil.copytree(ROOT / "rulesets", rulesets)
    smtp = contextlib.ExitStack()
    box, smtp_port = smtp.enter_context(smtp_server())
    service = ServiceProcess(work, env={
        "RULESVC_RULESETS_DIR": str(rulesets), "RULESVC_QUIET_HOURS": "",
        "RULESVC_CHANNEL_EMAIL_HOST": "127.0.0.1", "RULESVC_CHANNEL_EMAIL_PORT": str(smtp_port),
        "RULESVC_CHANNEL_EMAIL_SECURITY": "none", "RULESVC_CHANNEL_EMAIL_FROM": "Shop <shop@example.com>",
    })  # fmt: skip
    try:
        service.start()
        for contact in ("ann", "bob", "dee", "zed"):
            profile = {"email": f"{contact}@example.com", "consent": {"email": True, "push": True}}
            assert service.request("PUT", f"/v1/contacts/{contact}", profile)[0] == 201
        assert service.request("PUT", "/v1/contacts/cy", {"email": "cy@example.com"})[0] == 201  # no consent
        checkout = {"type": "checkout_started", "attributes": {"value": 42.5, "currency": "EUR"}}
        lamp = {"product_id": "lamp", "name": "Lamp", "price": 30.0, "currency": "EUR"}
        cart = {"value": 30.0, "currency": "EUR", "items": [{**lamp, "quantity": 1}]}
        status, _ = service.request("POST", "/v1/events", [
            {"id": "co-ann", "contact_id": "ann", **checkout},
            {"id": "co-bob", "contact_id": "bob", **checkout},
            {"id": "co-cy", "contact_id": "cy", **checkout},
            {"id": "cart-dee", "contact_id": "dee", "type": "cart_updated", "attributes": cart},
            {"id": "view-dee", "contact_id": "dee", "type": "product_viewed", "attributes": lamp},
            {"id": "view-cy", "contact_id": "cy", "type": "product_viewed", "attributes": lamp},
            {"id": "view-zed", "contact_id": "zed", "type": "product_viewed", "attributes": lamp},
        ])  # fmt: skip
        assert status == 202
        buy = {"id": "buy-bob", "type": "purchased", "contact_id": "bob", "attributes": {"order_id": "o-1"}}
        assert service.request("POST", "/v1/events", buy)[0] == 202
        # A Segment visitor browses, then signs in: linked to and merged into `eve`.
        track = {
            "type": "track",
            "event": "Product Viewed",
            "anonymousId": "v-1",
            "messageId": "seg-1",
            "properties": {"product_id": "lamp", "name": "Lamp", "price": 30.0, "currency": "EUR"},
        }
        assert service.request("POST", "/v1/track", track)[0] == 200
        identify = {"type": "identify", "userId": "eve", "anonymousId": "v-1", "messageId": "seg-2",
                    "traits": {"email": "eve@example.com", "email_opt_in": True}}  # fmt: skip
        assert service.request("POST", "/v1/identify", identify)[0] == 200
        with service.db() as db:
            wait_for(lambda: db.events.count_documents({"state": "pending"}) == 0, what="all events decided")
            wait_for(lambda: db.contacts.count_documents({"_id": "anon:v-1"}) == 0, what="the visitor merged")
            wait_for(lambda: db.messages.count_documents({"status": "sent"}) >= 1, what="a confirmation sent")
        assert service.request("DELETE", "/v1/contacts/zed")[0] == 200
        wait_for(lambda: len(box.messages) >= 1, what="the confirmation mailed")
    finally:
        service.stop()
        smtp.close()


async def leave_undecided(uri: str) -> None:
    """What a crash leaves behind, written by this release's own store code."""
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(uri)
    store = Store(client, "rulesvc", timedelta(days=365))
    now = datetime.now(UTC)
    await store.insert_events([
        Event(id="late-ann", type="cart_updated", contact_id="ann",
              attributes={"value": 30.0, "currency": "EUR", "items": [{"product_id": "lamp", "quantity": 1}]}),  # noqa: E501
        Event(id="late-bob", type="product_viewed", contact_id="bob", attributes={"product_id": "vase"}),
        Event(id="bad-cy", type="product_viewed", contact_id="cy", attributes={"product_id": "lamp"}),
        Event(id="price-lamp", type="price_changed",
              attributes={"product_id": "lamp", "price": 20.0, "currency": "EUR"}),
    ], now)  # fmt: skip
    for _ in range(3):  # three failed evaluations: quarantined, as the inbox would leave it
        await store.event_failed("bad-cy", "ValueError: planted by the fixture", "evaluate", now)
    await client.close()


def dump(uri: str) -> dict[str, Any]:
    with MongoClient(uri) as client:
        db = client["rulesvc"]
        out: dict[str, Any] = {"built_at": datetime.now(UTC), "release": "0.1.0", "collections": {}}
        for name in sorted(db.list_collection_names()):
            indexes = [dict(ix) for ix in db[name].list_indexes() if ix["name"] != "_id_"]
            for ix in indexes:
                ix.pop("v", None)
                ix.pop("ns", None)
            docs = list(db[name].find().sort("_id", 1))
            out["collections"][name] = {"indexes": indexes, "documents": docs}
        return out


def main(out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        drive_service(work)
        with EmbeddedMongod(work / ".rulesvc") as mongod:
            asyncio.run(leave_undecided(mongod.uri))
            data = dump(mongod.uri)
    # Key order kept: an index's key order is part of the index.
    text = json_util.dumps(data, json_options=json_util.CANONICAL_JSON_OPTIONS, indent=1)
    out.write_text(text + "\n")
    print(f"{out}: {sum(len(c['documents']) for c in data['collections'].values())} documents")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("release_0_1_0.json"))
