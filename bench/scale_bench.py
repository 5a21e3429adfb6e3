"""Scale-out benchmark: one `rulesvc serve` against two on the same three-member replica set.

    .venv/bin/python bench/scale_bench.py [--quick] [--events N] [--singles N]

Starts a three-member replica set on loopback (tests/replset.py: the embedded mongod's binary, three
data folders), then for 1 and for 2 service instances (each `--workers 1` unless told otherwise), each
time on a fresh database with the same contacts: the standard event mix of bench/service_bench.py as
NDJSON batches and as single-event POSTs, the load spread evenly over the instances; accepted/s and
decided/s (until nothing is pending). Then, with two instances under single-event load, the primary is
killed (SIGKILL): the seconds to a new primary and to the first acknowledged write after the kill, and
what the clients were answered meanwhile. Prints a table; writes bench/results/scale.json.

On one machine the three mongods, the instances and the load generator share the same cores: the ratio
says what a second instance adds when the database is not on other machines, not what it adds on a
cluster (docs/deploy.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
from pymongo import AsyncMongoClient

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.service_bench import (  # noqa: E402
    BATCH,
    BATCH_CLIENTS,
    CLIENTS,
    Mix,
    Server,
    closed_loop,
    contact_docs,
    machine,
    ndjson,
    progress,
    serve_command,
    service_env,
    until,
)
from rulesvc.store.db import Store  # noqa: E402
from rulesvc.store.keys import Keys  # noqa: E402
from tests.replset import ReplicaSet  # noqa: E402

Doc = dict[str, Any]


class ScaleBench:
    def __init__(self, args: argparse.Namespace, replset: ReplicaSet, tmp: Path) -> None:
        self.args = args
        self.replset = replset
        self.tmp = tmp
        self.client: AsyncMongoClient[Doc] = AsyncMongoClient(replset.uri, tz_aware=True)
        self.headers: dict[str, str] = {}
        self.results: dict[str, Any] = {}

    def services(self, database: str, count: int) -> list[Server]:
        env = service_env(self.replset.uri, database)
        command = serve_command(self.args.workers)
        return [Server(command, env, self.tmp / f"service-{database}-{i}.log") for i in range(count)]

    async def prepare(self, database: str) -> None:
        store = Store(self.client, database, timedelta(days=1))
        await store.ensure_schema()
        key, _ = await Keys(store.api_keys).create("admin", "bench")
        self.headers = {"Authorization": f"Bearer {key}"}
        for batch in contact_docs(0, self.args.contacts, datetime.now(UTC)):
            await store.contacts.insert_many(batch, ordered=False)

    async def none_pending(self, database: str) -> bool:
        """No undecided event: in `events` (this release) or in the `inbox` queue (issue 19's layout)."""
        db = self.client[database]
        for name in ("events", "inbox"):
            if await db[name].find_one({"state": "pending"}, {"_id": 1}) is not None:
                return False
        return True

    async def throughput(self, instances: int) -> dict[str, Any]:
        a = self.args
        database = f"scale_{instances}"
        await self.prepare(database)
        servers = self.services(database, instances)
        await asyncio.gather(*(s.start("/readyz") for s in servers))
        urls = [s.url + "/v1/events" for s in servers]
        mix = Mix(a.contacts, f"i{instances}-")

        async def phase(
            bodies: list[bytes], content_type: str, clients: int, counted: str
        ) -> dict[str, float]:
            """Posted by a closed loop, then decided: how many were accepted (named `counted`), per second,
            and decided per second."""
            seconds, accepted, errors = await closed_loop(urls, self.headers, bodies, content_type, clients)
            t0 = time.perf_counter() - seconds
            await until(lambda: self.none_pending(database), 600)
            return {counted: accepted, "errors": errors, "accept_per_s": accepted / seconds,
                    "decide_per_s": accepted / (time.perf_counter() - t0)}  # fmt: skip

        try:
            batch = await phase(ndjson(mix.events(a.events)), "application/x-ndjson", BATCH_CLIENTS, "events")
            singles = [json.dumps(e).encode() for e in mix.events(a.singles)]
            single = await phase(singles, "application/json", CLIENTS, "requests")
        finally:
            for s in servers:
                s.stop()
        await self.client.drop_database(database)
        return {"instances": instances, "batch": batch, "single": single}

    async def failover(self) -> dict[str, Any]:
        """Two instances under single-event load (64 clients, 503s retried after Retry-After, as the API
        asks); the primary is killed and later restarted."""
        database = "scale_failover"
        await self.prepare(database)
        servers = self.services(database, 2)
        await asyncio.gather(*(s.start("/readyz") for s in servers))
        mix = Mix(self.args.contacts, "f-")
        statuses: Counter[int] = Counter()
        acked: list[float] = []  # when each 202 arrived (perf_counter) for requests sent after the kill
        killed_at = 0.0
        stop = asyncio.Event()
        try:
            async with aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=CLIENTS), headers=self.headers
            ) as session:

                async def client(url: str) -> None:
                    while not stop.is_set():
                        body = json.dumps(mix.event()).encode()
                        while not stop.is_set():
                            sent = time.perf_counter()
                            try:
                                async with session.post(
                                    url, data=body, headers={"Content-Type": "application/json"}
                                ) as resp:
                                    await resp.read()
                                    statuses[resp.status] += 1
                                    if resp.status == 202:
                                        if killed_at and sent > killed_at:
                                            acked.append(time.perf_counter())
                                        break
                                    if resp.status != 503:
                                        break
                                    await asyncio.sleep(float(resp.headers.get("Retry-After", "1")))
                            except aiohttp.ClientError:
                                statuses[0] += 1
                                await asyncio.sleep(0.2)

                tasks = [
                    asyncio.create_task(client(servers[i % 2].url + "/v1/events")) for i in range(CLIENTS)
                ]
                await asyncio.sleep(self.args.failover_warmup)
                before = dict(statuses)
                primary = self.replset.primary()
                assert primary is not None
                killed_at = time.perf_counter()
                primary.kill()
                await asyncio.to_thread(
                    self.replset.wait_for, lambda: self.replset.primary() is not None, 60, "new primary"
                )
                elected = time.perf_counter() - killed_at

                async def any_acked() -> bool:
                    return bool(acked)

                await until(any_acked, 120)
                first_ack = min(acked) - killed_at
                await asyncio.sleep(5)  # load on the new primary
                stop.set()
                await asyncio.gather(*tasks)
        finally:
            for s in servers:
                s.stop()
        primary.spawn()
        t0 = time.perf_counter()
        await asyncio.to_thread(self.replset.wait_healthy, 120)
        during = {str(k): v - before.get(k, 0) for k, v in statuses.items() if v != before.get(k, 0)}
        return {
            "elected_s": elected,
            "first_ack_after_kill_s": first_ack,
            "answers_from_kill_on": during,
            "restarted_member_secondary_after_s": time.perf_counter() - t0,
        }

    def save(self) -> None:
        self.args.out.parent.mkdir(parents=True, exist_ok=True)
        self.args.out.write_text(json.dumps(self.results, indent=2, default=str) + "\n")

    async def run(self) -> dict[str, Any]:
        started = time.perf_counter()
        for instances in (1, 2):
            progress(f"{instances} instance(s) ...")
            self.results[f"instances_{instances}"] = await self.throughput(instances)
            progress(json.dumps(self.results[f"instances_{instances}"]))
            self.save()
        one, two = self.results["instances_1"], self.results["instances_2"]
        self.results["ratios"] = {
            f"{kind}_{rate}": two[kind][rate] / one[kind][rate]
            for kind in ("batch", "single")
            for rate in ("accept_per_s", "decide_per_s")
        }
        if not self.args.no_failover:
            progress("failover ...")
            self.results["failover"] = await self.failover()
            progress(json.dumps(self.results["failover"]))
        self.results["bench_seconds"] = time.perf_counter() - started
        await self.client.close()
        return self.results


def table(r: dict[str, Any]) -> str:
    one, two, ratio = r["instances_1"], r["instances_2"], r["ratios"]
    rows = [("", "1 instance", "2 instances", "2 / 1")]
    for kind, label in (
        ("batch", f"NDJSON batches of {BATCH}"),
        ("single", f"single events, {CLIENTS} clients"),
    ):
        for rate, what in (("accept_per_s", "accepted"), ("decide_per_s", "decided")):
            rows.append((f"{label}, {what}/s", f"{one[kind][rate]:,.0f}", f"{two[kind][rate]:,.0f}",
                         f"{ratio[f'{kind}_{rate}']:.2f}"))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [f"{a:<{widths[0]}}  {b:>{widths[1]}}  {c:>{widths[2]}}  {d:>{widths[3]}}" for a, b, c, d in rows]
    if "failover" in r:
        f = r["failover"]
        lines.append(
            f"primary killed under load (2 instances): new primary after {f['elected_s']:.1f} s, first "
            f"acknowledged write after {f['first_ack_after_kill_s']:.1f} s; answers meanwhile "
            f"{f['answers_from_kill_on']}; restarted member a secondary after "
            f"{f['restarted_member_secondary_after_s']:.1f} s"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=int, default=1, help="worker processes of each instance")
    parser.add_argument("--contacts", type=int, default=20_000)
    parser.add_argument("--events", type=int, default=20_000, help="events posted in NDJSON batches")
    parser.add_argument("--singles", type=int, default=6_000, help="single-event requests")
    parser.add_argument("--cache-gb", type=float, default=0.5, help="each member's WiredTiger cache")
    parser.add_argument("--failover-warmup", type=float, default=3.0, help="seconds of load before the kill")
    parser.add_argument("--no-failover", action="store_true", help="throughput only")
    parser.add_argument("--quick", action="store_true", help="small sizes, to check the benchmark runs")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "scale.json")
    args = parser.parse_args()
    if args.quick:
        args.contacts, args.events, args.singles, args.failover_warmup = 1000, 2000, 500, 1.0
    with tempfile.TemporaryDirectory(prefix="rulesvc-scale-") as tmp:
        replset = ReplicaSet(Path(tmp) / "replset", cache_gb=args.cache_gb)
        replset.start()
        try:
            results = asyncio.run(ScaleBench(args, replset, Path(tmp)).run())
        finally:
            replset.stop()
    results = {
        "machine": machine(args.workers, args.cache_gb),
        "sizes": {k: v for k, v in vars(args).items() if k != "out"},
        **results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(table(results))
    m = results["machine"]
    print(f"\n{m['cpu']}, {m['cores']} cores; {results['bench_seconds']:.0f} s; written to {args.out}")


if __name__ == "__main__":
    main()
