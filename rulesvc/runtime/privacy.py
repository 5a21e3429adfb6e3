"""Privacy requests: erase a contact everywhere, export everything stored about it, and log each request.

An erasure must not be undone by work in flight. So it writes the tombstone first (ingest drops a late
retry of an old event from then on), takes the contact's lease as an inbox batch does (no batch decides
for it meanwhile, and it waits for one that does now), deletes the sends no scheduler runs and waits for
those one runs, then deletes everything, waits a moment for writes that were already on their way (an
ingest that looked for the tombstone just before it existed, a provider callback, a fan-out copy) and
deletes again, before it lets the lease go.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import msgspec
import structlog

from rulesvc.core.audiences import hashed_identifiers
from rulesvc.core.privacy import ERASED_PREFIX, TombstoneMode, contact_hash, dropped_events
from rulesvc.runtime.waiting import renewing
from rulesvc.store.db import Doc, Store
from rulesvc.store.leases import ContactLeases
from rulesvc.store.privacy import Privacy

log = structlog.get_logger(__name__)

LEASE = timedelta(seconds=30)  # renewed every 10 s while the erasure runs
WAIT_FOR_WORK = 120.0  # seconds to wait for an inbox batch or a send in flight before giving up
# After the first deletion, how long writes already on their way get before the second: an ingest's
# insert, a provider callback's outcome event, a fan-out copy, each a single write.
SETTLE = 0.5
EXPORT_FORMAT = "rulesvc.contact-export/1"
CHUNK = 64 * 1024  # bytes of the export written at a time


class ErasureBusy(Exception):
    """The contact's events or sends stayed in work longer than `WAIT_FOR_WORK`: nothing was deleted
    yet but the sends to come (the tombstone is written); the request may be repeated."""


@dataclass
class ErasureReport:
    contact_id_sha256: str
    deleted: dict[str, int] = field(default_factory=dict)
    audience_removals: int = 0  # removals queued for the ad platforms (hashed identifiers only)
    linked_ids: int = 0  # anonymous ids linked to the contact, erased with it
    request_id: str = ""


async def _lease(leases: ContactLeases, ids: list[str]) -> str:
    """The contacts' lease, as an inbox batch takes it: waits while a batch holds one of them."""
    token = f"privacy/{uuid.uuid4().hex}"
    loop = asyncio.get_running_loop()
    give_up = loop.time() + WAIT_FOR_WORK
    while True:
        now = datetime.now(UTC)
        await leases.release_expired(now)  # a lease whose process died
        if await leases.take(token, "privacy", ids, now + LEASE):
            return token
        if loop.time() > give_up:
            raise ErasureBusy("the contact's events stayed in an inbox batch; try again")
        await asyncio.sleep(0.01)  # a busy inbox lets a contact go between batches only briefly


async def erase_contact(
    store: Store, contact_id: str, now: datetime | None = None, source: str = "api", *, settle: float = SETTLE
) -> ErasureReport:
    """Erase the contact and the anonymous ids linked to it everywhere (`CONTACT_FIELDS`), queue its
    removal from the ad audiences it is in, keep a tombstone, log the request. Idempotent: an unknown id
    is erased with nothing found (zeros). `settle`: the pause before the second deletion (a caller erasing
    many contacts at once, a shop's redact, may erase them all and then each again after one pause)."""
    now = now or datetime.now(UTC)
    privacy = Privacy(store)
    h = contact_hash(contact_id)
    request_id = await privacy.open_request(
        {"kind": "erase", "contact_sha256": h, "source": source, "requested_at": now}
    )
    ids = [contact_id, *[i for i in await privacy.linked_ids(contact_id) if i != contact_id]]
    await privacy.bury([contact_hash(i) for i in ids], now)
    leases = ContactLeases(store)
    token = await _lease(leases, ids)
    report = ErasureReport(h, linked_ids=len(ids) - 1, request_id=request_id)

    async def renew() -> None:
        await leases.renew(token, datetime.now(UTC) + LEASE)

    try:
        async with renewing("privacy", renew, LEASE.total_seconds() / 3):
            loop = asyncio.get_running_loop()
            give_up = loop.time() + WAIT_FOR_WORK
            stopped = 0
            while True:
                deleted, running = await privacy.stop_sends(ids)
                stopped += deleted
                if not running:
                    break
                if loop.time() > give_up:
                    raise ErasureBusy("a send to the contact stayed in flight; try again")
                await asyncio.sleep(0.05)
            report.audience_removals = await privacy.queue_removals(
                await _removals(store, privacy, ids, h, now)
            )
            first = await privacy.erase_pass(ids, now)
            first["schedule"] += stopped
            if any(first.values()):
                await asyncio.sleep(settle)
            second = await privacy.erase_pass(ids, now)
    finally:
        await leases.release(token)
    report.deleted = {k: first[k] + second.get(k, 0) for k in first}
    done = datetime.now(UTC)
    counts = {
        **report.deleted,
        "audience_removals": report.audience_removals,
        "linked_ids": report.linked_ids,
    }
    await privacy.close_request(request_id, done, counts)
    log.info("privacy.erased", contact_sha256=h, source=source, **counts)
    return report


class TombstoneCache:
    """This process's copy of the tombstones, so that ingest asks MongoDB nothing per request (a query per
    request halved the single-event ingest rate, measured). It reads only the tombstones changed since its
    last look, at most every REFRESH seconds, well inside an erasure's settle pause: an event accepted by
    a process that had not seen a new tombstone yet is deleted by the erasure's second pass. Reads go back
    OVERLAP before the newest change seen, since writes of several processes commit out of time order.
    Above MAX_KEPT tombstones it stops copying and asks MongoDB per batch, as before."""

    REFRESH = 0.2
    OVERLAP = timedelta(seconds=30)
    MAX_KEPT = 200_000

    def __init__(self, store: Store) -> None:
        self.privacy = Privacy(store)
        self.stones: dict[str, Doc] = {}
        self.newest: datetime | None = None
        self.looked_at = -math.inf
        self.lock = asyncio.Lock()
        self.too_many = False

    async def of(self, hashes: list[str]) -> dict[str, Doc]:
        """The tombstones among these contact hashes."""
        if not hashes:
            return {}
        await self._refresh()
        if self.too_many:
            return await self.privacy.tombstones_of(hashes)
        return {h: self.stones[h] for h in hashes if h in self.stones}

    def stale(self) -> None:
        """This process changed a tombstone (an erasure, a re-creation): the next check reads first."""
        self.looked_at = -math.inf

    async def _refresh(self) -> None:
        loop = asyncio.get_running_loop()
        if self.too_many or loop.time() - self.looked_at < self.REFRESH:
            return
        async with self.lock:
            if loop.time() - self.looked_at < self.REFRESH:
                return
            started = loop.time()
            since = None if self.newest is None else self.newest - self.OVERLAP
            while True:
                docs = await self.privacy.tombstones_changed(since, 10_000)
                for doc in docs:
                    self.stones[doc["_id"]] = doc
                    changed = doc.get("changed_at")
                    if isinstance(changed, datetime) and (self.newest is None or changed > self.newest):
                        self.newest = changed
                if len(self.stones) > self.MAX_KEPT:
                    self.too_many, self.stones = True, {}
                    log.info("privacy.tombstones_not_cached", kept_over=self.MAX_KEPT)
                    return
                if len(docs) < 10_000 or self.newest is None or self.newest == since:
                    break
                since = self.newest  # a long first read: go on from the newest seen
            self.looked_at = started


async def tombstone_drops(store: Store, contact_id: str, time: datetime, mode: TombstoneMode) -> bool:
    """For a profile update a source derives from a posted message (Segment's identify, Shopify's
    customers/update): True when the contact's tombstone drops it, as ingest drops an event of that time
    (a late retry of a webhook from before the erasure must not bring the email back)."""
    if mode == "off":
        return False
    h = contact_hash(contact_id)
    stones = await Privacy(store).tombstones_of([h])
    return bool(dropped_events([(contact_id, time)], stones, mode))


async def _removals(store: Store, privacy: Privacy, ids: list[str], h: str, now: datetime) -> list[Doc]:
    """One `remove` per audience the contacts are in, naming the person by hashed identifiers only."""
    audiences = await privacy.audience_memberships(ids)
    if not audiences:
        return []
    profile = await store.get_contact(ids[0]) or {}
    # The email even when it bounced since (`email_invalid`): it may have been sent with the add, and
    # removing a digest the platform does not hold is harmless.
    identifiers = hashed_identifiers(_text(profile.get("email")), _text(profile.get("phone")))
    return [
        {"audience": a, "contact_id": f"{ERASED_PREFIX}{h}", "op": "remove", "identifiers": identifiers,
         "at": now, "synced": False}
        for a in audiences
    ]  # fmt: skip


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


# --- the export ------------------------------------------------------------------------------------------


def _enc_hook(value: Any) -> Any:
    """BSON's own types (ObjectId, Decimal128, ...) as their text."""
    return str(value)


_encoder = msgspec.json.Encoder(enc_hook=_enc_hook)


def _json(value: Any) -> bytes:
    return _encoder.encode(value)


async def export_chunks(store: Store, contact_id: str, now: datetime | None = None) -> AsyncIterator[bytes]:
    """Everything stored about the contact as one JSON document, in pieces: events and messages are read
    from their cursors a batch at a time, so a long history is never held in memory whole."""
    privacy = Privacy(store)
    now = now or datetime.now(UTC)
    profile = await store.get_contact(contact_id)
    state = None if profile is None else profile.pop("state", None)
    if profile is not None:
        profile.pop("_id", None)
        profile.pop("version", None)
    head = {
        "format": EXPORT_FORMAT,
        "contact_id": contact_id,
        "exported_at": now,
        "profile": profile,
        "state": state,
        "identities": await privacy.identity_links(contact_id),
    }
    yield _json(head)[:-1]
    audiences = [
        {k: v for k, v in d.items() if k != "contact_id"}
        async for d in privacy.contact_docs("audience_changes", contact_id, [("at", 1)])
    ]
    yield b',"audiences":' + _json(
        {"member_of": await privacy.audience_memberships([contact_id]), "changes": audiences}
    )
    sections: list[tuple[str, str, list[tuple[str, int]]]] = [
        ("interests", "interests", [("_id", 1)]),
        ("carts", "segment_carts", [("_id", 1)]),
        ("scheduled", "schedule", [("due_at", 1), ("_id", 1)]),
        ("messages", "messages", [("created_at", 1), ("_id", 1)]),
        ("events", "events", [("time", 1), ("_id", 1)]),
    ]
    for name, collection, sort in sections:
        piece = bytearray(f',"{name}":['.encode())
        first = True
        async for doc in privacy.contact_docs(collection, contact_id, sort):
            doc.pop("contact_id", None)
            piece += (b"" if first else b",") + _json(doc)
            first = False
            if len(piece) >= CHUNK:
                yield bytes(piece)
                piece.clear()
        yield bytes(piece + b"]")
    inbox = await store.inapp_messages(contact_id, 10_000)
    yield b',"inbox":' + _json([d["_id"] for d in inbox]) + b"}"


async def export_contact(store: Store, contact_id: str) -> dict[str, Any] | None:
    """The export as one value (Shopify's data request); None for a contact nothing is stored of. The
    caller logs the request (`record_request`), as it knows who asked."""
    if not await Privacy(store).known(contact_id):
        return None
    body = b"".join([chunk async for chunk in export_chunks(store, contact_id)])
    decoded: dict[str, Any] = msgspec.json.decode(body)
    return decoded


async def record_request(
    store: Store,
    kind: Literal["export", "erase"],
    contact_id: str,
    source: str,
    details: dict[str, Any] | None = None,
    requested_at: datetime | None = None,
) -> str:
    """A privacy request in the log, done now: what was asked, by whom (`api:<key id>`, `cli`,
    `shopify:<shop domain>`), when. An erasure's entry keeps only the SHA-256 of the contact id."""
    now = datetime.now(UTC)
    fields: Doc = {"kind": kind, "contact_sha256": contact_hash(contact_id), "source": source,
                   "requested_at": requested_at or now, "done_at": now, "counts": details or {}}  # fmt: skip
    if kind == "export":
        fields["contact_id"] = contact_id
    return await Privacy(store).open_request(fields)
