"""The durable schedule: every delayed decision is a document in `schedule`, run once when due.

Entries are claimed in batches with a lease (`status: running`, an owner token and `lease_until`), so two
processes never run the same entry; a process that dies mid-batch loses its lease and the entries go
back to `pending`. Each entry's effect is written idempotently before the entry is marked done: a send
goes through the delivery pipeline and outbox (rulesvc.delivery), and a wait's `else` becomes one
internal event in the inbox under a fixed id.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from pymongo import ASCENDING, UpdateOne
from pymongo.errors import BulkWriteError

from rulesvc.delivery import Dispatcher, Result
from rulesvc.engine import timer_event
from rulesvc.store import DUPLICATE_KEY, PENDING, Doc, Store
from rulesvc.waiting import Every, renewing, work_loop

log = structlog.get_logger(__name__)


class Scheduler:
    def __init__(
        self,
        store: Store,
        dispatcher: Dispatcher,
        live_rulesets: Callable[[], set[str]],
        *,
        batch_size: int = 1000,
        concurrency: int = 64,
        lease: timedelta = timedelta(seconds=60),
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        on_timer_event: Callable[[], None] | None = None,
    ) -> None:
        self.store = store
        self.dispatcher = dispatcher
        self.concurrency = concurrency
        self.live_rulesets = live_rulesets
        self.batch_size = batch_size
        self.lease = lease
        self.clock = clock
        self.on_timer_event = on_timer_event
        self.wake = asyncio.Event()
        self.fired = 0
        self._expired_look = Every(lease / 4)

    def due_soon(self, due_at: datetime) -> None:
        """The inbox scheduled something: look again now instead of at the next poll."""
        self.wake.set()

    async def run(self, stop: asyncio.Event, max_sleep: float = 0.25) -> None:
        async def step() -> float:
            if await self.fire_due():
                return 0.0
            return await self._until_next_due(max_sleep)

        await work_loop("scheduler", step, stop, self.wake)

    async def _until_next_due(self, max_sleep: float) -> float:
        nxt = await self.store.schedule.find_one(
            {"status": "pending"}, {"due_at": 1}, sort=[("due_at", ASCENDING)]
        )
        if nxt is None:
            return max_sleep
        seconds: float = (nxt["due_at"] - self.clock()).total_seconds()
        return max(0.0, min(max_sleep, seconds))

    async def _claim(self, now: datetime) -> list[Doc]:
        # The look scans every running entry: too much for every claim under load.
        if self._expired_look.due(now):
            await self.store.schedule.update_many(
                {"status": "running", "lease_until": {"$lt": now}},
                {"$set": {"status": "pending"}, "$unset": {"owner": "", "lease_until": ""}},
            )
        ids = [
            d["_id"]
            async for d in self.store.schedule.find(
                {"status": "pending", "due_at": {"$lte": now}}, {"_id": 1}, sort=[("due_at", ASCENDING)]
            ).limit(self.batch_size)
        ]
        if not ids:
            return []
        token = uuid.uuid4().hex
        await self.store.schedule.update_many(
            {"_id": {"$in": ids}, "status": "pending"},
            {"$set": {"status": "running", "owner": token, "lease_until": now + self.lease}},
        )
        return await self.store.schedule.find({"owner": token, "status": "running"}).to_list()

    async def fire_due(self) -> int:
        now = self.clock()
        entries = await self._claim(now)
        if not entries:
            return 0
        live = self.live_rulesets()
        removed = [e for e in entries if e["ruleset"] not in live]
        sends = [e for e in entries if e["ruleset"] in live and "message" in e]
        timers = [e for e in entries if e["ruleset"] in live and "message" not in e]
        owner = entries[0]["owner"]

        async def renew() -> None:
            await self.store.schedule.update_many(
                {"owner": owner, "status": "running"}, {"$set": {"lease_until": self.clock() + self.lease}}
            )

        async with renewing("scheduler", renew, self.lease.total_seconds() / 3):
            results = await self._dispatch(sends, now) if sends else []
            if timers:
                await self._insert_timer_events(timers, now)
            await self._record(owner, results, timers, removed, now)
        self.fired += len(entries)
        if timers and self.on_timer_event is not None:
            self.on_timer_event()
        return len(entries)

    async def _dispatch(self, entries: list[Doc], now: datetime) -> list[tuple[Doc, Result]]:
        ids = [e["_id"] for e in entries]
        messages = {m["_id"]: m async for m in self.store.messages.find({"_id": {"$in": ids}})}
        contact_ids = list({e["contact_id"] for e in entries})
        contacts = {c["_id"]: c async for c in self.store.contacts.find({"_id": {"$in": contact_ids}})}
        limit = asyncio.Semaphore(self.concurrency)
        by_contact: dict[str, list[Doc]] = {}
        for entry in entries:
            by_contact.setdefault(entry["contact_id"], []).append(entry)

        async def contact_in_order(mine: list[Doc]) -> list[tuple[Doc, Result]]:
            """One contact's messages one after another, so a cap counts the one just sent."""
            done: list[tuple[Doc, Result]] = []
            for entry in mine:
                message = messages.get(entry["_id"])
                if message is None:
                    done.append((entry, Result("skip", reason="message record missing")))
                    continue
                async with limit:
                    result = await self.dispatcher.dispatch(message, contacts.get(entry["contact_id"]), now)
                if result.kind == "sent" and entry is not mine[-1] and self.dispatcher.capped(result.channel):
                    # The contact has more messages in this batch: the next cap check must see this one.
                    await self.store.messages.update_one(
                        {"_id": entry["_id"]}, {"$set": {"sent_at": now, "sent_channel": result.channel}}
                    )
                done.append((entry, result))
            return done

        per_contact = await asyncio.gather(*(contact_in_order(m) for m in by_contact.values()))
        return [pair for pairs in per_contact for pair in pairs]

    async def _record(
        self,
        owner: str,
        results: list[tuple[Doc, Result]],
        timers: list[Doc],
        removed: list[Doc],
        now: datetime,
    ) -> None:
        """Message first, entry last: a crash in between re-runs the entry, which finds the message done."""
        message_ops: dict[str, tuple[list[str], Doc]] = {}  # identical updates are sent as one update_many
        entry_done: list[str] = [e["_id"] for e in timers]
        entry_again: list[tuple[str, datetime]] = []
        contact_ops: list[Any] = []

        def update(message_id: str, guard: list[str], fields: Doc) -> None:
            key = repr((guard, sorted(fields.items())))
            message_ops.setdefault(key, ([], {"guard": guard, "set": fields}))[0].append(message_id)

        for entry, r in results:
            mid = entry["_id"]
            if r.kind in ("postponed", "retry"):
                fields: Doc = {"status": "scheduled", "due_at": r.at, "reason": r.reason}
                if r.kind == "retry":
                    fields |= {"attempt": r.attempt}
                update(mid, ["scheduled", "sending"], fields)
                assert r.at is not None
                entry_again.append((mid, r.at))
                continue
            entry_done.append(mid)
            if r.kind == "skip":
                continue
            fields = {"status": r.kind, "reason": r.reason}
            if r.kind == "sent":
                fields |= {"sent_at": now, "sent_channel": r.channel, "attempt": r.attempt}
                if r.provider_id:
                    fields["provider_id"] = r.provider_id
                fields |= {k: v for k, v in r.record.items() if k not in fields}
            elif r.channel:
                fields["sent_channel"] = r.channel
            update(mid, ["scheduled", "sending"], fields)
            for path, value in r.unreachable:
                contact_ops.append(UpdateOne({"_id": entry["contact_id"]}, {"$pull": {path: value}}))
        for e in removed:
            update(
                e["_id"],
                ["scheduled"],
                {"status": "cancelled", "reason": "ruleset removed", "cancelled_at": now},
            )
        for ids, op in message_ops.values():
            await self.store.messages.update_many(
                {"_id": {"$in": ids}, "status": {"$in": op["guard"]}}, {"$set": op["set"]}
            )
        if contact_ops:
            await self.store.contacts.bulk_write(contact_ops, ordered=False)
        for mid, at in entry_again:
            await self.store.schedule.update_one(
                {"_id": mid, "owner": owner},
                {"$set": {"status": "pending", "due_at": at}, "$unset": {"owner": "", "lease_until": ""}},
            )
        finished = [(entry_done, "done", None), ([e["_id"] for e in removed], "cancelled", "ruleset removed")]
        for ids, status, reason in finished:
            if ids:
                await self.store.schedule.update_many(
                    {"_id": {"$in": ids}, "owner": owner},
                    {"$set": {"status": status, "done_at": now} | ({"reason": reason} if reason else {}),
                     "$unset": {"lease_until": ""}},
                )  # fmt: skip

    async def _insert_timer_events(self, timers: list[Doc], now: datetime) -> None:
        """A wait's `else` becomes one inbox event under a fixed id: re-running the entry cannot double it."""
        docs = []
        for entry in timers:
            event = timer_event(entry)
            docs.append(
                {
                    "_id": event.id,
                    "type": event.type,
                    "contact_id": event.contact_id,
                    "time": event.time,
                    "attributes": event.attributes,
                    "received_at": now,
                    "state": PENDING,
                }
            )
        try:
            await self.store.events.insert_many(docs, ordered=False)
        except BulkWriteError as exc:  # already inserted by a run that died before marking done
            if any(e.get("code") != DUPLICATE_KEY for e in exc.details.get("writeErrors", [])):
                raise
