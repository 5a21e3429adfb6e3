"""Before and after in one run: `bench/service_bench.py` of two revisions, one after the other on the same
machine, each with its own baselines, and one table of both (BENCHMARKS.md's before/after tables).

    .venv/bin/python bench/compare.py fcbb0cb            # that revision, then the working tree
    .venv/bin/python bench/compare.py fcbb0cb main -- --contacts 20000 --events 20000

Each revision runs from its own `git worktree` (its own code and its own benchmark script) with this
checkout's virtualenv; the working tree runs as it is. Results: bench/results/compare.json and a table."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

# (label, path in service.json, higher is better)
ROWS: tuple[tuple[str, tuple[str, ...], bool], ...] = (
    ("batches decided (events/s)", ("batch", "decide_per_s"), True),
    ("batches accepted (events/s)", ("batch", "accept_per_s"), True),
    ("single requests accepted (req/s)", ("single", "accept_per_s"), True),
    ("single events decided (events/s)", ("single", "decide_per_s"), True),
    ("latency rate (req/s)", ("latency_ms", "rate_per_s"), True),
    ("acceptance to decision p50 (ms)", ("latency_ms", "p50"), False),
    ("acceptance to decision p99 (ms)", ("latency_ms", "p99"), False),
    ("drain (sends/s)", ("drain", "per_s"), True),
    ("fan-out to all interested (s)", ("fanout", "seconds_to_schedule_all"), False),
    ("shop traffic accepted during fan-out, p99 (ms)", ("fanout", "accept_ms_p99"), False),
    ("service CPU per decided event (us)", ("batch", "cpu_us_per_event", "service"), False),
    ("mongod CPU per decided event (us)", ("batch", "cpu_us_per_event", "mongod"), False),
    ("service RSS at 10k contacts (MB)", ("rss_mb", "10000", "service"), False),
    ("service RSS at 1M contacts (MB)", ("rss_mb", "1000000", "service"), False),
    ("decisions from a backlog, counting off (events/s)", ("counting", "decide_per_s_off"), True),
    ("baseline: aiohttp handler (req/s)", ("aiohttp_baseline_per_s",), True),
    ("baseline: insert_many (docs/s)", ("insert_many_per_s",), True),
    ("ratio: batches decided / insert_many", ("ratios", "batch_vs_insert_many"), True),
    ("ratio: single requests / aiohttp", ("ratios", "single_vs_aiohttp"), True),
    ("ratio: drain / insert_many of the entries", ("ratios", "drain_vs_insert_many"), True),
)


def value(results: dict[str, Any], path: tuple[str, ...]) -> float | None:
    node: Any = results
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return float(node) if isinstance(node, int | float) else None


@contextlib.contextmanager
def checkout(revision: str | None, patch: Path | None = None) -> Iterator[tuple[Path, dict[str, str]]]:
    """A revision's code in a `git worktree` of its own (`revision` None: the working tree as it is), with
    `patch` applied to it if given, and the environment that runs the service from it."""
    with tempfile.TemporaryDirectory(prefix="rulesvc-bench-") as tmp:
        tree = ROOT
        if revision is not None:
            tree = Path(tmp) / "tree"
            subprocess.run(
                ["git", "worktree", "add", "--detach", "-q", str(tree), revision], cwd=ROOT, check=True
            )
        try:
            if patch is not None:
                if revision is None:
                    raise ValueError("a patch is applied to a revision, never to the working tree")
                subprocess.run(["git", "apply", str(patch.resolve())], cwd=tree, check=True)
            plugins = [
                str(p) for p in sorted((tree / "plugins").glob("*")) if (p / "pyproject.toml").exists()
            ]
            yield tree, {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), *plugins])}
        finally:
            if revision is not None:
                subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=False)


def run(revision: str | None, bench_args: list[str], out: Path) -> dict[str, Any]:
    """`revision` None: the working tree as it is."""
    with checkout(revision) as (tree, env):
        command = [sys.executable, str(tree / "bench" / "service_bench.py"), "--out", str(out), *bench_args]
        print(f"== {revision or 'working tree'}: {' '.join(command)}", flush=True)
        subprocess.run(command, cwd=tree, env=env, check=True)
    results: dict[str, Any] = json.loads(out.read_text())
    return results


def table(before: dict[str, Any], after: dict[str, Any], names: tuple[str, str]) -> str:
    lines = [f"| measure | {names[0]} | {names[1]} | after / before |", "|---|---|---|---|"]
    for label, path, _ in ROWS:
        a, b = value(before, path), value(after, path)
        if a is None and b is None:
            continue
        shown = [
            f"{x:,.2f}" if x is not None and x < 10 else f"{x:,.0f}" if x is not None else "-" for x in (a, b)
        ]
        ratio = f"{b / a:.2f}" if a and b is not None else "-"
        lines.append(f"| {label} | {shown[0]} | {shown[1]} | {ratio} |")
    return "\n".join(lines)


def main() -> int:
    argv = sys.argv[1:]
    bench_args: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, bench_args = argv[:at], argv[at + 1 :]
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("before", help="the revision measured first (e.g. the round's start)")
    parser.add_argument("after", nargs="?", default=None, help="a revision; default: the working tree")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "compare.json")
    args = parser.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        before = run(args.before, bench_args, Path(tmp) / "before.json")
        after = run(args.after, bench_args, Path(tmp) / "after.json")
    names = (args.before, args.after or "working tree")
    both = {"before": {"revision": names[0], **before}, "after": {"revision": names[1], **after}}
    args.out.write_text(json.dumps(both, indent=2, default=str))
    print(table(before, after, names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
