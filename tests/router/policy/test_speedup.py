"""S(a, k) against its closed form (docs/policy.md, "Expected speed-up"), and k* for known
acceptance and costs."""

from __future__ import annotations

import numpy as np
import pytest

from router.policy.speedup import (
    best_draft_length,
    cost_gain,
    expected_tokens_per_step,
    request_speedup,
    speedup,
    speedup_table,
)

# a = 0.5, t_ar = 1, t_draft = 0.1, t_verify(k) = 1 + 0.05 k, by hand:
#   k=1: 1.5   / 1.15 = 1.304348    k=2: 1.75 / 1.30 = 1.346154    k=3: 1.875 / 1.45 = 1.293103
HAND_TABLE = {1: 1.5 / 1.15, 2: 1.75 / 1.30, 3: 1.875 / 1.45}


def _gain(draft_cost: float, k_max: int = 8) -> np.ndarray:
    return cost_gain(1.0, [draft_cost], 1.0 + 0.05 * np.arange(k_max + 1))


def test_expected_tokens_per_step_is_the_geometric_sum() -> None:
    table = expected_tokens_per_step([0.5, 0.0, 1.0], 3)
    np.testing.assert_allclose(table[0], [1.0, 1.5, 1.75, 1.875])
    np.testing.assert_allclose(table[1], [1.0, 1.0, 1.0, 1.0])
    np.testing.assert_allclose(table[2], [1.0, 2.0, 3.0, 4.0])  # a = 1: no division by zero
    a, k = 0.7, 5
    assert table.shape == (3, 4)
    assert expected_tokens_per_step(a, k)[k] == pytest.approx((1 - a ** (k + 1)) / (1 - a))


def test_speedup_matches_the_hand_table() -> None:
    table = speedup_table([0.5], _gain(0.1))[0]
    assert table[0] == 1.0  # k = 0 means no speculation
    for k, expected in HAND_TABLE.items():
        assert table[k] == pytest.approx(expected)
        assert speedup(0.5, k, t_ar=1.0, t_draft=0.1, t_verify=1 + 0.05 * k) == pytest.approx(
            expected
        )
    assert speedup(0.5, 0, t_ar=1.0, t_draft=0.1, t_verify=1.0) == 1.0


def test_speedup_scales_with_measured_seconds_not_units() -> None:
    # Same ratios in seconds give the same speed-up.
    seconds = cost_gain(0.02, [0.002], 0.02 * (1.0 + 0.05 * np.arange(9)))
    np.testing.assert_allclose(seconds, _gain(0.1))


@pytest.mark.parametrize(
    ("acceptance", "draft_cost", "best_k", "best_s"),
    [
        (0.5, 0.1, 2, 1.75 / 1.30),
        # a = 0.8: k=4 -> 3.3616/1.6 = 2.1010, k=5 -> 3.68928/1.75 = 2.1082, k=6 -> 2.0797
        (0.8, 0.1, 5, 3.68928 / 1.75),
        # a = 0.05 is below the cost ratio: 1.05 / 1.15 < 1, so no speculation
        (0.05, 0.1, 0, 1.0),
        # free drafting and near-perfect acceptance: draft as far as allowed
        (0.99, 0.0, 8, None),
    ],
)
def test_best_draft_length_for_known_acceptance_and_cost(
    acceptance: float, draft_cost: float, best_k: int, best_s: float | None
) -> None:
    k, s = best_draft_length(speedup_table([acceptance], _gain(draft_cost)))
    assert int(k[0]) == best_k
    if best_s is not None:
        assert float(s[0]) == pytest.approx(best_s)


def test_table_is_vectorised_over_samples_and_drafters() -> None:
    gain = cost_gain(1.0, [0.1, 0.01], 1.0 + 0.05 * np.arange(5))
    table = speedup_table(np.array([[0.5, 0.2], [0.9, 0.6]]), gain)
    assert table.shape == (2, 2, 5)
    assert table[0, 0, 2] == pytest.approx(1.75 / 1.30)
    assert table[1, 1, 1] == pytest.approx(1.6 / (0.01 + 1.05))


def test_request_speedup_without_fixed_time_is_the_step_speedup() -> None:
    gain = _gain(0.1, k_max=3)
    per_request = request_speedup(
        [0.5], gain, t_ar=1.0, output_tokens=40.0, fixed_none=0.0, fixed_drafters=[0.0]
    )
    assert per_request == pytest.approx(speedup_table([0.5], gain))


def test_request_speedup_prices_fixed_time_against_the_output_length() -> None:
    # a = 0.5, k = 2: 1.75 tokens per step at 1.30 t_ar. Plain pays 2 t_ar of fixed time,
    # the drafter 10: over 10 tokens (2 + 10) / (10 + 10 / 1.75 * 1.30) = 0.6885,
    # over 200 tokens (2 + 200) / (10 + 200 / 1.75 * 1.30) = 1.2737.
    gain = _gain(0.1, k_max=3)
    short, long = (
        request_speedup(
            [0.5], gain, t_ar=1.0, output_tokens=n, fixed_none=2.0, fixed_drafters=[10.0]
        )
        for n in (10.0, 200.0)
    )
    assert short[0, 2] == pytest.approx(12.0 / (10.0 + 10.0 / 1.75 * 1.30))
    assert long[0, 2] == pytest.approx(202.0 / (10.0 + 200.0 / 1.75 * 1.30))
    assert short[0, 0] == long[0, 0] == 1.0
    assert short[0, 1:].max() < 1.0 < long[0, 1:].max()


def test_a_lead_is_paid_once_per_drafting_step() -> None:
    """t_lead (a draft's first forward above a further token's t_draft) enters every
    k >= 1 once: the step of k costs t_lead + k t_draft + t_verify(k); k = 0 stays 1."""
    verify = 1.0 + 0.05 * np.arange(5)
    gain = cost_gain(1.0, [0.1, 0.1], verify, t_lead=[0.0, 0.3])
    np.testing.assert_allclose(gain[0], cost_gain(1.0, [0.1], verify)[0])
    np.testing.assert_allclose(gain[1, 1:], 1.0 / (0.3 + 0.1 * np.arange(1, 5) + verify[1:]))
    assert gain[1, 0] == 1.0
