"""The catalog (`products`: each product's last price and stock), the interest index (`interests`: one
document per contact and product), and the fan-out's claims and positions: on a catalog event's queue
document (rulesvc.store.event_queue) until it is cut into parts, then one document per part
(`fanout_parts`: its range of the interest index, position, holder, and whether it is done)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from pymongo import ASCENDING, ReplaceOne, ReturnDocument
from pymongo.asynchronous.client_session import AsyncClientSession

from rulesvc.core.catalog import VIEW_WINDOW
from rulesvc.store.db import Doc, Store
from rulesvc.store.event_queue import PENDING
from rulesvc.store.transactions import in_transaction


class Superseded(Exception):
    """The fan-out's claim on a part of a catalog event was taken over (it ran out while a batch was being
    decided): that batch's decisions must not be committed, the new holder decides it."""


PAGE = 20  # catalog events read at a time while looking for one with work nobody holds


class Catalog:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def claim(self, owner: str, now: datetime, lease: timedelta) -> tuple[Doc, Doc | None] | None:
        """The oldest catalog event with work nobody else holds, with its `fanout`, and what `owner` now
        holds of it for `lease`: one of its parts (`fanout_parts`, each worker takes its own), or, before
        it is cut into parts, the whole event (the part None), to record the catalog change and cut it."""
        mine: list[Doc] = [{"until": None}, {"until": {"$lt": now}}, {"owner": owner}]
        # An event out of the way for a while after a failure (`fanout.until` later, no owner) is skipped.
        free = [{f"fanout.{k}": v for k, v in c.items()} for c in mine]
        due = {"state": PENDING, "contact_id": None, "$or": free}
        oldest = [("contact_id", ASCENDING), ("time", ASCENDING), ("_id", ASCENDING)]
        # `inbox_pending`: its `contact_id: null` range. Read a page at a time: events whose parts are all
        # held by other workers are passed over, however many there are, and the newer ones still taken.
        cursor = self.store.queue.find(
            due, {"fanout.parts": 1, "fanout.done": 1}, sort=oldest, hint="inbox_pending", batch_size=PAGE
        )
        try:
            async for candidate in cursor:
                part: Doc | None = None
                fanout = candidate.get("fanout") or {}
                if "parts" in fanout:
                    if fanout["done"] >= fanout["parts"]:  # its last part finished while it was set aside
                        await self.finish_event(candidate["_id"], now)
                        continue
                    part = await self.store.fanout_parts.find_one_and_update(
                        {"event_id": candidate["_id"], "done": False, "$or": mine},
                        {"$set": {"owner": owner, "until": now + lease}},
                        sort=[("n", ASCENDING)],
                        return_document=ReturnDocument.AFTER,
                    )
                    if part is None:
                        continue
                    queued = await self.store.queue.find_one({"_id": candidate["_id"], "state": PENDING})
                else:
                    queued = await self.store.queue.find_one_and_update(
                        {**due, "_id": candidate["_id"], "fanout.parts": {"$exists": False}},
                        {"$set": {"fanout.owner": owner, "fanout.until": now + lease}},
                        return_document=ReturnDocument.AFTER,
                    )
                if queued is None:
                    continue
                found = await self.store.events_of([queued])  # an event gone: its queue document goes too
                if found:
                    return found[0], part
        finally:
            await cursor.close()
        return None

    async def renew_event(self, event_id: str, owner: str, until: datetime) -> None:
        """`owner`'s claim on the whole event (before its cut) lasts until `until`, if it still holds it."""
        await self.store.queue.update_one(
            {"_id": event_id, "fanout.owner": owner, "fanout.parts": {"$exists": False}},
            {"$set": {"fanout.until": until}},
        )

    async def save_change(self, event_id: str, change: Doc) -> None:
        """What the copies are to know about the product's change, kept for a resumed run."""
        await self.store.queue.update_one({"_id": event_id}, {"$set": {"fanout.product": change}})

    async def cut(self, event_id: str, owner: str, parts: list[tuple[str | None, str | None]]) -> None:
        """The event's interested contacts as `parts` (`rulesvc.core.catalog.fanout_ranges`), each claimed
        by one worker from now on, in one transaction with the event's own claim let go: only while `owner`
        still holds the whole event (else `Superseded`: another run cuts it)."""

        async def write(session: AsyncClientSession) -> None:
            whole = {"fanout.owner": owner, "fanout.parts": {"$exists": False}}
            result = await self.store.queue.update_one(
                {"_id": event_id, "state": PENDING, **whole},
                {"$set": {"fanout.parts": len(parts), "fanout.done": 0},
                 "$unset": {"fanout.owner": "", "fanout.until": "", "fanout.after": ""}},
                session=session,
            )  # fmt: skip
            if result.matched_count != 1:
                raise Superseded(f"catalog event {event_id}: the fan-out's claim was taken over")
            # Parts left by an event of the same id that expired before it finished are not this one's.
            await self.store.fanout_parts.delete_many({"event_id": event_id}, session=session)
            await self.store.fanout_parts.bulk_write(
                [ReplaceOne({"_id": f"{event_id}#{n}"},
                            {"event_id": event_id, "n": n, "after": after, "upto": upto, "done": False},
                            upsert=True)
                 for n, (after, upto) in enumerate(parts)],
                session=session,
            )  # fmt: skip

        await in_transaction(self.store.client, write)

    async def advance(
        self,
        part_id: str,
        owner: str,
        before: str | None,
        after: str,
        until: datetime,
        session: AsyncClientSession,
    ) -> None:
        """The part's position moved from `before` to `after` and its claim extended, in the transaction of
        the batch it covers, only while `owner` still holds the part at `before`: else `Superseded`, and the
        transaction with its decisions is not committed (decided copies are not stored, so nothing else
        would keep a second holder from deciding the same batch again). Each part is a document of its own,
        so the workers deciding an event's parts at once never write the same document."""
        result = await self.store.fanout_parts.update_one(
            {"_id": part_id, "owner": owner, "after": before, "done": False},
            {"$set": {"after": after, "until": until}},
            session=session,
        )
        if result.matched_count != 1:
            raise Superseded(f"fan-out part {part_id}: its claim was taken over")

    async def release(self, part_id: str, owner: str) -> None:
        """A part given up after a failure: any worker may take it once the event is due again."""
        await self.store.fanout_parts.update_one(
            {"_id": part_id, "owner": owner}, {"$set": {"owner": None, "until": None}}
        )

    async def stored_copies(self, ids: list[str]) -> set[str]:
        """Which of these copies an earlier run queued (they are the inbox's now, never decided twice)."""
        return {d["_id"] async for d in self.store.events.find({"_id": {"$in": ids}}, {"_id": 1})}

    async def finish_part(self, event_id: str, part_id: str, owner: str, now: datetime) -> None:
        """The part done; with the event's last part, the event out of the queue (its parts with it) and
        counted, in one transaction. Every part done goes through the event's queue document, so two
        workers finishing its last two parts at once conflict and one of them, run again, sees both
        done. A part is counted even while its event is set aside after another part failed: the retry
        finishes what is left. A part another run took over is its to finish."""

        async def write(session: AsyncClientSession) -> None:
            result = await self.store.fanout_parts.update_one(
                {"_id": part_id, "owner": owner, "done": False}, {"$set": {"done": True}}, session=session
            )
            if result.modified_count != 1:
                return
            queued = await self.store.queue.find_one_and_update(
                {"_id": event_id},
                {"$inc": {"fanout.done": 1}},
                projection={"fanout": 1, "state": 1},
                return_document=ReturnDocument.AFTER,
                session=session,
            )
            if queued is None or queued["state"] != PENDING:
                return
            if queued["fanout"]["done"] >= queued["fanout"]["parts"]:
                await self._finish(event_id, now, session)

        await in_transaction(self.store.client, write)

    async def finish_event(self, event_id: str, now: datetime, owner: str | None = None) -> None:
        """Out of the queue and counted, in one transaction: no contact interested (only while `owner`
        still holds the whole event), or every part done. A repeat finds it gone: nothing to change."""
        held = {"fanout.owner": owner, "fanout.parts": {"$exists": False}} if owner else {}
        await in_transaction(self.store.client, lambda session: self._finish(event_id, now, session, held))

    async def _finish(
        self, event_id: str, now: datetime, session: AsyncClientSession, held: Doc | None = None
    ) -> None:
        result = await self.store.queue.delete_one(
            {"_id": event_id, "state": PENDING, **(held or {})}, session=session
        )
        if result.deleted_count:  # a catalog event is decided once its copies are all made
            await self.store.fanout_parts.delete_many({"event_id": event_id}, session=session)
            await self.store.count_decided(now, 1, "fanout", session)

    async def product(self, product_id: str) -> Doc:
        """The product's last known fields (`{}` for a product not seen before)."""
        return await self.store.products.find_one({"_id": product_id}) or {}

    async def save_product(self, product_id: str, fields: Doc) -> None:
        await self.store.products.update_one({"_id": product_id}, {"$set": fields}, upsert=True)

    async def interested(self, event: Doc, after: str | None, upto: str | None, limit: int) -> list[Doc]:
        """The interests in the event's product that count for its type (the query form of
        `rulesvc.core.catalog.interested`), in id order after `after` and up to `upto` (a part)."""
        query = self._range(self._interest_query(event), after, upto)
        return await self.store.interests.find(query).sort("_id", ASCENDING).limit(limit).to_list()

    async def count_interested(self, event: Doc, after: str | None) -> int:
        """How many interests `interested` would return after `after`: how many parts to cut."""
        return await self.store.interests.count_documents(self._range(self._interest_query(event), after))

    async def interested_at(self, event: Doc, after: str | None, positions: list[int]) -> list[str]:
        """The ids of `interested` at these positions (ascending, from 0, after `after`), read in one pass
        over the index keeping only those: fewer if interests went meanwhile."""
        if not positions:  # one part: nothing to read
            return []
        query = self._range(self._interest_query(event), after)
        cursor = self.store.interests.find(query, {"_id": 1}, batch_size=10_000).sort("_id", ASCENDING)
        wanted, found = set(positions), []
        try:
            n = 0
            async for doc in cursor:
                if n in wanted:
                    found.append(doc["_id"])
                if n == positions[-1]:
                    break
                n += 1
        finally:
            await cursor.close()
        return found

    @staticmethod
    def _range(query: Doc, after: str | None, upto: str | None = None) -> Doc:
        """The query narrowed to the index ids in `(after, upto]` (either end open when None)."""
        bounds = {**({"$gt": after} if after is not None else {}),
                  **({"$lte": upto} if upto is not None else {})}  # fmt: skip
        return {**query, "_id": bounds} if bounds else query

    def _interest_query(self, event: Doc) -> Doc:
        product = str((event.get("attributes") or {})["product_id"])
        query: Doc
        if event["type"] == "price_changed":
            since = event["time"] - VIEW_WINDOW
            query = {
                "product_id": product,
                "$or": [{"viewed_at": {"$gte": since}}, {"wishlisted_at": {"$exists": True}}],
            }
        else:
            query = {
                "product_id": product,
                "$or": [{"wanted_oos_at": {"$exists": True}}, {"wishlisted_at": {"$exists": True}}],
            }
        return query

    async def queue_copies(
        self, copies: list[Doc], part_id: str, owner: str, before: str | None, after: str, until: datetime
    ) -> None:
        """A batch's per-contact copies queued for the inbox, in one transaction with the part's position
        (`advance`): only while `owner` still holds the part at `before`. A batch read before the operator
        dropped the event (its parts go with it) or before another worker took the part over queues
        nothing (`Superseded`); copies earlier batches queued are ordinary events by then and stay. Copies
        already stored (0.1.0 saved its position after its copies) are left as they are: the first try
        reads nothing, a duplicate has the next one read (`Store.retry_duplicates`)."""

        async def write(session: AsyncClientSession, read: bool) -> None:
            await self.advance(part_id, owner, before, after, until, session)
            await self.store.queue_new(copies, session, read)

        await self.store.retry_duplicates(write)

    async def update_interests(self, ops: list[Any], session: AsyncClientSession) -> None:
        """Index writes for a batch of contact events (see `rulesvc.runtime.fanout.interest_updates`)."""
        await self.store.interests.bulk_write(ops, ordered=False, session=session)
