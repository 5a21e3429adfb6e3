"""The durable schedule: every delayed decision is a document in `schedule`, run once when due.

Entries are claimed in batches with a lease (`status: running`, an owner token and `lease_until`), so two
processes never run the same entry; a process that dies mid-batch loses its lease and the entries go
back to `pending`. Each entry's effect is written idempotently before the entry is marked done:
a send's message goes from `scheduled` to `sent` only once, and a wait's `else` becomes one internal
event in the inbox under a fixed id.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import structlog
from pymongo import ASCENDING
from pymongo.errors import BulkWriteError, PyMongoError

from rulesvc.channels import ChannelRegistry, Delivery
from rulesvc.engine import timer_event
from rulesvc.store import DUPLICATE_KEY, PENDING, Doc, Store
from rulesvc.waiting import wait_any

log = structlog.get_logger(__name__)


class Scheduler:
    def __init__(
        self,
        store: Store,
        channels: ChannelRegistry,
        live_rulesets: Callable[[], set[str]],
        *,
        batch_size: int = 1000,
        lease: timedelta = timedelta(seconds=60),
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        on_timer_event: Callable[[], None] | None = None,
    ) -> None:
        self.store = store
        self.channels = channels
        self.live_rulesets = live_rulesets
        self.batch_size = batch_size
        self.lease = lease
        self.clock = clock
        self.on_timer_event = on_timer_event
        self.wake = asyncio.Event()
        self.fired = 0

    def due_soon(self, due_at: datetime) -> None:
        """The inbox scheduled something: look again now instead of at the next poll."""
        self.wake.set()

    async def run(self, stop: asyncio.Event, max_sleep: float = 0.25) -> None:
        while not stop.is_set():
            try:
                fired = await self.fire_due()
                if fired:
                    continue
                sleep = await self._until_next_due(max_sleep)
            except PyMongoError as exc:
                log.warning("scheduler.storage_error", error=type(exc).__name__)
                sleep = 1.0
            self.wake.clear()
            if sleep > 0:
                await wait_any(stop, self.wake, seconds=sleep)

    async def _until_next_due(self, max_sleep: float) -> float:
        nxt = await self.store.schedule.find_one(
            {"status": "pending"}, {"due_at": 1}, sort=[("due_at", ASCENDING)]
        )
        if nxt is None:
            return max_sleep
        seconds: float = (nxt["due_at"] - self.clock()).total_seconds()
        return max(0.0, min(max_sleep, seconds))

    async def _claim(self, now: datetime) -> list[Doc]:
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
        sent: list[tuple[Doc, Delivery]] = []
        timers: list[Doc] = []
        finished: list[tuple[Doc, str, str | None]] = []
        for entry in entries:
            if entry["ruleset"] not in live:
                finished.append((entry, "cancelled", "ruleset removed"))
            elif "message" in entry:
                delivery = await self._deliver(entry)
                sent.append((entry, delivery))
                finished.append((entry, "done", None))
            else:
                timers.append(entry)
                finished.append((entry, "done", None))
        await self._record(sent, timers, finished, now)
        self.fired += len(entries)
        if timers and self.on_timer_event is not None:
            self.on_timer_event()
        return len(entries)

    async def _deliver(self, entry: Doc) -> Delivery:
        message = entry["message"]
        channel = self.channels.get(message["channel"])
        if channel is None:
            return Delivery("failed", f"channel `{message['channel']}` is not available")
        try:
            return await channel.send(message, {"contact_id": entry["contact_id"]})
        except Exception as exc:  # a channel's bug fails its message, not the scheduler
            log.exception("scheduler.channel_error", channel=message["channel"])
            return Delivery("failed", f"channel error: {type(exc).__name__}")

    async def _record(
        self,
        sent: list[tuple[Doc, Delivery]],
        timers: list[Doc],
        finished: list[tuple[Doc, str, str | None]],
        now: datetime,
    ) -> None:
        # Outcomes are grouped so that a batch costs a handful of commands, not one per entry.
        outcomes: dict[tuple[str, str | None], list[str]] = defaultdict(list)
        for entry, delivery in sent:
            outcomes[(delivery.status, delivery.reason)].append(entry["_id"])
        for (status, reason), ids in outcomes.items():
            await self.store.messages.update_many(
                {"_id": {"$in": ids}, "status": "scheduled"},
                {"$set": {"status": status, "sent_at": now} | ({"reason": reason} if reason else {})},
            )
        if timers:
            await self._insert_timer_events(timers, now)
        ends: dict[tuple[str, str | None], list[str]] = defaultdict(list)
        for entry, status, reason in finished:
            ends[(status, reason)].append(entry["_id"])
        for (status, reason), ids in ends.items():
            if status == "cancelled":
                await self.store.messages.update_many(
                    {"_id": {"$in": ids}, "status": "scheduled"},
                    {"$set": {"status": "cancelled", "reason": reason, "cancelled_at": now}},
                )
            await self.store.schedule.update_many(
                {"_id": {"$in": ids}, "owner": finished[0][0]["owner"]},
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
