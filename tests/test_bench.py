"""`make bench` keeps working: the benchmark runs end to end at small sizes and reports every figure.
(No timing is asserted here; the figures are for BENCHMARKS.md.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def test_the_benchmark_runs_and_reports_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "service.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "service_bench.py"), "--quick", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["batch"]["events"] == r["sizes"]["events"] and r["batch"]["errors"] == 0
    assert r["single"]["requests"] == r["sizes"]["singles"] and r["single"]["errors"] == 0
    assert r["latency_ms"]["events"] > 0 and r["latency_ms"]["p50"] <= r["latency_ms"]["p99"]
    assert r["drain"]["statuses"] == ["sent"]
    assert r["fanout"]["contacts"] == r["sizes"]["interested"]
    assert set(r["rss_mb"]) == {str(n) for n in r["sizes"]["rss_levels"]}
    assert all(v > 0 for v in r["ratios"].values())
    assert set(r["batch"]["cpu_us_per_event"]) == {"service", "mongod", "bench"}
    assert "ratio: batches decided / insert_many" in run.stdout
