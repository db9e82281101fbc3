"""Prometheus metrics, computed from the database at each scrape (`engine.stats`), so the
worker's `/metrics` and `nodepatch metrics` (for node_exporter's textfile collector) show the
same figures whichever process asks."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from engine import stats
from engine.model import utcnow
from engine.outbox import Outbox
from engine.store import Store

STEP_BUCKETS = (1, 10, 30, 60, 300, 600, 1800, 3600, 7200, 14400, 28800, 86400)


class DatabaseCollector:
    """Collects every nodepatch metric from the database when scraped."""

    def __init__(self, store: Store, webhooks: Callable[[], list[str]] = list) -> None:
        self.store, self.webhooks = store, webhooks

    def collect(self) -> Iterator[Metric]:
        figures = stats.read(self.store)
        yield _gauge(
            "nodepatch_runs",
            "Runs by workflow and current state.",
            ["workflow", "state"],
            figures.runs,
        )
        yield _counter(
            "nodepatch_transitions",
            "State transitions by workflow and state entered.",
            ["workflow", "state"],
            figures.transitions,
        )
        yield _counter(
            "nodepatch_step_failures",
            "Steps that failed, by workflow and the state they ran in.",
            ["workflow", "state"],
            figures.step_failures,
        )
        yield _histogram(figures.stays)
        yield _counter(
            "nodepatch_cluster_operations",
            "Cluster/VMM operations journaled by runs, by kind and outcome (succeeded, failed; "
            "submitted or intent while in flight).",
            ["workflow", "kind", "outcome"],
            figures.operations,
        )
        now = utcnow()
        yield _gauge(
            "nodepatch_oldest_run_age_seconds",
            "Per unfinished state, how long the run that has been in it longest has been there.",
            ["workflow", "state"],
            {key: (now - at).total_seconds() for key, at in figures.oldest.items()},
        )
        takeovers = CounterMetricFamily(
            "nodepatch_lease_takeovers",
            "Runs taken over from a holder whose lease had run out.",
        )
        takeovers.add_metric([], figures.takeovers)
        yield takeovers
        yield from self._webhooks()

    def _webhooks(self) -> Iterator[Metric]:
        from workflows.webhooks import CONSUMER

        summary = Outbox(self.store.engine, CONSUMER).summary()
        targets = summary["targets"]
        for name in self.webhooks():
            targets.setdefault(
                name, {"pending": 0, "delivered": 0, "parked": 0, "failed_attempts": 0}
            )
        deliveries = GaugeMetricFamily(
            "nodepatch_webhook_deliveries",
            "Webhook deliveries by webhook and status (pending, delivered, parked).",
            labels=["webhook", "status"],
        )
        failures = CounterMetricFamily(
            "nodepatch_webhook_failures",
            "Failed webhook delivery attempts by webhook.",
            labels=["webhook"],
        )
        for name, counts in sorted(targets.items()):
            for status in ("pending", "delivered", "parked"):
                deliveries.add_metric([name, status], counts[status])
            failures.add_metric([name], counts["failed_attempts"])
        yield deliveries
        yield failures


def _gauge(name: str, doc: str, labels: list[str], values: dict[Any, Any]) -> Metric:
    family = GaugeMetricFamily(name, doc, labels=labels)
    for key, value in sorted(values.items()):
        family.add_metric(list(key), value)
    return family


def _counter(name: str, doc: str, labels: list[str], values: dict[Any, int]) -> Metric:
    family = CounterMetricFamily(name, doc, labels=labels)
    for key, value in sorted(values.items()):
        family.add_metric(list(key), value)
    return family


def _histogram(stays: dict[tuple[str, str], list[float]]) -> Metric:
    family = HistogramMetricFamily(
        "nodepatch_step_duration_seconds",
        "Time runs spent in each state before leaving it (ended stays).",
        labels=["workflow", "state"],
    )
    for key, seconds in sorted(stays.items()):
        buckets = [(str(b), sum(1 for s in seconds if s <= b)) for b in STEP_BUCKETS]
        buckets.append(("+Inf", len(seconds)))
        family.add_metric(list(key), buckets, sum(seconds))
    return family


def registry(store: Store, webhooks: Callable[[], list[str]] = list) -> CollectorRegistry:
    found = CollectorRegistry(auto_describe=False)
    found.register(DatabaseCollector(store, webhooks))
    return found


def exposition(store: Store, webhooks: Callable[[], list[str]] = list) -> str:
    from prometheus_client import generate_latest

    return generate_latest(registry(store, webhooks)).decode()


def serve(store: Store, port: int, addr: str, webhooks: Callable[[], list[str]] = list) -> None:
    """Serve /metrics on addr:port from a background thread."""
    from prometheus_client import start_http_server

    start_http_server(port, addr=addr, registry=registry(store, webhooks))
