"""The measured cost model: draft time per drafter, the verify line, t_ar (measured or not)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from router.policy.base import Context, Outcome
from router.policy.costs import CostModel, RequestOverheads


def _outcome(
    k: int,
    steps: int,
    *,
    t_ar: float = 0.01,
    draft: float = 0.002,
    slope: float = 0.1,
    plain: float | None = None,
) -> Outcome:
    return Outcome.from_steps(
        [k] * steps,
        [0] * steps,
        draft_time_s=steps * k * draft,
        verify_time_s=steps * (t_ar + slope * t_ar * k),
        plain_token_time_s=plain,
    )


def test_units_before_any_measurement() -> None:
    costs = CostModel(default_draft_cost_ratio=0.2, draft_cost_ratio={"ngram": 0.01})
    assert costs.plain_token_time() == 1.0
    assert list(costs.draft_times(["model", "ngram"])) == [0.2, 0.01]
    assert costs.verify_times(2) == pytest.approx([1.0, 1.05, 1.1])


def test_learns_the_verify_line_and_t_ar_without_plain_times() -> None:
    costs = CostModel()
    for k in (1, 2, 4, 6, 8) * 4:
        costs.observe("generic", _outcome(k, 20))
    t0, t1 = costs.verify_line() or (0, 0)
    # Exact data: t_verify(k) = 0.01 + 0.001 k; the intercept is the plain step time.
    assert t0 == pytest.approx(0.01, rel=0.05)
    assert t1 == pytest.approx(0.001, rel=0.1)
    assert costs.plain_token_time() == pytest.approx(0.01, rel=0.05)
    assert costs.draft_times(["generic"])[0] == pytest.approx(0.002)
    # An unmeasured drafter costs the default ratio times the estimated t_ar.
    assert costs.draft_times(["new"])[0] == pytest.approx(0.1 * 0.01, rel=0.05)


def test_one_k_only_uses_the_prior_slope() -> None:
    costs = CostModel(verify_slope_ratio=0.05)
    costs.observe("generic", _outcome(4, 10, slope=0.05))
    t0, t1 = costs.verify_line() or (0, 0)
    assert t0 == pytest.approx(0.01, rel=0.02)
    assert t1 == pytest.approx(0.05 * t0, rel=0.05)


def test_plain_decoding_outcomes_pin_t_ar() -> None:
    costs = CostModel()
    plain = Outcome.from_totals(
        steps=0,
        drafted_tokens=0,
        accepted_tokens=0,
        draft_time_s=0.0,
        verify_time_s=0.0,
        wall_time_s=0.5,
        generated_tokens=50,
    )
    costs.observe("none", plain)
    assert costs.plain_token_time() == pytest.approx(0.01)


def test_measured_plain_time_wins_and_averages() -> None:
    costs = CostModel(ewma=0.01)
    costs.observe("generic", _outcome(4, 10, plain=0.02))
    costs.observe("generic", _outcome(4, 10, plain=0.04))
    assert costs.plain_token_time() == pytest.approx(0.03)  # running mean while n < 1/ewma


def test_state_round_trip_through_json() -> None:
    costs = CostModel()
    for k in (1, 3, 5):
        costs.observe("generic", _outcome(k, 10))
    restored = CostModel()
    restored.load_state_dict(json.loads(json.dumps(costs.state_dict())))
    assert restored.verify_line() == pytest.approx(costs.verify_line())
    assert restored.draft_times(["generic"]) == pytest.approx(costs.draft_times(["generic"]))


def _with_fixed_time(outcome: Outcome, fixed: float) -> Outcome:
    return Outcome.from_steps(
        outcome.drafted_per_step,
        outcome.accepted_per_step,
        draft_time_s=outcome.draft_time_s,
        verify_time_s=outcome.verify_time_s,
        wall_time_s=outcome.draft_time_s + outcome.verify_time_s + fixed,
    )


def test_request_overheads_measure_each_arms_fixed_time_and_the_output_length() -> None:
    costs, overheads = CostModel(), RequestOverheads()
    math, chat = Context("math"), Context("chat")
    for _ in range(20):
        for k, arm, fixed in ((0, "none", 0.02), (3, "generic", 0.05)):
            outcome = _with_fixed_time(_outcome(k, 10), fixed)
            costs.observe(arm, outcome)
            overheads.observe(math, arm, outcome, costs)
    fixed_none, fixed = overheads.fixed_times(math, ["generic", "code"])
    assert fixed_none == pytest.approx(0.02, rel=0.05)
    # "code" was never measured here: priced like the cheapest measured drafter.
    assert fixed == pytest.approx([0.05, 0.05], rel=0.05)
    assert overheads.output_tokens(math) == pytest.approx(10.0)
    assert overheads.output_tokens(chat) is None
    restored = RequestOverheads()
    restored.load_state_dict(json.loads(json.dumps(overheads.state_dict())))
    assert restored.fixed_times(math, ["generic"])[1] == pytest.approx(fixed[:1])
    restored.forget_drafter("generic")
    assert restored.fixed_times(math, ["generic"])[1] == pytest.approx([fixed_none])


def test_an_unmeasured_plain_arm_is_priced_so_drafting_is_not_overrated() -> None:
    costs, overheads = CostModel(), RequestOverheads()
    for arm, fixed in (("generic", 0.05), ("code", 0.03)):
        outcome = _with_fixed_time(_outcome(2, 10), fixed)
        costs.observe(arm, outcome)
        overheads.observe(Context("qa"), arm, outcome, costs)
    fixed_none, fixed = overheads.fixed_times(Context("qa"), ["generic", "code", "new"])
    assert fixed_none == 0.0
    assert fixed == pytest.approx([0.05, 0.03, 0.03], abs=0.005)


def test_fixed_time_from_noise_alone_is_not_used() -> None:
    # Residuals of +-20 ms around 0 (cost-model noise) net to ~0; a real 50 ms start-up
    # measured with the same noise survives.
    rng = np.random.default_rng(0)
    costs, overheads = CostModel(), RequestOverheads()
    base = _outcome(2, 10)
    costs.observe("generic", base)
    for _ in range(60):
        for arm, fixed in (("generic", 0.0), ("code", 0.05)):
            noisy = _with_fixed_time(base, max(-0.01, fixed + rng.normal(0.0, 0.02)))
            overheads.observe(Context("qa"), arm, noisy, costs)
    _, fixed_times = overheads.fixed_times(Context("qa"), ["generic", "code"])
    assert fixed_times[0] < 0.005  # a tenth of the real start-up below
    assert 0.02 < fixed_times[1] < 0.08
