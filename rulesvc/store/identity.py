"""Identity links (`identities`) and the merge of an anonymous contact into a known one.

A link is `{"_id": "anon:<anonymousId>", "contact_id": <known contact id>, "linked_at", "merged",
"merged_at"}`: made once, the first one wins (the `_id` is the anonymous contact). Its index of links to
merge is made by `Store.ensure_schema` (the one by `contact_id`, which erasure reads, is privacy's).
The merge moves what is stored under the anonymous id to the known one in ONE transaction, so it is
all or nothing (decided events, pure history, move just before it, in batches): a process that dies
before or in it leaves the link `merged: False`, and the next identify or the start-up/periodic sweep
(`rulesvc.runtime.identity.finish_merges`) does it again from the start.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from pymongo import ASCENDING, UpdateOne
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.errors import DuplicateKeyError

from rulesvc.core import reasons
from rulesvc.core.contacts import PROFILE_FIELDS
from rulesvc.core.engine import (
    Cancellation,
    ContactView,
    armed_at,
    cancelled_by_history,
    event_from_doc,
    from_ts,
)
from rulesvc.core.funnel import Increment, fate_increment
from rulesvc.core.identity import joined_audiences, merge_profile, merge_state, superseded
from rulesvc.core.messages import Fate
from rulesvc.store.carts import Carts
from rulesvc.store.db import Doc, Store
from rulesvc.store.inbox import InboxEvents
from rulesvc.store.schedule import Schedule
from rulesvc.store.transactions import in_transaction

# The collections whose `contact_id` moves as it is (history and what is still to come). `interests`
# are keyed by contact and product, and merged instead; `contacts` is the state merge.
MOVED = ("events", "schedule", "messages", "audience_changes")


class Busy(Exception):
    """A scheduler is deciding a send of one of the contacts now: the merge waits for it."""


class Conflict(Exception):
    """A contact changed between the merge's read and its write (an inbox batch): merge again."""


class Identities:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.links = store.db["identities"]

    async def record(self, anonymous_id: str, known_id: str, now: datetime) -> tuple[Doc, bool]:
        """The link of `anonymous_id` (made now if there was none) and whether this call made it."""
        try:
            await self.links.insert_one(
                {"_id": anonymous_id, "contact_id": known_id, "linked_at": now, "merged": False}
            )
        except DuplicateKeyError:
            found = await self.links.find_one({"_id": anonymous_id})
            assert found is not None  # links are never deleted but with the contact (erasure)
            return found, False
        return {"_id": anonymous_id, "contact_id": known_id, "linked_at": now, "merged": False}, True

    async def resolve(self, anonymous_ids: list[str]) -> dict[str, str]:
        """The known contact each of these anonymous ids is linked to (those linked)."""
        if not anonymous_ids:
            return {}
        cursor = self.links.find({"_id": {"$in": anonymous_ids}}, {"contact_id": 1})
        return {d["_id"]: d["contact_id"] async for d in cursor}

    async def to_finish(self, now: datetime, recent: timedelta, limit: int) -> list[Doc]:
        """Links whose merge is not done (a process died in it, or it waited for a send), and links merged
        lately under whose anonymous id something arrived since (an event racing the merge)."""
        unmerged = (
            await self.links.find({"merged": False}).sort("linked_at", ASCENDING).limit(limit).to_list()
        )
        lately = await self.links.find({"merged": True, "merged_at": {"$gte": now - recent}}).to_list()
        # (A link's `merged_at` is its last merge: an id that keeps receiving late events stays looked at.)
        ids = [d["_id"] for d in lately]
        if not ids:
            return unmerged
        left = set(await self.store.events.distinct("contact_id", {"contact_id": {"$in": ids}}))
        left.update(await self.store.contacts.distinct("_id", {"_id": {"$in": ids}}))
        return [*unmerged, *(d for d in lately if d["_id"] in left)]

    async def move_history(self, anonymous_id: str, known_id: str, batch: int = 1000) -> int:
        """The anonymous contact's decided events moved to the known contact, a batch at a time, before
        the merge's transaction (which then stays small for a visitor with a long history). Decided
        events are history only: no process reads them again, so they may move ahead of the state. The
        queued ones (undecided, or quarantined) stay for the merge's transaction, with their queue."""
        moved = 0
        queued: list[Any] = []
        while True:
            query: Doc = {"contact_id": anonymous_id, "_id": {"$nin": queued}}
            ids = [d["_id"] async for d in self.store.events.find(query, {"_id": 1}).limit(batch)]
            if not ids:
                return moved
            held = {d["_id"] async for d in self.store.queue.find({"_id": {"$in": ids}}, {"_id": 1})}
            queued.extend(held)
            result = await self.store.events.update_many(
                {"_id": {"$in": [i for i in ids if i not in held]}, "contact_id": anonymous_id},
                {"$set": {"contact_id": known_id}},
            )
            moved += result.modified_count

    async def merge(
        self, anonymous_id: str, known_id: str, now: datetime, shard: str
    ) -> tuple[dict[str, int], list[Fate]]:
        """Everything of `anonymous_id` moved to `known_id` in one transaction, the link marked merged.
        Returns the documents moved per collection and the sends cancelled as duplicates (to be told
        once committed). Raises Busy while a send of either contact is being decided, Conflict when
        either contact's state changed meanwhile. The caller holds both contacts' leases."""
        schedule = Schedule(self.store)
        moved: dict[str, int] = {}
        cancelled: list[Fate] = []

        async def write(session: AsyncClientSession) -> None:
            moved.clear()
            cancelled.clear()
            db = self.store
            both = [anonymous_id, known_id]
            if await db.schedule.find_one(
                {"contact_id": {"$in": both}, "status": "running"}, session=session
            ):
                raise Busy()
            contacts = {c["_id"]: c async for c in db.contacts.find({"_id": {"$in": both}}, session=session)}
            anon, known = contacts.get(anonymous_id), contacts.get(known_id)
            waiting = await db.schedule.find(
                {"contact_id": {"$in": both}, "status": "pending"},
                {"key": 1, "contact_id": 1, "trigger.time": 1, "trigger.id": 1, "created_at": 1,
                 "cancel_on": 1},
                session=session,
            ).to_list()  # fmt: skip
            # A send one contact waits on that the other's decided history cancels (a cart left
            # anonymously, then a purchase signed in): cancelled as that event would have, in time order.
            history = await self._cancels_in_history(waiting, both, known or anon, known_id, session)
            waiting = [e for e in waiting if e["_id"] not in {c.entry_id for c in history}]
            drop = superseded(
                [e for e in waiting if e["contact_id"] == known_id],
                [e for e in waiting if e["contact_id"] == anonymous_id],
            )
            detail = f"re-armed by the merge of {anonymous_id} into {known_id}"
            cancels = [*history, *(Cancellation(i, reasons.REARMED, detail) for i in drop)]
            cancelled.extend(await schedule.cancel(cancels, now, session))
            if cancelled:
                counts: list[Increment] = [fate_increment(f, now) for f in cancelled]
                await db.add_counts(counts, shard, session)
            for name in MOVED:
                result = await db.db[name].update_many(
                    {"contact_id": anonymous_id}, {"$set": {"contact_id": known_id}}, session=session
                )
                moved[name] = result.modified_count
            # The queue documents of its undecided events follow them (not counted: the events are).
            await db.queue.update_many(
                {"contact_id": anonymous_id}, {"$set": {"contact_id": known_id}}, session=session
            )
            moved["interests"] = await self._merge_interests(anonymous_id, known_id, session)
            moved["segment_carts"] = await Carts(self.store).merge(anonymous_id, known_id, now, session)
            if anon is not None:
                await self._merge_contact(anon, known, known_id, now, session)
                moved["contacts"] = 1
            await self.links.update_one(
                {"_id": anonymous_id}, {"$set": {"merged": True, "merged_at": now}}, session=session
            )

        await in_transaction(self.store.client, write)
        return {k: v for k, v in moved.items() if v}, cancelled

    async def _cancels_in_history(
        self,
        waiting: list[Doc],
        both: list[str],
        contact: Doc | None,
        known_id: str,
        session: AsyncClientSession,
    ) -> list[Cancellation]:
        """The waiting sends of either contact a decided event of the other, at or after their trigger,
        cancels (`rulesvc.core.engine.cancelled_by_history`, the engine's own test of `cancel_on`)."""
        armed = [e for e in waiting if e.get("cancel_on")]
        if not armed:
            return []
        types = sorted({t for e in armed for spec in e["cancel_on"] for t in spec["event"]})
        since = from_ts(min(armed_at(e) for e in armed))
        found = await InboxEvents(self.store).decided_since(both, types, since, session)
        if not found:
            return []
        contact = contact or {}
        profile = {k: contact[k] for k in PROFILE_FIELDS if contact.get(k) is not None}
        view = ContactView(known_id, profile, dict(contact.get("state") or {}))
        return cancelled_by_history(armed, [event_from_doc(d) for d in found], view)

    async def _merge_interests(self, anonymous_id: str, known_id: str, session: AsyncClientSession) -> int:
        """The anonymous contact's product interests, joined into the known contact's (latest times)."""
        found = await self.store.interests.find({"contact_id": anonymous_id}, session=session).to_list()
        if not found:
            return 0
        ops: list[Any] = []
        for doc in found:
            times = {k: v for k, v in doc.items() if k.endswith("_at")}
            ops.append(
                UpdateOne(
                    {"_id": f"{known_id}|{doc['product_id']}"},
                    {
                        "$max": times,
                        "$setOnInsert": {"contact_id": known_id, "product_id": doc["product_id"]},
                    },
                    upsert=True,
                )
            )
        await self.store.interests.bulk_write(ops, ordered=False, session=session)
        await self.store.interests.delete_many({"contact_id": anonymous_id}, session=session)
        return len(found)

    async def _merge_contact(
        self, anon: Doc, known: Doc | None, known_id: str, now: datetime, session: AsyncClientSession
    ) -> None:
        """The known contact gets the merged state and the profile fields it lacked; the anonymous contact
        is gone. Both checked against the versions read (an inbox batch that wrote meanwhile: Conflict)."""
        state = merge_state((known or {}).get("state") or {}, anon.get("state") or {})
        version = (known or {}).get("version")
        query: Doc = {"_id": known_id, "version": version if version is not None else {"$exists": False}}
        update: Doc = {
            "$set": {"state": state, "version": (version or 0) + 1, **merge_profile(known, anon)},
            "$setOnInsert": {"created_at": anon.get("created_at", now)},
        }
        try:
            result = await self.store.contacts.update_one(query, update, upsert=True, session=session)
        except DuplicateKeyError as exc:  # the known contact was made meanwhile: not the version read
            raise Conflict() from exc
        if not (result.matched_count or result.upserted_id is not None):
            raise Conflict()
        anon_query: Doc = {"_id": anon["_id"]}
        anon_query["version"] = anon["version"] if anon.get("version") is not None else {"$exists": False}
        if not (await self.store.contacts.delete_one(anon_query, session=session)).deleted_count:
            raise Conflict()
        added = joined_audiences((known or {}).get("state") or {}, anon.get("state") or {})
        if added:
            changes = [{"contact_id": known_id, "audience": a, "op": "add", "at": now, "synced": False}
                       for a in added]  # fmt: skip
            await self.store.audience_changes.insert_many(changes, session=session)
