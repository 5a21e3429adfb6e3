"""GET /v1/contacts/{id}/messages over records as the engine and channels write them."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import msgspec

from rulesvc.core.messages import Message
from rulesvc.store.db import Store
from tests.helpers import yesterday_at

T0 = yesterday_at(8)  # sent messages are kept a year from it


def message(n: int, contact: str = "c1", status: str = "sent") -> Message:
    return Message(
        message_id=f"m{n}",
        contact_id=contact,
        ruleset="cart_abandon",
        rule="remind_push",
        channel="push",
        template="cart_push",
        status=status,  # type: ignore[arg-type]
        reason="no consent" if status == "suppressed" else None,
        created_at=T0 + timedelta(minutes=n),
        due_at=T0 + timedelta(minutes=n + 20),
        sent_at=T0 + timedelta(minutes=n + 20) if status == "sent" else None,
    )


async def fill(db: Any, settings: Any, messages: list[Message]) -> None:
    store = Store(db.client, settings.database, timedelta(days=1))
    for m in messages:
        await store.insert_message(m)


async def test_empty_history(client: Any) -> None:
    resp = await client.get("/v1/contacts/c1/messages")
    assert resp.status == 200
    assert await resp.json() == {"messages": [], "next_before": None, "next_before_id": None}


async def test_newest_first_paged_and_filtered(client: Any, db: Any, settings: Any) -> None:
    await fill(db, settings, [message(n, status="suppressed" if n == 3 else "sent") for n in range(6)])
    await fill(db, settings, [message(100, contact="c2")])
    page = await (await client.get("/v1/contacts/c1/messages", params={"limit": "4"})).json()
    assert [m["message_id"] for m in page["messages"]] == ["m5", "m4", "m3", "m2"]
    first = page["messages"][0]
    assert first["ruleset"] == "cart_abandon" and first["channel"] == "push" and first["status"] == "sent"
    assert first["sent_at"] == (T0 + timedelta(minutes=25)).isoformat().replace("+00:00", "Z")
    assert page["messages"][2]["reason"] == "no consent"
    rest = await (
        await client.get("/v1/contacts/c1/messages", params={"limit": "4", "before": page["next_before"]})
    ).json()
    assert [m["message_id"] for m in rest["messages"]] == ["m1", "m0"]
    assert rest["next_before"] is None
    suppressed = await (await client.get("/v1/contacts/c1/messages", params={"status": "suppressed"})).json()
    assert [m["message_id"] for m in suppressed["messages"]] == ["m3"]


async def test_paging_through_one_batch_skips_nothing(client: Any, db: Any, settings: Any) -> None:
    """Messages decided in one inbox batch share their `created_at`: a page ending inside such a batch
    must continue with the rest of it, on both lists."""
    batch = [msgspec.structs.replace(message(n, status="dead"), created_at=T0) for n in range(7)]
    await fill(db, settings, [*batch, message(30, status="dead")])
    for path, extra in (("/v1/contacts/c1/messages", {}), ("/v1/messages", {"status": "dead"})):
        seen: list[str] = []
        params: dict[str, str] = {"limit": "3", **extra}
        while True:
            page = await (await client.get(path, params=params)).json()
            seen += [m["message_id"] for m in page["messages"]]
            if page["next_before"] is None:
                break
            params |= {"before": page["next_before"], "before_id": page["next_before_id"]}
        assert sorted(seen) == sorted(f"m{n}" for n in [*range(7), 30]) and len(seen) == 8, path


async def test_history_query_uses_its_index(db: Any, settings: Any, client: Any) -> None:
    await fill(db, settings, [message(n) for n in range(3)])
    plan = await db.command(
        "explain",
        {"find": "messages", "filter": {"contact_id": "c1"}, "sort": {"created_at": -1, "_id": -1}},
        verbosity="queryPlanner",
    )
    assert "messages_by_contact" in str(plan["queryPlanner"]["winningPlan"])
