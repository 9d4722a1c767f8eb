"""The operator's cluster view from policy summaries: share, speed-up, ceiling, headroom."""

from __future__ import annotations

import math

import pytest

from router.clusters import ceiling_speedup, cluster_views, tokens_per_step
from router.policy.base import ArmSummary, ContextSummary


def _arm(drafter: str, acceptance: float, k: int, speedup: float) -> ArmSummary:
    return ArmSummary(drafter, acceptance, 1.0, 1.0, k, speedup, 0)


def _context(
    cluster: str, bucket: int, arms: tuple[ArmSummary, ...], chosen: str, k: int, requests: int
) -> ContextSummary:
    return ContextSummary(cluster, bucket, arms, chosen, k, requests)


def test_ceiling_is_the_same_step_cost_with_every_draft_accepted() -> None:
    # a = 0.5, k = 2: L = 1.75 tokens per step; every draft accepted: 3 tokens per step.
    assert tokens_per_step(0.5, 2) == pytest.approx(1.75)
    assert ceiling_speedup(_arm("d", 0.5, 2, 1.4)) == pytest.approx(1.4 * 3 / 1.75)
    assert math.isnan(ceiling_speedup(_arm("d", 0.1, 0, 1.0)))
    assert math.isnan(ceiling_speedup(None))


def test_views_weigh_contexts_by_requests_and_rank_headroom() -> None:
    good = (_arm("code", 0.9, 4, 2.5), _arm("ngram", 0.5, 2, 1.3))
    poor = (_arm("generic", 0.5, 2, 1.4), _arm("ngram", 0.2, 1, 1.05))
    contexts = [
        _context("code", 0, good, "code", 4, 30),
        _context("code", 1, good, "code", 4, 10),
        _context("math", 0, poor, "generic", 2, 60),
    ]
    views = {v.cluster: v for v in cluster_views(contexts, {"math": 12, "qa": 3})}
    code, math_, qa = views["code"], views["math"], views["qa"]
    assert (code.requests, math_.requests) == (40, 60)
    assert code.traffic_share == pytest.approx(0.4) and math_.traffic_share == pytest.approx(0.6)
    assert (code.best_drafter, code.best_k, code.speedup) == ("code", 4, 2.5)
    code_ceiling = 2.5 * 5 / tokens_per_step(0.9, 4)
    assert code.headroom == pytest.approx(0.4 * (code_ceiling - 2.5))
    math_ceiling = 1.4 * 3 / 1.75
    assert math_.headroom == pytest.approx(0.6 * (math_ceiling - 1.4))
    assert math_.headroom > code.headroom  # the lagging cluster with more traffic
    assert (math_.captured_samples, qa.captured_samples, qa.requests) == (12, 3, 0)
    assert math.isnan(qa.speedup) and math.isnan(qa.headroom)


def test_a_cluster_where_no_drafter_pays_serves_plain_decoding() -> None:
    arms = (_arm("generic", 0.05, 0, 1.0),)
    (view,) = cluster_views([_context("chat", 0, arms, "none", 0, 5)])
    assert (view.speedup, view.best_drafter, view.best_k) == (1.0, "none", 0)
    assert view.acceptance == pytest.approx(0.05)
    assert math.isnan(view.headroom)  # no arm with k > 0: its costs are not known
