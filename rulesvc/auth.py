"""API keys: `Authorization: Bearer rsk_<id>_<secret>`, stored as a SHA-256 of the secret, two scopes.

`ingest` may post events and use the in-app inbox (what a shop's pages and backend need); `admin` may do
everything. Health and metrics stay open on loopback (and everywhere with RULESVC_OPEN_OPS); provider
callbacks are authenticated by the provider's own signature instead.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from pymongo.asynchronous.collection import AsyncCollection

Scope = Literal["ingest", "admin"]
SCOPES: tuple[Scope, ...] = ("ingest", "admin")
KEY_FORMAT = re.compile(r"^rsk_([0-9a-f]{12})_([A-Za-z0-9_-]{32,64})$")
CACHE_SECONDS = 5.0  # a revoked key stops working within this long in every process


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class ApiKey:
    key_id: str
    scope: Scope
    name: str


class Keys:
    def __init__(self, collection: AsyncCollection[dict[str, Any]]) -> None:
        self.collection = collection
        self._cache: dict[str, tuple[float, dict[str, Any] | None]] = {}

    async def create(self, scope: Scope, name: str = "") -> tuple[str, ApiKey]:
        """Returns the key itself (shown once, never stored) and its record."""
        key_id = secrets.token_hex(6)
        secret = secrets.token_urlsafe(32)
        await self.collection.insert_one(
            {
                "_id": key_id,
                "hash": _digest(secret),
                "scope": scope,
                "name": name,
                "created_at": datetime.now(UTC),
            }
        )
        return f"rsk_{key_id}_{secret}", ApiKey(key_id, scope, name)

    async def list(self) -> list[dict[str, Any]]:
        return await self.collection.find({}, {"hash": 0}).sort("created_at", 1).to_list()

    async def revoke(self, key_id: str) -> bool:
        result = await self.collection.update_one(
            {"_id": key_id, "revoked_at": {"$exists": False}}, {"$set": {"revoked_at": datetime.now(UTC)}}
        )
        self._cache.pop(key_id, None)
        return result.modified_count == 1

    async def any_active(self) -> bool:
        return await self.collection.find_one({"revoked_at": {"$exists": False}}) is not None

    async def verify(self, presented: str) -> ApiKey | None:
        match = KEY_FORMAT.match(presented)
        if match is None:
            return None
        key_id, secret = match.groups()
        now = time.monotonic()
        cached = self._cache.get(key_id)
        if cached is None or now - cached[0] > CACHE_SECONDS:
            doc = await self.collection.find_one({"_id": key_id})
            cached = (now, doc)
            self._cache[key_id] = cached
        doc = cached[1]
        if doc is None or doc.get("revoked_at") is not None:
            return None
        if not hmac.compare_digest(doc["hash"], _digest(secret)):
            return None
        return ApiKey(key_id, doc["scope"], doc.get("name", ""))


async def hand_out_first_key(keys: Keys) -> None:
    """The embedded default is for trying rulesvc out: hand the user a key instead of locking them out."""
    if not await keys.any_active():
        key, _ = await keys.create("admin", "created at first start")
        print(f"rulesvc: first start, created an admin API key; it is shown only now:\n{key}", flush=True)


class RateLimiter:
    """A token bucket per key: `rate` requests a second, bursts of twice that."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.burst = max(1.0, 2 * rate)
        self._buckets: dict[str, tuple[float, float]] = {}

    def check(self, key_id: str) -> float | None:
        """None if the request may go on, else the seconds to wait (for Retry-After)."""
        if self.rate <= 0:
            return None
        now = time.monotonic()
        tokens, last = self._buckets.get(key_id, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens < 1:
            self._buckets[key_id] = (tokens, now)
            return (1 - tokens) / self.rate
        self._buckets[key_id] = (tokens - 1, now)
        return None
