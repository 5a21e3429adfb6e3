"""The durable schedule: every delayed decision is a document in `schedule`, run once when due.

Entries are claimed in batches with a lease (`status: running`, an owner token and `lease_until`), so two
processes never run the same entry; a process that dies mid-batch loses its lease and the entries go
back to `pending`. Each entry's effect is written idempotently before the entry is marked done: a send
goes through the delivery pipeline and outbox (rulesvc.runtime.dispatcher), and a wait's `else` becomes one
internal event in the inbox under a fixed id. An entry whose processing raises (a corrupt document, a
plugin's bug) is set aside, `failed` with the error on the entry and its message, while the rest of its
batch goes on: one bad entry never holds the schedule up.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import bson
import structlog
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.errors import BulkWriteError, OperationFailure

from rulesvc.channels import Outcome
from rulesvc.core import reasons
from rulesvc.core.engine import first_due, send_order, timer_event
from rulesvc.core.funnel import KIND_STATUS, Increment, message_increment
from rulesvc.core.messages import Fate
from rulesvc.runtime.dispatcher import Dispatcher, Result
from rulesvc.runtime.fate import OnFate, tell
from rulesvc.runtime.waiting import Every, renewing, work_loop
from rulesvc.store.contacts import Contacts
from rulesvc.store.db import Doc, OnCounts, Store, failure_text, transient
from rulesvc.store.inbox import InboxEvents
from rulesvc.store.messages import Messages
from rulesvc.store.schedule import Schedule
from rulesvc.store.stats import shard_of
from rulesvc.store.transactions import in_transaction

log = structlog.get_logger(__name__)

# What the scheduler itself reads from an entry; anything else is the delivery pipeline's or the inbox's.
ENTRY_FIELDS = {"contact_id": str, "ruleset": str}
# A send put back for its contact's undecided events is looked at again after 0.2 s, then twice as long
# each time up to 10 s; after 10 minutes past its due time it no longer waits.
INBOX_FIRST = timedelta(milliseconds=200)
INBOX_LONGEST = timedelta(seconds=10)
INBOX_PATIENCE = timedelta(minutes=10)
AFTER_THE_ONE_BEFORE = timedelta(milliseconds=1)


def malformed(entry: Doc) -> str | None:
    for name, kind in ENTRY_FIELDS.items():
        if not isinstance(entry.get(name), kind):
            return f"schedule entry field `{name}` is {type(entry.get(name)).__name__}, not {kind.__name__}"
    return None


def error_reason(exc: BaseException) -> str:
    return f"could not be processed: {failure_text(exc)}"[:500]


def refused(exc: BaseException) -> bool:
    """The database refused the data (a value it cannot store), rather than failed: a retry cannot cure
    it. A bulk write reports such a refusal per document, which `transient` cannot see."""
    if isinstance(exc, BulkWriteError):
        errors = exc.details.get("writeErrors") or []
        return (
            bool(errors)
            and not exc.details.get("writeConcernErrors")
            and not any(transient(OperationFailure(e.get("errmsg", ""), e.get("code"))) for e in errors)
        )
    return not transient(exc)


def storable(value: Any) -> bool:
    try:
        bson.encode({"v": value})
    except Exception:
        return False
    return True


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
        on_fate: OnFate | None = None,
        on_counts: OnCounts | None = None,
    ) -> None:
        self.store = store
        self.shard = shard_of("scheduler")  # this loop's funnel counters (rulesvc.store.stats)
        self.on_counts = on_counts  # the funnel counts of each batch, once committed
        self.schedule = Schedule(store)
        self.messages = Messages(store)
        self.contacts = Contacts(store)
        self.events = InboxEvents(store)
        self.dispatcher = dispatcher
        self.concurrency = concurrency
        self.live_rulesets = live_rulesets
        self.batch_size = batch_size
        self.lease = lease
        self.clock = clock
        self.on_timer_event = on_timer_event
        self.on_fate = on_fate  # each recorded outcome, once written (the app counts them)
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
        due_at = await self.schedule.next_due()
        if due_at is None:
            return max_sleep
        seconds = (due_at - self.clock()).total_seconds()
        return max(0.0, min(max_sleep, seconds))

    async def _claim(self, now: datetime) -> list[Doc]:
        # The look scans every running entry: too much for every claim under load.
        if self._expired_look.due(now):
            await self.schedule.release_expired(now)
        return await self.schedule.claim(now, self.batch_size, self.lease)

    async def fire_due(self) -> int:
        now = self.clock()
        claimed = await self._claim(now)
        if not claimed:
            return 0
        live = self.live_rulesets()
        owner = claimed[0]["owner"]
        aside: list[tuple[Doc, str]] = []  # set aside, with why
        entries: list[Doc] = []
        for e in claimed:
            why = malformed(e)
            if why is None:
                entries.append(e)
            else:
                aside.append((e, why))
        removed = [e for e in entries if e["ruleset"] not in live]
        timers = [e for e in entries if e["ruleset"] in live and "message" not in e]
        sends, held = await self._after_earlier_events(
            [e for e in entries if e["ruleset"] in live and "message" in e], timers, owner, now
        )

        # The claim is renewed while the batch runs, from this event loop: a process that dies, or whose
        # loop is held (a long computation, a paused database), stops renewing, and its entries are taken
        # over while a send may be in flight. The `sending` mark (rulesvc.runtime.dispatcher) is what keeps
        # such a send from being made more than once more, and never before its first call is over.
        async def renew() -> None:
            await self.schedule.renew(owner, self.clock() + self.lease)

        trouble: list[BaseException] = []  # storage errors met while sending
        async with renewing("scheduler", renew, self.lease.total_seconds() / 3):
            results = await self._dispatch(sends, now, owner, aside, trouble) if sends else []
            if timers:
                timers = await self._insert_timer_events(timers, now, aside)
            await self._record(owner, results, timers, removed, aside, now)
        # A held send is counted when it is claimed again and done; so is one that storage trouble left
        # unsent (its claim runs out and it is claimed again).
        over = {e["_id"] for e, _ in results} | {e["_id"] for e, _ in aside}
        unsent = sum(1 for e in sends if e["_id"] not in over)
        self.fired += len(claimed) - held - unsent
        if timers and self.on_timer_event is not None:
            self.on_timer_event()
        if trouble:
            raise trouble[0]  # recorded what was done; the loop now waits the trouble out
        return len(claimed) - held - unsent

    async def _after_earlier_events(
        self, sends: list[Doc], timers: list[Doc], owner: str, now: datetime
    ) -> tuple[list[Doc], int]:
        """The sends to make now, in their contacts' order, and how many were put back.

        A delayed send waits while its contact has an undecided event from before the send first came
        due, or a timer of this batch due no later (its event joins the inbox after this batch). Such an
        event may cancel or re-arm the send (a purchase, a new cart), and it happened first: the inbox's
        lag must not let the reminder out before it, which a simulation of the same events would never
        do. Events after the first due time do not hold it (a steady stream of page views would, for
        ever), the waits grow from 0.2 s to 10 s, and after 10 minutes the send goes (an inbox that far
        behind is stuck, and the others must not be).

        Any send also waits behind an earlier one of its contact that waits (`send_order`): in a later
        batch or this one. Otherwise a send due a moment after a held one goes first, and a frequency
        cap counts it instead of the one due first, which a simulation would have sent."""

        if not sends:
            return sends, 0
        # A send due when it was decided (a send "now") never waits for the inbox: the inbox took its
        # contact's events in order up to its trigger, so whatever is pending came after it.
        delayed = [e for e in sends if first_due(e) > e.get("created_at", first_due(e))]
        earliest: dict[str, datetime] = {}
        if delayed:
            earliest = await self.events.earliest_pending(list({e["contact_id"] for e in delayed}))
            for timer in timers:
                cid, due = timer["contact_id"], timer["due_at"]
                if cid not in earliest or due < earliest[cid]:
                    earliest[cid] = due
        # Each contact's earliest waiting send: where it stands, and when it is looked at again. One
        # another process runs now counts (it may be put back again), those of this claim come below.
        behind: dict[str, tuple[tuple[float, str], datetime]] = {}
        cids = list({e["contact_id"] for e in sends})
        for doc in await self.schedule.held_of(cids, [e["_id"] for e in sends]):
            cid, order = doc["contact_id"], send_order(doc)
            if cid not in behind or order < behind[cid][0]:
                behind[cid] = (order, doc["due_at"])
        delayed_ids = {e["_id"] for e in delayed}
        ordered = sorted(sends, key=send_order)
        looks: dict[str, datetime] = {}  # the sends put back, and when each is looked at again
        for_inbox: set[str] = set()  # those waiting for the inbox (their back-off grows)
        for entry in ordered:
            cid, order = entry["contact_id"], send_order(entry)
            if now - first_due(entry) >= INBOX_PATIENCE:
                continue
            if cid in behind and behind[cid][0] < order:
                # Right after the send it waits behind (both then come due together, in order), not
                # in a loop meanwhile, nor past its own patience.
                right_after = min(behind[cid][1] + AFTER_THE_ONE_BEFORE, first_due(entry) + INBOX_PATIENCE)
                looks[entry["_id"]] = max(right_after, now + INBOX_FIRST)
                continue
            first = earliest.get(cid)
            if entry["_id"] in delayed_ids and first is not None and first <= first_due(entry):
                wait = min(INBOX_LONGEST, INBOX_FIRST * 2 ** min(entry.get("holds", 0), 16))
                looks[entry["_id"]] = max(entry["due_at"], now + wait)
                for_inbox.add(entry["_id"])
                behind[cid] = (order, looks[entry["_id"]])
        if not looks:
            return ordered, 0
        await self.schedule.put_back(looks, owner, for_inbox)
        return [e for e in ordered if e["_id"] not in looks], len(looks)

    async def _dispatch(
        self,
        entries: list[Doc],
        now: datetime,
        owner: str,
        aside: list[tuple[Doc, str]],
        trouble: list[BaseException],
    ) -> list[tuple[Doc, Result]]:
        ids = [e["_id"] for e in entries]
        messages = await self.messages.by_id(ids)
        contact_ids = list({e["contact_id"] for e in entries})
        contacts = await self.contacts.by_id(contact_ids)
        limit = asyncio.Semaphore(self.concurrency)
        by_contact: dict[str, list[Doc]] = {}
        for entry in entries:
            by_contact.setdefault(entry["contact_id"], []).append(entry)

        async def contact_in_order(mine: list[Doc]) -> list[tuple[Doc, Result]]:
            """One contact's messages one after another, so a cap counts the one just sent."""
            done: list[tuple[Doc, Result]] = []
            # Counted here, not from MongoDB: the batch writes its results only at the end (a `log` or
            # in-app send is still `scheduled` until then, which a cap's count leaves out).
            sent_now: Counter[str] = Counter()
            for entry in mine:
                message = messages.get(entry["_id"])
                if message is None:
                    done.append((entry, Result("skip", detail="message record missing")))
                    continue
                async with limit:
                    try:
                        result = await self.dispatcher.dispatch(
                            message, contacts.get(entry["contact_id"]), now, owner, sent_now
                        )
                    except Exception as exc:
                        if transient(exc):
                            # Storage trouble is the loop's to wait out, not this message's fault. This
                            # contact's later messages wait with it (in order, after their claim runs out);
                            # what the batch finished is still recorded before the loop backs off.
                            trouble.append(exc)
                            return done
                        log.exception("scheduler.entry_failed", entry=entry["_id"])
                        aside.append((entry, error_reason(exc)))  # the others go on
                        continue
                if result.kind == "sent" and result.channel and not message.get("transactional"):
                    sent_now[result.channel] += 1  # the contact's next cap check in this batch sees it
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
        aside: list[tuple[Doc, str]],
        now: datetime,
    ) -> None:
        """Message first, entry last: a crash in between re-runs the entry, which finds the message done."""
        message_ops: dict[str, tuple[list[str], Doc, Doc]] = {}  # identical updates go as one update_many
        counts: dict[str, tuple[str, str | None]] = {}  # per message: the status and reason it counts as
        entry_done: list[str] = [e["_id"] for e in timers]
        entry_again: list[tuple[str, datetime]] = []
        unreachable: list[tuple[str, str, Any]] = []
        blocked: dict[str, list[Outcome]] = {}  # per channel: refusals to record as its callbacks would
        fates: list[Fate] = []

        def fate(entry: Doc, status: str, reason: str | None, r: Result | None = None) -> None:
            """For the log line: the channel used, else the one the rule named."""
            sent = entry.get("message")
            channel = (r and r.channel) or (sent.get("channel") if isinstance(sent, dict) else None)
            attempt, latency = (r.attempt, r.latency) if r is not None else (0, None)
            fates.append(Fate(str(entry["_id"]), str(entry.get("contact_id")), str(entry.get("ruleset")),
                              str(entry.get("rule")), channel, status, reason, attempt, latency))  # fmt: skip

        def update(message_id: str, guard: Doc, fields: Doc, count: str, reason: str | None) -> None:
            counts[message_id] = (count, reason)
            key = repr((guard, sorted(fields.items())))
            message_ops.setdefault(key, ([], guard, fields))[0].append(message_id)

        for entry, r in results:
            mid = entry["_id"]
            if r.kind == "wait":  # the message stays as it is; the entry comes back then
                assert r.at is not None
                entry_again.append((mid, r.at))
                continue
            if r.kind != "skip":
                fate(entry, r.kind, r.reason, r)
            if r.kind in ("postponed", "retry"):
                fields: Doc = {"status": "scheduled", "due_at": r.at, "reason": r.reason, "detail": r.detail}
                if r.kind == "retry":
                    fields |= {"attempt": r.attempt}
                update(mid, r.guard, fields, KIND_STATUS.get(r.kind, r.kind), r.reason)
                assert r.at is not None
                entry_again.append((mid, r.at))
                continue
            entry_done.append(mid)
            if r.kind == "skip":
                if r.reason == reasons.RECIPIENT_BLOCKED and r.channel:  # its refusal, queued once more
                    again = Outcome(
                        "blocked", message_id=mid, reason=r.detail, attributes={"synchronous": True}
                    )
                    blocked.setdefault(r.channel, []).append(again)
                continue
            fields = {"status": r.kind, "reason": r.reason, "detail": r.detail}
            if r.kind == "sent":
                fields |= {"sent_at": now, "sent_channel": r.channel, "attempt": r.attempt}
                if r.provider_id:
                    fields["provider_id"] = r.provider_id
                fields |= {k: v for k, v in r.record.items() if k not in fields}
            elif r.channel:
                fields["sent_channel"] = r.channel
            if r.kind == "blocked" and r.channel:  # recorded as a callback's: the channel gets suppressed
                refusal = Outcome(
                    "blocked", message_id=mid, reason=r.detail, attributes={"synchronous": True}
                )
                blocked.setdefault(r.channel, []).append(refusal)
            update(mid, r.guard, fields, KIND_STATUS.get(r.kind, r.kind), r.reason)
            for path, value in r.unreachable:
                if isinstance(path, str) and path and not path.startswith("$") and storable(value):
                    unreachable.append((entry["contact_id"], path, value))
        gone = "its ruleset is no longer loaded"
        for e in removed:
            update(
                e["_id"],
                {"status": "scheduled"},
                {
                    "status": "cancelled",
                    "reason": reasons.RULESET_REMOVED,
                    "detail": gone,
                    "cancelled_at": now,
                },
                "cancelled",
                reasons.RULESET_REMOVED,
            )
            if "message" in e:
                fate(e, "cancelled", reasons.RULESET_REMOVED)
        for e, why in aside:
            if "message" in e:
                update(
                    e["_id"],
                    {"status": {"$in": ["scheduled", "sending"]}},
                    {"status": "failed", "reason": reasons.PROCESSING_ERROR, "detail": why},
                    "failed",
                    reasons.PROCESSING_ERROR,
                )
                fate(e, "failed", reasons.PROCESSING_ERROR)
        counted = await self._update_messages(list(message_ops.values()), counts, entry_again, owner, now)
        for channel, outcomes in blocked.items():  # once the message says `blocked`, before the entry is done
            await self.store.record_outcomes(channel, outcomes, now, self.on_counts)
        errors = await self.contacts.forget_unreachable(unreachable)
        if errors is not None:
            log.warning("scheduler.unreachable_not_removed", errors=errors[:3])
        finished = [(entry_done, "done", None), ([e["_id"] for e in removed], "cancelled", "ruleset removed")]
        for ids, status, reason in finished:
            if ids:
                await self.schedule.finish(ids, owner, status, now, reason)
        for e, why in aside:
            await self.schedule.fail(e["_id"], owner, why, now)
        tell(fates, self.on_fate)
        if counted and self.on_counts is not None:
            self.on_counts(counted)

    async def _update_messages(
        self,
        updates: list[tuple[list[str], Doc, Doc]],
        counts: dict[str, tuple[str, str | None]],
        again: list[tuple[str, datetime]],
        owner: str,
        now: datetime,
    ) -> list[Increment]:
        """The batch's message updates, the entries that run again, and the funnel counts, in one
        transaction. A message is counted only if its guarded update matched it (another run may have
        recorded it already) and, if its entry runs again (postponed, retried), only if the entry was
        still this batch's (else its message is left to the new owner): a batch run again after a crash
        never counts twice, and a message's state and its count are written together. If the database refuses
        the batch (a value it cannot store), each message alone, and one whose result cannot be stored
        gets at least its status and the error. Returns the counts written."""
        token = uuid.uuid4().hex  # marks the messages this write matched, to read back and count

        async def write(session: AsyncClientSession) -> list[Increment]:
            moved = await self.schedule.run_again_many(again, owner, session) if again else set()
            # An entry another process took over meanwhile is its to decide: its message is left as it
            # is (state and count stay together: the new owner writes and counts both).
            lost = {mid for mid, _ in again} - moved
            kept = [([i for i in ids if i not in lost], guard, fields) for ids, guard, fields in updates]
            kept = [update for update in kept if update[0]]
            matched = await self.messages.record(kept, token, session) if kept else []
            return await self._count(matched, counts, now, session)

        try:
            return await in_transaction(self.store.client, write)
        except Exception as exc:
            if not refused(exc):
                raise
            log.warning("scheduler.record_refused", error=f"{type(exc).__name__}: {exc}"[:300])
        at = dict(again)
        counted: list[Increment] = []
        for ids, guard, fields in updates:
            for mid in ids:
                when = at.pop(mid, None)
                try:
                    counted += await self._update_one(mid, guard, fields, counts, when, owner, now)
                except Exception as exc:
                    if not refused(exc):
                        raise
                    minimal = {"status": fields["status"], "reason": reasons.PROCESSING_ERROR,
                               "detail": error_reason(exc)}  # fmt: skip
                    counted += await self._update_one(mid, guard, minimal, counts, when, owner, now)
        for mid, when in at.items():  # entries without a message update (a send in flight, looked at later)
            await self.schedule.run_again(mid, owner, when)
        return counted

    async def _update_one(
        self,
        mid: str,
        guard: Doc,
        fields: Doc,
        counts: dict[str, tuple[str, str | None]],
        again: datetime | None,
        owner: str,
        now: datetime,
    ) -> list[Increment]:
        """One message's update, its entry if it runs again, and its count, in a transaction of their own."""
        token = uuid.uuid4().hex

        async def write(session: AsyncClientSession) -> list[Increment]:
            if again is not None and not await self.schedule.run_again_many([(mid, again)], owner, session):
                return []  # taken over: the new owner decides, writes and counts it
            matched = await self.messages.record([([mid], guard, fields)], token, session)
            return await self._count(matched, counts, now, session)

        return await in_transaction(self.store.client, write)

    async def _count(
        self,
        matched: list[Doc],
        counts: dict[str, tuple[str, str | None]],
        now: datetime,
        session: AsyncClientSession,
    ) -> list[Increment]:
        """The counts of the messages a write matched, written in the write's transaction."""
        counted = [message_increment(m, counts[m["_id"]][0], now, counts[m["_id"]][1]) for m in matched]
        await self.store.add_counts(counted, self.shard, session)
        return counted

    async def _insert_timer_events(
        self, timers: list[Doc], now: datetime, aside: list[tuple[Doc, str]]
    ) -> list[Doc]:
        """A wait's `else` becomes one inbox event under a fixed id: re-running the entry cannot double it.
        Returns the entries whose event is in the inbox; the others are set aside with the error."""
        docs, fired = [], []
        for entry in timers:
            try:
                event = timer_event(entry)
                doc = {
                    "_id": event.id,
                    "type": event.type,
                    "contact_id": event.contact_id,
                    "time": event.time,
                    "attributes": event.attributes,
                    "received_at": now,
                }
                bson.encode(doc)
            except Exception as exc:
                log.exception("scheduler.entry_failed", entry=entry["_id"])
                aside.append((entry, error_reason(exc)))
                continue
            docs.append(doc)
            fired.append(entry)
        if not docs:
            return fired
        refused = await self.events.insert_internal(docs)  # one already there: a run died before `done`
        for index, error in refused.items():
            aside.append((fired[index], f"could not be processed: {error.get('errmsg', error)}"[:500]))
        return [e for i, e in enumerate(fired) if i not in refused]
