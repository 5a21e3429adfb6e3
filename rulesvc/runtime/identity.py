"""Linking an anonymous contact to a known one, and merging it in, safely beside the inbox and scheduler.

`link` records the link first, then merges: the link alone already sends every later event of the
anonymous id to the known contact (`to_known` at ingest), and a merge that did not happen (a crash, a
send being decided) is finished by the next identify, by `finish_merges` at start-up and every few
seconds (`merge_loop`), or by the next ingest naming the anonymous id.

The merge runs under both contacts' leases (`contact_leases`, as an inbox batch takes them), so no inbox
batch decides either contact while their state is combined, and refuses to run while the scheduler is
deciding a send of either (a claimed entry). What moves, in one transaction:

- events (decided ones as history; undecided ones stay pending and are decided once, for the known
  contact, whose rules then see the anonymous cart and whose state has the anonymous contact's in it);
- schedule entries and their messages: a send still waiting is MOVED, not cancelled and re-decided.
  Its decision (the rule that fired on the anonymous contact's event) was made once and is kept; the
  scheduler decides the send when it comes due, against the known contact's profile then: its address
  and consent apply. Re-deciding instead would mean evaluating the anonymous events again, which fires
  their rules a second time (counters, `once`, immediate sends already made). Where both contacts wait
  on the same key (the same reminder, armed on each), the one armed earlier is cancelled `rearmed`, as
  a repeat trigger does, so one reminder goes out, not two; one that a decided event of the other
  contact, at or after its trigger, cancels (a purchase signed in after an anonymous cart) is cancelled
  as that event would have cancelled it. A send the scheduler holds now is never
  moved under it (the merge waits), so it is sent once, to whom it was decided for;
- messages already sent, in-app messages, audience changes, product interests: history, now the known
  contact's (an outcome reported later for such a message, under either id, finds it);
- the contact: its rule state merged into the known contact's (`rulesvc.core.identity.merge_state`),
  profile fields the known contact lacks copied, the anonymous contact deleted.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime, timedelta

import msgspec
import structlog
from pymongo.errors import PyMongoError

from rulesvc.core.events import Event
from rulesvc.core.identity import LinkResult, is_anonymous, link_problem
from rulesvc.core.privacy import TombstoneMode
from rulesvc.runtime.fate import OnFate, tell
from rulesvc.runtime.privacy import ErasureBusy, erase_contact, tombstone_drops
from rulesvc.runtime.waiting import wait_any
from rulesvc.store.db import PROCESS_SHARD, Store, failure_text
from rulesvc.store.identity import Busy, Conflict, Identities
from rulesvc.store.leases import ContactLeases

log = structlog.get_logger(__name__)

MERGE_LEASE = timedelta(seconds=30)  # far longer than a merge's transaction
MERGE_PATIENCE = 3.0  # seconds a merge waits for the contacts' leases and sends, then leaves it to the sweep
SWEEP_EVERY = 5.0  # seconds between looks for merges to finish
RECENT = timedelta(minutes=10)  # how long after a merge a late arrival under the anonymous id is looked for


async def resolve_contacts(store: Store, anonymous_contact_ids: list[str]) -> dict[str, str]:
    """For events that carry only an anonymous id: the known contact each one is linked to (absent:
    none yet)."""
    return await Identities(store).resolve([c for c in set(anonymous_contact_ids) if is_anonymous(c)])


async def to_known(store: Store, events: list[Event]) -> list[Event]:
    """Events of a linked anonymous id, given to the known contact: an event arriving after identify
    with only the anonymous id lands where the rest of the history is."""
    anonymous = [e.contact_id for e in events if e.contact_id is not None and is_anonymous(e.contact_id)]
    linked = await resolve_contacts(store, anonymous)
    if not linked:
        return events
    return [
        msgspec.structs.replace(e, contact_id=linked[e.contact_id]) if e.contact_id in linked else e
        for e in events
    ]


async def merge_late(
    store: Store, events: list[Event], on_fate: OnFate | None = None, tombstone: TombstoneMode = "old-events"
) -> None:
    """After storing events still under an anonymous id: if that id was linked in the meantime (the link
    came between `to_known` and the insert), the merge moves them now."""
    anonymous = [e.contact_id for e in events if e.contact_id is not None and is_anonymous(e.contact_id)]
    if not anonymous:
        return
    for anonymous_id, known_id in (await resolve_contacts(store, anonymous)).items():
        await merge_linked(store, anonymous_id, known_id, datetime.now(UTC), on_fate, tombstone=tombstone)


async def link(
    store: Store,
    anonymous_contact_id: str,
    known_contact_id: str,
    now: datetime,
    on_fate: OnFate | None = None,
    tombstone: TombstoneMode = "old-events",
) -> LinkResult:
    """Link the anonymous contact to the known one and merge it in. Idempotent: the same identify again
    finds the link and nothing left to move. The first link wins: an anonymous id linked to `u1` and then
    identified as `u2` stays `u1`'s (the result names `u2` as `conflict`; nothing moves to `u2`), since
    splitting its history again afterwards cannot be done right. Raises ValueError for ids that cannot be
    linked (not `anon:...`, or a known id that is)."""
    problem = link_problem(anonymous_contact_id, known_contact_id)
    if problem is not None:
        raise ValueError(problem)
    doc, created = await Identities(store).record(anonymous_contact_id, known_contact_id, now)
    target = str(doc["contact_id"])
    conflict = known_contact_id if target != known_contact_id else None
    if conflict is not None:
        log.warning("identity.link_conflict", anonymous_contact_id=anonymous_contact_id, linked_to=target,
                    refused=known_contact_id)  # fmt: skip
    merged, moved = await merge_linked(store, anonymous_contact_id, target, now, on_fate, tombstone=tombstone)
    return LinkResult(anonymous_contact_id, target, created, merged, conflict, moved)


async def merge_linked(
    store: Store,
    anonymous_id: str,
    known_id: str,
    now: datetime,
    on_fate: OnFate | None = None,
    patience: float = MERGE_PATIENCE,
    tombstone: TombstoneMode = "old-events",
) -> tuple[bool, dict[str, int]]:
    """The merge of a linked anonymous contact, under both contacts' leases: (done, moved per
    collection). Not done within `patience` (the inbox or the scheduler busy with either contact the
    whole time, or the database refusing): False, and the sweep tries again; the link stands meanwhile,
    so an identify is answered either way. Refused (False) where the known contact was erased after the
    link was made (`tombstone`, RULESVC_ERASURE_TOMBSTONE, says when its tombstone is in force): the
    anonymous contact is erased instead, as the erasure would have erased it with its link."""
    leases = ContactLeases(store)
    owner = f"identity:{uuid.uuid4().hex}"
    deadline = time.monotonic() + patience
    pause = 0.02
    history = 0  # decided events moved ahead of the transaction, by every attempt
    refused = False
    while True:
        token = uuid.uuid4().hex
        if await leases.take(token, owner, [anonymous_id, known_id], datetime.now(UTC) + MERGE_LEASE):
            try:
                # Looked at under the leases: an erasure holds the known contact's lease while it runs.
                if await _erased(store, anonymous_id, known_id, now, tombstone):
                    refused = True
                    return False, {}
                history += await Identities(store).move_history(anonymous_id, known_id)
                moved, cancelled = await Identities(store).merge(anonymous_id, known_id, now, PROCESS_SHARD)
                if history:
                    moved["events"] = moved.get("events", 0) + history
            except (Busy, Conflict):
                pass
            except PyMongoError as exc:  # e.g. documents a dead process's transaction still holds
                log.info("identity.merge_failed", anonymous_contact_id=anonymous_id, error=failure_text(exc))
            else:
                tell(cancelled, on_fate)
                if moved:
                    log.info(
                        "identity.merged", anonymous_contact_id=anonymous_id, contact_id=known_id, **moved
                    )
                return True, moved
            finally:
                await leases.release(token)
                if refused:
                    await _refuse(store, anonymous_id)
        else:
            await leases.release_expired(datetime.now(UTC))  # a dead process's lease must not stop it
        if time.monotonic() + pause > deadline:
            log.info("identity.merge_postponed", anonymous_contact_id=anonymous_id, contact_id=known_id)
            return False, {}
        await asyncio.sleep(pause)
        pause = min(pause * 2, 0.5)


async def _erased(store: Store, anonymous_id: str, known_id: str, now: datetime, mode: TombstoneMode) -> bool:
    """Whether the known contact's tombstone is in force for the link's time (that of the stored link,
    else `now`, the identify's: the erasure deleted the link meanwhile), as it is for an event's."""
    found = await Identities(store).links.find_one({"_id": anonymous_id}, {"linked_at": 1, "contact_id": 1})
    if found is not None and found.get("contact_id") != known_id:
        return False  # linked to another contact: not this merge's to refuse
    at = found.get("linked_at") if found is not None else None
    return await tombstone_drops(store, known_id, at if isinstance(at, datetime) else now, mode)


async def _refuse(store: Store, anonymous_id: str) -> None:
    """The anonymous contact of an erased one erased too (its data, its link), with a request logged."""
    log.warning("identity.merge_refused", anonymous_contact_id=anonymous_id, reason="known contact erased")
    try:
        await erase_contact(store, anonymous_id, source="identity")
    except ErasureBusy:  # its events stayed in an inbox batch: the sweep refuses (and erases) again
        log.info("identity.refusal_postponed", anonymous_contact_id=anonymous_id)


async def finish_merges(
    store: Store, on_fate: OnFate | None = None, limit: int = 100, tombstone: TombstoneMode = "old-events"
) -> int:
    """Merges a crash or a busy contact left undone, and late arrivals under a merged anonymous id;
    how many were finished."""
    now = datetime.now(UTC)
    done = 0
    for doc in await Identities(store).to_finish(now, RECENT, limit):
        merged, _ = await merge_linked(
            store, doc["_id"], doc["contact_id"], now, on_fate, patience=0.5, tombstone=tombstone
        )
        done += merged
    return done


async def merge_loop(
    store: Store, stop: asyncio.Event, on_fate: OnFate | None = None, tombstone: TombstoneMode = "old-events"
) -> None:
    """`finish_merges` at start-up and every SWEEP_EVERY seconds, until `stop`. Quiet about storage
    outages (debug lines only): the inbox's and the scheduler's loops already say when one starts and
    ends, and a missed sweep is simply made at the next."""
    while not stop.is_set():
        try:
            await finish_merges(store, on_fate, tombstone=tombstone)
        except PyMongoError as exc:
            log.debug("identity.sweep_failed", error=type(exc).__name__)
        except Exception:
            log.exception("identity.error")
        await wait_any(stop, seconds=SWEEP_EVERY)
