"""The funnel's hourly counters, `stats`: one document per (hour, ruleset, rule, variant, channel, shard).

Counts are written in the transaction of the decision they count, so a retried or crashed batch never
counts twice nor loses a count. `shard` names the writing loop and process (`inbox:<id>`,
`scheduler:<id>`, `api:<id>`): two processes' transactions never touch the same document, so counting
adds no write conflicts under `--workers N`; a read adds the shards up."""

from __future__ import annotations

import math
import uuid
from datetime import UTC, datetime
from typing import Any, Literal

from rulesvc.store.db import PROCESS_SHARD, Doc, Store

__all__ = ["PROCESS_SHARD", "By", "Stats", "shard_of"]

By = Literal["hour", "day"]


def shard_of(loop: str) -> str:
    """A new shard for one loop of this process: `inbox:<id>`."""
    return f"{loop}:{uuid.uuid4().hex}"


class Stats:
    def __init__(self, store: Store) -> None:
        self.store = store

    @property
    def enabled(self) -> bool:
        return self.store.count_stats

    async def totals(
        self,
        ruleset: str,
        rule: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        by: By | None = None,
    ) -> list[Doc]:
        """The counts of a ruleset per (rule, variant, channel), shards added up; with `by`, per hour or
        UTC day too (`at`: the bucket's start). Hours from `since`'s hour up to `until` (exclusive).
        Each row: `rule, variant, channel, counts {status: n}, reasons {status: {reason: n}}, revenue,
        revenue_sq` (and `at`), sorted by `at`, rule, variant, channel."""
        match: Doc = {"ruleset": ruleset}
        if rule is not None:
            match["rule"] = rule
        hours: Doc = {}
        if since is not None:
            hours["$gte"] = since.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
        if until is not None:
            hours["$lt"] = until
        if hours:
            match["hour"] = hours
        key: Doc = {"rule": "$rule", "variant": "$variant", "channel": "$channel"}
        if by is not None:
            key["at"] = "$hour"
        # Each document as items (status, reason, n, revenue): unwound and summed per key and item.
        counts = {"$map": {"input": {"$objectToArray": {"$ifNull": ["$counts", {}]}}, "as": "c",
                           "in": {"s": "$$c.k", "r": None, "n": "$$c.v"}}}  # fmt: skip
        per_reason = {"$map": {"input": {"$objectToArray": "$$this.v"}, "as": "x",
                               "in": {"s": "$$this.k", "r": "$$x.k", "n": "$$x.v"}}}  # fmt: skip
        reasons = {"$reduce": {"input": {"$objectToArray": {"$ifNull": ["$reasons", {}]}}, "initialValue": [],
                               "in": {"$concatArrays": ["$$value", per_reason]}}}  # fmt: skip
        money = [{"s": None, "r": None, "n": 0, "v": {"$ifNull": ["$revenue", 0]},
                  "v2": {"$ifNull": ["$revenue_sq", 0]}}]  # fmt: skip
        pipeline: list[Doc] = [
            {"$match": match},
            {"$project": {"_id": 0, "key": key, "items": {"$concatArrays": [counts, reasons, money]}}},
            {"$unwind": "$items"},
            {
                "$group": {
                    "_id": {"key": "$key", "s": "$items.s", "r": "$items.r"},
                    "n": {"$sum": "$items.n"},
                    "v": {"$sum": {"$ifNull": ["$items.v", 0]}},
                    "v2": {"$sum": {"$ifNull": ["$items.v2", 0]}},
                }
            },
        ]
        rows: dict[tuple[Any, ...], Doc] = {}
        async for item in await self.store.stats.aggregate(pipeline):
            k = item["_id"]["key"]
            at = k.get("at")
            if at is not None and at.tzinfo is None:
                at = at.replace(tzinfo=UTC)
            if by == "day" and at is not None:
                at = at.replace(hour=0)
            # Written by the service only; read defensively all the same (a key missing reads as "").
            rule, variant, channel = (str(k.get(name) or "") for name in ("rule", "variant", "channel"))
            ident = (at, rule, variant, channel)
            row = rows.get(ident)
            if row is None:
                row = rows[ident] = {"rule": rule, "variant": variant, "channel": channel,
                                     "counts": {}, "reasons": {}, "revenue": 0.0,
                                     "revenue_sq": 0.0}  # fmt: skip
                if by is not None:
                    row["at"] = at
            status, reason = item["_id"]["s"], item["_id"]["r"]
            if status is None:
                row["revenue"] += float(item["v"])
                row["revenue_sq"] += float(item["v2"])
            elif reason is None:
                row["counts"][status] = row["counts"].get(status, 0) + _whole(item["n"])
            else:
                per = row["reasons"].setdefault(status, {})
                per[reason] = per.get(reason, 0) + _whole(item["n"])
        epoch = datetime(1970, 1, 1, tzinfo=UTC)
        return [rows[k] for k in sorted(rows, key=lambda k: (k[0] or epoch, *k[1:]))]

    async def exists(self, ruleset: str) -> bool:
        """Whether the ruleset was ever counted: a removed ruleset's counts stay readable, a name never
        counted (nor loaded) is unknown."""
        return await self.store.stats.find_one({"ruleset": ruleset}, {"_id": 1}) is not None


def _whole(value: Any) -> int:
    """A stored count as an int; anything but a finite number counts 0 (never a failed read)."""
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return int(value)
    return 0
