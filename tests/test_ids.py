"""One id rule everywhere: the contact ids events refuse are refused in paths too, and the ids the
service makes for itself (fan-out copies) cannot be taken first by a client's event."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from rulesvc.config import Settings
from rulesvc.web.app import create_app
from tests.helpers import eventually, write_ruleset

BAD_IDS = ["a b", "a/b", "a\x00b", "a\rb", "a\nb", "ab\n", "a\tb", "a\x7fb", "x" * 129, ""]


@pytest.mark.parametrize("contact_id", BAD_IDS)
async def test_an_id_refused_in_events_is_refused_in_paths(client: Any, db: Any, contact_id: str) -> None:
    event = {"id": "e1", "type": "cart_updated", "contact_id": contact_id}
    resp = await client.post("/v1/events", json=event)
    assert resp.status == 422
    assert (await resp.json())["errors"][0]["path"] == "$.contact_id"
    path = f"/v1/contacts/{quote(contact_id, safe='')}"
    resp = await client.put(path, json={"email": "a@example.com"})
    assert resp.status in (400, 404, 405)  # 404/405: the router saw a `/` and no such route
    assert "error" in await resp.json()
    for suffix in ("", "/messages", "/events", "/inbox"):
        assert (await client.get(path + suffix)).status in (400, 404, 405)
    assert await db.contacts.count_documents({}) == 0 and await db.events.count_documents({}) == 0


async def test_the_path_error_is_plain(client: Any) -> None:
    resp = await client.put("/v1/contacts/a%20b", json={})
    assert resp.status == 400
    assert (await resp.json())["error"] == "contact_id may not contain whitespace, `/` or control characters"
    resp = await client.put("/v1/contacts/a%0Ab", json={})
    assert resp.status == 400


async def test_unusual_but_valid_ids_work_in_both(client: Any) -> None:
    for contact_id in ("jane@example.com", "Kunde-ä.ß:42", "+4915112345678", "a%b"):
        path = f"/v1/contacts/{quote(contact_id, safe='')}"
        assert (await client.put(path, json={})).status == 201, contact_id
        event = {"id": f"e-{contact_id}", "type": "cart_updated", "contact_id": contact_id}
        assert (await client.post("/v1/events", json=event)).status == 202, contact_id


async def test_a_client_event_cannot_take_the_id_of_a_fanout_copy_first(
    make_client: Any, settings: Settings, db: Any
) -> None:
    write_ruleset(Path(settings.rulesets_dir), "news", {"rules": [
        {"name": "n", "when": {"event": "price_changed"}, "then": [{"count": "price_news"}]}]})  # fmt: skip
    client = await make_client(create_app(settings))
    now = datetime.now(UTC)
    await db.interests.insert_many(
        [{"_id": f"{c}|lamp", "contact_id": c, "product_id": "lamp", "viewed_at": now} for c in ("c1", "c2")]
    )
    # Knowing how copies are named, a client posts events under those ids before the price change.
    for claimed in ("pc>c1", "pc/c1", "pc/c2"):
        resp = await client.post(
            "/v1/events", json={"id": claimed, "type": "page_viewed", "contact_id": "c1"}
        )
        if "/" in claimed:  # the service's own namespace: never a client's
            assert resp.status == 422
            assert (await resp.json())["errors"][0]["path"] == "$.id"
    price = {"id": "pc", "type": "price_changed", "attributes": {"product_id": "lamp", "price": 5.0}}
    assert (await client.post("/v1/events", json=price)).status == 202

    async def copies_decided() -> bool:
        """The change fanned out (its queue document gone) and both copies decided: the copies are
        queued by the fan-out and decided after it, so the first alone is not enough."""
        fanned = await db.inbox.find_one({"_id": "pc"}) is None
        return fanned and await db.inbox.count_documents({"contact_id": {"$in": ["c1", "c2"]}}) == 0

    await eventually(copies_decided)
    assert await db.events.find_one({"_id": "pc"}) is not None
    told = await db.contacts.find({"state.counters.price_news.n": 1}, {"_id": 1}).to_list()
    assert sorted(c["_id"] for c in told) == ["c1", "c2"]  # both decided for their copy, none was lost


async def test_simulated_contacts_follow_the_same_rule(client: Any) -> None:
    body = {"events": [], "contacts": [{"contact_id": "a b"}]}
    resp = await client.post("/v1/simulate", json=body)
    assert resp.status == 422
    assert (await resp.json())["path"] == "$.contacts[0].contact_id"
