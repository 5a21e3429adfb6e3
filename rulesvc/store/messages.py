"""Queries on `messages` made outside the store's own message methods."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pymongo import ASCENDING, DESCENDING, ReturnDocument, UpdateMany
from pymongo.asynchronous.client_session import AsyncClientSession

from rulesvc.core.messages import SENT_STATUSES
from rulesvc.store.db import Doc, Store, older_than

# The detail of a dead or uncertain message an operator gave up on begins so (its fate is counted
# `dismissed`, not `cancelled`: rulesvc.runtime.fate).
DISMISSED = "dismissed by an operator"


class Messages:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def owners(self, ids: list[str]) -> dict[str, str]:
        """The contact of each of these messages that exists, by message id."""
        found = await self.store.messages.find({"_id": {"$in": ids}}, {"contact_id": 1}).to_list()
        return {d["_id"]: d["contact_id"] for d in found}

    async def by_id(self, ids: list[str]) -> dict[str, Doc]:
        """These messages (those that exist), by id; none asked, no query (most of the inbox's batches)."""
        if not ids:
            return {}
        return {m["_id"]: m async for m in self.store.messages.find({"_id": {"$in": ids}})}

    async def sent_to(self, contact_ids: list[str], rulesets: list[str], since: datetime) -> list[Doc]:
        """The messages of these rulesets sent to these contacts since `since`: what a conversion may be
        credited to (core.attribution)."""
        query = {"contact_id": {"$in": contact_ids}, "ruleset": {"$in": rulesets},
                 "status": {"$in": sorted(SENT_STATUSES)}, "sent_at": {"$gte": since}}  # fmt: skip
        fields = {"contact_id": 1, "ruleset": 1, "rule": 1, "channel": 1, "sent_channel": 1, "status": 1,
                  "sent_at": 1}  # fmt: skip
        return await self.store.messages.find(query, fields, hint="messages_by_contact").to_list()

    async def record(
        self, updates: list[tuple[list[str], Doc, Doc]], token: str, session: AsyncClientSession
    ) -> list[Doc]:
        """Each `(ids, guard, fields)`: set `fields` on these messages, those still matching `guard`, in one
        write; returns the messages it changed (their counter key fields), found by `token`, which marks
        them (`recorded_by`): what a write matched, read back inside the same transaction."""
        ops = [UpdateMany({"_id": {"$in": ids}, **guard}, {"$set": {**fields, "recorded_by": token}})
               for ids, guard, fields in updates]  # fmt: skip
        await self.store.messages.bulk_write(ops, ordered=True, session=session)
        ids = [i for group, _, _ in updates for i in group]
        return await self.store.messages.find(
            {"_id": {"$in": ids}, "recorded_by": token}, KEY_FIELDS, session=session
        ).to_list()

    async def insert(self, messages: list[Doc], session: AsyncClientSession) -> None:
        await self.store.messages.insert_many(messages, session=session)

    async def apply(self, ops: list[Any], session: AsyncClientSession) -> None:
        """Outcome updates (delivered, opened, bounced, ...) in one write."""
        await self.store.messages.bulk_write(ops, ordered=False, session=session)

    async def cancel(
        self, ids: list[str], reason: str, detail: str, now: datetime, session: AsyncClientSession
    ) -> list[Doc]:
        """These messages, those still scheduled, are cancelled with the reason; returns those it
        cancelled (id, contact, ruleset, rule, channel, group), for the outcome log and the funnel."""
        found = await self.store.messages.find(
            {"_id": {"$in": ids}, "status": "scheduled"},
            {
                "contact_id": 1,
                "ruleset": 1,
                "rule": 1,
                "channel": 1,
                "attempt": 1,
                "variant": 1,
                "held_out": 1,
            },
            session=session,
        ).to_list()
        await self.store.messages.update_many(
            {"_id": {"$in": [d["_id"] for d in found]}, "status": "scheduled"},
            {"$set": {"status": "cancelled", "reason": reason, "detail": detail, "cancelled_at": now}},
            session=session,
        )
        return found

    async def sent_since(self, contact_id: str, channel: str, since: datetime) -> int:
        """Marketing messages that went out on `channel` since `since`: what a frequency cap counts."""
        return await self.store.messages.count_documents(
            {"contact_id": contact_id, "sent_channel": channel, "sent_at": {"$gte": since},
             "transactional": {"$ne": True}, "status": {"$nin": ["scheduled", "failed", "dead",
                                                                 "suppressed", "held_out", "cancelled"]}},
        )  # fmt: skip

    async def sending_state(self, message_id: str) -> Doc | None:
        """A message's status and `sending_until`: whether another process's call may still run."""
        return await self.store.messages.find_one({"_id": message_id}, {"status": 1, "sending_until": 1})

    async def mark_sending(self, message_id: str, guard: Doc, fields: Doc) -> bool:
        """The outbox's `sending` mark, set only if the message is still as this process left it."""
        result = await self.store.messages.update_one({"_id": message_id, **guard}, {"$set": fields})
        return result.modified_count == 1

    async def take_back_mark(self, message_id: str, mark: Doc, before: Doc) -> bool:
        """Our `sending` mark (its fields `mark`) undone, back to the message as it was (`before`), if it
        is still on it: a mark whose answer was lost, and whose provider call was never made."""
        guard = {k: mark[k] for k in ("status", "send_owner", "sending_at")}
        restore = {k: before[k] for k in mark if k in before}
        gone = {k: "" for k in mark if k not in before}
        result = await self.store.messages.update_one(
            {"_id": message_id, **guard}, {"$set": restore, **({"$unset": gone} if gone else {})}
        )
        return result.modified_count == 1

    async def get(self, message_id: str) -> Doc | None:
        return await self.store.messages.find_one({"_id": message_id})

    async def find(
        self,
        limit: int,
        *,
        before: datetime | None = None,
        before_id: str | None = None,
        status: str | None = None,
        channel: str | None = None,
        contact_id: str | None = None,
        ruleset: str | None = None,
        rule: str | None = None,
        reason: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> list[Doc]:
        """Messages across contacts, newest first, filtered by any of these fields (`channel`: the one the
        rule named or the one used), decided (`created_at`) in [`since`, `until`).

        Indexes: `status` → messages_by_status, `contact_id` → messages_by_contact, `ruleset` (and `rule`
        within it) → messages_by_ruleset, none of these → messages_by_time; the time window bounds the
        `created_at` key of each. `channel` and `reason` filter what the index gives (reasons come with a
        few statuses: filter by both to stay on an index)."""
        query: Doc = older_than(before, before_id)
        for name, value in (("status", status), ("contact_id", contact_id), ("ruleset", ruleset),
                            ("rule", rule), ("reason", reason)):  # fmt: skip
            if value is not None:
                query[name] = value
        window = {op: at for op, at in (("$gte", since), ("$lt", until)) if at is not None}
        if window:
            query = {"$and": [query, {"created_at": window}]}
        if channel is not None:
            query = {"$and": [query, {"$or": [{"channel": channel}, {"sent_channel": channel}]}]}
        cursor = self.store.messages.find(query).sort([("created_at", DESCENDING), ("_id", DESCENDING)])
        return await cursor.limit(limit).to_list()

    async def retry(self, message_id: str, now: datetime, session: AsyncClientSession) -> Doc | None:
        """A dead, failed or uncertain message back to `scheduled`, due now, its attempts counted afresh;
        the retry recorded (`retried_at`, `retries`). None if it is in no such status."""
        return await self.store.messages.find_one_and_update(
            {"_id": message_id, "status": {"$in": list(RETRYABLE)}},
            {
                "$set": {"status": "scheduled", "due_at": now, "attempt": 0, "retried_at": now},
                "$inc": {"retries": 1},
                "$unset": dict.fromkeys(FORGOTTEN_ON_RETRY, ""),
            },
            return_document=ReturnDocument.AFTER,
            session=session,
        )

    async def cancel_one(
        self, message_id: str, reason: str, now: datetime, session: AsyncClientSession
    ) -> Doc | None:
        """A scheduled, dead or uncertain message `cancelled` with the reason; None if it is in no such
        status. A dead or uncertain one keeps what it was in its detail (one update: no read before)."""
        has_detail = {"$and": [{"$eq": [{"$type": "$detail"}, "string"]}, {"$ne": ["$detail", ""]}]}
        said = {"$cond": [has_detail, {"$concat": [": ", "$detail"]}, ""]}
        was = {"$concat": [DISMISSED + "; it was ", "$status", said]}
        detail = {"$cond": [{"$eq": ["$status", "scheduled"]}, "cancelled by an operator", was]}
        # One `$set` stage: its expressions read the message as it was, `$status` included.
        return await self.store.messages.find_one_and_update(
            {"_id": message_id, "status": {"$in": list(CANCELLABLE)}},
            [{"$set": {"status": "cancelled", "reason": {"$literal": reason}, "detail": detail,
                       "cancelled_at": now}}],
            return_document=ReturnDocument.AFTER,
            session=session,
        )  # fmt: skip

    async def count_status(self, status: str) -> int:
        """Messages in this status now, e.g. the dead letters."""
        return await self.store.messages.count_documents({"status": status}, hint="messages_by_status")

    async def scheduled_of(self, contact_id: str, limit: int) -> list[Doc]:
        """A contact's sends still to go (scheduled, or in a provider call now), soonest first."""
        query = {"contact_id": contact_id, "status": {"$in": ["scheduled", "sending"]}}
        return await self.store.messages.find(query).sort([("due_at", ASCENDING)]).limit(limit).to_list()


# What a message's funnel count needs (rulesvc.core.funnel.message_key).
KEY_FIELDS = {"ruleset": 1, "rule": 1, "variant": 1, "held_out": 1, "channel": 1, "sent_channel": 1}
# The statuses an operator may send again from: given up on, refused, or in doubt.
RETRYABLE = ("dead", "failed", "uncertain")
# The statuses an operator may cancel from: waiting, or given up on or in doubt (dismissed: never retried).
CANCELLABLE = ("scheduled", "dead", "uncertain")
# What a retried message forgets: the last attempt's result and its outbox mark.
FORGOTTEN_ON_RETRY = ("reason", "detail", "sending_at", "sending_until", "send_owner", "resent",
                      "sent_channel", "sent_at", "provider_id")  # fmt: skip
