"""Message retention (RULESVC_MESSAGE_RETENTION_DAYS): TTL indexes on the message history and the schedule,
applied by MongoDB itself. The test mongod runs its TTL monitor every second (`ttlMonitorSleepSecs=1`,
checked below), so the test waits for real deletions: an old final message and an old done schedule entry
go; an old message still scheduled or sending, a pending entry, and anything recent stay."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest

from rulesvc.config import ConfigError, Settings, load_settings
from rulesvc.store.db import Store
from rulesvc.web.app import create_app
from tests.helpers import entry_doc, eventually, message_doc

DAY = 86400


async def ttl_passes(db: Any) -> int:
    return int((await db.client.admin.command("serverStatus"))["metrics"]["ttl"]["passes"])


async def test_the_service_builds_the_ttl_indexes_with_its_setting(
    make_client: Any, settings: Settings, db: Any
) -> None:
    await make_client(create_app(msgspec.structs.replace(settings, message_retention_days=30)))
    messages = (await db.messages.index_information())["messages_ttl"]
    assert (messages["key"], messages["expireAfterSeconds"]) == ([("created_at", 1)], 30 * DAY)
    statuses = set(messages["partialFilterExpression"]["status"]["$in"])
    assert {
        "sent",
        "failed",
        "suppressed",
        "cancelled",
        "dead",
        "uncertain",
        "held_out",
        "opened",
    } <= statuses
    assert statuses.isdisjoint({"scheduled", "sending"})
    schedule = (await db.schedule.index_information())["schedule_ttl"]
    assert (schedule["key"], schedule["expireAfterSeconds"]) == ([("done_at", 1)], 30 * DAY)
    assert "partialFilterExpression" not in schedule

    # Another setting: the service changes both in place; a CLI process (no change_ttl) leaves them.
    await Store(db.client, db.name, timedelta(days=90), message_retention=timedelta(days=7)).ensure_schema()
    assert (await db.messages.index_information())["messages_ttl"]["expireAfterSeconds"] == 30 * DAY
    changed = Store(db.client, db.name, timedelta(days=90), message_retention=timedelta(days=7))
    await changed.ensure_schema(change_ttl=True)
    assert (await db.messages.index_information())["messages_ttl"]["expireAfterSeconds"] == 7 * DAY
    assert (await db.schedule.index_information())["schedule_ttl"]["expireAfterSeconds"] == 7 * DAY


async def test_mongodb_removes_old_final_messages_and_done_entries_only(db: Any) -> None:
    params = await db.client.admin.command("getParameter", 1, ttlMonitorSleepSecs=1)
    assert params["ttlMonitorSleepSecs"] == 1  # else this test would wait a minute per TTL pass
    store = Store(db.client, db.name, timedelta(days=90), message_retention=timedelta(days=1))
    await store.ensure_schema(change_ttl=True)
    now = datetime.now(UTC)
    old, recent = now - timedelta(days=2), now - timedelta(hours=1)
    messages = [
        message_doc("old-sent", "c1", "email", old, status="sent", sent_at=old),
        message_doc("old-dead", "c1", "email", old, status="dead"),
        message_doc("old-cancelled", "c1", "email", old, status="cancelled"),
        message_doc("old-scheduled", "c1", "email", old),  # due long ago, not sent yet (a paused service)
        message_doc("old-sending", "c1", "email", old, status="sending"),
        message_doc("recent-sent", "c1", "email", recent, status="sent", sent_at=recent),
    ]
    await db.messages.insert_many(messages)
    await db.schedule.insert_many([
        entry_doc(messages[0], status="done", done_at=old),
        entry_doc(messages[3]),  # pending: no done_at
        entry_doc(messages[4], status="running", owner="w1"),
        entry_doc(messages[5], status="done", done_at=recent),
    ])  # fmt: skip

    async def removed() -> bool:
        ids = {d["_id"] async for d in db.messages.find({}, {"_id": 1})}
        entries = {d["_id"] async for d in db.schedule.find({}, {"_id": 1})}
        return not ids & {"old-sent", "old-dead", "old-cancelled"} and "old-sent" not in entries

    await eventually(removed, timeout=30)
    passes = await ttl_passes(db)
    await eventually(lambda: _more(db, passes + 1), timeout=30)  # one more whole pass over both indexes
    assert sorted([d["_id"] async for d in db.messages.find({}, {"_id": 1})]) == [
        "old-scheduled", "old-sending", "recent-sent"
    ]  # fmt: skip
    assert sorted([d["_id"] async for d in db.schedule.find({}, {"_id": 1})]) == [
        "old-scheduled", "old-sending", "recent-sent"
    ]  # fmt: skip


async def _more(db: Any, at_least: int) -> bool:
    return await ttl_passes(db) >= at_least


def test_the_setting_is_read_and_checked() -> None:
    assert load_settings(environ={"RULESVC_MESSAGE_RETENTION_DAYS": "30"}).message_retention_days == 30
    assert load_settings(environ={}).message_retention_days == 365
    with pytest.raises(ConfigError, match="message_retention_days must be positive"):
        load_settings(environ={"RULESVC_MESSAGE_RETENTION_DAYS": "0"})
