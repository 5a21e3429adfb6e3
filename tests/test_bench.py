"""`make bench` keeps working: the benchmark runs end to end at small sizes and reports every figure.
(No timing is asserted here; the figures are for BENCHMARKS.md.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def run_bench(script: str, out: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """The benchmark script run to the end (it must succeed), with the figures it wrote to `out`."""
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args, "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    return run, json.loads(out.read_text())


def test_the_benchmark_runs_and_reports_every_figure(tmp_path: Path) -> None:
    run, r = run_bench("service_bench.py", tmp_path / "service.json", "--quick")
    assert r["batch"]["events"] == r["sizes"]["events"] and r["batch"]["errors"] == 0
    assert r["single"]["requests"] == r["sizes"]["singles"] and r["single"]["errors"] == 0
    assert r["latency_ms"]["events"] > 0 and r["latency_ms"]["p50"] <= r["latency_ms"]["p99"]
    assert r["drain"]["statuses"] == ["sent"]
    assert r["fanout"]["contacts"] == r["sizes"]["interested"]
    assert set(r["rss_mb"]) == {str(n) for n in r["sizes"]["rss_levels"]}
    assert all(v > 0 for v in r["ratios"].values())
    for kind in ("batch", "single"):  # where the cores went, and the round trips, per decided event
        assert set(r[kind]["cpu_us_per_event"]) == {"service", "mongod", "bench"}
        assert (
            r[kind]["commands_per_event"]["insert"] > 0
            and r[kind]["commands_per_event"]["commitTransaction"] > 0
        )
    assert "mongod commands" in run.stdout
    assert "ratio: batches decided / insert_many" in run.stdout


def test_the_backtest_benchmark_replays_the_whole_stored_history(tmp_path: Path) -> None:
    run, r = run_bench(
        "backtest_bench.py", tmp_path / "backtest.json", "--events", "20000", "--contacts", "2000"
    )
    assert json.loads(run.stdout.strip().splitlines()[-1]) == r  # the JSON line is the file's content
    stored = r["generate"]["stored"]
    assert stored["contact_events"] == 20000 and stored["contacts"] == 2000 and stored["catalog_events"] > 0
    # Every stored event of the window, each contact's and each catalog event, went through the replay.
    assert r["backtest"]["events"] == stored["contact_events"] + stored["catalog_events"]
    assert r["backtest"]["contacts"] == stored["contacts_with_events"] == 2000
    assert r["backtest"]["skipped"] == 0
    assert r["engine_alone"]["events"] == stored["contact_events"] + stored["catalog_copies"]
    assert 0 < r["backtest_quarter"]["events"] < r["backtest"]["events"]
    # The candidate moved the cart push: the replay decided messages, and some contacts' changed.
    summary = r["backtest"]["summary"]
    assert summary["sent"]["baseline"] > 0 and summary["contacts_changed"] > 0
    for key in ("compile_only", "backtest_quarter", "backtest"):
        assert r[key]["peak_rss_mb"] > 0
    assert set(r["backtest"]["rss_mb_at_replayed"]) <= {"0.25", "0.50", "0.75", "1.00"}
    assert all(v > 0 for v in r["ratios"].values())
    assert "ratio: per version / engine alone" in run.stdout


def test_the_latency_benchmark_reports_each_rate_and_the_round_trip_floor(tmp_path: Path) -> None:
    _, r = run_bench(
        "latency_bench.py", tmp_path / "latency.json",
        "--rates", "20,100", "--seconds", "2", "--warm", "200", "--round-trips", "200",
    )  # fmt: skip
    assert r["baseline_find_one_ms"] > 0 and r["baseline_one_update_transaction_ms"] > 0
    for rate in ("20/s", "100/s"):
        assert r[f"{rate} errors"] == 0
        assert 0 < r[f"{rate} p50_ms"] <= r[f"{rate} p99_ms"]
        assert r[f"{rate} events_per_inbox_transaction"] >= 1
    # Accepting and deciding one event is several round trips: an ingest transaction and an inbox batch.
    assert r["20/s commands_per_event"] > 5
    floor = r["20/s commands_per_event"] * r["baseline_find_one_ms"]
    assert r["floor_ms (commands per event at the lowest rate x find_one_ms)"] == pytest.approx(floor)


def test_the_cut_benchmark_finds_the_same_bounds_both_ways(tmp_path: Path) -> None:
    # It fails (and run_bench with it) when the two ways' bounds differ.
    _, r = run_bench("cut_bench.py", tmp_path / "cut.json", "--interests", "20000", "--batch", "100")
    assert r["interests"] == 20000 and r["parts"] == 16  # 20000 // (4 batches of 100), at most 16
    assert r["cut_one_pass_peak_mb"] > 0 and r["baseline_ids_in_a_list_peak_mb"] > 0


def test_the_alternating_benchmark_measures_both_sides_each_round_and_patches_only_the_second(
    tmp_path: Path,
) -> None:
    # HEAD against HEAD with the step-3 ceiling patch (bench/patches): the same code but for the patch.
    # The patch stops applying when the lines it changes are edited: this test then fails on purpose,
    # and the measurement is brought up to date or retired.
    run, r = run_bench(
        "alternate.py", tmp_path / "alternate.json", "HEAD", "HEAD",
        "--patch-after", str(ROOT / "bench" / "patches" / "step3_ceiling.diff"),
        "--rounds", "2", "--contacts", "1000", "--warm", "600", "--singles", "400",
    )  # fmt: skip
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
    assert r["revisions"] == [head.stdout.strip()] * 2
    before, after = r["rounds"]
    assert [s["first_in_round"] for s in before] == [True, False]  # A B, then B A
    assert [s["first_in_round"] for s in after] == [False, True]
    assert all(s["errors"] == 0 for s in [*before, *after])
    # The same events on both sides; only the patched side skips the records of sends due later than a
    # minute (the warm-up's batches arm reminders due hours later), while the schedule is the same but
    # for the order in which concurrent requests of one contact happened to be decided.
    assert 0 < max(s["messages"] for s in after) < min(s["messages"] for s in before)
    for b, a in zip(before, after, strict=True):
        assert b["schedule"] > 0 and abs(a["schedule"] - b["schedule"]) <= 0.05 * b["schedule"]
    for side, summary in zip((before, after), r["summary"], strict=True):
        values = [s["mongod_us"] for s in side]
        assert summary["mongod_us"] == pytest.approx(
            {"mean": sum(values) / 2, "min": min(values), "max": max(values)}
        )
        assert all(s["mongod_vs_bench"] == pytest.approx(s["mongod_us"] / s["bench_us"]) for s in side)
    assert "| mongod_vs_bench |" in run.stdout
