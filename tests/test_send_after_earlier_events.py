"""A send waits for its contact's earlier events: the inbox's lag never lets a reminder out before the
purchase that came first would have cancelled it (as a simulation of the same events decides)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

from rulesvc.config import Settings
from rulesvc.web.app import create_app
from tests.helpers import PROFILE, Provider, eventually, history, registry, send, setup


async def test_a_due_send_waits_while_an_earlier_event_of_its_contact_is_undecided(
    make_client: Any, settings: Settings, db: Any
) -> None:
    push = Provider("push", needs="push_tokens")
    # 8 s: time enough, on a loaded machine, to post the purchase before the reminder comes due.
    flow = setup(settings, [send("push", after="8s", cancel_on=["purchased"], transactional=True)])
    client = await make_client(create_app(flow, registry(push)))
    for contact in ("c1", "c2"):
        assert (await client.put(f"/v1/contacts/{contact}", json=PROFILE)).status in (200, 201)
        body = {"id": f"go-{contact}", "type": "go", "contact_id": contact, "attributes": {"code": "X1"}}
        assert (await client.post("/v1/events", json=body)).status == 202

    async def both_scheduled() -> bool:
        statuses = [[m["status"] for m in await history(client, c)] for c in ("c1", "c2")]
        return statuses == [["scheduled"], ["scheduled"]]

    await eventually(both_scheduled)
    [scheduled] = await history(client, "c1")
    due = datetime.fromisoformat(scheduled["due_at"])
    # Another process is busy with c1 (its lease), so c1's purchase, made before the reminder came due,
    # stays undecided past the due time.
    await db.contact_leases.insert_one(
        {
            "_id": "busy",
            "owner": "another-process",
            "contacts": ["c1"],
            "until": datetime.now(UTC) + timedelta(minutes=5),
        }
    )
    purchase = {
        "id": "buy-c1",
        "type": "purchased",
        "contact_id": "c1",
        "time": datetime.now(UTC).isoformat(),
    }
    assert (await client.post("/v1/events", json=purchase)).status == 202
    assert datetime.now(UTC) < due, "the purchase came after the reminder was due: the machine is too slow"

    async def c2_sent() -> bool:
        return [m.contact_id for m in push.delivered] == ["c2"]

    # c2 had nothing undecided: its reminder goes out; c1's, due at the same moment, waits for the purchase.
    await eventually(c2_sent)
    await asyncio.sleep(max(0.0, (due + timedelta(seconds=1) - datetime.now(UTC)).total_seconds()))
    assert [m.contact_id for m in push.delivered] == ["c2"]
    assert [m["status"] for m in await history(client, "c1")] == ["scheduled"]
    await db.contact_leases.delete_one({"_id": "busy"})

    async def c1_cancelled() -> bool:
        return [m["status"] for m in await history(client, "c1")] == ["cancelled"]

    await eventually(c1_cancelled)
    [cancelled] = await history(client, "c1")
    assert cancelled["reason"] == "cancelled_by_event"
    await asyncio.sleep(0.5)
    assert [m.contact_id for m in push.delivered] == ["c2"]


async def test_events_after_the_due_time_do_not_hold_a_send(
    make_client: Any, settings: Settings, db: Any
) -> None:
    """Only what happened before the send came due can change it: a contact whose later events wait in
    the inbox (a steady stream of page views) still gets the reminder on time."""
    push = Provider("push", needs="push_tokens")
    flow = setup(settings, [send("push", after="2s", cancel_on=["purchased"], transactional=True)])
    client = await make_client(create_app(flow, registry(push)))
    assert (await client.put("/v1/contacts/c1", json=PROFILE)).status in (200, 201)
    body = {"id": "go-c1", "type": "go", "contact_id": "c1", "attributes": {"code": "X1"}}
    assert (await client.post("/v1/events", json=body)).status == 202

    async def scheduled() -> bool:
        return [m["status"] for m in await history(client, "c1")] == ["scheduled"]

    await eventually(scheduled)
    [message] = await history(client, "c1")
    due = datetime.fromisoformat(message["due_at"])
    until = datetime.now(UTC) + timedelta(minutes=5)
    await db.contact_leases.insert_one(
        {"_id": "busy", "owner": "another", "contacts": ["c1"], "until": until}
    )
    later = {"id": "late-buy", "type": "purchased", "contact_id": "c1",
             "time": (due + timedelta(seconds=30)).isoformat()}  # fmt: skip
    assert (await client.post("/v1/events", json=later)).status == 202

    async def sent() -> bool:
        return [m["status"] for m in await history(client, "c1")] == ["sent"]

    await eventually(sent)
    assert [m.contact_id for m in push.delivered] == ["c1"]
    assert await db.inbox.count_documents({"_id": "late-buy", "state": "pending"}) == 1  # still undecided


async def test_a_send_waits_behind_an_earlier_send_of_its_contact_that_waits(
    make_client: Any, settings: Settings, db: Any
) -> None:
    """Two reminders twelve seconds apart and a cap of one: the first one due is the one sent, as a
    simulation decides, even when it was put back for the inbox and the inbox caught up only after the
    second came due (the second must not overtake it and use the cap up). Twelve seconds: the first's
    back-off passes the second's due time about six seconds before it, room for a slow machine."""
    push = Provider("push", needs="push_tokens")
    flow = setup(settings, [send("push", after="6s"), send("push", after="18s")], frequency_caps={"push": 1})
    client = await make_client(create_app(flow, registry(push)))
    profile = {**PROFILE, "consent": {"push": True}}
    assert (await client.put("/v1/contacts/c1", json=profile)).status in (200, 201)
    body = {"id": "go-c1", "type": "go", "contact_id": "c1", "attributes": {"code": "X1"}}
    assert (await client.post("/v1/events", json=body)).status == 202

    async def both_waiting() -> bool:
        return await db.schedule.count_documents({"contact_id": "c1", "status": "pending"}) == 2

    await eventually(both_waiting)
    first, second = await db.schedule.find({"contact_id": "c1"}).sort("due_at", 1).to_list()
    # c1's next event, from before the first reminder is due, stays undecided (another process has c1).
    until = datetime.now(UTC) + timedelta(minutes=5)
    lease = {"_id": "busy", "owner": "another", "contacts": ["c1"], "until": until}
    await db.contact_leases.insert_one(lease)
    viewed = {"id": "view-c1", "type": "viewed", "contact_id": "c1", "time": datetime.now(UTC).isoformat()}
    assert (await client.post("/v1/events", json=viewed)).status == 202

    async def first_put_back_past_the_second() -> bool:
        entry = await db.schedule.find_one({"_id": first["_id"]})
        return entry is not None and "held_due" in entry and entry["due_at"] > second["due_at"]

    # The first reminder is put back again and again; once its next look is after the second's due
    # time, the inbox catches up: the second comes due with nothing undecided before it.
    await eventually(first_put_back_past_the_second, timeout=30)
    await db.contact_leases.delete_one({"_id": "busy"})

    async def viewed_decided() -> bool:
        return await db.inbox.count_documents({"_id": "view-c1"}) == 0

    await eventually(viewed_decided)
    # What this test is about: nothing undecided holds the second reminder when it comes due.
    assert datetime.now(UTC) < second["due_at"], "the machine is too slow for this test's timing"

    async def both_done() -> bool:
        return [m["status"] for m in await history(client, "c1")].count("scheduled") == 0

    await eventually(both_done, timeout=30)
    fates = {m["message_id"]: (m["status"], m.get("reason")) for m in await history(client, "c1")}
    assert fates == {first["_id"]: ("sent", None), second["_id"]: ("suppressed", "frequency_cap")}
    assert [m.message_id for m in push.delivered] == [first["_id"]]
