"""Prometheus view of the fleet, computed at each scrape from the replicas' live state:
one series per replica served now (its URL) and speculative configuration; and the
count of fleet-file reloads."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from router.fleet.replica import Replica

LABELS = ["replica", "speculative"]


class FleetCollector:
    """Health, load and counts of each replica (``specroute_fleet_replica_*``)."""

    def __init__(self, replicas: Callable[[], Sequence[Replica]]) -> None:
        self._replicas = replicas  # the replicas served now

    def describe(self) -> list[Metric]:
        return list(self._families())

    def collect(self) -> Iterator[Metric]:
        up, in_flight, queue, served, failures, mismatch = self._families()
        for replica in self._replicas():
            labels = [replica.spec.url, replica.drafter]
            up.add_metric(labels, 1.0 if replica.healthy else 0.0)
            mismatch.add_metric(labels, 1.0 if replica.mismatch else 0.0)
            in_flight.add_metric(labels, replica.in_flight)
            queue.add_metric(labels, replica.running + replica.waiting)
            served.add_metric(labels, replica.served)
            failures.add_metric(labels, replica.failures)
        yield from (up, in_flight, queue, served, failures, mismatch)

    @staticmethod
    def _families() -> tuple[
        GaugeMetricFamily,
        GaugeMetricFamily,
        GaugeMetricFamily,
        CounterMetricFamily,
        CounterMetricFamily,
        GaugeMetricFamily,
    ]:
        return (
            GaugeMetricFamily(
                "specroute_fleet_replica_up",
                "1 while the replica serves (its last health check or request succeeded).",
                labels=LABELS,
            ),
            GaugeMetricFamily(
                "specroute_fleet_replica_in_flight",
                "Requests this sidecar has in flight on the replica.",
                labels=LABELS,
            ),
            GaugeMetricFamily(
                "specroute_fleet_replica_queue",
                "vLLM's own running + waiting requests on the replica (from its /metrics).",
                labels=LABELS,
            ),
            CounterMetricFamily(
                "specroute_fleet_replica_requests",
                "Requests the replica finished for this sidecar.",
                labels=LABELS,
            ),
            CounterMetricFamily(
                "specroute_fleet_replica_failures",
                "Times the replica was found failed (a request or a health check).",
                labels=LABELS,
            ),
            GaugeMetricFamily(
                "specroute_fleet_replica_mismatch",
                "1 while the replica's last answer contradicted the fleet file (another k, "
                "speculation where it says none, no speculation metrics); the log says how.",
                labels=LABELS,
            ),
        )


def reloads_counter(registry: CollectorRegistry) -> Counter:
    """``specroute_fleet_reloads_total{outcome}``: changes of the fleet file applied, or
    refused (the fleet stayed as it was)."""
    counter = Counter(
        "specroute_fleet_reloads",
        "Changes of the fleet file read while serving, by outcome: applied, or refused "
        "(logged; the fleet stayed as it was).",
        ["outcome"],
        registry=registry,
    )
    for outcome in ("applied", "refused"):
        counter.labels(outcome=outcome)
    return counter
