"""A CLI process never changes the service's schema: run from a shell without the service's
RULESVC_EVENT_RETENTION_DAYS, it must not cut the events' TTL (MongoDB would then delete the older
events within a minute), and `rulesvc backtest`, read-only, builds nothing at all."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

from rulesvc.config import Settings
from rulesvc.store.db import Store
from rulesvc.store.migrations import prepare
from tests.test_backtest_api import remind, write_rulesets

YEAR = 365 * 86400


def cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RULESVC_", "MONGODB_"))}
    env |= {"MONGODB_URI": settings.mongodb_uri or "", "RULESVC_DATABASE": settings.database,
            "RULESVC_RULESETS_DIR": settings.rulesets_dir, "RULESVC_DATA_DIR": settings.data_dir,
            "RULESVC_CHANNEL_WEBHOOK_URL": "http://127.0.0.1:9/hook", "RULESVC_QUIET_HOURS": "",
            "RULESVC_CHANNEL_WEBHOOK_SECRET": "s" * 32}  # fmt: skip
    return subprocess.run([sys.executable, "-m", "rulesvc", *args], env=env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip


async def schema(db: Any) -> dict[str, Any]:
    """Every collection's options and indexes (with their TTLs): what a CLI process must leave alone."""
    found: dict[str, Any] = {}
    for info in await (await db.list_collections()).to_list():
        name = info["name"]
        found[name] = (info.get("options"), await db[name].index_information())
    return found


async def test_cli_commands_leave_the_services_retention_alone(settings: Settings, db: Any) -> None:
    write_rulesets(Path(settings.rulesets_dir), {"cart": {"rules": [remind("20m")]}})
    await prepare(Store(db.client, db.name, timedelta(days=365)), change_ttl=True)  # as the service starts
    await db.contacts.insert_one({"_id": "c1", "consent": {"webhook": True}})
    before = await schema(db)
    assert before["events"][1]["events_ttl"]["expireAfterSeconds"] == YEAR

    for args in (
        ("backtest", "--since", "1d", "--json"),
        ("events", "quarantine", "list"),
        ("messages", "list"),
        ("contacts", "show", "c1"),
    ):
        result = cli(settings, *args)
        assert result.returncode == 0, (args, result.stderr)
        assert await schema(db) == before, args  # the default retention is 90 days: still 365

    # A service started with another retention does change it: the setting is the service's.
    await prepare(Store(db.client, db.name, timedelta(days=30)), change_ttl=True)
    assert (await db.events.index_information())["events_ttl"]["expireAfterSeconds"] == 30 * 86400
    # An erased contact's event ids are kept as long as events (the CLI runs above left it at a year).
    assert before["erased_events"][1]["erased_events_ttl"]["expireAfterSeconds"] == YEAR
    erased = await db.erased_events.index_information()
    assert erased["erased_events_ttl"]["expireAfterSeconds"] == 30 * 86400
