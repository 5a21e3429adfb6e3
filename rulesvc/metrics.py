"""Prometheus metrics, one registry per app so several apps in one process (tests) never share counters.

Under `rulesvc serve --workers N` the supervisor sets PROMETHEUS_MULTIPROC_DIR for its workers
(`runtime/workers.py`): each worker's values go to files there, and a scrape, whichever worker it
reaches, reads all of them (prometheus_client's multiprocess mode): one view of the service, so counters
never seem to reset when consecutive scrapes land on different workers."""

from __future__ import annotations

import os

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.multiprocess import MultiProcessCollector

from rulesvc.core.funnel import Increment
from rulesvc.core.messages import Fate

__all__ = ["CONTENT_TYPE_LATEST", "MULTIPROC_ENV", "Metrics"]

WORKER_ENV = "RULESVC_WORKER_INDEX"  # set by the supervisor for its workers, the only ones sharing files
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client's own variable: read when values are created


class Metrics:
    def __init__(self) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]  # the *_created series only double the scrape size
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "rulesvc_http_requests",
            "HTTP requests answered",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "rulesvc_http_request_duration_seconds",
            "Time from request to response",
            ["method", "route"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.events = Counter(
            "rulesvc_events",
            "Events posted, by outcome (accepted, duplicate, rejected; erased: dropped by an erased "
            "contact's tombstone; ignored: Segment calls that carry no event, e.g. group)",
            ["outcome"],
            registry=self.registry,
        )
        # Gauges read from MongoDB at each scrape hold for the whole service: across workers the latest
        # reading is the value (`mostrecent`), never a sum of the workers' readings.
        self.inbox_pending = Gauge(
            "rulesvc_inbox_pending", "Accepted events not yet evaluated (all processes)",
            registry=self.registry, multiprocess_mode="mostrecent",
        )  # fmt: skip
        self.events_quarantined = Counter(
            "rulesvc_events_quarantined",
            "Events set aside after failing evaluation repeatedly, by stage (inbox, fanout)",
            ["stage"],
            registry=self.registry,
        )
        self.quarantine_size = Gauge(
            "rulesvc_events_quarantine_size",
            "Events in quarantine now (all processes), awaiting retry or drop",
            registry=self.registry,
            multiprocess_mode="mostrecent",
        )

        # Every message's fate (rulesvc.runtime.fate): labels are codes, so the series stay few.
        self.messages = Counter(
            "rulesvc_messages",
            "Message outcomes recorded, by channel, status and reason code",
            ["channel", "status", "reason"],
            registry=self.registry,
        )
        self.send_duration = Histogram(
            "rulesvc_send_duration_seconds",
            "Duration of provider calls (a channel's send), by channel",
            ["channel"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        # The funnel (rulesvc.core.funnel), as the `stats` collection counts it, once committed. Labels are
        # names from ruleset files, channel names and status codes: bounded by what is deployed.
        self.flow = Counter(
            "rulesvc_flow",
            "Funnel counts: contacts entered and converted, messages by status, once per message",
            ["ruleset", "rule", "variant", "channel", "status"],
            registry=self.registry,
        )
        self.flow_revenue = Counter(
            "rulesvc_flow_revenue",
            "Goal value of the conversions counted",
            ["ruleset", "rule", "variant", "channel"],
            registry=self.registry,
        )
        # Read from MongoDB at each scrape, so they hold for every process of the deployment.
        self.due_messages = Gauge(
            "rulesvc_due_messages", "Scheduled sends whose due time has passed (all processes)",
            registry=self.registry, multiprocess_mode="mostrecent",
        )  # fmt: skip
        self.due_oldest_age = Gauge(
            "rulesvc_due_oldest_age_seconds", "How long the longest-overdue scheduled send has been due",
            registry=self.registry, multiprocess_mode="mostrecent",
        )  # fmt: skip
        self.inbox_lag = Gauge(
            "rulesvc_inbox_lag_seconds", "How long the oldest unprocessed event has waited",
            registry=self.registry, multiprocess_mode="mostrecent",
        )  # fmt: skip
        self.dead_letters = Gauge(
            "rulesvc_dead_letters", "Messages in status dead (retry or cancel them)",
            registry=self.registry, multiprocess_mode="mostrecent",
        )  # fmt: skip

    def count_fate(self, fate: Fate) -> None:
        """One message outcome: counted, and its provider call timed."""
        channel = fate.channel or ""
        self.messages.labels(channel, fate.status, fate.reason or "").inc()
        if fate.latency is not None:
            self.send_duration.labels(channel).observe(fate.latency)

    def count_flow(self, increments: list[Increment]) -> None:
        """Funnel counts, once the transaction that wrote them committed."""
        for inc in increments:
            self.flow.labels(*inc.key, inc.status).inc(inc.n)
            if inc.revenue > 0:  # a counter only goes up: a negative goal value is in `stats` only
                self.flow_revenue.labels(*inc.key).inc(inc.revenue)

    def render(self) -> bytes:
        """This app's registry; with PROMETHEUS_MULTIPROC_DIR, every worker's values, added up (counters,
        histograms) or the latest (the gauges read from MongoDB)."""
        directory = os.environ.get(MULTIPROC_ENV) if WORKER_ENV in os.environ else None
        if not directory:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, directory)  # type: ignore[no-untyped-call]
        return generate_latest(registry)
