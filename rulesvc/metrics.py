"""Prometheus metrics, one registry per app so several apps (tests, workers) never share counters."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]


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
            "Events posted, by outcome (accepted, duplicate, rejected)",
            ["outcome"],
            registry=self.registry,
        )
        self.inbox_pending = Gauge(
            "rulesvc_inbox_pending", "Accepted events not yet evaluated", registry=self.registry
        )
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
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
