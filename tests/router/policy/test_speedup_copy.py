"""Pricing copy drafters by their runs (router/policy/speedup.py, "copy drafters"): a
hand-computed case, the step count against a step-by-step replay of runs, and the
per-request form."""

from __future__ import annotations

import numpy as np
import pytest

from router.policy.speedup import copy_request_speedup, run_steps_matrix


def _per_step(
    match: float,
    hazard: list[float],
    k_max: int,
    *,
    t_ar: float = 1.0,
    t_draft: float = 0.01,
    t_unmatched: float | None = None,
) -> np.ndarray:
    return copy_request_speedup(
        np.array([[match]]),
        np.array([[hazard]]),
        k_max=k_max,
        t_ar=t_ar,
        t_draft=np.array([t_draft]),
        verify_line=(1.0, 0.1),
        t_unmatched=t_unmatched,
        output_tokens=np.array([1.0]),
        fixed_none=np.array([0.0]),
        fixed_drafters=np.zeros((1, 1)),
    )[0, 0]


def test_a_small_case_by_hand() -> None:
    """c = 0.5; h = (0.8, 0.5, 1, 1), H = 4: P(R >= i) = 0.8, 0.4, 0.4, 0.4, E[R] = 2,
    E[tokens] = 1 + 0.5 * 2 = 2 per run start. t_draft 0.01, t_verify(d) = 1 + 0.1 d:

    k = 1: a run takes 1 + P(R >= 2) + P(R >= 4) = 1.8 steps; E[steps] = 0.5 * 1.8 + 0.5
           = 1.4, E[drafted] = 0.5 * 1 * 1.8 = 0.9, cost 1.4 + 0.11 * 0.9 = 1.499;
    k = 2: 1 + P(R >= 3) = 1.4 steps; E[steps] 1.2, E[drafted] 1.4, cost 1.354;
    k = 3: 1 + P(R >= 4) = 1.4 steps; E[steps] 1.2, E[drafted] 2.1, cost 1.431;
    per request, N = 10, F_0 = 2, F_d = 3 at k = 2: (2 + 10) / (3 + 10 * 1.354 / 2)."""
    table = _per_step(0.5, [0.8, 0.5, 1.0, 1.0], 3)
    np.testing.assert_allclose(table, [1.0, 2 / 1.499, 2 / 1.354, 2 / 1.431])
    per_request = copy_request_speedup(
        np.array([[0.5]]),
        np.array([[[0.8, 0.5, 1.0, 1.0]]]),
        k_max=3,
        t_ar=1.0,
        t_draft=np.array([0.01]),
        verify_line=(1.0, 0.1),
        output_tokens=np.array([10.0]),
        fixed_none=np.array([2.0]),
        fixed_drafters=np.array([[3.0]]),
    )
    assert per_request[0, 0, 2] == pytest.approx(12.0 / (3.0 + 10.0 * 1.354 / 2.0))


def _replayed_steps(run: int, k: int) -> int:
    """Steps of greedy speculation over a run of ``run`` copied tokens at draft length
    k: a step accepts min(left, k); when it accepted k and the copy goes on, its bonus
    token is the copy's next one too."""
    steps, left = 0, run
    while True:
        steps += 1
        if left > k:
            left -= k + 1
            continue
        return steps


def test_run_steps_agree_with_a_step_by_step_replay() -> None:
    rng = np.random.default_rng(4)
    horizon, k_max = 40, 16
    hazard = rng.uniform(0.6, 1.0, size=horizon)
    reach = np.cumprod(hazard)  # P(R >= i)
    probability = np.append(np.append(1.0, reach)[:-1] - reach, reach[-1])  # P(R = r), r <= H
    matrix = run_steps_matrix(horizon, k_max)
    for k in range(1, k_max + 1):
        replayed = sum(p * _replayed_steps(r, k) for r, p in enumerate(probability))
        assert reach @ matrix[:, k - 1] + 1.0 == pytest.approx(replayed)
    table = _per_step(1.0, hazard.tolist(), k_max)
    tokens = 1.0 + reach.sum()
    for k in (1, 5, 16):
        steps = sum(p * _replayed_steps(r, k) for r, p in enumerate(probability))
        cost = steps * (1.0 + 0.11 * k)
        assert table[k] == pytest.approx(tokens / cost)


def test_runs_that_never_start_cost_a_plain_step_and_long_runs_pay_at_long_k() -> None:
    nothing = _per_step(0.0, [1.0] * 64, 16)
    np.testing.assert_allclose(nothing, 1.0)
    long_runs = _per_step(0.5, [0.95] * 64, 16)
    short_runs = _per_step(0.5, [0.5] * 64, 16)
    assert int(long_runs.argmax()) > 8 and long_runs[16] > long_runs[8]
    assert int(short_runs.argmax()) <= 3


def test_an_unmatched_lookup_costs_a_plain_step_whatever_the_verify_intercept() -> None:
    """A lookup that finds nothing runs a one-position target forward (t_e, as measured
    within requests), not the speculative step's intercept t0: in the sidecar's engine
    that is plain decoding's step, so a copy drafter that never matches (and costs nothing
    to look up) is exactly as fast as plain decoding, whatever a two-position forward
    costs. Priced at t0 = 1.4 t_ar, it was 0.7x."""
    plain_lookups = {"t_ar": 0.7, "t_draft": 0.0, "t_unmatched": 0.7}
    never = _per_step(0.0, [1.0] * 8, 2, **plain_lookups)
    np.testing.assert_allclose(never, 1.0)
    # Half the lookups match a run of exactly 2 tokens: at k = 2 a matched start is one
    # step of t0 + 2 t1 for 3 tokens, an unmatched one a plain step for 1.
    half = _per_step(0.5, [1.0, 1.0] + [0.0] * 6, 2, **plain_lookups)
    assert half[2] == pytest.approx(0.7 * 2.0 / (0.5 * 1.2 + 0.5 * 0.7))
