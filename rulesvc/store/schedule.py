"""The durable schedule (`schedule`): finding, claiming and renewing the due entries."""

from __future__ import annotations

import uuid
from collections import defaultdict
from datetime import datetime, timedelta

from pymongo import ASCENDING, UpdateOne
from pymongo.asynchronous.client_session import AsyncClientSession

from rulesvc.core.engine import Cancellation
from rulesvc.core.messages import Fate, fate_of
from rulesvc.store.db import Doc, Store
from rulesvc.store.messages import Messages

# An entry pending again after it ran (postponed, retried, sent again) is not waiting for its contact's
# earlier events any more: what `put_back` recorded of its waits goes, with its claim.
WAITS = {"held_due": "", "holds": ""}
DECIDED_AGAIN = {"owner": "", "lease_until": "", **WAITS}
OVER = {"lease_until": "", **WAITS}  # an entry over keeps its owner: who ran it


class Schedule:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def next_due(self) -> datetime | None:
        """When the earliest pending entry is due."""
        nxt = await self.store.schedule.find_one(
            {"status": "pending"}, {"due_at": 1}, sort=[("due_at", ASCENDING)]
        )
        return None if nxt is None else nxt["due_at"]

    async def release_expired(self, now: datetime) -> None:
        """Entries whose claim ran out (their process died or stopped renewing) are pending again."""
        await self.store.schedule.update_many(
            {"status": "running", "lease_until": {"$lt": now}},
            {"$set": {"status": "pending"}, "$unset": {"owner": "", "lease_until": ""}},
        )

    async def claim(self, now: datetime, limit: int, lease: timedelta) -> list[Doc]:
        """Up to `limit` entries due by `now`, earliest first, now `running` under one new owner token."""
        ids = [
            d["_id"]
            async for d in self.store.schedule.find(
                {"status": "pending", "due_at": {"$lte": now}}, {"_id": 1}, sort=[("due_at", ASCENDING)]
            ).limit(limit)
        ]
        if not ids:
            return []
        token = uuid.uuid4().hex
        await self.store.schedule.update_many(
            {"_id": {"$in": ids}, "status": "pending"},
            {"$set": {"status": "running", "owner": token, "lease_until": now + lease}},
        )
        # In the order they were written: the scheduler puts the sends in their contacts' order.
        return await self.store.schedule.find({"owner": token, "status": "running"}).to_list()

    async def put_back(self, looks: dict[str, datetime], owner: str, counted: set[str]) -> None:
        """Claimed entries handed back unsent, each to be looked at again at its time in `looks`: they
        wait for their contact's earlier events or sends. `held_due` keeps the time the send first came
        due (what it waits against); `holds` counts the returns of those in `counted` (the waits for the
        inbox, whose back-off grows with them)."""
        if not looks:
            return
        await self.store.schedule.bulk_write(
            [
                UpdateOne(
                    {"_id": entry_id, "owner": owner, "status": "running"},
                    [
                        {
                            "$set": {
                                "status": "pending",
                                "held_due": {"$ifNull": ["$held_due", "$due_at"]},
                                "due_at": at,
                                "holds": {"$add": [{"$ifNull": ["$holds", 0]}, int(entry_id in counted)]},
                            }
                        },
                        {"$unset": ["owner", "lease_until"]},
                    ],
                )
                for entry_id, at in looks.items()
            ],
            ordered=False,
        )

    async def held_of(self, contact_ids: list[str], claimed: list[str]) -> list[Doc]:
        """These contacts' sends that were put back and wait, or run now in another claim (what their
        later sends wait behind), but those of this claim: a small partial index holds only sends put
        back and not yet over."""
        return await self.store.schedule.find(
            {
                "contact_id": {"$in": contact_ids},
                "held_due": {"$exists": True},
                "status": {"$in": ["pending", "running"]},
                "_id": {"$nin": claimed},
            },
            {"contact_id": 1, "held_due": 1, "due_at": 1, "created_at": 1, "trigger.time": 1},
            hint="schedule_held",
        ).to_list()

    async def renew(self, owner: str, until: datetime) -> None:
        """The claim of `owner` on its running entries lasts until `until`."""
        await self.store.schedule.update_many(
            {"owner": owner, "status": "running"}, {"$set": {"lease_until": until}}
        )

    async def pending_of(self, contact_ids: list[str]) -> dict[str, list[Doc]]:
        """The pending entries of these contacts (what the engine needs to know of them), by contact."""
        pending: dict[str, list[Doc]] = {}
        async for entry in self.store.schedule.find(
            {"contact_id": {"$in": contact_ids}, "status": "pending"},
            {"key": 1, "ruleset": 1, "rule": 1, "cancel_on": 1, "contact_id": 1},
        ):
            pending.setdefault(entry["contact_id"], []).append(entry)
        return pending

    async def running_contacts(self) -> list[str]:
        """The contacts of the entries a scheduler is deciding now (claimed, not yet written back)."""
        return list(await self.store.schedule.distinct("contact_id", {"status": "running"}))

    async def run_again(self, entry_id: str, owner: str, at: datetime) -> None:
        """The entry (still claimed by `owner`) is pending again, due at `at`."""
        await self.store.schedule.update_one(
            {"_id": entry_id, "owner": owner},
            {"$set": {"status": "pending", "due_at": at}, "$unset": DECIDED_AGAIN},
        )

    async def run_again_many(
        self, entries: list[tuple[str, datetime]], owner: str, session: AsyncClientSession
    ) -> set[str]:
        """Each entry still claimed by `owner` pending again, due at its time; returns those it moved
        (inside a transaction, what is read is what is written)."""
        ids = [entry_id for entry_id, _ in entries]
        owned = {
            d["_id"]
            async for d in self.store.schedule.find({"_id": {"$in": ids}, "owner": owner}, {"_id": 1},
                                                    session=session)
        }  # fmt: skip
        ops = [
            UpdateOne(
                {"_id": entry_id, "owner": owner},
                {"$set": {"status": "pending", "due_at": at}, "$unset": DECIDED_AGAIN},
            )
            for entry_id, at in entries
            if entry_id in owned
        ]
        if ops:
            await self.store.schedule.bulk_write(ops, ordered=False, session=session)
        return owned

    async def finish(
        self, ids: list[str], owner: str, status: str, now: datetime, reason: str | None
    ) -> None:
        """These entries of `owner` are over: `done`, or `cancelled` with the reason."""
        await self.store.schedule.update_many(
            {"_id": {"$in": ids}, "owner": owner},
            {"$set": {"status": status, "done_at": now} | ({"reason": reason} if reason else {}),
             "$unset": OVER},
        )  # fmt: skip

    async def fail(self, entry_id: str, owner: str, reason: str, now: datetime) -> None:
        """Set aside: `failed` with why, while the rest of its batch goes on."""
        await self.store.schedule.update_one(
            {"_id": entry_id, "owner": owner},
            {"$set": {"status": "failed", "reason": reason, "done_at": now}, "$unset": OVER},
        )

    async def insert(self, entries: list[Doc], session: AsyncClientSession) -> None:
        await self.store.schedule.insert_many(entries, session=session)

    async def cancel(
        self, cancels: list[Cancellation], now: datetime, session: AsyncClientSession
    ) -> list[Fate]:
        """The engine's cancellations written: their entries still pending `cancelled`, each with its
        reason's code (`code`) and its detail (`reason`), and their messages still scheduled too.
        Returns the fates of the messages it cancelled, for the outcome log and the funnel."""
        by_reason: dict[tuple[str, str], list[str]] = defaultdict(list)
        for c in cancels:
            by_reason[c.reason, c.detail].append(c.entry_id)
        fates: list[Fate] = []
        for (code, detail), ids in by_reason.items():
            await self.cancel_entries(ids, code, detail, now, session)
            found = await Messages(self.store).cancel(ids, code, detail, now, session)
            fates.extend(fate_of(doc, "cancelled", code) for doc in found)
        return fates

    async def cancel_entries(
        self, ids: list[str], code: str, detail: str, now: datetime, session: AsyncClientSession
    ) -> None:
        """These entries, those still pending, `cancelled`: the reason's code and its detail."""
        await self.store.schedule.update_many(
            {"_id": {"$in": ids}, "status": "pending"},
            {"$set": {"status": "cancelled", "code": code, "reason": detail, "done_at": now},
             "$unset": WAITS},
            session=session,
        )  # fmt: skip

    async def send_again(self, message: Doc, now: datetime, session: AsyncClientSession) -> None:
        """The entry of a message an operator retries: pending again, due now; made anew from the message
        if it is gone (its key is the message's own, so no repeat trigger replaces it)."""
        await self.store.schedule.update_one(
            {"_id": message["_id"]},
            {
                "$set": {"status": "pending", "due_at": now},
                "$unset": {**DECIDED_AGAIN, "done_at": "", "reason": ""},
                "$setOnInsert": {
                    "contact_id": message["contact_id"],
                    "ruleset": message["ruleset"],
                    "rule": message["rule"],
                    "key": f"retry/{message['_id']}",
                    "created_at": now,
                    "cancel_on": [],
                    "message": {
                        k: message.get(k)
                        for k in ("channel", "template", "params", "transactional", "fallback", "guard")
                    },
                },
            },
            upsert=True,
            session=session,
        )

    async def due_sends(self, now: datetime) -> tuple[int, datetime | None]:
        """(pending sends whose due time has passed, the earliest of their due times): the due queue."""
        query: Doc = {"status": "pending", "due_at": {"$lte": now}, "message": {"$exists": True}}
        count = await self.store.schedule.count_documents(query, hint="schedule_due")
        first = await self.store.schedule.find_one(
            query, {"due_at": 1}, sort=[("due_at", ASCENDING)], hint="schedule_due"
        )
        return count, None if first is None else first["due_at"]
