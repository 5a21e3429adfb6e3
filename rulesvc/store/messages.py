"""Queries on `messages` made outside the store's own message methods."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pymongo.asynchronous.client_session import AsyncClientSession

from rulesvc.store.db import Doc, Store


class Messages:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def owners(self, ids: list[str]) -> dict[str, str]:
        """The contact of each of these messages that exists, by message id."""
        found = await self.store.messages.find({"_id": {"$in": ids}}, {"contact_id": 1}).to_list()
        return {d["_id"]: d["contact_id"] for d in found}

    async def by_id(self, ids: list[str]) -> dict[str, Doc]:
        """These messages (those that exist), by id."""
        return {m["_id"]: m async for m in self.store.messages.find({"_id": {"$in": ids}})}

    async def update(self, ids: list[str], guard: Doc, fields: Doc) -> None:
        """Set `fields` on these messages, those still matching `guard` (e.g. their status)."""
        await self.store.messages.update_many({"_id": {"$in": ids}, **guard}, {"$set": fields})

    async def update_one(self, message_id: str, guard: Doc, fields: Doc) -> None:
        await self.store.messages.update_one({"_id": message_id, **guard}, {"$set": fields})

    async def note_sent(self, message_id: str, now: datetime, channel: str | None) -> None:
        """Sent, ahead of the batch's record: the contact's next cap check counts it."""
        await self.store.messages.update_one(
            {"_id": message_id}, {"$set": {"sent_at": now, "sent_channel": channel}}
        )

    async def insert(self, messages: list[Doc], session: AsyncClientSession) -> None:
        await self.store.messages.insert_many(messages, session=session)

    async def apply(self, ops: list[Any], session: AsyncClientSession) -> None:
        """Outcome updates (delivered, opened, bounced, ...) in one write."""
        await self.store.messages.bulk_write(ops, ordered=False, session=session)

    async def cancel(self, ids: list[str], reason: str, now: datetime, session: AsyncClientSession) -> None:
        """These messages, those still scheduled, are cancelled with the reason."""
        await self.store.messages.update_many(
            {"_id": {"$in": ids}, "status": "scheduled"},
            {"$set": {"status": "cancelled", "reason": reason, "cancelled_at": now}},
            session=session,
        )

    async def sent_since(self, contact_id: str, channel: str, since: datetime) -> int:
        """Marketing messages that went out on `channel` since `since`: what a frequency cap counts."""
        return await self.store.messages.count_documents(
            {"contact_id": contact_id, "sent_channel": channel, "sent_at": {"$gte": since},
             "transactional": {"$ne": True}, "status": {"$nin": ["scheduled", "failed", "dead",
                                                                 "suppressed", "cancelled"]}},
        )  # fmt: skip

    async def sending_state(self, message_id: str) -> Doc | None:
        """A message's status and `sending_until`: whether another process's call may still run."""
        return await self.store.messages.find_one({"_id": message_id}, {"status": 1, "sending_until": 1})

    async def mark_sending(self, message_id: str, guard: Doc, fields: Doc) -> bool:
        """The outbox's `sending` mark, set only if the message is still as this process left it."""
        result = await self.store.messages.update_one({"_id": message_id, **guard}, {"$set": fields})
        return result.modified_count == 1
