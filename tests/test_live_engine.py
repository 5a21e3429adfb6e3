"""The engine live on a real mongod: inbox to decisions, the durable schedule, restarts, two processes."""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from rulesvc.channels import ChannelRegistry, Delivery, OutboundMessage
from rulesvc.config import Settings
from rulesvc.core.events import Event
from rulesvc.plugins import builtin_channels
from rulesvc.runtime.inbox import Inbox
from rulesvc.runtime.rulesets import Rulesets
from rulesvc.store.db import Store
from rulesvc.web.app import create_app
from rulesvc.web.keys import INBOX, SCHEDULER
from tests.helpers import an_hour_ago, eventually, write_ruleset


class RecordingChannel:
    """Stands in for a provider: remembers every message it was asked to deliver."""

    idempotent = False

    def __init__(self, name: str, log: list[tuple[str, str]]) -> None:
        self.name = name
        self.log = log

    def status(self) -> tuple[bool, str]:
        return True, "records"

    def reachable(self, contact: dict[str, Any]) -> str | None:
        return None

    async def send(self, message: OutboundMessage) -> Delivery:
        self.log.append((self.name, message.contact_id))
        return Delivery("sent")


def recording(log: list[tuple[str, str]]) -> ChannelRegistry:
    registry = builtin_channels()
    for name in ("push", "email"):
        registry.register(RecordingChannel(name, log))
    return registry


def fast_cart(directory: Path, push_after: str = "1s", email_after: str = "1h") -> None:
    (directory / "templates").mkdir(parents=True, exist_ok=True)
    (directory / "templates" / "cart.title").write_text("Your cart")
    (directory / "templates" / "cart.body").write_text("Still thinking about it? {{ params.value }}")

    def reminder(channel: str, after: str) -> dict[str, Any]:
        # Transactional, so that these engine tests need no consent; the pipeline has tests of its own.
        return {"send": {"channel": channel, "template": "cart", "after": after, "transactional": True,
                         "cancel_on": ["purchased"], "params": {"value": "$attributes.value"}}}  # fmt: skip

    write_ruleset(
        directory,
        "cart",
        {
            "rules": [
                {
                    "name": "remind",
                    "when": {"event": "cart_updated"},
                    "then": [
                        {"count": "carts"},
                        reminder("push", push_after),
                        reminder("email", email_after),
                    ],
                }
            ]
        },
    )


async def messages(client: Any, contact: str) -> list[dict[str, Any]]:
    return list((await (await client.get(f"/v1/contacts/{contact}/messages")).json())["messages"])


async def statuses(client: Any, contact: str) -> dict[str, str]:
    return {m["channel"]: m["status"] for m in await messages(client, contact)}


async def due_now(db: Any, query: dict[str, Any], when: datetime | None = None) -> None:
    """Time passes: the scheduled entries matching `query` fall due (the messages show it too). Tests
    schedule far ahead and then do this, so that no step races a due time on a slow machine."""
    when = when or datetime.now(UTC)
    ids = [e["_id"] async for e in db.schedule.find(query, {"_id": 1})]
    assert ids, f"nothing scheduled matches {query}"
    await db.schedule.update_many({"_id": {"$in": ids}}, {"$set": {"due_at": when}})
    await db.messages.update_many({"_id": {"$in": ids}}, {"$set": {"due_at": when}})


async def test_cart_event_to_sent_push_and_purchase_cancels_email(
    make_client: Any, settings: Settings, db: Any
) -> None:
    fast_cart(Path(settings.rulesets_dir))  # push after 1 s, email after an hour
    log: list[tuple[str, str]] = []
    client = await make_client(create_app(settings, recording(log)))
    at = datetime.now(UTC).replace(microsecond=0)
    event = {"id": "e1", "type": "cart_updated", "contact_id": "c1", "time": at.isoformat(),
             "attributes": {"value": 42}}  # fmt: skip
    assert (await client.post("/v1/events", json=event)).status == 202

    async def push_sent() -> bool:
        return await statuses(client, "c1") == {"push": "sent", "email": "scheduled"}

    await eventually(push_sent)
    push = next(m for m in await messages(client, "c1") if m["channel"] == "push")
    # Due a second after the event, and sent then, not before: the service's own record, not our clock.
    assert datetime.fromisoformat(push["due_at"]) == at + timedelta(seconds=1)
    assert datetime.fromisoformat(push["sent_at"]) >= datetime.fromisoformat(push["due_at"])
    assert (
        await client.post("/v1/events", json={"id": "p1", "type": "purchased", "contact_id": "c1"})
    ).status == 202

    async def email_cancelled() -> bool:
        return (await statuses(client, "c1")).get("email") == "cancelled"

    await eventually(email_cancelled)
    # Past the email's due time it stays cancelled: its entry falls due, then a later send (c2's) goes
    # out; the scheduler takes entries in due order, so it has passed the cancelled one by then.
    await due_now(db, {"contact_id": "c1", "status": "cancelled"}, datetime.now(UTC) - timedelta(seconds=1))
    later = {"id": "e2", "type": "cart_updated", "contact_id": "c2", "attributes": {"value": 1}}
    assert (await client.post("/v1/events", json=later)).status == 202

    async def later_push_sent() -> bool:
        return (await statuses(client, "c2")).get("push") == "sent"

    await eventually(later_push_sent)
    assert await statuses(client, "c1") == {"push": "sent", "email": "cancelled"}
    assert log == [("push", "c1"), ("push", "c2")]
    history = await messages(client, "c1")
    push = next(m for m in history if m["channel"] == "push")
    assert push["params"] == {"value": 42} and push["ruleset"] == "cart" and push["rule"] == "remind"
    email = next(m for m in history if m["channel"] == "email")
    assert (email["reason"], email["detail"]) == ("cancelled_by_event", "cancelled by purchased")


async def test_restart_between_decision_and_due_time_sends_once(
    make_client: Any, settings: Settings, db: Any
) -> None:
    fast_cart(Path(settings.rulesets_dir), push_after="1h", email_after="1h")
    log: list[tuple[str, str]] = []
    first = await make_client(create_app(settings, recording(log)))
    event = {"id": "r1", "type": "cart_updated", "contact_id": "c1", "attributes": {"value": 5}}
    assert (await first.post("/v1/events", json=event)).status == 202

    async def decided() -> bool:
        return await db.schedule.count_documents({"status": "pending"}) == 2

    await eventually(decided)
    await first.close()  # the service stops before anything is due
    assert log == []
    await due_now(db, {"status": "pending"})  # ... and the time comes while it is down

    second = await make_client(create_app(settings, recording(log)))

    async def both_done() -> bool:
        return await statuses(second, "c1") == {"push": "sent", "email": "sent"} and (
            await db.schedule.count_documents({"status": "done"}) == 2
        )

    await eventually(both_done)
    assert sorted(log) == [("email", "c1"), ("push", "c1")]
    assert await db.schedule.count_documents({"status": {"$ne": "done"}}) == 0
    assert await db.inbox.count_documents({"state": "pending"}) == 0


async def test_two_processes_share_the_work_and_never_send_twice(
    make_client: Any, settings: Settings, db: Any
) -> None:
    fast_cart(Path(settings.rulesets_dir), push_after="1h", email_after="1h")
    log: list[tuple[str, str]] = []
    apps = [await make_client(create_app(settings, recording(log))) for _ in range(2)]
    contacts = [f"c{i}" for i in range(60)]
    posts = []
    for n in range(5):  # five cart updates per contact, alternating between the two services
        batch = [{"id": f"e{n}-{c}", "type": "cart_updated", "contact_id": c, "attributes": {"value": n}}
                 for c in contacts]  # fmt: skip
        posts.append(apps[n % 2].post("/v1/events", json=batch))
    assert [r.status for r in await asyncio.gather(*posts)] == [202] * 5

    async def all_decided() -> bool:
        return await db.inbox.count_documents({"state": "pending"}) == 0

    await eventually(all_decided)
    # Re-armed four times, the last one waits: all fall due at once, for both processes to take.
    assert await db.schedule.count_documents({"status": "pending"}) == 2 * len(contacts)
    await due_now(db, {"status": "pending"})

    async def all_done() -> bool:
        return await db.schedule.count_documents({"status": "done"}) == 2 * len(contacts) and (
            await db.messages.count_documents({"status": "sent"}) == 2 * len(contacts)
        )

    await eventually(all_done)
    assert Counter(log) == Counter({(ch, c): 1 for c in contacts for ch in ("push", "email")})
    # Every event evaluated exactly once: the counter each cart update bumps equals the updates posted.
    async for contact in db.contacts.find({}):
        assert contact["state"]["counters"]["carts"]["n"] == 5, contact["_id"]
    # Re-armed four times, sent once: the history shows the four cancelled ones.
    assert await db.messages.count_documents({"status": "cancelled"}) == 4 * 2 * len(contacts)
    workers = [app.server.app for app in apps]
    assert sum(w[INBOX].processed for w in workers) == 5 * len(contacts)
    assert sum(w[SCHEDULER].fired for w in workers) == 2 * len(contacts)


def with_step_order(settings: Settings) -> Settings:
    """A ruleset that remembers the order in which a contact's `step` events were evaluated."""
    write_ruleset(
        Path(settings.rulesets_dir),
        "order",
        {"rules": [{"name": "last", "when": {"event": "step"},
                    "then": [{"remember": {"name": "steps", "from": "attributes.n", "append": True}}]}]},
    )  # fmt: skip
    return settings


async def test_events_of_one_contact_are_evaluated_in_time_order(
    make_client: Any, settings: Settings, db: Any
) -> None:
    client = await make_client(create_app(with_step_order(settings)))
    # Posted newest first: the inbox still evaluates them by event time.
    events = [{"id": f"s{n}", "type": "step", "contact_id": "c1", "time": f"2026-11-22T10:00:0{n}Z",
               "attributes": {"n": n}} for n in reversed(range(6))]  # fmt: skip
    assert (await client.post("/v1/events", json=events)).status == 202

    async def processed() -> bool:
        return await db.inbox.count_documents({"state": "pending"}) == 0

    await eventually(processed)
    contact = await db.contacts.find_one({"_id": "c1"})
    assert contact["state"]["values"]["steps"]["v"] == [0, 1, 2, 3, 4, 5]


async def test_a_backlog_is_taken_in_bounded_batches_still_in_time_order(
    make_client: Any, settings: Settings, db: Any
) -> None:
    client = await make_client(create_app(with_step_order(settings)))
    inbox = client.server.app[INBOX]
    inbox.max_events = 7  # a contact's 60 events cannot go in one transaction
    events = [{"id": f"b{n}", "type": "step", "contact_id": f"c{n % 2}", "time": f"2026-11-22T10:{n:02d}:00Z",
               "attributes": {"n": n}} for n in reversed(range(60))]  # fmt: skip
    assert (await client.post("/v1/events", json=events)).status == 202

    async def processed() -> bool:
        return await db.inbox.count_documents({"state": "pending"}) == 0

    await eventually(processed)
    for c in (0, 1):
        contact = await db.contacts.find_one({"_id": f"c{c}"})
        assert contact["state"]["values"]["steps"]["v"] == list(range(c, 60, 2))


async def test_the_contacts_that_waited_longest_go_first(settings: Settings, db: Any) -> None:
    """Under a steady flow for some contacts, a contact whose event came earlier is not starved."""
    write_ruleset(
        Path(settings.rulesets_dir),
        "count",
        {"rules": [{"name": "n", "when": {"event": "step"}, "then": [{"count": "steps"}]}]},
    )
    rulesets = Rulesets(Path(settings.rulesets_dir), builtin_channels().names())
    rulesets.reload()
    store = Store(db.client, settings.database, timedelta(days=1))
    await store.ensure_schema()
    t0 = an_hour_ago()
    # "z9" (last in key order) waited longest; "a0".."a5" came after it.
    await store.insert_events([Event(id="z", type="step", contact_id="z9")], now=t0)
    for n in range(6):
        later = t0 + timedelta(seconds=n + 1)
        await store.insert_events([Event(id=f"a{n}", type="step", contact_id=f"a{n}")], now=later)
    inbox = Inbox(store, rulesets, batch_size=2)
    try:
        await inbox.process_once()
    finally:
        for compiled in rulesets.live.values():
            compiled.free()
    decided = {d["_id"] async for d in db.events.find({})} - {d["_id"] async for d in db.inbox.find({})}
    assert decided == {"z", "a0"}


async def test_schedule_survives_and_ruleset_removed_cancels(
    make_client: Any, settings: Settings, db: Any
) -> None:
    fast_cart(Path(settings.rulesets_dir), push_after="1h", email_after="1h")
    client = await make_client(create_app(settings))
    event = {"id": "x1", "type": "cart_updated", "contact_id": "c1", "attributes": {"value": 1}}
    await client.post("/v1/events", json=event)

    async def decided() -> bool:
        return await db.schedule.count_documents({"status": "pending"}) == 2

    await eventually(decided)
    (Path(settings.rulesets_dir) / "cart.json").unlink()
    resp = await client.post("/v1/rulesets/reload")
    assert (await resp.json())["rulesets"] == []
    await due_now(db, {"status": "pending"})  # the entries outlive the ruleset; they are dropped when due

    async def cancelled() -> bool:
        return await statuses(client, "c1") == {"push": "cancelled", "email": "cancelled"}

    await eventually(cancelled)
    assert {m["reason"] async for m in db.messages.find({})} == {"ruleset_removed"}
