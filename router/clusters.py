"""The operator's view of task clusters: traffic share, speed-up, acceptance, best arm,
captured samples and headroom, from what the policy already knows (docs/capture.md).

Per cluster c, over its contexts (length buckets) weighted by their requests:

- traffic share: c's requests / all requests the policy learned from;
- speed-up S_c: the policy's expected speed-up of its chosen arm (S at the posterior mean
  acceptance and that arm's best k; 1 for ``none``);
- acceptance a: the posterior mean per-token acceptance of c's best drafter arm (highest
  expected speed-up), which is the chosen one unless no drafter pays (then none is);
- ceiling: the speed-up that best arm would give if the target accepted every draft, with
  the same draft length k and costs per step: S_arm * L(1, k) / L(a, k) = S_arm * (k + 1) /
  (1 + a + ... + a^k), since S is tokens per step times a per-step cost factor;
- headroom: share * (ceiling - S_c): speed-up a better drafter could still add, weighted by
  how much traffic would get it. NaN when no drafter arm has k > 0 (its costs are unknown).

The sidecar exports the same figures as Prometheus gauges (:class:`ClusterCollector`),
computed at each scrape.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from router.policy.base import NONE_DRAFTER, ArmSummary, ContextSummary

Family = GaugeMetricFamily | CounterMetricFamily


@dataclass(frozen=True)
class ClusterView:
    """One task cluster as ``specroute clusters`` shows it."""

    cluster: str
    requests: int
    traffic_share: float
    speedup: float
    acceptance: float
    best_drafter: str
    best_k: int
    ceiling_speedup: float
    headroom: float
    captured_samples: int


def tokens_per_step(acceptance: float, k: int) -> float:
    """L(a, k) = 1 + a + ... + a^k: expected tokens a k-token step emits."""
    return float(sum(acceptance**i for i in range(k + 1)))


def best_drafter_arm(arms: Sequence[ArmSummary]) -> ArmSummary | None:
    """The arm with the highest expected speed-up (None without arms)."""
    return max(arms, key=lambda arm: arm.expected_speedup, default=None)


def ceiling_speedup(arm: ArmSummary | None) -> float:
    """``arm``'s speed-up with every draft accepted at its best k (see module doc)."""
    if arm is None or arm.best_k <= 0:
        return math.nan
    k = arm.best_k
    return arm.expected_speedup * (k + 1) / tokens_per_step(arm.acceptance_mean, k)


def _chosen_speedup(context: ContextSummary) -> float:
    if context.chosen_drafter == NONE_DRAFTER or context.chosen_k == 0:
        return 1.0
    for arm in context.arms:
        if arm.drafter == context.chosen_drafter:
            return arm.expected_speedup
    return 1.0


def _weighted(values: Sequence[tuple[float, float]]) -> float:
    """Mean of ``(value, weight)`` pairs by weight (plain mean when all weights are 0)."""
    total = sum(weight for _, weight in values)
    if total <= 0:
        return sum(value for value, _ in values) / len(values)
    return sum(value * weight for value, weight in values) / total


def cluster_views(
    contexts: Iterable[ContextSummary], captured: Mapping[str, int] | None = None
) -> list[ClusterView]:
    """Per cluster (by name), the operator's figures from the policy's context summaries
    and the captured samples per cluster."""
    by_cluster: dict[str, list[ContextSummary]] = {}
    for context in contexts:
        by_cluster.setdefault(context.cluster, []).append(context)
    captured = captured or {}
    all_requests = sum(c.requests for group in by_cluster.values() for c in group)
    views = []
    for cluster in sorted(by_cluster.keys() | captured.keys()):
        group = by_cluster.get(cluster, [])
        requests = sum(c.requests for c in group)
        share = requests / all_requests if all_requests else 0.0
        if not group:
            views.append(
                ClusterView(
                    cluster,
                    0,
                    0.0,
                    math.nan,
                    math.nan,
                    "",
                    0,
                    math.nan,
                    math.nan,
                    int(captured.get(cluster, 0)),
                )
            )
            continue
        best_arms = [best_drafter_arm(c.arms) for c in group]
        speedup = _weighted([(_chosen_speedup(c), c.requests) for c in group])
        acceptance = _weighted(
            [
                (a.acceptance_mean if a else 0.0, c.requests)
                for c, a in zip(group, best_arms, strict=True)
            ]
        )
        ceilings = [(ceiling_speedup(a), c.requests) for c, a in zip(group, best_arms, strict=True)]
        known = [(value, weight) for value, weight in ceilings if not math.isnan(value)]
        ceiling = max(_weighted(known), speedup) if known else math.nan
        busiest = max(group, key=lambda c: c.requests)
        views.append(
            ClusterView(
                cluster=cluster,
                requests=requests,
                traffic_share=share,
                speedup=speedup,
                acceptance=acceptance,
                best_drafter=busiest.chosen_drafter,
                best_k=busiest.chosen_k,
                ceiling_speedup=ceiling,
                headroom=share * (ceiling - speedup) if known else math.nan,
                captured_samples=int(captured.get(cluster, 0)),
            )
        )
    return views


def summaries_from_pb(state: Any) -> list[ContextSummary]:
    """GetPolicyState's contexts (protobuf) as the policy's own summaries."""
    return [
        ContextSummary(
            cluster=context.task_cluster,
            length_bucket=int(context.length_bucket),
            structured=bool(context.structured),
            arms=tuple(
                ArmSummary(
                    arm.drafter,
                    float(arm.acceptance_mean),
                    float(arm.alpha),
                    float(arm.beta),
                    int(arm.best_k),
                    float(arm.expected_speedup),
                    int(arm.decisions),
                )
                for arm in context.arms
            ),
            chosen_drafter=context.chosen_drafter,
            chosen_k=int(context.chosen_k),
            requests=int(context.requests),
        )
        for context in state.contexts
    ]


class ClusterCollector:
    """Prometheus collector of the cluster view, the capture store and distillation runs,
    computed at each scrape (a policy describe and two small SQLite queries)."""

    def __init__(
        self,
        contexts: Callable[[], Sequence[ContextSummary]],
        capture: Any = None,  # router.capture.CaptureStore | None
    ) -> None:
        self._contexts = contexts
        self._capture = capture

    def describe(self) -> list[Metric]:
        return list(self._families().values())

    def collect(self) -> Iterator[Metric]:
        families = self._families()
        captured: dict[str, int] = {}
        if self._capture is not None:
            stats = self._capture.stats()
            captured = {s.cluster: s.samples for s in stats}
            for s in stats:
                families["samples"].add_metric([s.cluster], s.samples)
            families["bytes"].add_metric([], sum(s.bytes for s in stats))
            for outcome, count in self._capture.distillation_counts().items():
                families["runs"].add_metric([outcome], count)
        for view in cluster_views(self._contexts(), captured):
            labels = [view.cluster]
            families["share"].add_metric(labels, view.traffic_share)
            families["speedup"].add_metric(labels, view.speedup)
            families["acceptance"].add_metric(labels, view.acceptance)
            families["headroom"].add_metric(labels, view.headroom)
            if view.best_drafter:
                families["best"].add_metric([view.cluster, view.best_drafter, str(view.best_k)], 1)
        yield from families.values()

    def _families(self) -> dict[str, Family]:
        cluster = ["cluster"]
        families: dict[str, Family] = {
            "share": GaugeMetricFamily(
                "specroute_cluster_traffic_share_ratio",
                "Share of the requests the policy learned from that were in this cluster.",
                labels=cluster,
            ),
            "speedup": GaugeMetricFamily(
                "specroute_cluster_speedup_ratio",
                "Expected speed-up of the cluster's chosen arm (policy posterior mean).",
                labels=cluster,
            ),
            "acceptance": GaugeMetricFamily(
                "specroute_cluster_acceptance_ratio",
                "Posterior mean per-token acceptance of the cluster's best drafter arm.",
                labels=cluster,
            ),
            "headroom": GaugeMetricFamily(
                "specroute_cluster_headroom_ratio",
                "Traffic share x (speed-up with every draft accepted - speed-up now).",
                labels=cluster,
            ),
            "best": GaugeMetricFamily(
                "specroute_cluster_best_arm_info",
                "1 for the (drafter, k) the policy currently chooses in the cluster.",
                labels=["cluster", "drafter", "k"],
            ),
        }
        if self._capture is not None:
            families["samples"] = GaugeMetricFamily(
                "specroute_capture_samples",
                "Captured (prompt, verified output) samples stored, by cluster.",
                labels=cluster,
            )
            families["bytes"] = GaugeMetricFamily(
                "specroute_capture_bytes",
                "Bytes of captured token ids stored, all clusters.",
            )
            families["runs"] = CounterMetricFamily(
                "specroute_distillation_runs",
                "Drafter distillation runs on captured traffic, by outcome.",
                labels=["outcome"],
            )
        return families
