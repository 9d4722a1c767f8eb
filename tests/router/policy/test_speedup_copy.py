"""Pricing copy drafters (router/policy/speedup.py, "copy drafters"): a hand-computed
case, agreement of the select-path form with the general one, and the fixed-k model as
the special case c_i = 1, a_i = a."""

from __future__ import annotations

import numpy as np
import pytest

from router.policy.speedup import (
    constant_positions,
    copy_request_speedup,
    cost_gain,
    request_speedup,
    stopped_draft_expectations,
    stopped_speedup_table,
)

K = 16


def test_a_small_case_by_hand() -> None:
    """c = (0.5, 1), a = (0.8, 0.5), t_draft 0.01, t_verify(d) = 1 + 0.1 d, t_ar 1:

    k = 1: E[drafted] = 0.5, E[tokens] = 1 + 0.5 * 0.8 = 1.4,
           cost = 0.5 * 0.01 + 1 + 0.1 * 0.5 = 1.055, S = 1.4 / 1.055;
    k = 2: E[drafted] = 1, E[tokens] = 1.4 + 0.5 * 0.4 = 1.6, cost = 0.01 + 1.1, S = 1.6 / 1.11;
    per request, N = 10, F_0 = 2, F_d = 3 at k = 2: (2 + 10) / (3 + (10 / 1.6) 1.11)."""
    c = np.array([[0.5, 1.0]])
    a = np.array([[0.8, 0.5]])
    t_verify = 1.0 + 0.1 * np.arange(3)
    table = stopped_speedup_table(
        a, c, t_ar=1.0, t_draft=np.array([0.01]), t_verify=t_verify, copy=True
    )
    np.testing.assert_allclose(table[0], [1.0, 1.4 / 1.055, 1.6 / 1.11])
    per_step = copy_request_speedup(
        np.stack([c, a], axis=-2)[None],
        t_ar=1.0,
        t_draft=np.array([0.01]),
        verify_line=(1.0, 0.1),
        output_tokens=np.array([1.0]),
        fixed_none=np.array([0.0]),
        fixed_drafters=np.zeros((1, 1)),
    )
    np.testing.assert_allclose(per_step[0, 0], [1.0, 1.4 / 1.055, 1.6 / 1.11])
    per_request = copy_request_speedup(
        np.stack([c, a], axis=-2)[None],
        t_ar=1.0,
        t_draft=np.array([0.01]),
        verify_line=(1.0, 0.1),
        output_tokens=np.array([10.0]),
        fixed_none=np.array([2.0]),
        fixed_drafters=np.array([[3.0]]),
    )
    assert per_request[0, 0, 2] == pytest.approx(12.0 / (3.0 + 10.0 / 1.6 * 1.11))
    tokens, drafted, _ = stopped_draft_expectations(a, c, first_drafted=False)
    np.testing.assert_allclose(tokens[0], [1.0, 1.4, 1.6])
    np.testing.assert_allclose(drafted[0], [0.0, 0.5, 1.0])
    # Without ``copy`` (a stop rule) the first draft is always made, as before:
    # k = 1: 1.8 / (0.01 + 1.1); k = 2: 2.2 / (0.02 + 1.2).
    stop_rule = stopped_speedup_table(a, c, t_ar=1.0, t_draft=np.array([0.01]), t_verify=t_verify)
    np.testing.assert_allclose(stop_rule[0], [1.0, 1.8 / 1.11, 2.2 / 1.22])


def test_the_select_path_form_equals_the_general_one() -> None:
    rng = np.random.default_rng(3)
    a = rng.uniform(0.0, 1.0, size=(2, 3, 2, K))  # [2, R, D, K]
    c = rng.uniform(0.0, 1.0, size=(2, 3, 2, K))
    t_draft = np.array([0.01, 0.2])
    slope = 0.07
    general = stopped_speedup_table(
        a, c, t_ar=1.3, t_draft=t_draft, t_verify=1.0 + slope * np.arange(K + 1), copy=True
    )
    lean = copy_request_speedup(
        np.stack([c, a], axis=-2),
        t_ar=1.3,
        t_draft=t_draft,
        verify_line=(1.0, slope),
        output_tokens=np.ones(3),
        fixed_none=np.zeros(3),
        fixed_drafters=np.zeros((3, 2)),
    )
    np.testing.assert_allclose(lean, general, rtol=1e-12)


def test_copies_always_made_with_a_constant_acceptance_are_the_fixed_k_model() -> None:
    a = np.array([[0.3, 0.62], [0.8, 0.05]])  # [R, D]
    t_draft = np.array([0.01, 0.15])
    slope = 0.05
    gain = cost_gain(1.0, t_draft, 1.0 + slope * np.arange(K + 1))
    terms = {
        "output_tokens": np.array([40.0, 90.0]),
        "fixed_none": np.array([3.0, 0.0]),
        "fixed_drafters": np.array([[5.0, 2.0], [0.5, 0.0]]),
    }
    geometric = request_speedup(a, gain, t_ar=1.0, **terms)
    copy = copy_request_speedup(
        np.stack([np.ones((*a.shape, K)), constant_positions(a, K)], axis=-2),
        t_ar=1.0,
        t_draft=t_draft,
        verify_line=(1.0, slope),
        **terms,
    )
    np.testing.assert_allclose(copy, geometric, rtol=1e-12)
