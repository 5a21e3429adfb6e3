"""The inbox feeds accepted events to the engine: each exactly once, in per-contact time order.

Several processes may run this loop against one database. A process leases the contacts it works on
(one document per batch in `contact_leases`, whose unique index on `contacts` allows one holder per
contact), reads their pending events, evaluates them in time order, and commits contact state, new
schedule entries, cancellations and the removal of the events' queue documents (rulesvc.store.event_queue)
in one transaction. A crash before the commit leaves the events queued; the lease runs out and another
pass takes them. Contact state also
carries a version, checked on write.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from pymongo import UpdateOne
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.errors import DuplicateKeyError

from rulesvc.core.attribution import attribute
from rulesvc.core.contacts import PROFILE_FIELDS
from rulesvc.core.engine import (
    Cancellation,
    ContactView,
    Decisions,
    EngineEvent,
    ScheduleEntry,
    armed_at,
    cancelled_by_history,
    entry_doc,
    event_from_doc,
    from_ts,
    pending_from_doc,
)
from rulesvc.core.events import MESSAGE_EVENT_TYPES
from rulesvc.core.funnel import OUTCOMES, Increment, fate_increment, message_increment
from rulesvc.core.messages import Fate, fate_of
from rulesvc.core.sendpolicy import outcome_changes
from rulesvc.core.statediff import Snapshot, snapshot, state_delta
from rulesvc.runtime.fanout import interest_updates
from rulesvc.runtime.fate import OnFate, tell
from rulesvc.runtime.rulesets import Rulesets
from rulesvc.runtime.waiting import Every, renewing, work_loop
from rulesvc.store.audiences import Audiences
from rulesvc.store.catalog import Catalog, Superseded
from rulesvc.store.contacts import Contacts
from rulesvc.store.db import Doc, OnCounts, Store, failure_text, transient
from rulesvc.store.inbox import InboxEvents
from rulesvc.store.leases import ContactLeases
from rulesvc.store.messages import Messages
from rulesvc.store.schedule import Schedule
from rulesvc.store.transactions import in_transaction

log = structlog.get_logger(__name__)


# How far a message has come; an outcome moves it forward only (a late `delivered` after `opened`
# is recorded but does not move the status back). Bad news is final: a provider's `failed` report
# (set by the callback, store.record_outcomes) ranks with bounced and blocked.
OUTCOME_RANK = {"scheduled": 0, "sending": 0, "sent": 1, "delivered": 2, "opened": 3, "clicked": 4,
                "replied": 4, "bounced": 5, "blocked": 5, "failed": 5}  # fmt: skip


def never_sent(message: Doc) -> bool:
    """No provider was ever handed it (suppressed, cancelled, or scheduled before its first attempt): a
    report naming it is recorded, but cannot make it delivered, opened or bounced, nor stop its send."""
    status = message["status"]
    return status in ("suppressed", "held_out", "cancelled") or (
        status == "scheduled" and not message.get("attempt")
    )


def apply_outcome(
    doc: Doc,
    messages: dict[str, Doc],
    view: ContactView,
    told: list[Fate] | None = None,
    counted: list[Increment] | None = None,
) -> list[Any]:
    """A message_* event: record it on the message, give rules its channel/template, act on bad news;
    its fate (delivered, opened, ...) goes to `told`, for the outcome log once committed, and to
    `counted` the first time this outcome is recorded on a message that was sent (the funnel counts
    each outcome once per message; a refusal at send time was counted by the scheduler)."""
    attributes = doc.setdefault("attributes", {})
    outcome = doc["type"].removeprefix("message_")
    message_id = attributes.get("message_id")
    message = messages.get(message_id) if isinstance(message_id, str) else None
    if message is not None and message["contact_id"] != view.contact_id:
        message = None  # an outcome names a message of another contact: ignore the link, keep the event
    channel = attributes.get("channel")
    ops: list[Any] = []
    if message is not None:
        channel = channel or message.get("sent_channel") or message["channel"]
        for key in ("channel", "template", "ruleset", "rule"):
            attributes.setdefault(key, channel if key == "channel" else message.get(key))
        update: Doc = {"$set": {f"outcomes.{outcome}": doc["time"]}}
        recorded = message.setdefault("outcomes", {})
        first = outcome not in recorded
        recorded.setdefault(outcome, doc["time"])  # a later event of the batch finds it recorded
        if (counted is not None and first and outcome in OUTCOMES and not never_sent(message)
                and not attributes.get("synchronous")):  # fmt: skip
            counted.append(message_increment(message, outcome, doc["time"]))  # as stored, never the payload's
        if not never_sent(message) and OUTCOME_RANK.get(outcome, 0) > OUTCOME_RANK.get(message["status"], 0):
            update["$set"]["status"] = outcome
            message["status"] = outcome
        ops.append(UpdateOne({"_id": message["_id"]}, update))
        if told is not None and not attributes.get("synchronous"):  # a refusal at send time was told then
            told.append(fate_of(message, outcome))  # labels from the stored message: a bounded set
    profile, suppressed = outcome_changes(outcome, channel, doc["time"].timestamp())
    view.profile.update(profile)
    view.profile_set.update(profile)
    if suppressed:
        view.state.setdefault("suppressed", {}).update(suppressed)
    return ops


class VersionConflict(Exception):
    """Another process changed a contact in between: the batch is retried."""


Also = Callable[[AsyncClientSession], Awaitable[None]]


class Backlogged(Exception):
    """A contact of the batch has more undecided events than one batch takes: a copy given to it would
    be decided before some of them."""


@dataclass
class Given:
    """Events that are not stored (a catalog change's per-contact copies), decided in a batch after each
    contact's own undecided events (`docs`); `queue`: copies for other contacts, stored and queued in the
    same transaction, as are those of a contact whose events fail; `also`: one more write in it (the
    fan-out's position)."""

    docs: list[Doc]
    queue: list[Doc]
    also: Also
    committed: bool = False  # what fails after the commit must not send the copies the queue's way too


def inbox_order(doc: Doc) -> tuple[Any, Any, Any]:
    return doc["contact_id"], doc["time"], doc["_id"]


def engine_event(doc: Doc) -> EngineEvent:
    return event_from_doc(doc)


@dataclass
class StoredContact(ContactView):
    """A contact as read from `contacts`, with its state as read (the engine changes `state` in place):
    the commit writes only what changed."""

    read: Snapshot | None = None


def contact_view(contact_id: str, doc: Doc | None, pending: list[Doc]) -> StoredContact:
    doc = doc or {}
    profile = {k: doc[k] for k in PROFILE_FIELDS if doc.get(k) is not None}
    profile["email_invalid"] = bool(doc.get("email_invalid"))
    state = doc.get("state")
    return StoredContact(
        contact_id, profile, dict(state or {}), [pending_from_doc(p) for p in pending], read=snapshot(state)
    )


def message_doc(entry: ScheduleEntry) -> Doc:
    assert entry.message is not None
    return {
        "_id": entry.entry_id,
        "contact_id": entry.contact_id,
        "ruleset": entry.ruleset,
        "rule": entry.rule,
        "channel": entry.message["channel"],
        "template": entry.message["template"],
        "params": entry.message["params"],
        "transactional": entry.message["transactional"],
        "fallback": entry.message["fallback"],
        "guard": entry.message.get("guard"),
        **{k: entry.message[k] for k in ("variant", "held_out") if k in entry.message},
        "status": "scheduled",
        "created_at": entry.created_at,
        "due_at": entry.due_at,
    }


class Inbox:
    def __init__(
        self,
        store: Store,
        rulesets: Rulesets,
        *,
        batch_size: int = 500,
        max_events: int = 2000,
        lease: timedelta = timedelta(seconds=15),
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        on_scheduled: Callable[[datetime], None] | None = None,
        on_quarantined: Callable[[str], None] | None = None,
        on_fate: OnFate | None = None,
        on_counts: OnCounts | None = None,
    ) -> None:
        self.store = store
        self.contact_leases = ContactLeases(store)
        self.inbox_events = InboxEvents(store)
        self.contacts = Contacts(store)
        self.schedule = Schedule(store)
        self.messages = Messages(store)
        self.catalog = Catalog(store)
        self.audiences = Audiences(store)
        self.rulesets = rulesets
        self.batch_size = batch_size
        self.max_events = max_events
        self.lease = lease
        self.clock = clock
        self.on_scheduled = on_scheduled
        self.on_quarantined = on_quarantined
        self.on_fate = on_fate  # each cancelled message, once the cancellation committed
        self.owner = uuid.uuid4().hex
        self.shard = f"inbox:{self.owner}"  # this loop's funnel counters (rulesvc.store.stats)
        # The fan-out's batches decided here: counters of their own, or its transactions and this loop's
        # would write the same documents and abort each other.
        self.fanout_shard = f"fanout:{self.owner}"
        self.on_counts = on_counts  # the funnel counts of each batch, once committed
        self.wake = asyncio.Event()
        self.processed = 0
        self._expired_look = Every(lease / 4)

    async def run(self, stop: asyncio.Event, idle_poll: float = 0.2) -> None:
        async def step() -> float:
            try:
                done = await self.process_once()
            except VersionConflict:
                return 0.0  # another process changed a contact: take the batch again now
            return 0.0 if done else idle_poll

        # One batch at a time per process: measured, a second one in flight only added contention in mongod.
        await work_loop("inbox", step, stop, self.wake)

    async def _leasable_keys(self, now: datetime) -> list[str]:
        if self._expired_look.due(now):
            await self.contact_leases.release_expired(now)
        # A contact whose due entry the scheduler is deciding waits for that decision, as in a simulation
        # (an entry due before an event is decided first): evaluated meanwhile, an event that cancels the
        # entry would not see it (claimed, not pending), and a postponement or retry would outlive it.
        busy = await self.schedule.running_contacts()
        return await self.inbox_events.contacts_waiting(
            [*await self.contact_leases.held(), *busy], self.batch_size
        )

    async def _acquire(self, keys: list[str], now: datetime) -> tuple[str, list[str]]:
        """One lease document for the whole batch; the unique index on `contacts` keeps any contact in at
        most one lease, so a contact another batch took meanwhile makes the insert fail: drop it, retry."""
        token = uuid.uuid4().hex
        for _ in range(3):
            if await self.contact_leases.take(token, self.owner, keys, now + self.lease):
                return token, keys
            held = set(await self.contact_leases.held())
            keys = [k for k in keys if k not in held]
            if not keys:
                break
        return token, []

    async def process_once(self) -> int:
        now = self.clock()
        keys = await self._leasable_keys(now)
        if not keys:
            return 0
        token, acquired = await self._acquire(keys, now)
        if not acquired:
            return 0

        async def renew() -> None:
            await self.contact_leases.renew(token, self.clock() + self.lease)

        try:
            async with renewing("inbox", renew, self.lease.total_seconds() / 3):
                try:
                    return await self._process(acquired, self.max_events)
                except VersionConflict:
                    raise
                except Exception as exc:
                    if transient(exc):
                        raise
                    return await self._isolate(acquired, exc)
        finally:
            await self.contact_leases.release(token)

    async def decide_given(
        self, docs: list[Doc], also: Callable[[AsyncClientSession], Awaitable[None]]
    ) -> int:
        """A catalog change's copies, decided here under their contacts' leases as if they had been queued
        (after each contact's own undecided events, in one transaction with `also`), without storing
        them: the insert, read and delete per contact of the queue's way are saved. The copies of
        contacts another batch or a due send holds right now are stored and queued instead in the same
        transaction, and so are all of them when the batch cannot be decided here (a backlog, a conflict,
        a failure outside evaluation). Returns how many were decided here."""

        async def queue_all(session: AsyncClientSession) -> None:
            await self.store.queue_in(docs, session)
            await also(session)

        now = self.clock()
        busy = {*await self.contact_leases.held(), *await self.schedule.running_contacts()}
        wanted = list(dict.fromkeys(d["contact_id"] for d in docs if d["contact_id"] not in busy))
        token, acquired = await self._acquire(wanted, now) if wanted else ("", [])
        taken = set(acquired)
        mine = [d for d in docs if d["contact_id"] in taken]
        if not mine:
            await in_transaction(self.store.client, queue_all)
            return 0

        async def renew() -> None:
            await self.contact_leases.renew(token, self.clock() + self.lease)

        try:
            async with renewing("fanout", renew, self.lease.total_seconds() / 3):
                given = Given(mine, [d for d in docs if d["contact_id"] not in taken], also)
                try:
                    await self._process(acquired, self.max_events, given)
                    return len(mine)
                except Exception as exc:
                    if transient(exc) or given.committed or isinstance(exc, Superseded):
                        raise
                    log.info("fanout.queued_instead", copies=len(docs), why=failure_text(exc))
                    await in_transaction(self.store.client, queue_all)
                    return 0
        finally:
            await self.contact_leases.release(token)

    async def _process(self, contact_ids: list[str], limit: int, given: Given | None = None) -> int:
        # At most `max_events` (a contact with a backlog is taken up to there, in time order, and its
        # later events wait for the next batch): a transaction stays small whatever piled up.
        events = await self.inbox_events.pending(contact_ids, limit)
        if given is not None:
            if len(events) >= limit:
                raise Backlogged()
            events = sorted([*events, *given.docs], key=inbox_order)
        if not events:
            return 0
        contact_ids = list(dict.fromkeys(e["contact_id"] for e in events))
        contacts = await self.contacts.by_id(contact_ids)
        pending = await self.schedule.pending_of(contact_ids)

        now = self.clock()
        views: dict[str, ContactView] = {}
        found_by: dict[str, list[Decisions]] = defaultdict(list)
        outcome_ops: dict[str, list[Any]] = defaultdict(list)
        outcome_fates: dict[str, list[Fate]] = defaultdict(list)
        outcome_counts: dict[str, list[Increment]] = defaultdict(list)
        failed: dict[str, tuple[Doc, BaseException]] = {}
        outcome_ids = [
            d["attributes"]["message_id"]
            for d in events
            if d["type"] in MESSAGE_EVENT_TYPES
            and isinstance((d.get("attributes") or {}).get("message_id"), str)
        ]
        messages = await self.messages.by_id(outcome_ids)
        # Taken after the last await and used without another: a reload (which frees the previous
        # version's engine rulesets) can only happen between batches, never inside one.
        engine = self.rulesets.engine()
        for doc in events:
            cid = doc["contact_id"]
            if cid in failed:
                continue  # its later events wait: a contact's events are decided in order or not at all
            view = views.get(cid)
            if view is None:
                view = views[cid] = contact_view(cid, contacts.get(cid), pending.get(cid, []))
            try:
                if doc["type"] in MESSAGE_EVENT_TYPES:
                    outcome_ops[cid].extend(
                        apply_outcome(doc, messages, view, outcome_fates[cid], outcome_counts[cid])
                    )
                found = engine.evaluate(engine_event(doc), view, now)
                found_by[cid].append(found)
                for entry in found.schedule:  # a later event of this batch may name its message
                    if entry.message is not None:
                        messages[entry.entry_id] = message_doc(entry)
            except Exception as exc:  # one event's fault: the other contacts of the batch go on
                failed[cid] = (doc, exc)

        for cid in failed:
            del views[cid]  # nothing of a failed contact is written but the failure itself
            found_by.pop(cid, None)
            outcome_ops.pop(cid, None)
            outcome_fates.pop(cid, None)
            outcome_counts.pop(cid, None)
        decisions = Decisions()
        for found in (f for per in found_by.values() for f in per):
            decisions.schedule.extend(found.schedule)
            decisions.cancel.extend(found.cancel)
            decisions.fired.extend(found.fired)
            decisions.audience.extend(found.audience)
        decisions.cancel.extend(await self._cancelled_by_history(decisions, views))
        decided = [e for e in events if e["contact_id"] in views]
        message_ops = [op for ops in outcome_ops.values() for op in ops]
        failures = [(doc, exc) for doc, exc in failed.values()]
        told = [f for fates in outcome_fates.values() for f in fates]
        counts = [c for per in outcome_counts.values() for c in per]
        counts.extend(await self._entries_and_conversions([f for per in found_by.values() for f in per]))
        await self._commit(
            decided, views, contacts, decisions, now, message_ops, failures, told, counts, given
        )
        self.processed += len(decided)
        log.debug("inbox.batch", events=len(decided), contacts=len(views), scheduled=len(decisions.schedule))
        if decisions.schedule and self.on_scheduled is not None:
            self.on_scheduled(min(e.due_at for e in decisions.schedule))
        return len(events)

    async def _cancelled_by_history(
        self, decisions: Decisions, views: dict[str, ContactView]
    ) -> list[Cancellation]:
        """Sends armed by this batch that an event decided earlier, but later in time, cancels: a trigger
        that arrived late, or an anonymous cart merged in after the contact's purchase was decided. In
        time order the purchase would have cancelled the reminder, so it does now. One indexed read, only
        for batches that armed a send with `cancel_on`."""
        gone = {c.entry_id for c in decisions.cancel}
        armed = [entry_doc(e) for e in decisions.schedule if e.cancel_on and e.entry_id not in gone]
        if not armed:
            return []
        types = sorted({t for e in armed for spec in e["cancel_on"] for t in spec["event"]})
        since = from_ts(min(armed_at(e) for e in armed))
        found = await self.inbox_events.decided_since(sorted({e["contact_id"] for e in armed}), types, since)
        by_contact: dict[str, list[EngineEvent]] = defaultdict(list)
        for doc in found:
            by_contact[doc["contact_id"]].append(engine_event(doc))
        return [
            c
            for cid, events in by_contact.items()
            for c in cancelled_by_history([e for e in armed if e["contact_id"] == cid], events, views[cid])
        ]

    async def _entries_and_conversions(self, found: list[Decisions]) -> list[Increment]:
        """The funnel's first and last steps: each entry, and each conversion credited to the last message
        of its ruleset the contact was sent (read here, just before the commit that counts it: a message
        the scheduler marks sent in that very moment is not seen, and the conversion goes to the message
        before it, or to the entry; the group, which the uplift compares, is the entry's either way)."""
        entered = (e for f in found for e in f.entered)
        counts = [Increment(e.at, e.ruleset, e.rule, e.group, "", "entered") for e in entered]
        converted = [c for f in found for c in f.converted]
        if not converted:
            return counts
        sent = await self.messages.sent_to(
            sorted({c.contact_id for c in converted}),
            sorted({c.ruleset for c in converted}),
            min(c.entered_at for c in converted),
        )
        for c in converted:
            to = attribute(c, sent)
            counts.append(
                Increment(c.at, c.ruleset, to.rule, to.group, to.channel, "converted", revenue=c.value)
            )
        return counts

    async def _commit(
        self,
        events: list[Doc],
        views: dict[str, ContactView],
        contacts: dict[str, Doc],
        decisions: Decisions,
        now: datetime,
        message_ops: list[Any],
        failures: list[tuple[Doc, BaseException]],
        told: list[Fate] | None = None,
        counts: list[Increment] | None = None,
        given: Given | None = None,
    ) -> None:
        """`told`: the outcomes the batch's message_* events recorded, logged once committed. `counts`:
        funnel counts decided by the batch beyond what is counted here (outcomes; entries and
        conversions), written with it. Counted here: each new message `scheduled` (and `cancelled` if
        born cancelled), and each message a cancellation cancelled."""
        contact_ops: list[Any] = []
        for cid, view in views.items():
            version = (contacts.get(cid) or {}).get("version")
            if version is None:  # a new contact (or one only its profile made): the whole state
                query: Doc = {"_id": cid, "version": {"$exists": False}}
                update: Doc = {
                    "$set": {"state": view.state, "version": 1, **view.profile_set},
                    "$setOnInsert": {"created_at": now},
                }
                contact_ops.append(UpdateOne(query, update, upsert=True))
                continue
            # What changed of the state as read. The version is bumped even when nothing did: the check
            # against it finds a batch whose lease ran out, or a merge that changed the contact meanwhile,
            # and this batch's other writes (counts, outcomes, interests) must not land then. Not an
            # upsert: a contact gone meanwhile (merged away, erased) is such a change too, and a delta
            # would make a contact of a part of its state.
            delta = state_delta(view.read if isinstance(view, StoredContact) else None, view.state)
            update = {"$set": {**delta.set, "version": version + 1, **view.profile_set}}
            if delta.unset:
                update["$unset"] = delta.unset
            contact_ops.append(UpdateOne({"_id": cid, "version": version}, update))
        # An entry armed and cancelled within this batch is written once, already cancelled: the history
        # shows it as a simulation does, without a second write.
        cancelled_now = {c.entry_id: (c.reason, c.detail) for c in decisions.cancel}
        entries: list[Doc] = []
        messages: list[Doc] = []
        born_cancelled: list[Fate] = []
        decided_counts: list[Increment] = [*(counts or [])]
        for decided in decisions.schedule:
            entry = entry_doc(decided)
            message = message_doc(decided) if decided.message is not None else None
            why = cancelled_now.pop(decided.entry_id, None)
            if why is not None:
                entry.update(status="cancelled", code=why[0], reason=why[1], done_at=now)
                if message is not None:
                    message.update(status="cancelled", reason=why[0], detail=why[1], cancelled_at=now)
                    born_cancelled.append(fate_of(message, "cancelled", why[0]))
                    decided_counts.append(message_increment(message, "cancelled", now, why[0]))
            entries.append(entry)
            if message is not None:
                messages.append(message)
                decided_counts.append(message_increment(message, "scheduled", now))
        cancels = [Cancellation(entry_id, *why) for entry_id, why in cancelled_now.items()]

        async def write(session: AsyncClientSession) -> None:
            quarantined.clear()  # a transaction that is retried runs this again from the start
            cancelled.clear()
            counted.clear()
            if contact_ops and not await self.contacts.write_states(contact_ops, session):
                raise VersionConflict()
            if entries:
                await self.schedule.insert(entries, session)
            if messages:
                await self.messages.insert(messages, session)
            if cancels:
                cancelled.extend(await self.schedule.cancel(cancels, now, session))
            counted.extend([*decided_counts, *(fate_increment(f, now) for f in cancelled)])
            await self.store.add_counts(counted, shard, session)
            if message_ops:
                await self.messages.apply(message_ops, session)
            interest_ops = interest_updates(events)
            if interest_ops:
                await self.catalog.update_interests(interest_ops, session)
            if decisions.audience:
                changes = [{"contact_id": c.contact_id, "audience": c.audience, "op": c.op, "at": c.at,
                            "synced": False} for c in decisions.audience]  # fmt: skip
                await self.audiences.record(changes, session)
            if events:
                await self.inbox_events.mark_done([e["_id"] for e in events], decided_at, shard, session)
            if given is not None:  # before the failures: a failing copy is queued, then counted against
                failing = [d for d in given.docs if d["contact_id"] not in views]
                await self.store.queue_in([*given.queue, *failing], session)
                direct = sum(1 for e in events if e["_id"] in given_ids)
                if direct:
                    await self.store.count_decided(decided_at, direct, shard, session)
                await given.also(session)
            for doc, error in failures:
                quarantined.append(await self._failed(doc, error, session))

        given_ids = {d["_id"] for d in given.docs} if given is not None else set()
        shard = self.shard if given is None else self.fanout_shard
        decided_at = self.clock()  # when the decisions were made (the batch's reads and rules are done)
        quarantined: list[bool] = []
        cancelled: list[Fate] = []
        counted: list[Increment] = []
        try:
            await in_transaction(self.store.client, write)  # within the client's deadline
        except (VersionConflict, DuplicateKeyError) as exc:
            log.info("inbox.version_conflict", contacts=len(views))
            raise VersionConflict() from exc
        if given is not None:
            given.committed = True
        tell([*born_cancelled, *cancelled, *(told or [])], self.on_fate)  # told once committed
        if counted and self.on_counts is not None:
            self.on_counts(counted)
        # Counted once the transaction that quarantined them committed.
        for _ in range(sum(quarantined)):
            if self.on_quarantined is not None:
                self.on_quarantined("inbox")

    async def _failed(self, doc: Doc, exc: BaseException, session: AsyncClientSession | None) -> bool:
        error = failure_text(exc)
        quarantined = await self.store.event_failed(doc["_id"], error, "inbox", self.clock(), session)
        log.error(
            "inbox.event_quarantined" if quarantined else "inbox.event_failed",
            event_id=doc["_id"],
            contact_id=doc.get("contact_id"),
            event_type=doc.get("type"),
            error=error,
        )
        return quarantined

    async def _isolate(self, contact_ids: list[str], exc: BaseException) -> int:
        """A batch failed outside evaluation (e.g. its commit): each contact again alone, and a contact
        that still fails one event at a time, so the event at fault is found and counted against."""
        log.warning("inbox.batch_failed", contacts=len(contact_ids), error=failure_text(exc))
        done = 0
        for cid in contact_ids:
            for limit in (self.max_events, 1):
                try:
                    done += await self._process([cid], limit)
                    break
                except VersionConflict:
                    break  # another process has it now
                except Exception as again:
                    if transient(again):
                        raise
                    if limit > 1:
                        continue
                    first = await self.inbox_events.first_pending(cid)
                    if first is not None and await self._failed(first, again, None):
                        if self.on_quarantined is not None:
                            self.on_quarantined("inbox")
        return done
