"""Small effects on single-event requests, measured: two revisions alternated, round after round.

    .venv/bin/python bench/alternate.py HEAD                         # HEAD and the working tree, 4 rounds
    .venv/bin/python bench/alternate.py HEAD HEAD --patch-after bench/patches/step3_ceiling.diff

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

Revisions after 030601b: each side is driven through its own tree's `bench/service_bench.py`, whose
`Bench.posted` measures the single requests. Results are written after every side
(bench/results/alternate.json), with the revisions resolved once at the start, the sizes, and which
side ran first in each round.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MEASURES = ("errors", "accept_per_s", "decide_per_s", "service_us", "mongod_us", "bench_us",
            "service_vs_bench", "mongod_vs_bench", "commands_per_event", "messages", "schedule")  # fmt: skip


async def probe(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """One side of a round, run from the revision's own tree (its `bench` and `rulesvc` on PYTHONPATH)."""
    # The tree's: its service, its contacts, its event mix and its measurement of posted requests.
    from bench.service_bench import BATCH_CLIENTS, CLIENTS, Bench, Mix, ndjson
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
            await bench.posted(service, ndjson(mix.events(args.warm)), "application/x-ndjson", BATCH_CLIENTS)
            singles = [json.dumps(e).encode() for e in mix.events(args.singles)]
            single = await bench.posted(service, singles, "application/json", CLIENTS)
            cpu = single["cpu_us_per_event"]
            per_bench = cpu["bench"] or float("nan")  # CPU is counted in ticks: a tiny run may show none
            db = bench.client["bench"]
            return {
                "errors": single["errors"],
                "accept_per_s": single["accept_per_s"],
                "decide_per_s": single["decide_per_s"],
                "service_us": cpu["service"],
                "mongod_us": cpu["mongod"],
                "bench_us": cpu["bench"],
                "service_vs_bench": cpu["service"] / per_bench,
                "mongod_vs_bench": cpu["mongod"] / per_bench,
                "commands_per_event": sum(single["commands_per_event"].values()),
                "messages": await db.messages.count_documents({}),
                "schedule": await db.schedule.count_documents({}),
            }
        finally:
            service.stop()
            await bench.client.close()
    finally:
        mongod.stop()


def one_side(revision: str | None, patch: Path | None, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """One side of a round, in a subprocess run from the revision's tree."""
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
        ratio = f"{after[m]['mean'] / before[m]['mean']:.2f}" if before[m]["mean"] else "-"
        lines.append(f"| {m} | {shown(before[m])} | {shown(after[m])} | {ratio} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("before", nargs="?", help="the revision measured first in each round")
    parser.add_argument("after", nargs="?", default=None, help="a revision; default: the working tree")
    parser.add_argument("--patch-after", type=Path, help="a patch applied to the `after` revision")
    parser.add_argument("--rounds", type=int, default=4, help="an even number: each side first as often")
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
    if args.patch_after is not None and args.after is None:
        parser.error("--patch-after needs the `after` revision: a patch is never applied to the working tree")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.rounds % 2:
        print(f"warning: {args.rounds} rounds: the first revision runs first more often", file=sys.stderr)
    sys.path.insert(0, str(ROOT))
    # Resolved once: a commit made while the rounds run must not change a side halfway.
    revisions = [resolve(args.before), None if args.after is None else resolve(args.after)]
    names = [
        args.before,
        (args.after or "working tree") + (f" + {args.patch_after.name}" if args.patch_after else ""),
    ]
    results: dict[str, Any] = {
        "names": names,
        "revisions": revisions,
        "patch_after": None if args.patch_after is None else str(args.patch_after),
        "sizes": {k: getattr(args, k) for k in ("contacts", "warm", "singles")},
        "rounds": [[], []],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for n in range(args.rounds):
            # A B, B A, A B, ...: whatever runs second in a round (a machine that slows as it works, a
            # disk still writing the first side's files) weighs on both sides alike.
            for i in (0, 1) if n % 2 == 0 else (1, 0):
                patch = None if i == 0 else args.patch_after
                found = one_side(revisions[i], patch, args, Path(tmp) / f"{n}-{i}.json")
                found["first_in_round"] = (i == 0) == (n % 2 == 0)
                results["rounds"][i].append(found)
                args.out.write_text(json.dumps(results, indent=2))  # a later failure keeps what was measured
                print(json.dumps({"round": n + 1, "side": names[i], **found}), flush=True)
    results["summary"] = [summary(s) for s in results["rounds"]]
    args.out.write_text(json.dumps(results, indent=2))
    print(table(*results["summary"], names))
    failed = sum(r["errors"] for side in results["rounds"] for r in side)
    if failed:
        print(f"{failed} requests failed: the figures are not comparable", file=sys.stderr)
        return 1
    return 0


def resolve(revision: str) -> str:
    found = subprocess.run(
        ["git", "rev-parse", "--verify", f"{revision}^{{commit}}"], cwd=ROOT, capture_output=True, text=True
    )
    if found.returncode != 0:
        sys.exit(f"not a revision: {revision}")
    return found.stdout.strip()


if __name__ == "__main__":
    sys.exit(main())
