"""A backtest job beats while a batch is replayed: the replay of a batch never awaits, so a heartbeat on
the job's event loop stopped for as long as the batch took, and a batch longer than LOST_AFTER got the
job taken as lost (its one-job slot freed for a second job beside it)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest

from rulesvc.config import Settings
from rulesvc.web import views
from rulesvc.web.app import create_app
from tests.test_backtest_api import as_stored, finished, many_events, remind, write_rulesets
from tests.webhook_flow import SECRET, Receiver

LOST_AFTER = timedelta(seconds=3)  # three heartbeats (one a second) may be missed, not more
RULES, PER_CONTACT = 12, 40


async def test_a_batch_longer_than_the_lost_threshold_keeps_its_job_alive(
    make_client: Any, settings: Settings, receiver: Receiver, db: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(views.backtests, "LOST_AFTER", LOST_AFTER)
    # Many rules on each event: seconds of replay from a history quick to store.
    rules = [{**remind(f"{20 + i}m"), "name": f"remind{i}"} for i in range(RULES)]
    write_rulesets(Path(settings.rulesets_dir), {"cart": {"rules": rules}})
    shop = msgspec.structs.replace(settings, channels={"webhook": {"url": receiver.url, "secret": SECRET}})
    client = await make_client(create_app(shop))
    # 500 contacts: one batch, replayed in one go without an await.
    await db.events.insert_many(as_stored(many_events(500, PER_CONTACT)))
    job = await (await client.post("/v1/backtests", json={"since": "7d"})).json()
    # `finished` reads the job every 50 ms; each read marks it lost if its heartbeat is too old.
    ended = await finished(client, job["id"])
    assert ended["status"] == "done", ended
    assert ended["report"]["events"] == 500 * PER_CONTACT
    # The test's own premise: the one batch took longer than the threshold.
    assert ended["report"]["seconds"] > 2 * LOST_AFTER.total_seconds(), ended["report"]["seconds"]
