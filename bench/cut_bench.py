"""What cutting a large catalog fan-out into parts costs the worker that cuts it, against reading every
interested id into a list (how the cut worked before), in the same run on the same mongod.

    .venv/bin/python bench/cut_bench.py [--interests 1000000] [--batch 500] [--out PATH]

Starts its own mongod (embedded, temporary), stores `--interests` interests in one product, and times,
then measures the Python memory (tracemalloc's peak) of:
- the cut: `Catalog.count_interested` and `Catalog.interested_at` at `part_ends` (one pass, keeping the
  bounds only);
- the baseline: the same query's ids read into a list, then the bounds taken from it.
Both must find the same bounds. Prints a table and writes bench/results/cut.json.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pymongo import ASCENDING, AsyncMongoClient

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.engine_bench import report  # noqa: E402
from rulesvc.core.catalog import part_ends  # noqa: E402
from rulesvc.store.catalog import Catalog  # noqa: E402
from rulesvc.store.db import Store  # noqa: E402
from rulesvc.store.mongod import EmbeddedMongod  # noqa: E402


async def store_interests(store: Store, n: int, now: datetime) -> None:
    for start in range(0, n, 50_000):
        await store.interests.insert_many(
            [{"_id": f"c{i:08d}|lamp", "contact_id": f"c{i:08d}", "product_id": "lamp", "viewed_at": now}
             for i in range(start, min(n, start + 50_000))],
            ordered=False,
        )  # fmt: skip


async def measured(run: Callable[[], Awaitable[list[str]]]) -> tuple[list[str], float, float]:
    """The bounds, the seconds (untraced) and the peak MB of Python allocations (a second, traced run)."""
    t0 = time.perf_counter()
    bounds = await run()
    seconds = time.perf_counter() - t0
    tracemalloc.start()
    try:
        assert await run() == bounds
        peak = tracemalloc.get_traced_memory()[1] / 1e6
    finally:
        tracemalloc.stop()
    return bounds, seconds, peak


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--interests", type=int, default=1_000_000)
    parser.add_argument(
        "--batch", type=int, default=500, help="the fan-out's batch size (parts are 4+ batches)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "cut.json")
    args = parser.parse_args()
    now = datetime.now(UTC)
    event: dict[str, Any] = {
        "_id": "pc",
        "type": "price_changed",
        "time": now,
        "attributes": {"product_id": "lamp"},
    }
    with tempfile.TemporaryDirectory() as tmp, EmbeddedMongod(tmp) as mongod:
        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongod.uri, tz_aware=True)
        store = Store(client, "bench", timedelta(days=1))
        await store.ensure_schema()
        await store_interests(store, args.interests, now)
        catalog = Catalog(store)

        async def cut() -> list[str]:
            count = await catalog.count_interested(event, None)
            return await catalog.interested_at(event, None, part_ends(count, args.batch))

        async def baseline() -> list[str]:
            query = catalog._range(catalog._interest_query(event), None)
            found = store.interests.find(query, {"_id": 1}, batch_size=10_000).sort("_id", ASCENDING)
            ids = [d["_id"] async for d in found]
            return [ids[at] for at in part_ends(len(ids), args.batch)]

        base_bounds, base_s, base_mb = await measured(baseline)
        cut_bounds, cut_s, cut_mb = await measured(cut)
        assert cut_bounds == base_bounds, "the cut and the baseline found different bounds"
        await client.close()
    results = {
        "interests": args.interests,
        "parts": len(cut_bounds) + 1,
        "baseline_ids_in_a_list_s": base_s,
        "baseline_ids_in_a_list_peak_mb": base_mb,
        "cut_one_pass_s": cut_s,
        "cut_one_pass_peak_mb": cut_mb,
        "cut_vs_baseline_time": cut_s / base_s,
        "cut_vs_baseline_memory": cut_mb / base_mb,
    }
    report(results, args.out, digits=3)


if __name__ == "__main__":
    asyncio.run(main())
