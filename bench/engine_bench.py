"""Engine and schedule throughput, with baselines measured in the same run on the same mongod.

    .venv/bin/python bench/engine_bench.py [--events 20000] [--entries 20000]

Prints a table and writes bench/results/engine.json. Measures, on one process (one core for Python):
- the matcher alone (durable-rules, one trivial rule) and the engine deciding for the cart ruleset;
- the inbox: accepted events evaluated and committed per second, against `insert_many` of the same docs;
- the schedule: due sends fired per second through the `log` channel, against `insert_many` of the entries.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import durable_rules_engine
from pymongo import AsyncMongoClient

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rulesvc import logs  # noqa: E402
from rulesvc.core.engine import ContactView, EngineEvent  # noqa: E402
from rulesvc.core.events import Event  # noqa: E402
from rulesvc.core.sendpolicy import SendPolicy  # noqa: E402
from rulesvc.plugins import builtin_channels  # noqa: E402
from rulesvc.runtime.dispatcher import Dispatcher  # noqa: E402
from rulesvc.runtime.inbox import Inbox  # noqa: E402
from rulesvc.runtime.rulesets import Rulesets  # noqa: E402
from rulesvc.runtime.scheduler import Scheduler  # noqa: E402
from rulesvc.runtime.templates import Templates  # noqa: E402
from rulesvc.store.db import Store  # noqa: E402
from rulesvc.store.mongod import EmbeddedMongod  # noqa: E402


def rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


def bench_matcher(n: int) -> float:
    definition = {"r": {"all": [{"m": {"$and": [{"t": "x"}, {"$gt": {"f0": 0}}]}}]}}
    handle = durable_rules_engine.create_ruleset("bench_matcher", json.dumps(definition))
    t0 = time.perf_counter()
    for i in range(n):
        message = f'{{"sid":"m","id":"{i}","t":"x","f0":{i % 2}}}'
        result = durable_rules_engine.assert_event(handle, message)
        if result[0] == 0 and durable_rules_engine.start_action_for_state(handle, result[1]) is not None:
            durable_rules_engine.complete_and_start_action(handle, result[1])
    return rate(n, time.perf_counter() - t0)


def bench_engine(rulesets: Rulesets, n: int) -> float:
    engine = rulesets.engine()
    now = datetime.now(UTC)
    contacts = [ContactView(f"c{i}", {}, {}) for i in range(1000)]
    events = [
        EngineEvent(f"e{i}", "cart_updated", f"c{i % 1000}", now, {"value": 10 + i % 50, "currency": "EUR"})
        for i in range(n)
    ]
    t0 = time.perf_counter()
    for i, event in enumerate(events):
        contact = contacts[i % 1000]
        engine.evaluate(event, contact, now)  # it keeps the contact's pending entries itself
    return rate(n, time.perf_counter() - t0)


def event_docs(n: int, now: datetime) -> list[Event]:
    return [
        Event(id=f"b{i}", type="cart_updated", contact_id=f"c{i % 5000}", time=now, attributes={"value": 20})
        for i in range(n)
    ]


async def bench_inbox(store: Store, rulesets: Rulesets, n: int) -> tuple[float, float]:
    now = datetime.now(UTC)
    events = event_docs(n, now)
    baseline = store.db["baseline_events"]
    docs = [{"_id": e.id, "type": e.type, "contact_id": e.contact_id, "time": now, "attributes": e.attributes,
             "received_at": now} for e in events]  # fmt: skip
    t0 = time.perf_counter()
    for i in range(0, n, 1000):
        await baseline.insert_many(docs[i : i + 1000], ordered=False)
    insert_rate = rate(n, time.perf_counter() - t0)

    for i in range(0, n, 1000):
        await store.insert_events(events[i : i + 1000], now)
    inbox = Inbox(store, rulesets, batch_size=1000)
    t0 = time.perf_counter()
    while await inbox.process_once():
        pass
    return rate(inbox.processed, time.perf_counter() - t0), insert_rate


async def bench_schedule(store: Store, rulesets: Rulesets, n: int) -> tuple[float, float]:
    now = datetime.now(UTC)
    due = now - timedelta(seconds=1)
    entries = [
        {"_id": f"s{i}", "contact_id": f"c{i}", "ruleset": "cart_abandon", "rule": "remind", "key": f"k{i}",
         "due_at": due, "created_at": now, "cancel_on": [], "status": "pending",
         "message": {"channel": "log", "template": "t", "params": {}, "transactional": False, "fallback": []}}
        for i in range(n)
    ]  # fmt: skip
    messages = [
        {"_id": e["_id"], "contact_id": e["contact_id"], "ruleset": "cart_abandon", "rule": "remind",
         "channel": "log", "template": "t", "status": "scheduled", "created_at": now, "due_at": due}
        for e in entries
    ]  # fmt: skip
    baseline = store.db["baseline_schedule"]
    t0 = time.perf_counter()
    for i in range(0, n, 1000):
        await baseline.insert_many(entries[i : i + 1000], ordered=False)
    insert_rate = rate(n, time.perf_counter() - t0)
    await store.schedule.delete_many({})
    for i in range(0, n, 1000):
        await store.schedule.insert_many(entries[i : i + 1000])
        await store.messages.insert_many(messages[i : i + 1000])
    channels = builtin_channels()
    templates = Path(tempfile.mkdtemp())
    (templates / "t.body").write_text("Hello {{ contact.id }}")
    dispatcher = Dispatcher(store, channels, Templates(templates), SendPolicy())
    scheduler = Scheduler(store, dispatcher, lambda: set(rulesets.live), batch_size=1000)
    t0 = time.perf_counter()
    while await scheduler.fire_due():
        pass
    elapsed = time.perf_counter() - t0
    assert await store.messages.count_documents({"status": "sent"}) == n
    return rate(scheduler.fired, elapsed), insert_rate


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--entries", type=int, default=20_000)
    args = parser.parse_args()
    logs.configure("console", "warning")
    rulesets = Rulesets(ROOT / "rulesets", builtin_channels().names())
    rulesets.reload()
    results: dict[str, Any] = {
        "machine": {"python": platform.python_version(), "cpu": platform.processor() or platform.machine()},
        "matcher_events_per_s": bench_matcher(200_000),
        "engine_cart_events_per_s": bench_engine(rulesets, args.events),
    }
    with tempfile.TemporaryDirectory() as tmp, EmbeddedMongod(tmp) as mongod:
        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongod.uri, tz_aware=True)
        store = Store(client, "bench", timedelta(days=1))
        await store.ensure_schema()
        inbox_rate, insert_rate = await bench_inbox(store, rulesets, args.events)
        drain_rate, entry_insert_rate = await bench_schedule(store, rulesets, args.entries)
        await client.close()
    results |= {
        "inbox_events_per_s": inbox_rate,
        "insert_many_events_per_s": insert_rate,
        "inbox_vs_insert_many": inbox_rate / insert_rate,
        "schedule_drain_per_s": drain_rate,
        "insert_many_entries_per_s": entry_insert_rate,
        "drain_vs_insert_many": drain_rate / entry_insert_rate,
    }
    report(results, ROOT / "bench" / "results" / "engine.json")


def report(results: dict[str, Any], out: Path, digits: int = 2) -> None:
    """The figures as JSON in `out` and as a two-column table on stdout."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    width = max(map(len, results))
    for key, value in results.items():
        shown = f"{value:,.{digits}f}" if isinstance(value, float) else value
        print(f"{key:<{width}}  {shown}")


if __name__ == "__main__":
    asyncio.run(main())
