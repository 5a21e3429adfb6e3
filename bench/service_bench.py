"""The service benchmark: real `rulesvc serve` workers, every shipped ruleset live, a real mongod.

    make bench            # or: .venv/bin/python bench/service_bench.py [--quick] [--workers N]

Starts its own mongod (embedded, temporary) and service, and measures, with baselines taken in the
same run on the same mongod:
1. ingest + decide: a realistic event mix over 100k contacts, as NDJSON batches and as single-event
   POSTs from 64 concurrent clients; acceptance-to-decision latency at half the highest single rate;
2. baselines: a minimal aiohttp handler (same workers, same client) and `insert_many` of the same
   event documents (same write concern, same concurrency as the batch clients);
3. the schedule: 100k entries due at once, drained through the no-op `log` channel;
4. fan-out: a price drop for a product 100k contacts are interested in, while other events come in;
5. memory: the workers' RSS with 10k, 100k and 1M contacts stored.
Prints a table and writes bench/results/service.json. Every figure comes from this machine, this run.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import functools
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
from pymongo import AsyncMongoClient
from pymongo.asynchronous.collection import AsyncCollection

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rulesvc.store.db import DURABLE, Store  # noqa: E402
from rulesvc.store.keys import Keys  # noqa: E402
from rulesvc.store.mongod import EmbeddedMongod, die_with_parent, free_port, live_children  # noqa: E402

Doc = dict[str, Any]
# The commands that read or write data, counted per decided event (monitoring and replication are not).
DATA_COMMANDS = ("insert", "update", "delete", "find", "getMore", "aggregate", "findAndModify", "count",
                 "distinct", "commitTransaction", "abortTransaction")  # fmt: skip
CLIENTS = 64  # concurrent single-event clients, as the issue sets
BATCH = 500  # events per NDJSON request
BATCH_CLIENTS = 8  # concurrent batch posters (and insert_many tasks in the baseline)
# What the cart reminder's send carries (rulesets/cart_abandon.json), for the drained entries.
PARAMS = {
    "value": 120,
    "currency": "EUR",
    "items": [{"sku": "p1", "name": "Trail shoe", "qty": 1, "price": 120}],
}


# --- the workload --------------------------------------------------------------------------------------


def service_env(uri: str, database: str, **extra: str) -> dict[str, str]:
    """A benchmarked service's settings: every shipped ruleset, no rate limit, quiet hours or caps."""
    return {
        **os.environ,
        **extra,
        "MONGODB_URI": uri,
        "RULESVC_DATABASE": database,
        "RULESVC_RULESETS_DIR": str(ROOT / "rulesets"),
        "RULESVC_LOG_LEVEL": "warning",
        "RULESVC_LOG_FORMAT": "json",
        "RULESVC_RATE_LIMIT": "0",
        "RULESVC_QUIET_HOURS": "",
        "RULESVC_FREQUENCY_CAPS": "",
    }


def serve_command(workers: int) -> list[str]:
    return [sys.executable, "-m", "rulesvc", "serve", "--workers", str(workers)]


class Mix:
    """Views, carts, checkouts, purchases and delivery updates over `contacts` contacts, reproducible."""

    KINDS = (
        ("product_viewed", 35),
        ("category_viewed", 8),
        ("page_viewed", 10),
        ("cart_updated", 20),
        ("checkout_started", 7),
        ("purchased", 8),
        ("delivery_status_changed", 7),
        ("wishlist_added", 5),
    )

    def __init__(self, contacts: int, prefix: str, seed: int = 7) -> None:
        self.contacts = contacts
        self.prefix = prefix
        self.rng = random.Random(seed)
        self.n = 0
        self.types = [t for t, w in self.KINDS for _ in range(w)]

    def event(self) -> Doc:
        rng, self.n = self.rng, self.n + 1
        kind = rng.choice(self.types)
        attributes: Doc = {}
        if kind in ("product_viewed", "wishlist_added"):
            attributes = {"product_id": f"p{rng.randrange(5000)}", "price": rng.randrange(5, 500)}
        elif kind == "category_viewed":
            attributes = {"category": f"cat{rng.randrange(50)}"}
        elif kind == "page_viewed":
            attributes = {"page": rng.choice(["home", "paywall", "faq", "sale"])}
        elif kind in ("cart_updated", "checkout_started"):
            items = [
                {
                    "sku": f"p{rng.randrange(5000)}",
                    "name": "Trail shoe",
                    "qty": rng.randrange(1, 3),
                    "price": rng.randrange(5, 200),
                }
                for _ in range(rng.randrange(1, 4))
            ]
            attributes = {
                "value": sum(i["price"] * i["qty"] for i in items),
                "currency": "EUR",
                "items": items,
            }
        elif kind == "purchased":
            attributes = {"order_id": f"o{self.n}", "value": rng.randrange(10, 400), "currency": "EUR"}
        elif kind == "delivery_status_changed":
            status = rng.choice(["shipped", "delayed", "out_for_delivery", "delivered"])
            attributes = {"order_id": f"o{rng.randrange(100000)}", "status": status}
        return {
            "id": f"{self.prefix}{self.n}",
            "type": kind,
            "contact_id": f"c{rng.randrange(self.contacts)}",
            "attributes": attributes,
        }

    def events(self, n: int) -> list[Doc]:
        return [self.event() for _ in range(n)]


def contact_docs(start: int, stop: int, now: datetime) -> Iterator[list[Doc]]:
    consent = {"email": True, "sms": True, "push": True, "webpush": True}
    batch: list[Doc] = []
    for i in range(start, stop):
        batch.append(
            {
                "_id": f"c{i}",
                "email": f"c{i}@example.com",
                "phone": f"+4915{i:09d}",
                "push_tokens": [f"tok{i}"],
                "consent": consent,
                "timezone": "Europe/Berlin",
                "attributes": {"tier": "gold" if i % 10 == 0 else "basic"},
                "created_at": now,
            }
        )
        if len(batch) == 5000:
            yield batch
            batch = []
    if batch:
        yield batch


def stored(event: Doc, now: datetime) -> Doc:
    """The document the service stores for an accepted event (rulesvc.store.Store.insert_events)."""
    return {
        "_id": event["id"],
        "type": event["type"],
        "contact_id": event["contact_id"],
        "time": now,
        "attributes": event["attributes"],
        "received_at": now,
    }


def queued(doc: Doc) -> Doc:
    """Its queue document, which says the inbox has it to decide (rulesvc.store.event_queue)."""
    return {k: doc[k] for k in ("_id", "contact_id", "time", "received_at")} | {"state": "pending"}


# --- processes -----------------------------------------------------------------------------------------


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time the processes have used so far."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


class Server:
    """`rulesvc serve --workers N` (or the baseline handler) as a process group on a free port."""

    def __init__(self, command: list[str], env: dict[str, str], log: Path) -> None:
        self.port = free_port()
        self.command = [*command, "--port", str(self.port)]
        self.env = env
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, ready_path: str) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                self.command, env=self.env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent
            )
        deadline = time.monotonic() + 60
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.command} exited:\n{self.log.read_text()[-3000:]}")
                try:
                    async with session.get(self.url + ready_path) as resp:
                        if resp.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
        raise TimeoutError(f"{self.command} not ready:\n{self.log.read_text()[-3000:]}")

    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def workers(self) -> list[int]:
        assert self.proc is not None
        return sorted(live_children(self.proc.pid)) or [self.proc.pid]

    def rss_mb(self) -> float:
        assert self.proc is not None
        return sum(rss_mb(p) for p in {self.proc.pid, *self.workers()})

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(90)


# --- load ----------------------------------------------------------------------------------------------


async def closed_loop(
    url: str | list[str], headers: dict[str, str], bodies: list[bytes], content_type: str, clients: int
) -> tuple[float, int, int]:
    """Each client posts its next body when the previous answer arrived; several URLs (instances) are
    shared out over the clients round-robin, as a load balancer would. (seconds, accepted, errors)"""
    urls = [url] if isinstance(url, str) else url
    queue = iter(bodies)
    accepted = errors = 0
    connector = aiohttp.TCPConnector(limit=clients, force_close=False)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:

        async def client(url: str) -> None:
            nonlocal accepted, errors
            for body in queue:
                async with session.post(url, data=body, headers={"Content-Type": content_type}) as resp:
                    answer = await resp.read()
                    if resp.status == 202:
                        accepted += json.loads(answer).get("accepted", 1)
                    else:
                        errors += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(client(urls[i % len(urls)]) for i in range(clients)))
        return time.perf_counter() - t0, accepted, errors


async def paced(
    url: str, headers: dict[str, str], bodies: list[bytes], per_second: float
) -> tuple[float, int]:
    """Open loop: a request every 1/rate seconds whether or not the last one was answered."""
    connector = aiohttp.TCPConnector(limit=CLIENTS)
    errors = 0
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:

        async def one(body: bytes) -> None:
            nonlocal errors
            async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as resp:
                await resp.read()
                errors += resp.status != 202

        t0 = time.perf_counter()
        tasks = []
        for i, body in enumerate(bodies):
            delay = t0 + i / per_second - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(body)))
        await asyncio.gather(*tasks)
        return time.perf_counter() - t0, errors


async def watch_decisions(
    db: Any,
    wanted: set[str],
    decided_at: dict[str, datetime],
    ready: asyncio.Event,
    per_transaction: collections.Counter[tuple[str, Any]] | None = None,
) -> None:
    """Fills `decided_at` with when each wanted event was decided: the server's time (a change stream's
    `wallTime`) of the inbox transaction that deleted its queue document. `per_transaction` counts the
    queue documents each transaction deleted (by session and transaction number)."""
    async with await db.inbox.watch([{"$match": {"operationType": "delete"}}]) as stream:
        ready.set()
        async for change in stream:
            if per_transaction is not None:
                per_transaction[str(change.get("lsid")), change.get("txnNumber")] += 1
            key = change["documentKey"]["_id"]
            if key in wanted:
                decided_at[key] = change["wallTime"].replace(tzinfo=UTC)
                if len(decided_at) == len(wanted):
                    return


async def until(check: Callable[[], Awaitable[bool]], timeout: float, every: float = 0.05) -> float:
    """Seconds until `check` holds."""
    t0 = time.perf_counter()
    while not await check():
        if time.perf_counter() - t0 > timeout:
            raise TimeoutError(f"not done in {timeout} s")
        await asyncio.sleep(every)
    return time.perf_counter() - t0


def ndjson(events: list[Doc]) -> list[bytes]:
    return [
        b"\n".join(json.dumps(e).encode() for e in events[i : i + BATCH])
        for i in range(0, len(events), BATCH)
    ]


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


# --- the benchmark -------------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, mongod: EmbeddedMongod, tmp: Path) -> None:
        self.args = args
        self.mongod = mongod
        self.tmp = tmp
        self.client: AsyncMongoClient[Doc] = AsyncMongoClient(mongod.uri, tz_aware=True)
        self.results: dict[str, Any] = {}
        self.headers: dict[str, str] = {}

    def db(self, name: str = "bench") -> Any:
        return self.client[name]

    def service(self, database: str, **extra: str) -> Server:
        env = service_env(self.mongod.uri, database, **extra)
        return Server(serve_command(self.args.workers), env, self.tmp / f"service-{database}.log")

    async def prepare(self, database: str, contacts: int) -> None:
        store = Store(self.client, database, timedelta(days=1))
        await store.ensure_schema()
        key, _ = await Keys(store.api_keys).create("admin", "bench")
        self.headers = {"Authorization": f"Bearer {key}"}
        now = datetime.now(UTC)
        for batch in contact_docs(0, contacts, now):
            await store.contacts.insert_many(batch, ordered=False)

    async def insert_many_baseline(self, events: list[Doc]) -> float:
        collection: AsyncCollection[Doc] = self.db().get_collection("baseline_events", write_concern=DURABLE)
        now = datetime.now(UTC)
        docs = [stored(e, now) for e in events]
        chunks = iter([docs[i : i + BATCH] for i in range(0, len(docs), BATCH)])

        async def worker() -> None:
            for chunk in chunks:
                await collection.insert_many(chunk, ordered=False)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(BATCH_CLIENTS)))
        return len(docs) / (time.perf_counter() - t0)

    async def aiohttp_baseline(self, bodies: list[bytes]) -> float:
        command = [
            sys.executable,
            str(ROOT / "bench" / "baseline_server.py"),
            "--workers",
            str(self.args.workers),
        ]
        server = Server(command, dict(os.environ), self.tmp / "baseline.log")
        await server.start("/")
        try:
            seconds, accepted, errors = await closed_loop(
                server.url + "/v1/events", {}, bodies, "application/json", CLIENTS
            )
        finally:
            server.stop()
        assert errors == 0
        return accepted / seconds

    async def posted(
        self, service: Server, bodies: list[bytes], content_type: str, clients: int
    ) -> dict[str, Any]:
        """`bodies` posted by `clients` at once and decided; where the two cores went per decided event
        (the service's processes, mongod, this client), and how many commands mongod ran per decided
        event (round trips)."""
        pids = {"service": [service.pid(), *service.workers()], "mongod": [self.mongod_pid()],
                "bench": [os.getpid()]}  # fmt: skip

        def cpu() -> dict[str, float]:
            return {k: cpu_seconds(v) for k, v in pids.items()}

        cpu0, commands0 = cpu(), await self.mongod_commands()
        seconds, accepted, errors = await closed_loop(
            service.url + "/v1/events", self.headers, bodies, content_type, clients
        )
        t0 = time.perf_counter() - seconds
        await until(lambda: self._none_pending(), 600)
        decided = time.perf_counter() - t0
        cpu1, commands1 = cpu(), await self.mongod_commands()
        return {
            "accepted": accepted,
            "errors": errors,
            "accept_per_s": accepted / seconds,
            "decide_per_s": accepted / decided,
            "cpu_us_per_event": {k: (cpu1[k] - cpu0[k]) / accepted * 1e6 for k in cpu0},
            "commands_per_event": {
                k: (n - commands0.get(k, 0)) / accepted
                for k, n in sorted(commands1.items())
                if n > commands0.get(k, 0)
            },
        }

    async def ingest(self, service: Server, mix: Mix) -> None:
        a = self.args
        url = service.url + "/v1/events"
        # Batches: accepted and decided, the decisions counted when the inbox has none left.
        bodies = ndjson(mix.events(a.events))
        batch = await self.posted(service, bodies, "application/x-ndjson", BATCH_CLIENTS)
        self.results["batch"] = {"events": batch.pop("accepted"), **batch}
        # Single-event requests from 64 clients.
        singles = [json.dumps(e).encode() for e in mix.events(a.singles)]
        single = await self.posted(service, singles, "application/json", CLIENTS)
        self.results["single"] = {"requests": single.pop("accepted"), **single}
        # Latency at half the highest sustained single-event rate.
        rate = 0.5 * min(single["accept_per_s"], single["decide_per_s"])
        count = max(200, int(rate * a.latency_seconds))
        latencies, errors = await self.decision_latencies(url, mix.events(count), rate)
        self.results["latency_ms"] = {
            "rate_per_s": rate,
            "events": len(latencies),
            "errors": errors,
            **{f"p{p}": percentile(latencies, p) for p in (50, 95, 99)},
        }

    async def decision_latencies(
        self,
        url: str,
        marked: list[Doc],
        rate: float,
        per_transaction: collections.Counter[tuple[str, Any]] | None = None,
    ) -> tuple[list[float], int]:
        """`marked` posted one per request at `rate` (open loop): the milliseconds from each event's
        acceptance to its decision, when the inbox's transaction deleted its queue document (the server's
        time of that delete, `watch_decisions`), and how many requests failed (never decided)."""
        wanted = {e["id"] for e in marked}
        decided_at: dict[str, datetime] = {}
        ready = asyncio.Event()
        watcher = asyncio.create_task(watch_decisions(self.db(), wanted, decided_at, ready, per_transaction))
        await ready.wait()
        _, errors = await paced(url, self.headers, [json.dumps(e).encode() for e in marked], rate)
        await until(lambda: self._none_pending(), 600)
        try:
            await asyncio.wait_for(watcher, 60)
        except TimeoutError:  # a request that failed is never decided: its error is counted, the rest timed
            if not errors:
                raise
        latencies = [
            (decided_at[d["_id"]] - d["received_at"]).total_seconds() * 1000
            async for d in self.db().events.find({"_id": {"$in": list(decided_at)}}, {"received_at": 1})
        ]
        return latencies, errors

    async def _none_pending(self, database: str = "bench") -> bool:
        """One index probe, so that watching costs the mongod nothing next to the service's work."""
        found = await self.db(database).inbox.find_one({"state": "pending"}, {"_id": 1}, hint="inbox_oldest")
        return found is None

    async def drain(self, service: Server) -> None:
        n = self.args.entries
        db = self.db()

        async def nothing_due() -> bool:
            """Index probes only: nothing due is left pending or running."""
            due = {"status": "pending", "due_at": {"$lte": datetime.now(UTC)}}
            return (
                await db.schedule.find_one(due) is None
                and await db.schedule.find_one({"status": "running"}) is None
            )

        await until(nothing_due, 600)  # the sends the ingest phases made due (confirmations...) go first
        now = datetime.now(UTC)
        due = now + timedelta(days=1)  # parked until every entry is written, then made due at once
        entries = [
            {
                "_id": f"s{i}",
                "contact_id": f"c{i % self.args.contacts}",
                "ruleset": "cart_abandon",
                "rule": "push_reminder",
                "key": f"k{i}",
                "due_at": due,
                "created_at": now,
                "cancel_on": [],
                "status": "pending",
                "message": {"channel": "log", "template": "cart_abandon/push", "params": PARAMS},
            }
            for i in range(n)
        ]
        messages = [
            {
                "_id": e["_id"],
                "contact_id": e["contact_id"],
                "ruleset": "cart_abandon",
                "rule": "push_reminder",
                "channel": "log",
                "template": "cart_abandon/push",
                "params": PARAMS,
                "transactional": False,
                "fallback": [],
                "guard": None,
                "status": "scheduled",
                "created_at": now,
                "due_at": due,
            }
            for e in entries
        ]
        baseline = db.get_collection("baseline_schedule", write_concern=DURABLE)
        t0 = time.perf_counter()
        for i in range(0, n, 1000):
            await baseline.insert_many(entries[i : i + 1000], ordered=False)
        insert_rate = n / (time.perf_counter() - t0)
        for i in range(0, n, 1000):
            await db.messages.insert_many(messages[i : i + 1000], ordered=False)
            await db.schedule.insert_many(entries[i : i + 1000], ordered=False)
        await db.schedule.update_many(
            {"_id": {"$regex": "^s"}, "status": "pending"}, {"$set": {"due_at": now}}
        )
        t0 = time.perf_counter()

        seconds = await until(nothing_due, 900, every=0.2)
        statuses = await db.messages.distinct("status", {"_id": {"$regex": "^s"}})
        if statuses != ["sent"]:
            sample = await db.messages.find_one({"_id": {"$regex": "^s"}, "status": {"$ne": "sent"}})
            raise RuntimeError(f"drained messages should all be sent, found {statuses}; e.g. {sample}")
        self.results["drain"] = {
            "entries": n,
            "seconds": seconds,
            "per_s": n / seconds,
            "insert_many_per_s": insert_rate,
            "statuses": statuses,
        }
        del t0

    async def fanout(self, service: Server, mix: Mix) -> None:
        n = self.args.interested
        db = self.db()
        now = datetime.now(UTC)
        product = "p-fanout"
        await db.products.insert_one({"_id": product, "price": 100.0, "in_stock": True})
        for i in range(0, n, 5000):
            await db.interests.insert_many(
                [
                    {"_id": f"c{j}|{product}", "contact_id": f"c{j}", "product_id": product, "viewed_at": now}
                    for j in range(i, min(n, i + 5000))
                ],
                ordered=False,
            )
        before: int = await db.schedule.count_documents({"ruleset": "price_drop"})
        drop = {
            "id": "fanout-1",
            "type": "price_changed",
            "attributes": {"product_id": product, "price": 70.0},
        }
        async with aiohttp.ClientSession(headers=self.headers) as session:
            async with session.post(service.url + "/v1/events", json=drop) as resp:
                assert resp.status == 202, await resp.text()
        t0 = time.perf_counter()
        stop = asyncio.Event()
        accepted_during = 0
        waits: list[float] = []

        async def keep_ingesting() -> None:
            """A busy shop's steady flow meanwhile: batches of 100 events ten times a second."""
            nonlocal accepted_during
            rate = self.args.fanout_ingest_rate
            async with aiohttp.ClientSession(headers=self.headers) as session:
                start = time.perf_counter()
                tick = 0
                while not stop.is_set():
                    body = ndjson(mix.events(rate // 10))[0]
                    sent = time.perf_counter()
                    headers = {"Content-Type": "application/x-ndjson"}
                    async with session.post(service.url + "/v1/events", data=body, headers=headers) as resp:
                        answer = await resp.json()
                        accepted_during += answer.get("accepted", 0) if resp.status == 202 else 0
                    waits.append((time.perf_counter() - sent) * 1000)
                    tick += 1
                    await asyncio.sleep(max(0.0, start + tick / 10 - time.perf_counter()))

        finished: list[datetime] = []

        async def scheduled() -> bool:
            """Index probes only: the fan-out wrote its last copies (the drop is out of the queue: seen
            within a probe's interval of it), and no older event is pending."""
            if not finished:
                if await db.events.find_one({"_id": drop["id"]}, {"_id": 1}) is None:
                    return False
                if await db.inbox.find_one({"_id": drop["id"]}, {"_id": 1}) is not None:
                    return False
                finished.append(datetime.now(UTC))
            oldest = await db.inbox.find_one(
                {"state": "pending"}, {"received_at": 1}, sort=[("received_at", 1)], hint="inbox_oldest"
            )
            return oldest is None or oldest["received_at"] > finished[0]

        ingest = asyncio.create_task(keep_ingesting())
        seconds = await until(scheduled, 900, every=0.2)
        stop.set()
        await ingest
        during = time.perf_counter() - t0
        copies = await db.schedule.count_documents({"ruleset": "price_drop"}) - before
        if copies != n:
            raise RuntimeError(f"the price drop scheduled {copies} messages for {n} interested contacts")
        await until(lambda: self._none_pending(), 600)
        self.results["fanout"] = {
            "contacts": n,
            "seconds_to_schedule_all": seconds,
            "ingest_during_per_s": accepted_during / during,
            "ingest_offered_per_s": self.args.fanout_ingest_rate,
            "accept_ms_p99": percentile(waits, 99),
            "accept_ms_max": max(waits),
        }

    async def memory(self, mix_prefix: str) -> None:
        levels = self.args.rss_levels
        database = "bench_rss"
        await self.prepare(database, 0)
        stored_contacts = 0
        self.results["rss_mb"] = {}
        for level in levels:
            now = datetime.now(UTC)
            for batch in contact_docs(stored_contacts, level, now):
                await self.db(database).contacts.insert_many(batch, ordered=False)
            stored_contacts = level
            service = self.service(database)
            await service.start("/readyz")
            try:
                mix = Mix(level, f"{mix_prefix}{level}-")
                await closed_loop(
                    service.url + "/v1/events",
                    self.headers,
                    ndjson(mix.events(self.args.rss_events)),
                    "application/x-ndjson",
                    BATCH_CLIENTS,
                )
                await until(lambda: self._none_pending(database), 600)
                self.results["rss_mb"][str(level)] = {
                    "service": service.rss_mb(),
                    "per_worker": [rss_mb(p) for p in service.workers()],
                    "mongod": rss_mb(self.mongod_pid()),
                }
            finally:
                service.stop()

    async def counting(self) -> dict[str, Any]:
        """Decisions with the funnel counts written in their transactions, against the same decisions with
        counting off (`RULESVC_STATS=0`): a backlog of stored events decided from a cold start, rounds
        alternated so that the machine's drift falls on both sides alike."""
        a = self.args
        rounds: dict[str, list[float]] = {"off": [], "on": []}
        stats_docs: dict[str, int] = {}
        for n, mode in enumerate(["off", "on"] * a.count_rounds):
            database = f"bench_count_{n}"
            await self.prepare(database, a.count_contacts)
            now = datetime.now(UTC)
            events = [stored(e, now) for e in Mix(a.count_contacts, f"k{n}-").events(a.count_events)]
            for i in range(0, len(events), 5000):
                await self.db(database).events.insert_many(events[i : i + 5000], ordered=False)
                await self.db(database).inbox.insert_many([queued(d) for d in events[i : i + 5000]])
            service = self.service(database, RULESVC_STATS="1" if mode == "on" else "0")
            await service.start("/readyz")
            inbox = self.db(database).inbox

            async def first_decided(inbox: AsyncCollection[Doc] = inbox, total: int = len(events)) -> bool:
                return bool(await inbox.estimated_document_count() < total)

            try:
                # From the first decision to the last (start-up is not counted), the end probed every 50 ms.
                await until(first_decided, 900, every=0.01)
                span = await until(functools.partial(self._none_pending, database), 900)
            finally:
                service.stop()
            rounds[mode].append(len(events) / max(span, 1e-3))
            stats_docs[mode] = stats_docs.get(mode, 0) + await self.db(database).stats.count_documents({})
            await self.client.drop_database(database)
        if stats_docs.get("off") or not stats_docs.get("on"):
            raise RuntimeError(f"counting on should write stats documents and off none: {stats_docs}")
        median = {mode: statistics.median(rates) for mode, rates in rounds.items()}
        return {
            "events": a.count_events,
            "contacts": a.count_contacts,
            "rounds": rounds,
            "decide_per_s_off": median["off"],
            "decide_per_s_on": median["on"],
            "on_vs_off": median["on"] / median["off"],
            "stats_documents_written": stats_docs["on"],
        }

    def mongod_pid(self) -> int:
        return int((self.tmp / "mongod" / "mongod.pid").read_text())

    async def mongod_commands(self) -> dict[str, int]:
        """How many of each data command mongod has run (`serverStatus`): the round trips. This
        benchmark's own polls for the end of a phase (a `find` every 50 ms) are among them."""
        status = await self.client.admin.command("serverStatus")
        commands = status["metrics"]["commands"]
        return {name: int(commands[name]["total"]) for name in DATA_COMMANDS if name in commands}

    def save(self) -> None:
        """After every phase, so that a later failure keeps what was measured."""
        self.args.out.parent.mkdir(parents=True, exist_ok=True)
        self.args.out.write_text(json.dumps(self.results, indent=2, default=str) + "\n")

    async def phase(self, name: str, work: Awaitable[Any], key: str) -> None:
        t0 = time.perf_counter()
        progress(f"{name} ...")
        before = set(self.results)
        result = await work
        if result is not None:
            self.results[key] = result
        self.save()
        found = {k: v for k, v in self.results.items() if k not in before}
        progress(f"{name} ({time.perf_counter() - t0:.0f} s): {json.dumps(found, default=str)}")

    async def run(self) -> dict[str, Any]:
        a = self.args
        started = time.perf_counter()
        await self.prepare("bench", a.contacts)
        mix = Mix(a.contacts, "e")
        baseline_events = Mix(a.contacts, "b").events(a.events)
        await self.phase(
            "baseline: insert_many", self.insert_many_baseline(baseline_events), "insert_many_per_s"
        )
        bodies = [json.dumps(e).encode() for e in Mix(a.contacts, "h").events(a.singles)]
        await self.phase("baseline: aiohttp", self.aiohttp_baseline(bodies), "aiohttp_baseline_per_s")
        service = self.service("bench")
        await service.start("/readyz")
        try:
            await self.phase("ingest + decide", self.ingest(service, mix), "batch")
            await self.phase("schedule drain", self.drain(service), "drain")
            await self.phase("fan-out", self.fanout(service, mix), "fanout")
        finally:
            service.stop()
        await self.phase("memory", self.memory("m"), "rss_mb")
        await self.phase("counting on / off", self.counting(), "counting")
        r = self.results
        r["ratios"] = {
            "batch_vs_insert_many": r["batch"]["decide_per_s"] / r["insert_many_per_s"],
            "batch_accept_vs_insert_many": r["batch"]["accept_per_s"] / r["insert_many_per_s"],
            "single_vs_aiohttp": r["single"]["accept_per_s"] / r["aiohttp_baseline_per_s"],
            "drain_vs_insert_many": r["drain"]["per_s"] / r["drain"]["insert_many_per_s"],
            "decide_counting_on_vs_off": r["counting"]["on_vs_off"],
        }
        r["bench_seconds"] = time.perf_counter() - started
        if a.index_stats is not None:
            await self.dump_index_stats(a.index_stats)
        await self.client.close()
        return r

    async def dump_index_stats(self, path: Path) -> None:
        """`$indexStats` of every collection of the databases left (the counting rounds drop theirs): how
        often each index served a query since mongod started, to find indexes nothing reads. The bench's
        own checks (pending events, due entries) count too."""
        found: dict[str, Any] = {}
        for database in await self.client.list_database_names():
            if database in ("admin", "config", "local"):
                continue
            db = self.client[database]
            for collection in sorted(await db.list_collection_names()):
                cursor = await db[collection].aggregate([{"$indexStats": {}}])
                found.setdefault(database, {})[collection] = {
                    s["name"]: {"ops": s["accesses"]["ops"], "since": s["accesses"]["since"], "key": s["key"]}
                    async for s in cursor
                }
        write_json(path, found)
        progress(f"index stats written to {path}")


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def progress(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


def machine(workers: int, cache_gb: float) -> dict[str, Any]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.machine(),
    )
    memory = int(Path("/proc/meminfo").read_text().split()[1]) // 1024 // 1024
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": memory,
        "python": platform.python_version(),
        "workers": workers,
        "mongod_cache_gb": cache_gb,
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
    }


def table(r: dict[str, Any]) -> str:
    rows = [
        (
            "ingest + decide, NDJSON batches of 500",
            f"{r['batch']['decide_per_s']:,.0f} events/s",
            f"accepted {r['batch']['accept_per_s']:,.0f}/s",
        ),
        (
            "ingest + decide, single events, 64 clients",
            f"{r['single']['decide_per_s']:,.0f} events/s",
            f"accepted {r['single']['accept_per_s']:,.0f} req/s",
        ),
        (
            f"acceptance to decision at {r['latency_ms']['rate_per_s']:,.0f} req/s",
            "p50 {p50:.1f} / p95 {p95:.1f} / p99 {p99:.1f} ms".format(**r["latency_ms"]),
            "",
        ),
        *(
            (
                f"CPU per decided event ({what})",
                "{service:.0f} us service + {mongod:.0f} us mongod".format(**r[kind]["cpu_us_per_event"]),
                "+ {bench:.0f} us load generator; {n:.2f} mongod commands".format(
                    n=sum(r[kind]["commands_per_event"].values()), **r[kind]["cpu_us_per_event"]
                ),
            )
            for kind, what in (("batch", "batches"), ("single", "single requests"))
        ),
        ("baseline: minimal aiohttp handler, 64 clients", f"{r['aiohttp_baseline_per_s']:,.0f} req/s", ""),
        ("baseline: insert_many of the same documents", f"{r['insert_many_per_s']:,.0f} docs/s", ""),
        (
            "schedule drain, no-op channel",
            f"{r['drain']['per_s']:,.0f} sends/s",
            f"{r['drain']['entries']:,} entries in {r['drain']['seconds']:.1f} s",
        ),
        ("baseline: insert_many of the entries", f"{r['drain']['insert_many_per_s']:,.0f} docs/s", ""),
        (
            f"fan-out to {r['fanout']['contacts']:,} contacts",
            f"{r['fanout']['seconds_to_schedule_all']:.1f} s",
            "ingest meanwhile {ingest_during_per_s:,.0f} events/s, accept p99 {accept_ms_p99:.0f} ms".format(
                **r["fanout"]
            ),
        ),
        *(
            (
                f"service RSS, {int(k):,} contacts stored",
                f"{v['service']:.0f} MB",
                f"mongod {v['mongod']:.0f} MB",
            )
            for k, v in r["rss_mb"].items()
        ),
        ("ratio: batches decided / insert_many", f"{r['ratios']['batch_vs_insert_many']:.2f}", ""),
        ("ratio: batches accepted / insert_many", f"{r['ratios']['batch_accept_vs_insert_many']:.2f}", ""),
        ("ratio: single requests / aiohttp handler", f"{r['ratios']['single_vs_aiohttp']:.2f}", ""),
        ("ratio: drain / insert_many", f"{r['ratios']['drain_vs_insert_many']:.2f}", ""),
        (
            "decisions from a backlog, funnel counting off / on",
            "{decide_per_s_off:,.0f} / {decide_per_s_on:,.0f} events/s".format(**r["counting"]),
            f"median of {len(r['counting']['rounds']['on'])} alternated rounds",
        ),
        ("ratio: decisions with counting / without", f"{r['ratios']['decide_counting_on_vs_off']:.2f}", ""),
    ]
    width = max(len(a) for a, _, _ in rows)
    value = max(len(b) for _, b, _ in rows)
    return "\n".join(f"{a:<{width}}  {b:>{value}}  {c}" for a, b, c in rows)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="service worker processes")
    parser.add_argument("--contacts", type=int, default=100_000)
    parser.add_argument("--events", type=int, default=100_000, help="events posted in NDJSON batches")
    parser.add_argument("--singles", type=int, default=30_000, help="single-event requests")
    parser.add_argument("--latency-seconds", type=float, default=10.0)
    parser.add_argument("--entries", type=int, default=100_000, help="schedule entries due at once")
    parser.add_argument("--interested", type=int, default=100_000, help="contacts the price drop reaches")
    parser.add_argument(
        "--rss-levels", type=lambda s: [int(x) for x in s.split(",")], default=[10_000, 100_000, 1_000_000]
    )
    parser.add_argument("--rss-events", type=int, default=20_000, help="events posted at each RSS level")
    parser.add_argument(
        "--fanout-ingest-rate", type=int, default=1000, help="events/s posted during the fan-out"
    )
    parser.add_argument("--mongod-cache-gb", type=float, default=2.0, help="the mongod's WiredTiger cache")
    parser.add_argument("--count-events", type=int, default=40_000, help="backlog decided per counting round")
    parser.add_argument("--count-contacts", type=int, default=20_000, help="contacts of the counting rounds")
    parser.add_argument("--count-rounds", type=int, default=3, help="rounds with counting off and on each")
    parser.add_argument("--quick", action="store_true", help="small sizes, to check the benchmark runs")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "service.json")
    parser.add_argument(
        "--index-stats", type=Path, default=None, help="write each index's use ($indexStats) as JSON here"
    )
    args = parser.parse_args()
    if args.quick:
        args.contacts, args.events, args.singles, args.entries, args.interested = 2000, 2000, 500, 1000, 1000
        args.latency_seconds, args.rss_levels, args.rss_events = 1.0, [1000, 3000], 500
        args.count_events, args.count_contacts, args.count_rounds = 1000, 500, 1
    with tempfile.TemporaryDirectory(prefix="rulesvc-bench-") as tmp:
        mongod = EmbeddedMongod(Path(tmp) / "mongod", cache_gb=args.mongod_cache_gb)
        mongod.start()
        try:
            results = asyncio.run(Bench(args, mongod, Path(tmp)).run())
        finally:
            mongod.stop()
    results = {
        "machine": machine(args.workers, args.mongod_cache_gb),
        "sizes": {k: v for k, v in vars(args).items() if k not in ("out", "index_stats")},
        **results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(table(results))
    print(
        f"\n{results['machine']['cpu']}, {results['machine']['cores']} cores, "
        f"{results['machine']['workers']} workers; {results['bench_seconds']:.0f} s; written to {args.out}"
    )


if __name__ == "__main__":
    main()
