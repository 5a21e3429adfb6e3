"""The reads of the `stats` collection: its hourly, per-shard counts added up in MongoDB."""

from __future__ import annotations

from datetime import datetime

from rulesvc.core.statsreport import Cell, Tally, Unit
from rulesvc.store.db import Doc, Store

# Each document's numbers as a list of {k: kind, s: status, r: reason, n: value}, so one `$group` adds
# up counts, reasons and revenue whatever statuses and reasons the documents have.
_PAIRS: Doc = {
    "$concatArrays": [
        {
            "$map": {
                "input": {"$objectToArray": {"$ifNull": ["$counts", {}]}},
                "in": {"k": "c", "s": "$$this.k", "r": "", "n": "$$this.v"},
            }
        },
        {
            "$reduce": {
                "input": {"$objectToArray": {"$ifNull": ["$reasons", {}]}},
                "initialValue": [],
                "in": {
                    "$concatArrays": [
                        "$$value",
                        {
                            "$map": {
                                "input": {"$objectToArray": "$$this.v"},
                                "as": "reason",
                                "in": {"k": "r", "s": "$$this.k", "r": "$$reason.k", "n": "$$reason.v"},
                            }
                        },
                    ]
                },
            }
        },
        [
            {"k": "m", "s": "revenue", "r": "", "n": {"$ifNull": ["$revenue", 0]}},
            {"k": "m", "s": "revenue_sq", "r": "", "n": {"$ifNull": ["$revenue_sq", 0]}},
        ],
    ]
}


def _fold(tally: Tally, row: Doc) -> None:
    kind, status, reason, n = row["_id"]["k"], row["_id"]["s"], row["_id"]["r"], row["n"]
    if kind == "c":
        tally.counts[status] = tally.counts.get(status, 0) + int(n)
    elif kind == "r":
        by = tally.reasons.setdefault(status, {})
        by[reason] = by.get(reason, 0) + int(n)
    elif status == "revenue":
        tally.revenue += float(n)
    else:
        tally.revenue_sq += float(n)


class StatsReads:
    """What `GET /v1/stats` and `rulesvc stats` read: a ruleset's counts in [start, end) by `hour`,
    every shard (writing loop and process) added up."""

    def __init__(self, store: Store) -> None:
        self.stats = store.db["stats"]

    def _match(self, ruleset: str, start: datetime, end: datetime, rule: str | None) -> Doc:
        match: Doc = {"ruleset": ruleset, "hour": {"$gte": start, "$lt": end}}
        if rule is not None:
            match["rule"] = rule
        return match

    async def _sums(self, match: Doc, key: Doc) -> list[Doc]:
        """Each (key, kind, status, reason)'s sum; `key`: output name -> expression on a document."""
        pipeline: list[Doc] = [
            {"$match": match},
            {"$project": {"rule": 1, "variant": 1, "channel": 1, "hour": 1, "pairs": _PAIRS}},
            {"$unwind": "$pairs"},
            {
                "$group": {
                    "_id": {**key, "k": "$pairs.k", "s": "$pairs.s", "r": "$pairs.r"},
                    "n": {"$sum": "$pairs.n"},
                }
            },
        ]
        return await (await self.stats.aggregate(pipeline)).to_list()

    async def cells(
        self, ruleset: str, start: datetime, end: datetime, rule: str | None = None
    ) -> list[Cell]:
        """One `Cell` per rule, group (`variant`) and channel with counts in the window."""
        key = {"rule": "$rule", "variant": "$variant", "channel": "$channel"}
        tallies: dict[tuple[str, str, str], Tally] = {}
        for row in await self._sums(self._match(ruleset, start, end, rule), key):
            ident = row["_id"]
            found = (str(ident.get("rule", "")), str(ident.get("variant", "")), str(ident.get("channel", "")))
            _fold(tallies.setdefault(found, Tally()), row)
        return [Cell(rule_, variant, channel, t) for (rule_, variant, channel), t in tallies.items()]

    async def series(
        self, ruleset: str, start: datetime, end: datetime, unit: Unit, rule: str | None = None
    ) -> list[tuple[datetime, Tally]]:
        """The totals per UTC hour or day that has counts, in time order."""
        key = {"at": {"$dateTrunc": {"date": "$hour", "unit": unit, "timezone": "UTC"}}}
        tallies: dict[datetime, Tally] = {}
        for row in await self._sums(self._match(ruleset, start, end, rule), key):
            _fold(tallies.setdefault(row["_id"]["at"], Tally()), row)
        return sorted(tallies.items(), key=lambda item: item[0])

    async def exists(self, ruleset: str) -> bool:
        """Whether the ruleset has ever been counted (a removed ruleset's counts stay)."""
        return await self.stats.find_one({"ruleset": ruleset}, {"_id": 1}) is not None
