"""The reason codes are one table (rulesvc/core/reasons.py) that docs/channels.md documents row by row,
and the due-queue query behind `rulesvc_due_messages` counts what is overdue, on a real mongod."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pymongo import AsyncMongoClient

from rulesvc.config import Settings
from rulesvc.core.reasons import REASONS, split_code
from rulesvc.store.db import Store
from rulesvc.store.schedule import Schedule

DOCS = Path(__file__).resolve().parent.parent / "docs" / "channels.md"


def test_the_docs_list_every_reason_code_and_no_other() -> None:
    text = DOCS.read_text()
    section = text[text.index("## Reason codes") :]
    section = section[: section.index("\n## ")]
    rows = re.findall(r"^\| `([a-z_]+)` \| ([^|]+) \| ([^|]+) \|$", section, re.MULTILINE)
    assert {code: (status.strip(), meaning.strip()) for code, status, meaning in rows} == REASONS


def test_a_plugin_may_name_its_code() -> None:
    assert split_code("template_error: `.url` must be http(s)", "provider_rejected") == (
        "template_error",
        "`.url` must be http(s)",
    )
    assert split_code("HTTP 400: bad", "provider_rejected") == ("provider_rejected", "HTTP 400: bad")
    assert split_code(None, "provider_error") == ("provider_error", None)


async def test_the_due_queue_counts_overdue_sends_only(mongod: Any, settings: Settings) -> None:
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongod.uri, tz_aware=True)
    try:
        store = Store(client, settings.database, timedelta(days=1))
        await store.ensure_schema()
        now = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
        entries = [
            ("late", now - timedelta(minutes=7), "pending", True),
            ("later", now - timedelta(seconds=30), "pending", True),
            ("future", now + timedelta(minutes=1), "pending", True),  # not due yet
            ("timer", now - timedelta(hours=1), "pending", False),  # a wait's else, not a send
            ("taken", now - timedelta(hours=2), "running", True),  # being sent now
            ("done", now - timedelta(hours=3), "done", True),
        ]
        await store.schedule.insert_many(
            [
                {"_id": i, "due_at": at, "status": status}
                | ({"message": {"channel": "email"}} if send else {})
                for i, at, status, send in entries
            ]
        )
        assert await Schedule(store).due_sends(now) == (2, now - timedelta(minutes=7))
        assert await Schedule(store).due_sends(now - timedelta(hours=5)) == (0, None)
    finally:
        await client.drop_database(settings.database)
        await client.close()
