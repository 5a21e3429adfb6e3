"""Where acceptance-to-decision latency comes from: the service at a few fixed request rates, against the
cost of one MongoDB round trip measured in the same run.

    .venv/bin/python bench/latency_bench.py [--rates 50,200,400] [--seconds 10] [--out PATH]

Starts its own mongod (embedded, temporary) and `rulesvc serve` with the shipped rulesets, as
`service_bench.py` does, and posts single-event requests at each rate (open loop). For each rate:
- acceptance to decision, p50/p95/p99: from when the event was received to the commit of the inbox
  transaction that decided it (the delete of its queue document, in a change stream);
- events per inbox transaction (the deletes of one transaction, grouped by session and number);
- MongoDB data commands per decided event (`serverStatus`; the service's background polls count too).
Baselines, same mongod, same client library and event loop as the service (uvloop): a `find_one` by
`_id` (one round trip), and a transaction of one update and its commit. At a low rate every batch holds
one event, so commands per event times the round trip is the floor that the latency cannot go under
whatever the CPU does. Prints a table and writes its figures to bench/results/latency.json.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import uvloop
from pymongo import AsyncMongoClient

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.engine_bench import report  # noqa: E402
from bench.service_bench import CLIENTS, Bench, Mix, closed_loop, percentile, until  # noqa: E402
from rulesvc.store.mongod import EmbeddedMongod  # noqa: E402

CONTACTS = 20_000


async def round_trips(uri: str, n: int) -> dict[str, float]:
    """Milliseconds per `find_one` by `_id`, and per transaction of one update and its commit."""
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(uri)
    try:
        coll = client["latency_baseline"]["t"]
        await coll.insert_one({"_id": 1, "n": 0})
        for _ in range(100):
            await coll.find_one({"_id": 1})
        t0 = time.perf_counter()
        for _ in range(n):
            await coll.find_one({"_id": 1})
        find_ms = (time.perf_counter() - t0) / n * 1000
        t0 = time.perf_counter()
        for _ in range(n // 4):
            async with client.start_session() as session, await session.start_transaction():
                await coll.update_one({"_id": 1}, {"$inc": {"n": 1}}, session=session)
        txn_ms = (time.perf_counter() - t0) / (n // 4) * 1000
        return {"find_one_ms": find_ms, "one_update_transaction_ms": txn_ms}
    finally:
        await client.close()


async def at_rate(bench: Bench, url: str, mix: Mix, rate: float, seconds: float) -> dict[str, Any]:
    per_txn: collections.Counter[tuple[str, Any]] = collections.Counter()
    before = await bench.mongod_commands()
    latencies, errors = await bench.decision_latencies(
        url, mix.events(max(20, int(rate * seconds))), rate, per_txn
    )
    after = await bench.mongod_commands()
    commands = sum(after.values()) - sum(before.values())
    return {
        "rate_per_s": rate,
        "events": len(latencies),
        "errors": errors,
        **{f"p{p}_ms": percentile(latencies, p) for p in (50, 95, 99)},
        "events_per_inbox_transaction": sum(per_txn.values()) / max(1, len(per_txn)),
        "commands_per_event": commands / max(1, len(latencies)),
    }


async def run(args: argparse.Namespace, mongod: EmbeddedMongod, tmp: Path) -> dict[str, Any]:
    results: dict[str, Any] = {"baseline": await round_trips(mongod.uri, args.round_trips)}
    bench = Bench(argparse.Namespace(workers=args.workers), mongod, tmp)
    await bench.prepare("bench", CONTACTS)
    service = bench.service("bench")
    await service.start("/healthz")
    try:
        mix = Mix(CONTACTS, "w")
        url = service.url + "/v1/events"
        warm = [json.dumps(e).encode() for e in mix.events(args.warm)]
        await closed_loop(url, bench.headers, warm, "application/json", CLIENTS)
        await until(lambda: bench._none_pending(), 600)
        results["rates"] = [await at_rate(bench, url, mix, r, args.seconds) for r in args.rates]
    finally:
        service.stop()
        await bench.client.close()
    low = results["rates"][0]
    results["floor_ms"] = low["commands_per_event"] * results["baseline"]["find_one_ms"]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rates", type=lambda s: [float(x) for x in s.split(",")], default=[50, 200, 400])
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds of requests at each rate")
    parser.add_argument("--workers", type=int, default=2, help="service worker processes")
    parser.add_argument("--warm", type=int, default=3000, help="single requests before the first rate")
    parser.add_argument("--round-trips", type=int, default=2000, help="round trips in the baseline")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "latency.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="rulesvc-latency-") as tmp:
        mongod = EmbeddedMongod(Path(tmp) / "mongod")
        mongod.start()
        try:
            results = uvloop.run(run(args, mongod, Path(tmp)))
        finally:
            mongod.stop()
    flat: dict[str, Any] = {**{f"baseline_{k}": v for k, v in results["baseline"].items()}}
    for r in results["rates"]:
        rate = f"{r['rate_per_s']:g}/s"
        for key in ("p50_ms", "p95_ms", "p99_ms", "events_per_inbox_transaction", "commands_per_event"):
            flat[f"{rate} {key}"] = r[key]
        flat[f"{rate} errors"] = r["errors"]
    flat["floor_ms (commands per event at the lowest rate x find_one_ms)"] = results["floor_ms"]
    report(flat, args.out)


if __name__ == "__main__":
    main()
