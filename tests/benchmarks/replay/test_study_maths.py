"""The study's analyses on hand-made data."""

from __future__ import annotations

import pytest
from scipy import stats

from benchmarks.replay.study_maths import (
    centroid_similarity,
    correlation,
    length_distribution,
    mix_adjusted_tokens_per_s,
    paired_points,
    spread_table,
)
from tests.benchmarks.replay.helpers import result


def test_correlation_matches_scipy_and_counts_points() -> None:
    xs = [0.1, 0.4, 0.35, 0.8, 0.9]
    ys = [1.0, 1.3, 1.5, 1.9, 2.4]
    c = correlation(xs, ys)
    assert c.n == 5
    assert c.pearson_r == pytest.approx(stats.pearsonr(xs, ys).statistic, abs=1e-6)
    assert c.spearman_rho == pytest.approx(0.9, abs=1e-6)  # one swapped pair: 1 - 6*2/(5*24)
    assert 0.0 <= (c.pearson_p or 0.0) < 0.05


def test_correlation_is_undefined_for_constant_or_too_few_points() -> None:
    assert correlation([1.0, 2.0], [1.0, 2.0]).pearson_r is None
    assert correlation([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]).spearman_rho is None
    with pytest.raises(ValueError):
        correlation([1.0], [1.0, 2.0])


def test_centroid_similarity_is_highest_for_the_matching_task() -> None:
    samples = {
        "code": ["def add(a, b): return a + b", "def mul(x, y): return x * y"],
        "math": ["what is 3 plus 4 answer 7", "compute 5 times 6 answer 30"],
    }
    tasks = {
        "code": ["def sub(a, b): return a - b"],
        "math": ["what is 9 plus 1 answer 10"],
    }
    sim = centroid_similarity(samples, tasks)
    assert sim["code"]["code"] > sim["code"]["math"]
    assert sim["math"]["math"] > sim["math"]["code"]
    assert all(0.0 <= v <= 1.0 + 1e-9 for row in sim.values() for v in row.values())


def test_paired_points_keep_only_pairs_in_both_tables() -> None:
    similarity = {"a": {"t1": 0.5, "t2": 0.1}, "b": {"t1": 0.2}}
    speedups = {"a": {"t1": 1.5}, "c": {"t1": 2.0}}
    assert paired_points(similarity, speedups) == [("a", "t1", 0.5, 1.5)]


def test_spread_table_picks_the_evenness_keys() -> None:
    report = {"policies": {"generic": {"mean_speedup": 1.2, "jain": 0.9, "cv": 0.1, "x": 1}}}
    table = spread_table(report, ["generic", "missing"])
    assert list(table) == ["generic"]
    assert table["generic"]["jain"] == 0.9 and table["generic"]["min_speedup"] is None


def test_length_distribution_per_task() -> None:
    results = [result(i, "a", 1.0, tokens=n) for i, n in enumerate((10, 20, 30, 40))]
    table = length_distribution([*results, result(9, "b", 1.0, tokens=5)])
    assert table["a"]["mean"] == 25.0 and table["a"]["p50"] == 25.0 and table["a"]["max"] == 40.0
    assert table["b"]["requests"] == 1.0


def test_mix_adjusted_tokens_per_s_holds_the_mix_fixed() -> None:
    # single-task rates: a 10 tok/s, b 40 tok/s; the mix makes 20 tokens of a and 40 of b,
    # which would take 2 s + 1 s at those rates: 60 tokens / 3 s = 20 tok/s.
    single = {"a": [result(0, "a", 1.0, tokens=10)], "b": [result(1, "b", 0.5, tokens=20)]}
    mixed = [result(2, "a", 9.0, tokens=20), result(3, "b", 9.0, tokens=40)]
    assert mix_adjusted_tokens_per_s(single, mixed) == pytest.approx(20.0)
