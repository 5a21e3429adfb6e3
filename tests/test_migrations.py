"""The migration runner on a real mongod: versions recorded, each migration run once even when several
processes start at once, an interrupted upgrade finished by the next start, a dead migrator's lock taken
over, and a newer database refused. The migrations here are the test's own, counting their runs; the
shipped ones are tested from a real 0.1.0 database in tests/test_upgrade.py."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from rulesvc.config import Settings
from rulesvc.store.db import Store
from rulesvc.store.migrations import (
    LOCK,
    MIGRATIONS,
    SCHEMA_VERSION,
    Migration,
    SchemaError,
    refuse_newer,
    upgrade,
)


@pytest.fixture
async def store(db: Any, settings: Settings) -> Store:
    return Store(db.client, settings.database, timedelta(days=30))


class Counted:
    """Migrations that count their runs and write a marker document each, as a real one writes data."""

    def __init__(self, fail_once: str | None = None, pause: float = 0.0) -> None:
        self.runs: dict[str, int] = {}
        self.fail_once = fail_once
        self.pause = pause

    def step(self, version: int, name: str) -> Migration:
        async def run(store: Store) -> None:
            self.runs[name] = self.runs.get(name, 0) + 1
            await asyncio.sleep(self.pause)
            if name == self.fail_once and self.runs[name] == 1:
                raise RuntimeError("killed half-way")
            await store.db["marks"].update_one({"_id": name}, {"$inc": {"n": 1}}, upsert=True)

        return Migration(version, name, run)

    def all(self) -> list[Migration]:
        return [self.step(1, "one"), self.step(2, "two"), self.step(3, "three")]


async def test_versions_are_recorded_and_nothing_runs_twice(store: Store) -> None:
    counted = Counted()
    assert await upgrade(store, counted.all()) == ["one", "two", "three"]
    assert await upgrade(store, counted.all()) == []
    schema = await store.db["meta"].find_one({"_id": "schema"})
    assert schema is not None and schema["version"] == 3
    assert [a["name"] for a in schema["applied"]] == ["one", "two", "three"]
    assert counted.runs == {"one": 1, "two": 1, "three": 1}
    assert await store.db["meta"].find_one({"_id": LOCK}) is None  # released


async def test_an_interrupted_upgrade_is_finished_by_the_next_start(store: Store) -> None:
    counted = Counted(fail_once="two")
    with pytest.raises(RuntimeError, match="killed half-way"):
        await upgrade(store, counted.all())
    assert (await store.db["meta"].find_one({"_id": "schema"}) or {})["version"] == 1
    assert await upgrade(store, counted.all()) == ["two", "three"]
    assert counted.runs == {"one": 1, "two": 2, "three": 1}  # `one` is not run again


async def test_processes_starting_together_migrate_once(store: Store, settings: Settings, db: Any) -> None:
    counted = Counted(pause=0.3)
    others = [Store(db.client, settings.database, timedelta(days=30)) for _ in range(3)]
    results = await asyncio.gather(
        *(upgrade(s, counted.all(), owner=f"p{i}", poll=0.05) for i, s in enumerate([store, *others]))
    )
    assert sorted(map(len, results)) == [0, 0, 0, 3]
    assert counted.runs == {"one": 1, "two": 1, "three": 1}
    marks = await store.db["marks"].find().to_list()
    assert {m["_id"]: m["n"] for m in marks} == {"one": 1, "two": 1, "three": 1}


async def test_a_dead_migrators_lock_runs_out_and_is_taken_over(store: Store) -> None:
    await store.db["meta"].insert_one(
        {"_id": LOCK, "owner": "dead", "until": datetime.now(UTC) + timedelta(seconds=1)}
    )
    counted = Counted()
    started = datetime.now(UTC)
    assert await upgrade(store, counted.all(), poll=0.05) == ["one", "two", "three"]
    assert datetime.now(UTC) - started >= timedelta(seconds=0.9)  # it waited for the lock to run out


async def test_a_newer_database_is_refused_and_left_alone(store: Store) -> None:
    await store.db["meta"].insert_one({"_id": "schema", "version": SCHEMA_VERSION + 7})
    with pytest.raises(SchemaError, match=f"schema version {SCHEMA_VERSION + 7}, written by a newer rulesvc"):
        await refuse_newer(store)
    counted = Counted()
    with pytest.raises(SchemaError):
        await upgrade(store, counted.all()[:1])
    assert counted.runs == {}


def test_the_shipped_migrations_are_in_version_order() -> None:
    versions = [m.version for m in MIGRATIONS]
    assert versions == list(range(1, len(MIGRATIONS) + 1))
    assert SCHEMA_VERSION == len(MIGRATIONS)


async def test_a_migrator_that_loses_its_lock_stops_and_records_nothing(store: Store) -> None:
    """Its lock taken by another process (it ran out while the database was away): the migration running
    is stopped, its version not recorded, and the other process's run is the one that counts."""
    counted = Counted(pause=5.0)  # long enough for the lock to be lost under it

    async def steal() -> None:
        await asyncio.sleep(0.3)
        await store.db["meta"].update_one({"_id": LOCK}, {"$set": {"owner": "another"}})

    thief = asyncio.create_task(steal())
    with pytest.raises(SchemaError, match="lost the migration lock"):
        await upgrade(store, counted.all()[:1], lock_for=timedelta(seconds=0.6))
    await thief
    assert await store.db["meta"].find_one({"_id": "schema"}) is None
    assert await store.db["marks"].find_one({"_id": "one"}) is None  # stopped before it wrote
