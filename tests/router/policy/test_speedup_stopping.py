"""Pricing drafts a stop rule may end early (router/policy/speedup.py): the expectations
against their closed forms and a simulation of the model, and the speed-up table."""

from __future__ import annotations

import numpy as np
import pytest

from router.policy.speedup import (
    constant_positions,
    cost_gain,
    expected_tokens_per_step,
    speedup_table,
    stopped_draft_expectations,
    stopped_speedup_table,
)

K = 16


def test_never_stopping_is_the_fixed_k_model() -> None:
    a = np.array([0.0, 0.3, 0.8, 1.0])
    tokens, drafted, stopped = stopped_draft_expectations(
        constant_positions(a, K), constant_positions(np.ones_like(a), K)
    )
    np.testing.assert_allclose(tokens, expected_tokens_per_step(a, K))
    np.testing.assert_allclose(drafted, np.broadcast_to(np.arange(K + 1), drafted.shape))
    np.testing.assert_allclose(stopped, 0.0)


def test_closed_forms_for_constant_acceptance_and_continuation() -> None:
    """a_i = a, c_i = c (i >= 2): E[tokens] = 1 + a sum_{i<k} (a c)^i, E[drafted] =
    sum_{i<k} c^i, P(stop) = 1 - c^(k-1)."""
    a, c = 0.7, 0.6
    tokens, drafted, stopped = stopped_draft_expectations(
        constant_positions(a, K), constant_positions(c, K)
    )
    for k in range(1, K + 1):
        assert tokens[k] == pytest.approx(1 + a * sum((a * c) ** i for i in range(k)))
        assert drafted[k] == pytest.approx(sum(c**i for i in range(k)))
        assert stopped[k] == pytest.approx(1 - c ** (k - 1))
    assert (tokens[0], drafted[0], stopped[0]) == (1.0, 0.0, 0.0)
    # c = 0: one draft per step whatever k.
    tokens0, drafted0, _ = stopped_draft_expectations(
        constant_positions(a, K), constant_positions(0.0, K)
    )
    np.testing.assert_allclose(tokens0[1:], 1 + a)
    np.testing.assert_allclose(drafted0[1:], 1.0)


def test_expectations_match_a_simulation_of_the_model() -> None:
    """Per-position a_i and c_i; 200,000 simulated steps at k = 10, means within 5
    standard errors (a correct formula fails with probability < 1e-6)."""
    rng = np.random.default_rng(7)
    k = 10
    a = np.linspace(0.95, 0.4, k)
    c = np.linspace(1.0, 0.5, k)
    steps = 200_000
    continues = rng.random((steps, k)) < c
    continues[:, 0] = True
    drafted_mask = np.cumprod(continues, axis=1).astype(bool)
    accepted_mask = np.cumprod(rng.random((steps, k)) < a, axis=1).astype(bool)
    drafted = drafted_mask.sum(axis=1)
    tokens = 1 + (drafted_mask & accepted_mask).sum(axis=1)
    stopped = drafted < k
    exp_tokens, exp_drafted, exp_stopped = stopped_draft_expectations(a, c)
    for sample, expected in (
        (tokens, exp_tokens[k]),
        (drafted, exp_drafted[k]),
        (stopped, exp_stopped[k]),
    ):
        error = sample.std() / np.sqrt(steps)
        assert abs(sample.mean() - expected) < 5 * error, (sample.mean(), expected)


def test_the_table_without_stopping_is_the_fixed_k_table() -> None:
    t_ar = 1.0
    t_draft = np.array([0.05, 0.2])
    t_verify = 1.0 + 0.08 * np.arange(K + 1)
    a = np.array([[0.6, 0.9], [0.3, 0.75]])  # [R, D]
    fixed = speedup_table(a, cost_gain(t_ar, t_draft, t_verify))
    stopped = stopped_speedup_table(
        constant_positions(a, K),
        constant_positions(np.ones_like(a), K),
        t_ar=t_ar,
        t_draft=t_draft,
        t_verify=t_verify,
    )
    np.testing.assert_allclose(stopped, fixed)


def test_stopping_is_priced_by_the_expected_draft_and_its_extra_forward() -> None:
    """One drafter, c_i = 0.5: the cost at k is (E[d] + P(stop)) t_draft + t_verify(E[d]),
    with the verify line read at the fractional mean."""
    t_ar, t_draft = 1.0, 0.1
    t_verify = 1.0 + 0.1 * np.arange(K + 1)
    a = constant_positions(np.array([0.8]), K)
    c = constant_positions(np.array([0.5]), K)
    table = stopped_speedup_table(a, c, t_ar=t_ar, t_draft=np.array([t_draft]), t_verify=t_verify)
    tokens, drafted, stopped = stopped_draft_expectations(a, c)
    for k in (1, 4, 16):
        cost = (drafted[0, k] + stopped[0, k]) * t_draft + 1.0 + 0.1 * drafted[0, k]
        assert table[0, k] == pytest.approx(tokens[0, k] * t_ar / cost)
    assert table[0, 0] == 1.0


def test_a_rule_that_drafts_only_confident_tokens_makes_long_drafts_pay() -> None:
    """Each token is, with probability 0.8, one the drafter is sure of (accepted with
    0.95), else not (accepted with 0.2). A fixed k drafts both kinds (a = 0.8 at every
    position) and its best k is short; a rule that stops before every unsure token drafts
    from position 2 on only sure ones (a_i = 0.95, c_i = 0.8; the first draft, always made,
    keeps a_1 = 0.8), and its k = 16 beats the best fixed k."""
    t_ar, t_draft = 1.0, 0.15
    t_verify = 1.0 + 0.1 * np.arange(K + 1)
    sure, unsure, share = 0.95, 0.2, 0.8
    mixed = share * sure + (1 - share) * unsure
    fixed = stopped_speedup_table(
        constant_positions(np.array([mixed]), K),
        np.ones((1, K)),
        t_ar=t_ar,
        t_draft=np.array([t_draft]),
        t_verify=t_verify,
    )
    acceptance = constant_positions(np.array([sure]), K)
    acceptance[:, 0] = mixed
    stopped = stopped_speedup_table(
        acceptance,
        constant_positions(np.array([share]), K),
        t_ar=t_ar,
        t_draft=np.array([t_draft]),
        t_verify=t_verify,
    )
    best_fixed = int(fixed[0].argmax())
    assert best_fixed < 8 and fixed[0, K] < 0.7 * fixed[0, best_fixed]
    assert stopped[0, K] > 1.05 * fixed[0, best_fixed]
