"""Small effects on single-event requests, measured: two revisions alternated, round after round.

    .venv/bin/python bench/alternate.py HEAD                         # HEAD, then the working tree, x3
    .venv/bin/python bench/alternate.py b6ea2b0 b6ea2b0 --patch-after bench/patches/step3_ceiling.diff

`compare.py` runs each side once. On this kind of machine the speed drifts by 10-20 % between two runs
of the same code, so a change worth 5-10 % cannot be told from the drift that way. Here each round
runs both sides (in turn first: A B, B A, ...), each on a fresh mongod and `rulesvc serve` (2 workers,
shipped rulesets): contacts made, a warm-up of NDJSON batches (which arms the reminders that later
events cancel), then single-event requests from 64 clients until all are decided.

Reported per side, as the mean and the spread over the rounds: accepted and decided per second; the
CPU per decided event of the service, of mongod, and of this load generator, which does the same work
on both sides and so shows the machine's drift (the service's and mongod's CPU are also given relative
to it); MongoDB commands per event; and what is stored at the end (messages, schedule entries).
`--patch-after` applies a patch to the second revision first: a build not meant to ship, to measure
the most a change can save. An A/A run (one revision against itself) shows the noise left.
Writes bench/results/alternate.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MEASURES = ("accept_per_s", "decide_per_s", "service_us", "mongod_us", "bench_us", "service_vs_bench",
            "mongod_vs_bench", "commands_per_event", "messages", "schedule")  # fmt: skip


async def probe(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """One side of a round, run from the revision's own tree (its `bench` and `rulesvc` on PYTHONPATH)."""
    from bench.service_bench import (  # the tree's: each revision is driven by its own benchmark code
        BATCH_CLIENTS,
        CLIENTS,
        Bench,
        Mix,
        closed_loop,
        cpu_seconds,
        ndjson,
        until,
    )
    from rulesvc.store.mongod import EmbeddedMongod

    mongod = EmbeddedMongod(tmp / "mongod", cache_gb=1.0)
    mongod.start()
    try:
        bench = Bench(argparse.Namespace(workers=2), mongod, tmp)
        await bench.prepare("bench", args.contacts)
        service = bench.service("bench")
        await service.start("/healthz")
        try:
            mix = Mix(args.contacts, "w")
            url = service.url + "/v1/events"
            warm = ndjson(mix.events(args.warm))
            await closed_loop(url, bench.headers, warm, "application/x-ndjson", BATCH_CLIENTS)
            await until(lambda: bench._none_pending(), 600)
            pids = {"service": [service.pid(), *service.workers()], "mongod": [bench.mongod_pid()],
                    "bench": [os.getpid()]}  # fmt: skip
            singles = [json.dumps(e).encode() for e in mix.events(args.singles)]
            cpu0 = {k: cpu_seconds(v) for k, v in pids.items()}
            commands0 = await bench.mongod_commands()
            seconds, accepted, errors = await closed_loop(
                url, bench.headers, singles, "application/json", CLIENTS
            )
            started = time.perf_counter() - seconds
            await until(lambda: bench._none_pending(), 600)
            decided = time.perf_counter() - started
            cpu = {k: (cpu_seconds(v) - cpu0[k]) / accepted * 1e6 for k, v in pids.items()}
            commands = sum((await bench.mongod_commands()).values()) - sum(commands0.values())
            db = bench.client["bench"]
            return {
                "errors": errors,
                "accept_per_s": accepted / seconds,
                "decide_per_s": accepted / decided,
                "service_us": cpu["service"],
                "mongod_us": cpu["mongod"],
                "bench_us": cpu["bench"],
                "service_vs_bench": cpu["service"] / cpu["bench"],
                "mongod_vs_bench": cpu["mongod"] / cpu["bench"],
                "commands_per_event": commands / accepted,
                "messages": await db.messages.count_documents({}),
                "schedule": await db.schedule.count_documents({}),
            }
        finally:
            service.stop()
            await bench.client.close()
    finally:
        mongod.stop()


def one_side(revision: str | None, patch: Path | None, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    from bench.compare import checkout

    with checkout(revision, patch) as (tree, env):
        command = [sys.executable, str(Path(__file__).resolve()), "--probe", "--out", str(out),
                   *(f"--{k}={getattr(args, k)}" for k in ("contacts", "warm", "singles"))]  # fmt: skip
        subprocess.run(command, cwd=tree, env=env, check=True)
    found: dict[str, Any] = json.loads(out.read_text())
    return found


def summary(rounds: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    return {
        m: {
            "mean": statistics.fmean(r[m] for r in rounds),
            "min": min(r[m] for r in rounds),
            "max": max(r[m] for r in rounds),
        }
        for m in MEASURES
    }


def table(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]], names: list[str]) -> str:
    def shown(s: dict[str, float]) -> str:
        fmt = "{:,.2f}" if s["mean"] < 10 else "{:,.0f}"
        return f"{fmt.format(s['mean'])} ({fmt.format(s['min'])}-{fmt.format(s['max'])})"

    lines = [
        f"| per single event, mean (spread) | {names[0]} | {names[1]} | after / before |",
        "|---|---|---|---|",
    ]
    for m in MEASURES:
        ratio = after[m]["mean"] / before[m]["mean"] if before[m]["mean"] else float("nan")
        lines.append(f"| {m} | {shown(before[m])} | {shown(after[m])} | {ratio:.2f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("before", nargs="?", help="the revision measured first in each round")
    parser.add_argument("after", nargs="?", default=None, help="a revision; default: the working tree")
    parser.add_argument("--patch-after", type=Path, help="a patch applied to the `after` revision")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--contacts", type=int, default=20_000)
    parser.add_argument("--warm", type=int, default=20_000, help="events posted in batches first")
    parser.add_argument("--singles", type=int, default=10_000, help="single-event requests measured")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "alternate.json")
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)  # one side, from its tree
    args = parser.parse_args()
    if args.probe:
        import uvloop

        with tempfile.TemporaryDirectory(prefix="rulesvc-alternate-") as tmp:
            args.out.write_text(json.dumps(uvloop.run(probe(args, Path(tmp)))))
        return 0
    if args.before is None:
        parser.error("name the revision to measure first")
    sys.path.insert(0, str(ROOT))
    names = [
        args.before,
        (args.after or "working tree") + (f" + {args.patch_after.name}" if args.patch_after else ""),
    ]
    sides: list[list[dict[str, Any]]] = [[], []]
    with tempfile.TemporaryDirectory() as tmp:
        for n in range(args.rounds):
            # A B, B A, A B, ...: whatever runs second in a round (a machine that slows as it works, a
            # disk still writing the first side's files) weighs on both sides alike.
            for i in (0, 1) if n % 2 == 0 else (1, 0):
                revision, patch = (args.before, None) if i == 0 else (args.after, args.patch_after)
                found = one_side(revision, patch, args, Path(tmp) / f"{n}-{i}.json")
                sides[i].append(found)
                print(json.dumps({"round": n + 1, "side": names[i], **found}), flush=True)
    results = {"names": names, "rounds": sides, "summary": [summary(s) for s in sides]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(table(*results["summary"], names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
