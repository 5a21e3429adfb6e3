"""The overview's reads: throughput from `events` (when each was received) and `throughput` (how many
were decided per minute, counted by the inbox in its transactions), the due queue
from `schedule`, messages by channel and status from the funnel's hourly counters (`stats`), and each
channel's last send from `messages`. Every query runs on an index over a time range (named in its hint),
so the page costs the same on a day-old database as on a year-old one; the 24 h series are grouped by
MongoDB and come back as at most 96 rows per series."""

from __future__ import annotations

from datetime import UTC, datetime

from rulesvc.store.db import Doc, Store

QUARTER_HOUR: Doc = {"unit": "minute", "binSize": 15}  # $dateTrunc's bins start at 2000-01-01T00:00 UTC


def _utc(at: datetime) -> datetime:
    return at if at.tzinfo else at.replace(tzinfo=UTC)


class OverviewReads:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def accepted_by_quarter(self, since: datetime) -> dict[datetime, int]:
        """Events by the UTC quarter hour they were received in, from `since` on. Only the indexed field
        is read, so the index answers alone (a covered scan)."""
        pipeline: list[Doc] = [
            {"$match": {"received_at": {"$gte": since}}},
            {"$group": {"_id": {"$dateTrunc": {"date": "$received_at", **QUARTER_HOUR}}, "n": {"$sum": 1}}},
        ]
        cursor = await self.store.events.aggregate(pipeline, hint="events_ttl")
        return {_utc(doc["_id"]): int(doc["n"]) async for doc in cursor if doc["_id"] is not None}

    async def accepted_since(self, since: datetime) -> int:
        return await self.store.events.count_documents({"received_at": {"$gte": since}}, hint="events_ttl")

    async def decided_by_quarter(self, since: datetime) -> dict[datetime, int]:
        """Events decided by UTC quarter hour, from the per-minute counters of every process."""
        pipeline: list[Doc] = [
            {"$match": {"minute": {"$gte": since}}},
            {
                "$group": {
                    "_id": {"$dateTrunc": {"date": "$minute", **QUARTER_HOUR}},
                    "n": {"$sum": "$decided"},
                }
            },
        ]
        cursor = await self.store.throughput.aggregate(pipeline, hint="throughput_ttl")
        return {_utc(doc["_id"]): int(doc["n"]) async for doc in cursor if doc["_id"] is not None}

    async def decided_since(self, since: datetime) -> int:
        """Events decided in the minutes from the one `since` is in (the counters are per minute)."""
        pipeline: list[Doc] = [
            {"$match": {"minute": {"$gte": since}}},
            {"$group": {"_id": None, "n": {"$sum": "$decided"}}},
        ]
        cursor = await self.store.throughput.aggregate(pipeline, hint="throughput_ttl")
        return sum([int(doc["n"]) async for doc in cursor])

    async def due_between(self, after: datetime, until: datetime) -> int:
        """Pending sends due after `after`, up to `until`: what the scheduler has coming."""
        query: Doc = {
            "status": "pending",
            "due_at": {"$gt": after, "$lte": until},
            "message": {"$exists": True},
        }
        return await self.store.schedule.count_documents(query, hint="schedule_due")

    async def messages_by_channel(self, since: datetime) -> list[Doc]:
        """The funnel's counts per channel and status from the hour `since` is in, every ruleset and shard
        added up: rows `{channel, counts: {status: n}}`."""
        hour = since.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
        pipeline: list[Doc] = [
            {"$match": {"hour": {"$gte": hour}}},
            {"$project": {"_id": 0, "channel": 1, "c": {"$objectToArray": {"$ifNull": ["$counts", {}]}}}},
            {"$unwind": "$c"},
            {"$match": {"c.v": {"$type": "number"}}},
            {"$group": {"_id": {"channel": "$channel", "s": "$c.k"}, "n": {"$sum": "$c.v"}}},
        ]
        rows: dict[str, Doc] = {}
        async for doc in await self.store.stats.aggregate(pipeline, hint="stats_by_hour"):
            channel = str(doc["_id"].get("channel") or "")
            row = rows.setdefault(channel, {"channel": channel, "counts": {}})
            row["counts"][str(doc["_id"]["s"])] = int(doc["n"])
        return list(rows.values())

    async def last_sent(self, channels: list[str]) -> dict[str, datetime]:
        """When each of these channels last sent a message (the channels that never did are left out)."""
        found: dict[str, datetime] = {}
        for channel in channels:
            doc = await self.store.messages.find_one(
                {"sent_channel": channel, "sent_at": {"$type": "date"}},
                {"sent_at": 1},
                sort=[("sent_channel", 1), ("sent_at", -1)],
                hint="messages_last_sent",
            )
            if doc is not None:
                found[channel] = _utc(doc["sent_at"])
        return found
