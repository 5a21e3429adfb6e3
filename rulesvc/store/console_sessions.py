"""The console's login sessions: a random token in the browser's cookie, only its SHA-256 here (a copy of
the database opens no console), with the key and scope it was opened with and its CSRF token. MongoDB's
TTL monitor removes expired ones; a lookup also refuses them, since the monitor runs once a minute."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from pymongo import ASCENDING, IndexModel
from pymongo.asynchronous.collection import AsyncCollection

from rulesvc.store.keys import Scope

TOKEN_BYTES = 32


@dataclass(frozen=True)
class ConsoleSession:
    key_id: str
    scope: Scope
    csrf: str
    expires_at: datetime


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class ConsoleSessions:
    def __init__(self, collection: AsyncCollection[dict[str, Any]]) -> None:
        self.collection = collection

    async def ensure_indexes(self) -> None:
        """Idempotent, as `Store.ensure_schema`: every worker runs it as it starts."""
        await self.collection.create_indexes(
            [IndexModel([("expires_at", ASCENDING)], name="console_sessions_ttl", expireAfterSeconds=0)]
        )

    async def open(self, key_id: str, scope: Scope, lifetime: timedelta) -> tuple[str, ConsoleSession]:
        """Returns the cookie's token (never stored) and the session."""
        token = secrets.token_urlsafe(TOKEN_BYTES)
        now = datetime.now(UTC)
        session = ConsoleSession(key_id, scope, secrets.token_urlsafe(TOKEN_BYTES), now + lifetime)
        await self.collection.insert_one(
            {
                "_id": _digest(token),
                "key_id": key_id,
                "scope": scope,
                "csrf": session.csrf,
                "created_at": now,
                "expires_at": session.expires_at,
            }
        )
        return token, session

    async def find(self, token: str) -> tuple[ConsoleSession, str | None] | None:
        """The session and its notice for the next page (taken: shown once), or None when the token is
        unknown, logged out or expired."""
        digest = _digest(token)
        doc = await self.collection.find_one({"_id": digest, "expires_at": {"$gt": datetime.now(UTC)}})
        if doc is None:
            return None
        if "notice" in doc:  # a read per page; a write only for the page after a change
            taken = await self.collection.update_one(
                {"_id": digest, "notice": doc["notice"]}, {"$unset": {"notice": ""}}
            )
            if not taken.modified_count:  # another request of the same session showed it
                doc.pop("notice")
        session = ConsoleSession(
            doc["key_id"], doc["scope"], doc["csrf"], doc["expires_at"].replace(tzinfo=UTC)
        )
        return session, doc.get("notice")

    async def notify(self, token: str, notice: str) -> None:
        await self.collection.update_one({"_id": _digest(token)}, {"$set": {"notice": notice[:500]}})

    async def close(self, token: str) -> None:
        await self.collection.delete_one({"_id": _digest(token)})
