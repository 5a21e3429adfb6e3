"""API keys: `Authorization: Bearer rsk_<id>_<secret>`, stored as a SHA-256 of the secret, three scopes.

`ingest` may post events and mint in-app inbox tokens (what a shop's backend needs); `read` may look at
everything an admin may look at (every admin `GET`, and the console read-only) but change nothing;
`admin` may do everything. Health and metrics stay open on loopback (and everywhere with
RULESVC_OPEN_OPS); provider callbacks are authenticated by the provider's own signature instead.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import re
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import DuplicateKeyError

from rulesvc.core.durations import parse_duration

Scope = Literal["ingest", "read", "admin"]
SCOPES: tuple[Scope, ...] = ("ingest", "read", "admin")
KEY_FORMAT = re.compile(r"^rsk_([0-9a-f]{12})_([A-Za-z0-9_-]{32,64})$")
CACHE_SECONDS = 5.0  # a revoked key stops working within this long in every process
# Key ids looked up, valid or not, remembered at most this many at a time: random keys presented by a
# scanner would otherwise grow the cache without end (measured: +2.5 MB per 30,000 keys).
CACHE_ENTRIES = 4096


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class ApiKey:
    key_id: str
    scope: Scope
    name: str


class Keys:
    def __init__(
        self, collection: AsyncCollection[dict[str, Any]], cache_entries: int = CACHE_ENTRIES
    ) -> None:
        self.collection = collection
        self.cache_entries = cache_entries
        # Least recently used first; a hit moves its key id to the end.
        self._cache: OrderedDict[str, tuple[float, dict[str, Any] | None]] = OrderedDict()

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
        doc = await self._active(key_id)
        if doc is None or not hmac.compare_digest(doc["hash"], _digest(secret)):
            return None
        return ApiKey(key_id, doc["scope"], doc.get("name", ""))

    async def still_active(self, key_id: str) -> bool:
        """For what a key opened (a console session): it ends when the key is revoked."""
        return await self._active(key_id) is not None

    async def _active(self, key_id: str) -> dict[str, Any] | None:
        now = time.monotonic()
        cached = self._cache.get(key_id)
        if cached is None or now - cached[0] > CACHE_SECONDS:
            doc = await self.collection.find_one({"_id": key_id})
            cached = (now, doc)
            self._cache[key_id] = cached
            while len(self._cache) > self.cache_entries:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key_id)
        doc = cached[1]
        return None if doc is None or doc.get("revoked_at") is not None else doc


INBOX_TOKEN_PREFIX = "rsi"
INBOX_SECRET_ID = "inbox_tokens"
DEFAULT_INBOX_TOKEN_TTL = timedelta(hours=1)
MAX_INBOX_TOKEN_TTL = timedelta(days=30)


TTL_RULE = "ttl must be a duration like 15m, 1h or 7d, more than 0s and at most 30d"


def inbox_token_ttl(text: str) -> timedelta | None:
    """The lifetime asked for, or None if it is not one a token may have (huge numbers included)."""
    try:
        ttl = parse_duration(text)
    except (ValueError, OverflowError):
        return None
    return ttl if timedelta(0) < ttl <= MAX_INBOX_TOKEN_TTL else None


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def inbox_signature(secret: bytes, contact_id: str, expires: int) -> str:
    """HMAC-SHA256 over `contact_id LF expiry` (Unix seconds), base64url without padding. Contact ids
    hold no whitespace, so the two parts cannot be shifted into each other."""
    mac = hmac.new(secret, f"{contact_id}\n{expires}".encode(), hashlib.sha256)
    return _b64(mac.digest())


@dataclass(frozen=True)
class TokenRefused:
    status: int  # 401: not a token we made, or expired; 403: a good token for another contact
    message: str


class InboxTokens:
    """Per-contact tokens for the in-app inbox, as Braze's and Klaviyo's SDKs use per-user tokens: the
    shop's backend mints one with its ingest key for the signed-in customer and hands it to the page; the
    page can read and act on that one inbox until the token expires, and nothing else.

    A token is `rsi.<base64url contact id>.<expiry, Unix seconds>.<signature>`, the signature as
    `inbox_signature` makes it with a random server secret kept in MongoDB (created at first use,
    shared by every process, never logged or returned). Deleting that document revokes every token.
    """

    def __init__(self, collection: AsyncCollection[dict[str, Any]]) -> None:
        self.collection = collection
        self._secret: tuple[float, bytes] | None = None

    async def secret(self) -> bytes:
        now = time.monotonic()
        if self._secret is not None and now - self._secret[0] <= CACHE_SECONDS:
            return self._secret[1]
        doc = await self.collection.find_one({"_id": INBOX_SECRET_ID})
        if doc is None:
            try:
                await self.collection.insert_one({"_id": INBOX_SECRET_ID, "secret": secrets.token_bytes(32)})
            except DuplicateKeyError:
                pass  # another process made it first: use theirs
            doc = await self.collection.find_one({"_id": INBOX_SECRET_ID})
            assert doc is not None
        self._secret = (now, bytes(doc["secret"]))
        return self._secret[1]

    async def mint(
        self, contact_id: str, ttl: timedelta = DEFAULT_INBOX_TOKEN_TTL, now: datetime | None = None
    ) -> tuple[str, datetime]:
        """The token and when it expires (whole seconds)."""
        expires = math.ceil(((now or datetime.now(UTC)) + ttl).timestamp())
        signature = inbox_signature(await self.secret(), contact_id, expires)
        token = f"{INBOX_TOKEN_PREFIX}.{_b64(contact_id.encode())}.{expires}.{signature}"
        return token, datetime.fromtimestamp(expires, UTC)

    async def check(self, token: str, contact_id: str, now: datetime | None = None) -> TokenRefused | None:
        """None when `token` lets its bearer use `contact_id`'s inbox now; else why not."""
        invalid = TokenRefused(401, "invalid inbox token")
        prefix, _, rest = token.partition(".")
        encoded, _, rest = rest.partition(".")
        expires_text, _, signature = rest.partition(".")
        if prefix != INBOX_TOKEN_PREFIX or not expires_text.isdigit() or len(expires_text) > 12:
            return invalid
        try:
            owner = _unb64(encoded).decode()
        except (ValueError, UnicodeDecodeError):
            return invalid
        expected = inbox_signature(await self.secret(), owner, int(expires_text))
        if not hmac.compare_digest(expected.encode(), signature.encode()):
            return invalid
        if int(expires_text) <= (now or datetime.now(UTC)).timestamp():
            return TokenRefused(401, "inbox token expired; ask the shop's backend for a new one")
        if owner != contact_id:
            return TokenRefused(403, "this inbox token is for another contact")
        return None


async def hand_out_first_key(keys: Keys) -> None:
    """The embedded default is for trying rulesvc out: hand the user a key instead of locking them out."""
    if not await keys.any_active():
        key, _ = await keys.create("admin", "created at first start")
        print(f"rulesvc: first start, created an admin API key; it is shown only now:\n{key}", flush=True)
