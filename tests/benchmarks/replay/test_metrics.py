"""Metrics on hand-computed numbers."""

from __future__ import annotations

import math

import pytest

from benchmarks.replay.metrics import (
    coefficient_of_variation,
    cumulative_regret,
    evenness,
    jain_index,
    length_bucket_name,
    lossless_mismatches,
    max_over_min,
    per_task_speedup,
    speedup_by_length,
    task_stats,
    weighted_mean,
)
from tests.benchmarks.replay.helpers import result


def test_jain_index_hand_computed() -> None:
    # (1 + 2 + 3)^2 / (3 * (1 + 4 + 9)) = 36 / 42
    assert jain_index([1.0, 2.0, 3.0]) == pytest.approx(36 / 42)
    assert jain_index([2.0, 2.0, 2.0, 2.0]) == pytest.approx(1.0)
    # one task gets everything: 1/n
    assert jain_index([5.0, 0.0, 0.0, 0.0]) == pytest.approx(0.25)


def test_coefficient_of_variation_is_population_std_over_mean() -> None:
    # mean 2, population variance (1 + 0 + 1) / 3 = 2/3
    assert coefficient_of_variation([1.0, 2.0, 3.0]) == pytest.approx(math.sqrt(2 / 3) / 2)
    assert coefficient_of_variation([4.0, 4.0]) == 0.0
    assert coefficient_of_variation([4.0]) == 0.0


def test_max_over_min_and_weighted_mean() -> None:
    assert max_over_min([1.5, 3.0, 2.0]) == pytest.approx(2.0)
    assert max_over_min([0.0, 1.0]) == math.inf
    # (1 * 3 + 3 * 1) / (3 + 1)
    assert weighted_mean({"a": 1.0, "b": 3.0}, {"a": 3.0, "b": 1.0}) == pytest.approx(1.5)
    assert weighted_mean({"a": 1.0}, {"z": 1.0}) == 0.0


def test_evenness_combines_the_metrics() -> None:
    spread = evenness({"a": 1.0, "b": 2.0, "c": 3.0}, {"a": 1.0, "b": 1.0, "c": 2.0})
    assert spread.mean == pytest.approx((1 + 2 + 6) / 4)
    assert (spread.minimum, spread.maximum, spread.max_over_min) == (1.0, 3.0, 3.0)
    assert spread.jain == pytest.approx(36 / 42)


def test_per_task_speedup_is_tokens_per_second_ratio_on_the_same_requests() -> None:
    baseline = [result(0, "a", 1.0), result(1, "a", 1.0), result(2, "b", 2.0, tokens=20)]
    policy = [
        result(0, "a", 0.5, drafter="d", k=4, steps=4, drafted=12, accepted=6),
        result(1, "a", 0.5, drafter="d", k=4, steps=4, drafted=12, accepted=6),
        result(2, "b", 4.0, tokens=20, drafter="g", k=2, steps=10, drafted=20, accepted=10),
    ]
    # a: 20 tokens / 1 s over 20 tokens / 2 s; b: 20/4 over 20/2
    assert per_task_speedup(policy, baseline) == pytest.approx({"a": 2.0, "b": 0.5})
    stats = task_stats(policy)
    assert stats["a"].tokens_per_s == pytest.approx(20.0)
    assert stats["a"].acceptance == pytest.approx(12 / 24)
    assert stats["a"].mean_accepted_length == pytest.approx(20 / 8)
    assert dict(stats["a"].arms) == {"d:4": 2}
    assert task_stats(baseline)["a"].acceptance is None


def test_cumulative_regret_sums_time_lost_against_the_oracle() -> None:
    oracle = [result(0, "a", 0.4), result(1, "a", 0.5), result(2, "a", 1.0)]
    policy = [result(0, "a", 0.5), result(1, "a", 0.7), result(2, "a", 0.9)]
    assert cumulative_regret(policy, oracle) == pytest.approx([0.1, 0.3, 0.2])


def test_length_buckets_and_speedup_by_length() -> None:
    assert [length_bucket_name(n) for n in (1, 16, 17, 64, 65, 129)] == [
        "1-16",
        "1-16",
        "17-32",
        "33-64",
        "65-128",
        ">128",
    ]
    baseline = [result(0, "a", 1.0, tokens=10), result(1, "b", 4.0, tokens=100)]
    policy = [result(0, "a", 0.5, tokens=10), result(1, "b", 1.0, tokens=100)]
    assert speedup_by_length(policy, baseline) == pytest.approx({"1-16": 2.0, "65-128": 4.0})


def test_lossless_mismatches_only_compare_greedy_requests() -> None:
    baseline = [
        result(0, "a", 1.0, output=(1, 2)),
        result(1, "a", 1.0, output=(3, 4)),
        result(2, "a", 1.0, output=(5,)),
    ]
    policy = [
        result(0, "a", 1.0, output=(1, 2)),
        result(1, "a", 1.0, output=(3, 9)),
        result(2, "a", 1.0, output=(6,), greedy=False),
    ]
    assert lossless_mismatches(policy, baseline) == ["r1"]


def test_regret_per_window_is_the_slope_of_each_slice() -> None:
    from benchmarks.replay.metrics import regret_per_window

    curve = [1.0, 2.0, 3.0, 4.0, 4.0, 4.0, 4.5, 5.0]  # slope 1, then 0, then 0.5
    assert regret_per_window(curve, 4) == pytest.approx([1.0, 1.0, 0.0, 0.5])
    assert regret_per_window([], 4) == []


def test_dominant_arms_per_phase() -> None:
    from benchmarks.replay.metrics import dominant_arms

    results = [
        result(0, "a", 1.0, drafter="x", k=2),
        result(1, "a", 1.0, drafter="x", k=2),
        result(2, "a", 1.0, drafter="y", k=4),
        result(3, "b", 1.0, drafter="z", k=1),
        result(4, "a", 1.0, drafter="y", k=4),
    ]
    assert dominant_arms(results, [3]) == [{"a": "x:2"}, {"a": "y:4", "b": "z:1"}]
    assert dominant_arms(results, []) == [{"a": "x:2", "b": "z:1"}]


def test_paired_speedup_is_the_geometric_mean_of_per_request_ratios() -> None:
    from benchmarks.replay.metrics import paired_speedup

    baseline = [result(0, "a", 1.0), result(1, "a", 1.0), result(2, "b", 2.0)]
    policy = [result(0, "a", 0.25), result(1, "a", 1.0), result(2, "b", 1.0)]
    # a: sqrt(4 * 1) = 2; b: 2
    assert paired_speedup(policy, baseline) == pytest.approx({"a": 2.0, "b": 2.0})


def test_mean_accepted_length_is_the_engines_when_a_stop_cuts_a_step() -> None:
    from drafters.stats import GenerationStats

    # Three steps accept 2 drafts each; the last step's first accepted draft is EOS, so it
    # keeps 1 of its 3 tokens: 7 tokens generated, 1 + 6 / 3 = 3 tokens per step as the
    # engine reports it (not 7 / 3).
    engine = GenerationStats(generated_tokens=7)
    for _ in range(3):
        engine.observe_step(requested=2, drafted=2, accepted=2, draft_time_s=0, verify_time_s=0)
    replayed = result(0, "a", 1.0, tokens=7, drafter="d", k=2, steps=3, drafted=6, accepted=6)
    assert task_stats([replayed])["a"].mean_accepted_length == engine.mean_accepted_length == 3.0
