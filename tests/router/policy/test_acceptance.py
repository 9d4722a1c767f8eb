"""Beta posterior updates against hand-computed numbers; similarity priors; evidence cap."""

from __future__ import annotations

import numpy as np
import pytest

from router.policy.acceptance import (
    ContextArms,
    PriorSettings,
    cap_evidence,
    counts_from_steps,
)


def test_conjugate_update_then_discounted_update_by_hand() -> None:
    arms = ContextArms(np.array([1.0, 1.0]), np.array([1.0, 1.0]))
    # k = 4, accepts [4, 1, 0]: successes 4 + 1 + 0 = 5, failures 2 (steps short of k).
    successes, failures = counts_from_steps([4, 1, 0], 4)
    assert (successes, failures) == (5, 2)
    arms.observe(0, successes, failures, gamma=0.5)
    # Nothing to discount yet: Beta(1 + 5, 1 + 2).
    assert (arms.alpha[0], arms.beta[0]) == (6.0, 3.0)
    # Next request accepts [2] at k = 4: discount toward the prior first,
    # alpha = 1 + 0.5 * (6 - 1) = 3.5, beta = 1 + 0.5 * (3 - 1) = 2, then + (2, 1).
    arms.observe(0, *counts_from_steps([2], 4), gamma=0.5)
    assert (arms.alpha[0], arms.beta[0]) == (5.5, 3.0)
    assert arms.mean()[0] == pytest.approx(5.5 / 8.5)
    # The other drafter's posterior is untouched.
    assert (arms.alpha[1], arms.beta[1]) == (1.0, 1.0)


def test_discount_forgets_old_evidence_geometrically() -> None:
    arms = ContextArms(np.array([1.0]), np.array([1.0]))
    arms.observe(0, 90, 10, gamma=0.9)  # a ~ 0.9
    for _ in range(60):
        arms.observe(0, 20, 80 / 4, gamma=0.9)  # a ~ 0.5 after a drift
    assert arms.mean()[0] == pytest.approx(0.5, abs=0.01)


def test_counts_clip_to_the_draft_length() -> None:
    assert counts_from_steps([9, 3], 3) == (6, 0)
    assert counts_from_steps([], 3) == (0, 0)


def test_cap_evidence_keeps_the_ratio() -> None:
    assert cap_evidence(30, 10, None) == (30.0, 10.0)
    assert cap_evidence(30, 10, 100) == (30.0, 10.0)
    assert cap_evidence(300, 100, 40) == pytest.approx((30.0, 10.0))


def test_similarity_prior_favours_the_matching_cluster() -> None:
    priors = PriorSettings(
        alpha=1, beta=1, similarity_weight=10, similarity_low=0.2, similarity_high=0.9
    )
    similarity = {"code": 0.9, "math": 0.5, "chat": 0.3}
    # r = (s - 0.3) / 0.6: code 1 -> mean 0.9, chat 0 -> mean 0.2, math 1/3 -> 0.2 + 0.7/3.
    assert priors.from_similarity(similarity, "code") == pytest.approx((9.0, 1.0))
    assert priors.from_similarity(similarity, "chat") == pytest.approx((2.0, 8.0))
    alpha, beta = priors.from_similarity(similarity, "math")
    assert alpha / (alpha + beta) == pytest.approx(0.2 + 0.7 / 3)
    assert alpha + beta == pytest.approx(10.0)
    # Unknown cluster or flat similarities: the neutral prior.
    assert priors.from_similarity(similarity, "rag") == (1, 1)
    assert priors.from_similarity({"a": 0.5, "b": 0.5}, "a") == (1, 1)


def test_context_arms_round_trip_and_columns() -> None:
    arms = ContextArms(np.array([1.0, 2.0]), np.array([1.0, 3.0]))
    arms.observe(1, 4, 1, gamma=1.0)
    arms.decisions[1] = 7
    arms.requests = 9
    arms.append(5.0, 5.0)
    arms.delete(0)
    restored = ContextArms.from_dict(arms.to_dict(["b", "c"]), ["b", "c"])
    np.testing.assert_array_equal(restored.alpha, [6.0, 5.0])
    np.testing.assert_array_equal(restored.beta, [4.0, 5.0])
    np.testing.assert_array_equal(restored.alpha0, [2.0, 5.0])
    np.testing.assert_array_equal(restored.decisions, [7, 0])
    assert restored.requests == 9


def test_surprise_by_hand_and_outliers_leave_the_spread_alone() -> None:
    arms = ContextArms(np.array([80.0]), np.array([20.0]))  # mean 0.8, spread 0.1
    # a_hat = 0.3: z = |0.3 - 0.8| / sqrt(max(0.01, 0.8 * 0.2 / 100)) = 5, an outlier.
    assert arms.surprise(0, 30, 70) == pytest.approx(5.0)
    assert arms.residual_var[0] == pytest.approx(0.01)
    # a_hat = 0.75: z = 0.05 / 0.1 = 0.5; the spread moves 5% toward 0.0025.
    assert arms.surprise(0, 75, 25) == pytest.approx(0.5)
    assert arms.residual_var[0] == pytest.approx(0.01 + 0.05 * (0.0025 - 0.01))
    assert arms.surprise(0, 0, 0) == 0.0
