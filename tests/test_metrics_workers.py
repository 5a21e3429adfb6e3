"""`/metrics` under `rulesvc serve --workers 2` is one view of the service: whichever worker a scrape
reaches, every counter is the sum of all workers and never goes back (Prometheus would read a drop as a
counter reset), and the gauges read from MongoDB appear once, not once per worker.

Judged by prometheus_client's own text parser and by counts the test keeps itself; which worker counted
what is read from the workers' metric files directly."""

from __future__ import annotations

import itertools
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.parser import text_string_to_metric_families

from rulesvc.store.mongod import EmbeddedMongod
from tests.helpers import counts_per_worker
from tests.service import ServiceProcess

pytestmark = pytest.mark.slow

EVENTS = 40
SCRAPES = 10
MONGO_GAUGES = {
    "rulesvc_inbox_pending",
    "rulesvc_inbox_lag_seconds",
    "rulesvc_events_quarantine_size",
    "rulesvc_due_messages",
    "rulesvc_due_oldest_age_seconds",
    "rulesvc_dead_letters",
}


Sample = tuple[str, tuple[tuple[str, str], ...]]  # name and sorted labels


def scrape(url: str) -> dict[Sample, float]:
    """One scrape on a new connection (so the kernel may hand it to either worker): sample -> value."""
    request = urllib.request.Request(url + "/metrics", headers={"Connection": "close"})
    with urllib.request.urlopen(request, timeout=30) as response:
        text = response.read().decode()
    samples: dict[Sample, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            assert key not in samples, f"{key} twice in one scrape"
            samples[key] = sample.value
    return samples


def counter_samples(samples: dict[Sample, float]) -> dict[Sample, float]:
    """The samples that may only grow: counters, and histograms' counts, sums and buckets."""
    return {k: v for k, v in samples.items() if k[0].endswith(("_total", "_count", "_sum", "_bucket"))}


def accepted_per_worker(metrics_dir: Path) -> dict[str, float]:
    """Keyed by file name: `counter_<pid>`."""
    return counts_per_worker(metrics_dir, "rulesvc_events_total", '"accepted"')


def test_scrapes_add_up_every_worker_and_never_go_back(mongod: EmbeddedMongod, tmp_path: Path) -> None:
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    # Left over from an earlier run: a start must not add its 1,000 accepted events to this one's.
    stale = MmapedDict(str(metrics_dir / "counter_999999.db"))
    key = mmap_key("rulesvc_events", "rulesvc_events_total", ["outcome"], ["accepted"], "")
    stale.write_value(key, 1000.0, 0.0)
    stale.close()
    env = {"MONGODB_URI": mongod.uri, "RULESVC_DATABASE": "metrics_workers", "RULESVC_RATE_LIMIT": "0",
           "RULESVC_RULESETS_DIR": str(tmp_path / "rulesets"),
           "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}  # fmt: skip
    service = ServiceProcess(tmp_path, env=env, workers=2)
    service.start()
    try:
        service.key = service.cli("keys", "create", "--scope", "ingest").stdout.splitlines()[-1]
        posted = 0
        # urllib: a new connection per request, spread over the workers; on a loaded machine the second
        # worker may start listening late, so post on until both have counted (at most 25 times as many).
        while posted < EVENTS or (
            len([n for n in accepted_per_worker(metrics_dir).values() if n > 0]) < 2 and posted < 25 * EVENTS
        ):
            event = {"id": f"e{posted}", "type": "page_viewed", "contact_id": f"c{posted % 7}"}
            assert service.request("POST", "/v1/events", event) == (202, {"accepted": 1, "duplicates": 0})
            posted += 1
        per_worker = accepted_per_worker(metrics_dir)
        assert "counter_999999" not in per_worker, "the earlier run's file was not cleaned at start"
        assert len([pid for pid, n in per_worker.items() if n > 0]) == 2, per_worker  # both counted
        assert sum(per_worker.values()) == posted

        scrapes = [scrape(service.url) for _ in range(SCRAPES)]
        accepted = ("rulesvc_events_total", (("outcome", "accepted"),))
        assert [s[accepted] for s in scrapes] == [float(posted)] * SCRAPES
        for before, after in itertools.pairwise(scrapes):
            for sample, value in counter_samples(before).items():
                assert after.get(sample, 0.0) >= value, (sample, value, after.get(sample))
        for samples in scrapes:
            gauges = [k for k in samples if k[0] in MONGO_GAUGES]
            assert sorted(name for name, _ in gauges) == sorted(MONGO_GAUGES)  # once each, no `pid` label
            assert all(labels == () for _, labels in gauges)
    finally:
        service.stop()
    assert list(metrics_dir.glob("*.db")), "a directory of one's own is kept (only emptied at start)"


def test_a_single_process_ignores_a_metrics_directory_in_its_environment(
    mongod: EmbeddedMongod, tmp_path: Path
) -> None:
    """Only a supervisor's workers share metric files: one process started twice with the variable set
    counts each run afresh and leaves no files behind (prometheus_client would otherwise keep values
    there, and the next run or app would add its counts to them)."""
    metrics_dir = tmp_path / "prom"
    metrics_dir.mkdir()
    env = {"MONGODB_URI": mongod.uri, "RULESVC_DATABASE": "metrics_single", "RULESVC_RATE_LIMIT": "0",
           "RULESVC_RULESETS_DIR": str(tmp_path / "rulesets"),
           "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}  # fmt: skip
    accepted = ("rulesvc_events_total", (("outcome", "accepted"),))
    for run in range(2):
        service = ServiceProcess(tmp_path, env=env, workers=1)
        service.start()
        try:
            service.key = service.cli("keys", "create", "--scope", "ingest").stdout.splitlines()[-1]
            for i in range(3):
                event = {"id": f"r{run}-{i}", "type": "page_viewed", "contact_id": "c1"}
                assert service.request("POST", "/v1/events", event)[0] == 202
            assert scrape(service.url)[accepted] == 3.0, run
        finally:
            service.stop()
    assert not list(metrics_dir.iterdir())
