"""Queries on `contacts` made outside the store's own contact methods."""

from __future__ import annotations

from typing import Any

from pymongo import UpdateOne
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.errors import BulkWriteError

from rulesvc.store.db import EMAIL_COLLATION, Doc, Store

# What a search result shows of a contact: never its state, push tokens or lease-era fields.
SUMMARY_FIELDS = {"email": 1, "phone": 1, "created_at": 1, "updated_at": 1}


EVENTS_SEEN_LIMIT = 10_000


class Contacts:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def by_id(self, ids: list[str]) -> dict[str, Doc]:
        """These contacts' profiles and state (those that exist), by id."""
        return {c["_id"]: c async for c in self.store.contacts.find({"_id": {"$in": ids}})}

    async def forget_unreachable(self, removals: list[tuple[str, str, Any]]) -> list[Doc] | None:
        """Removes each (contact, field path, value) a channel found unreachable (a dead push token). The
        write errors if the database refused some (the others are still made), else None."""
        if not removals:
            return None
        ops = [UpdateOne({"_id": cid}, {"$pull": {path: value}}) for cid, path, value in removals]
        try:
            await self.store.contacts.bulk_write(ops, ordered=False)
        except BulkWriteError as exc:
            return list(exc.details.get("writeErrors", []))
        return None

    async def write_states(self, ops: list[Any], session: AsyncClientSession) -> bool:
        """The contacts' new state, each write checked against the version it was read at: False if any
        contact changed meanwhile (another process decided for it)."""
        try:
            result = await self.store.contacts.bulk_write(ops, ordered=False, session=session)
        except BulkWriteError:
            return False
        return result.matched_count + result.upserted_count == len(ops)

    async def with_email(self, email: str, limit: int) -> list[Doc]:
        """Contacts whose email is this one in any letter case (index `contacts_by_email`)."""
        cursor = self.store.contacts.find({"email": email}, SUMMARY_FIELDS, collation=EMAIL_COLLATION)
        return await cursor.sort([("_id", 1)]).limit(limit).to_list()

    async def with_phone(self, phone: str, limit: int) -> list[Doc]:
        """Contacts with this E.164 number (index `contacts_by_phone`)."""
        cursor = self.store.contacts.find({"phone": phone}, SUMMARY_FIELDS)
        return await cursor.sort([("_id", 1)]).limit(limit).to_list()

    async def summary(self, contact_id: str) -> Doc | None:
        """The contact's search row, or, for an id with events but no stored contact, a bare one."""
        doc = await self.store.contacts.find_one({"_id": contact_id}, SUMMARY_FIELDS)
        if doc is not None:
            return doc
        seen = await self.store.events.find_one({"contact_id": contact_id}, {"_id": 1})
        return None if seen is None else {"_id": contact_id}

    async def events_seen(self, contact_id: str, types: list[str]) -> dict[str, tuple[int, Any]]:
        """Of these event types, those the contact's stored events have: (how many, the last time), among
        its newest EVENTS_SEEN_LIMIT events (newest first on `events_by_contact`: a contact with a huge
        history, a bot or a shared anonymous id, is not read through on every look at its page)."""
        if not types:
            return {}
        pipeline: list[Doc] = [
            {"$match": {"contact_id": contact_id}},
            {"$sort": {"contact_id": 1, "time": -1}},
            {"$limit": EVENTS_SEEN_LIMIT},
            {"$match": {"type": {"$in": types}}},
            {"$group": {"_id": "$type", "n": {"$sum": 1}, "last": {"$max": "$time"}}},
        ]
        cursor = await self.store.events.aggregate(pipeline, hint="events_by_contact")
        return {d["_id"]: (int(d["n"]), d["last"]) async for d in cursor}
