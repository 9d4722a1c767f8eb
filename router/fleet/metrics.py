"""Prometheus view of the fleet, computed at each scrape from the replicas' live state:
one series per replica (its URL, a fixed set) and speculative configuration."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from router.fleet.replica import Replica

LABELS = ["replica", "speculative"]


class FleetCollector:
    """Health, load and counts of each replica (``specroute_fleet_replica_*``)."""

    def __init__(self, replicas: Sequence[Replica]) -> None:
        self._replicas = replicas

    def describe(self) -> list[Metric]:
        return list(self._families())

    def collect(self) -> Iterator[Metric]:
        up, in_flight, queue, served, failures = self._families()
        for replica in self._replicas:
            labels = [replica.spec.url, replica.drafter]
            up.add_metric(labels, 1.0 if replica.healthy else 0.0)
            in_flight.add_metric(labels, replica.in_flight)
            queue.add_metric(labels, replica.running + replica.waiting)
            served.add_metric(labels, replica.served)
            failures.add_metric(labels, replica.failures)
        yield from (up, in_flight, queue, served, failures)

    @staticmethod
    def _families() -> tuple[
        GaugeMetricFamily,
        GaugeMetricFamily,
        GaugeMetricFamily,
        CounterMetricFamily,
        CounterMetricFamily,
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
        )
