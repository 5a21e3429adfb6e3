"""Schema versions: what layout a database holds, and the upgrades from each release's to this one's.

A database records its version in `meta` (`_id: "schema"`); one written by 0.1.0, the last release before
versions, has no such document and is version 0. At start the service refuses a database newer than it
knows (an older binary must not write an old layout into a newer database), creates the indexes this
release needs, then runs each migration the database has not had, in order, recording the version after
each one. Migrations are idempotent and resumable: a crash half-way and a restart finish the job. Several
processes may start at once (workers, instances on one replica set): one holds the lock and migrates, the
others wait for the version to arrive."""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pymongo
import structlog
from pymongo import DESCENDING, ReturnDocument
from pymongo.errors import DuplicateKeyError, PyMongoError

from rulesvc import __version__
from rulesvc.store.db import Store
from rulesvc.store.event_queue import PENDING, migrate_event_queue, older_release_indexes
from rulesvc.store.leases import drop_unused_indexes

log = structlog.get_logger(__name__)

SCHEMA = "schema"
LOCK = "migration"
LOCK_FOR = timedelta(seconds=60)  # renewed every `LOCK_FOR / 6` while a migration runs


@dataclass(frozen=True)
class Migration:
    version: int  # the schema version the database has once this ran
    name: str
    run: Callable[[Store], Coroutine[Any, Any, object]]


# In version order; the last one's version is this release's schema version.
MIGRATIONS: tuple[Migration, ...] = (
    # 0.1.0 -> 0.2.0: undecided events move to the queue (`inbox`); events are no longer rewritten.
    Migration(1, "event_queue", migrate_event_queue),
    # 0.1.0 -> 0.2.0: indexes no query reads (BENCHMARKS.md, the index audit).
    Migration(2, "drop_unused_indexes", drop_unused_indexes),
)

SCHEMA_VERSION = MIGRATIONS[-1].version if MIGRATIONS else 0


class SchemaError(RuntimeError):
    """The database's schema cannot be used by this release (newer, or older when not upgrading)."""


def process_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


async def stored_version(store: Store) -> int:
    doc = await store.db["meta"].find_one({"_id": SCHEMA}, {"version": 1})
    return int(doc["version"]) if doc else 0


async def refuse_newer(store: Store, known: int = SCHEMA_VERSION) -> int:
    """The database's version, unless it is newer than this release knows: then a clear refusal."""
    version = await stored_version(store)
    if version > known:
        raise SchemaError(
            f"database {store.db.name!r} has schema version {version}, written by a newer rulesvc; this "
            f"rulesvc {__version__} knows versions up to {known}. Run the newer release (rulesvc does not "
            "downgrade a database)."
        )
    return version


async def older_release_seen(store: Store, version: int | None = None) -> str | None:
    """One sentence when a process of the release before (0.1.0, which checks no version) has started on
    this database since its upgrade (`version`: the stored one, when the caller has read it): the events
    it accepts are stored its way, so only it decides them, and what it leaves undecided when stopped
    waits until `take_back`."""
    if (await stored_version(store) if version is None else version) < 1:
        return None  # not upgraded: its indexes belong here
    names = await older_release_indexes(store)
    if not names:
        return None
    return (
        f"an older rulesvc (0.1.0) has started on database {store.db.name!r} since its upgrade (it created "
        f"the index events.{names[0]} again): only it decides the events it accepts. Stop it, then run "
        "`rulesvc migrate` so that this release decides what it left"
    )


OLDER_RELEASE_QUIET = timedelta(minutes=5)


async def take_back(store: Store, *, force: bool = False) -> Counter[str] | None:
    """What `rulesvc migrate` does after `prepare` once the older release is stopped: its undecided (and
    quarantined) events get their queue documents, counted by state, and the indexes it made again go
    (the upgrade's migrations again). None when there is nothing to take back. Refused while an event
    stored its way arrived within `OLDER_RELEASE_QUIET` (it may still run: an event it is deciding would
    be decided twice) unless `force`. No lock: both migrations are safe to run twice at once (a queue
    document is inserted only where none is, in the transaction that reads the event's state; an index
    gone is fine)."""
    if not await older_release_indexes(store):  # `prepare` left the version current
        return None
    if not force:
        newest = await store.events.find_one(
            {"state": PENDING}, {"received_at": 1}, sort=[("received_at", DESCENDING)]
        )
        received = newest and newest.get("received_at")
        if isinstance(received, datetime):
            ago = datetime.now(UTC) - (received if received.tzinfo else received.replace(tzinfo=UTC))
            if ago < OLDER_RELEASE_QUIET:
                raise SchemaError(
                    f"the older rulesvc stored an event {max(ago.total_seconds(), 0):.0f} s ago: is it still "
                    f"running? Stop it first (an event it is deciding would be decided twice), then run "
                    f"`rulesvc migrate` again after {OLDER_RELEASE_QUIET.total_seconds():.0f} s of quiet, or "
                    "now with --force"
                )
    moved = await migrate_event_queue(store)
    await drop_unused_indexes(store)
    return moved


DATA_COLLECTIONS = ("events", "contacts", "messages", "schedule")


async def prepare_for_command(store: Store) -> None:
    """For commands other than `serve` and `migrate` (an operator's look at the data): they never upgrade
    a database that holds data (an older release may still serve it, and would go on writing its layout
    after the upgrade), but set up an empty one as `serve` would."""
    version = await refuse_newer(store)
    if version < SCHEMA_VERSION:
        names = set(await store.db.list_collection_names())
        for name in DATA_COLLECTIONS:
            if name in names and await store.db[name].find_one({}, {"_id": 1}) is not None:
                raise SchemaError(
                    f"database {store.db.name!r} has schema version {version}; this rulesvc {__version__} "
                    f"needs {SCHEMA_VERSION}. Stop the older release, then start `rulesvc serve` of this "
                    "one or run `rulesvc migrate` to upgrade it."
                )
    await prepare(store)


async def prepare(store: Store, *, change_ttl: bool = False, index_seconds: float = 120.0) -> list[str]:
    """What a starting service does before it reads or writes anything else. Returns the migrations run.
    The index builds get `index_seconds` (longer than a request); a migration's operations each get the
    client's deadline, the migration as long as it takes (a large database takes a while)."""
    await refuse_newer(store)
    with pymongo.timeout(index_seconds):
        await store.ensure_schema(change_ttl=change_ttl)
    return await upgrade(store)


async def upgrade(
    store: Store,
    migrations: Sequence[Migration] = MIGRATIONS,
    *,
    owner: str | None = None,
    poll: float = 0.5,
    lock_for: timedelta = LOCK_FOR,
) -> list[str]:
    """Runs the migrations the database has not had, under the lock; returns their names (none when
    another process did them while this one waited)."""
    target = migrations[-1].version if migrations else 0
    owner = owner or process_id()
    while True:
        version = await refuse_newer(store, target)
        if version >= target:
            return []
        if await _take_lock(store, owner, lock_for):
            break
        await asyncio.sleep(poll)  # another process migrates; its version arrives, or its lock runs out
    renew = asyncio.create_task(_keep_lock(store, owner, lock_for), name="migration-lock")
    done: list[str] = []
    try:
        for migration in migrations:
            if migration.version <= await stored_version(store):
                continue
            log.info("migration.started", version=migration.version, migration=migration.name)
            started = datetime.now(UTC)
            run: asyncio.Task[object] = asyncio.create_task(
                migration.run(store), name=f"migration-{migration.name}"
            )
            await asyncio.wait([run, renew], return_when=asyncio.FIRST_COMPLETED)
            if not run.done():  # the lock was lost (see `_keep_lock`): another process may migrate now
                run.cancel()
                await asyncio.gather(run, return_exceptions=True)
                raise SchemaError(f"migration {migration.name}: this process lost the migration lock")
            run.result()
            if not await _holds(store, owner):
                raise SchemaError(f"migration {migration.name}: this process lost the migration lock")
            await _record(store, migration, started)
            log.info("migration.done", version=migration.version, migration=migration.name,
                     seconds=round((datetime.now(UTC) - started).total_seconds(), 3))  # fmt: skip
            done.append(migration.name)
    finally:
        renew.cancel()
        await asyncio.gather(renew, return_exceptions=True)
        await store.db["meta"].delete_one({"_id": LOCK, "owner": owner})
    return done


async def _record(store: Store, migration: Migration, started: datetime) -> None:
    applied = {"version": migration.version, "name": migration.name, "release": __version__,
               "started_at": started, "finished_at": datetime.now(UTC)}  # fmt: skip
    await store.db["meta"].update_one(
        {"_id": SCHEMA}, {"$max": {"version": migration.version}, "$push": {"applied": applied}}, upsert=True
    )


async def _take_lock(store: Store, owner: str, lock_for: timedelta) -> bool:
    now = datetime.now(UTC)
    try:
        doc: dict[str, Any] | None = await store.db["meta"].find_one_and_update(
            {"_id": LOCK, "$or": [{"until": {"$lt": now}}, {"owner": owner}]},
            {"$set": {"owner": owner, "until": now + lock_for, "since": now}},
            upsert=True,
            return_document=ReturnDocument.AFTER,
        )
    except DuplicateKeyError:
        return False  # held by another process, not yet run out
    return doc is not None and doc.get("owner") == owner


async def _holds(store: Store, owner: str) -> bool:
    return await store.db["meta"].find_one({"_id": LOCK, "owner": owner}, {"_id": 1}) is not None


async def _keep_lock(store: Store, owner: str, lock_for: timedelta) -> None:
    """Renews the lock while the migrations run; returns (ending them) once it is no longer ours, or when
    it could not be renewed before it ran out (the database away that long)."""
    renewed = datetime.now(UTC)
    while True:
        await asyncio.sleep(lock_for.total_seconds() / 6)
        try:
            result = await store.db["meta"].update_one(
                {"_id": LOCK, "owner": owner}, {"$set": {"until": datetime.now(UTC) + lock_for}}
            )
        except PyMongoError as exc:
            if datetime.now(UTC) - renewed < lock_for / 2:
                log.warning("migration.lock_not_renewed", error=str(exc)[:300])
                continue
            log.error("migration.lock_lost", error=str(exc)[:300])
            return
        if result.matched_count != 1:
            log.error("migration.lock_lost", owner=owner)
            return
        renewed = datetime.now(UTC)
