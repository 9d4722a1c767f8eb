"""The loss guard: a request whose drafts clearly do not pay stops drafting, losslessly."""

from __future__ import annotations

import numpy as np
import pytest

from drafters.engine import SpeculativeEngine
from drafters.guard import LossGuard, step_speedups
from drafters.loader import LoadedModel
from drafters.registry import create_drafter
from drafters.stats import GenerationStats

from .conftest import TinyModels, assert_same_or_near_tie, make_prompts, reference_greedy

MAX_NEW = 64


def test_step_speedups_by_hand() -> None:
    # a = 0.5, c = 0.2, slope 0.05: S(0) = 1, S(1) = 1.5 / 1.25, S(2) = 1.75 / 1.5.
    np.testing.assert_allclose(step_speedups(0.5, 2, 0.2, 0.05), [1.0, 1.2, 1.75 / 1.5])


PLAIN_STEP_S = 0.01


def _steps(guard: LossGuard, accepted: list[int], draft_cost: float = 0.2) -> list[int]:
    """Feed the guard one step at a time, as the engine does, with a drafted token costing
    ``draft_cost`` plain steps; the k it asks per step."""
    stats = GenerationStats()
    asked = []
    for n in accepted:
        k = guard(stats.steps, stats)
        asked.append(k)
        stats.observe_step(
            requested=k,
            drafted=k,
            accepted=min(n, k),
            draft_time_s=draft_cost * PLAIN_STEP_S * k,
            verify_time_s=PLAIN_STEP_S * (1 + guard.verify_slope * k),
        )
    return asked


def test_costs_are_read_from_the_requests_own_timings() -> None:
    guard = LossGuard(4)
    stats = GenerationStats()
    for _ in range(3):
        stats.observe_step(
            requested=4,
            drafted=4,
            accepted=1,
            draft_time_s=4 * 0.15 * PLAIN_STEP_S,
            verify_time_s=PLAIN_STEP_S * 1.2,
        )
    assert guard.draft_cost(stats) == pytest.approx(0.15)
    assert guard.draft_cost(GenerationStats()) == 0.0


def test_every_draft_rejected_shortens_then_stops_drafting_for_good() -> None:
    guard = LossGuard(4)
    asked = _steps(guard, [0] * 40)
    assert asked[:8] == [4] * 8  # min_evidence observations first
    assert guard.tripped_at_step is not None and guard.tripped_at_step < 14
    assert asked[guard.tripped_at_step :] == [0] * (40 - guard.tripped_at_step)
    assert all(0 < k < 4 for k in asked[8 : guard.tripped_at_step])
    assert guard.shortest == 0


def test_drafts_kept_whole_are_never_shortened() -> None:
    guard = LossGuard(3)
    assert _steps(guard, [3] * 60) == [3] * 60
    assert guard.shortest is None and guard.tripped_at_step is None


def test_a_free_drafter_keeps_drafting_where_a_costly_one_stops() -> None:
    """One accepted draft token in four steps: below what a model drafter's forward costs,
    above what an n-gram lookup (no forward) costs."""
    pattern = [1, 0, 0, 0] * 15
    costly, free = LossGuard(2), LossGuard(2)
    _steps(costly, pattern, draft_cost=0.3)
    _steps(free, pattern, draft_cost=0.0)
    assert costly.tripped_at_step is not None
    assert free.tripped_at_step is None


def test_a_fixed_draft_cost_makes_the_schedule_a_function_of_the_counts() -> None:
    """The measured cost follows the machine: the same accepts under other timings gave
    another schedule, so a sampled run (whose draws follow each step's k) another text for
    the same seed. With ``draft_cost_ratio`` the timings do not enter."""
    accepted = [0, 1, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]
    cheap, dear = _steps(LossGuard(4), accepted, 0.05), _steps(LossGuard(4), accepted, 0.6)
    assert cheap != dear  # measured: the timings decide
    fixed = [_steps(LossGuard(4, draft_cost_ratio=0.1), accepted, c) for c in (0.05, 0.6)]
    assert fixed[0] == fixed[1]


def test_a_plain_step_cheaper_than_the_intercept_stops_drafts_that_only_break_even() -> None:
    """One accepted draft token in two steps at a drafted token's cost of 0.1: about even
    against a plain step priced at the speculative step's intercept (q = 1), but 30%
    slower than plain decoding where a plain step costs 0.7 of it (a one-position forward
    on a CPU), which the policy measures and the sidecar passes in."""
    pattern = [1, 0] * 30
    at_intercept, measured = LossGuard(2), LossGuard(2, plain_step_ratio=0.7)
    _steps(at_intercept, pattern, draft_cost=0.1)
    _steps(measured, pattern, draft_cost=0.1)
    assert at_intercept.tripped_at_step is None
    assert measured.tripped_at_step is not None
    np.testing.assert_allclose(step_speedups(0.5, 1, 0.2, 0.05, 0.5), [1.0, 0.6])


def test_the_policys_q_is_converted_to_the_guards_unit() -> None:
    """The policy's unit takes the draft positions off the verify step with its measured
    slope s, the guard's with its own 0.05: q (1 + 0.05 kbar) / (1 + s kbar)."""
    stats = GenerationStats()
    stats.observe_step(requested=4, drafted=4, accepted=1, draft_time_s=0.001, verify_time_s=0.01)
    guard = LossGuard(4, plain_step_ratio=0.7, plain_step_slope=0.025)
    assert guard.plain_step(stats) == pytest.approx(0.7 * 1.2 / 1.1)
    assert LossGuard(4, plain_step_ratio=0.7).plain_step(stats) == 0.7
    assert guard.plain_step(GenerationStats()) == 0.7


def test_the_unit_leaves_out_the_steps_that_drafted_nothing() -> None:
    """A step without drafts (a lookup without a match) is a one-position forward timed
    apart: it is no point of the verify line, so it does not move the unit the draft cost
    is counted in."""
    stats = GenerationStats()
    for drafted in (4, 0, 4, 0):
        stats.observe_step(
            requested=4,
            drafted=drafted,
            accepted=0,
            draft_time_s=0.1 * PLAIN_STEP_S * drafted,
            verify_time_s=PLAIN_STEP_S * (1 + 0.05 * drafted) if drafted else 0.6 * PLAIN_STEP_S,
        )
    assert LossGuard(4).draft_cost(stats) == pytest.approx(0.1)


def test_settings_are_checked() -> None:
    for bad in (
        {"k": -1},
        {"k": 2, "confidence": 1.0},
        {"k": 2, "verify_slope": -0.1},
        {"k": 2, "plain_step_ratio": 0.0},
    ):
        with pytest.raises(ValueError):
            LossGuard(**bad)  # type: ignore[arg-type]


class CheapDrafterGuard(LossGuard):
    """The loss guard with a drafted token costing a tenth of a plain step and a draft's
    first forward nothing more, whatever the machine measures (the lead was measured: on a
    loaded machine it alone tripped the guard, one run in `make test`)."""

    def draft_cost(self, stats: GenerationStats) -> float:
        return 0.1

    def draft_lead(self, stats: GenerationStats) -> float:
        return 0.0


def test_a_drafter_the_target_rejects_stops_drafting_with_the_same_output(
    target: LoadedModel, tiny_models: TinyModels
) -> None:
    engine = SpeculativeEngine(target)
    far = create_drafter("model", name="far", target=target, path=tiny_models.far_dir)
    close = create_drafter("model", name="close", target=target, path=tiny_models.close_dir)
    tripped = 0
    for prompt in make_prompts(4, seed=5):
        reference = reference_greedy(target, engine, prompt, MAX_NEW)
        guard = LossGuard(4)
        run = engine.generate(prompt, far, guard, max_new_tokens=MAX_NEW)
        assert_same_or_near_tie(target, prompt, run.collect(), reference)
        drafted = run.stats.drafted_per_step
        if guard.tripped_at_step is not None:
            tripped += 1
            assert all(d > 0 for d in drafted[: guard.tripped_at_step][:-1])
            assert not any(drafted[guard.tripped_at_step :])
        # A drafter the target keeps agreeing with never trips it, at the cost of a cheap
        # drafter. (The test's close drafter is the target's own size: its measured cost is
        # near a plain step, where no draft pays, and its measure moves with the machine's
        # load, so the cost is pinned here; the output stays the engine's own.)
        kept = CheapDrafterGuard(4)
        run = engine.generate(prompt, close, kept, max_new_tokens=MAX_NEW)
        assert_same_or_near_tie(target, prompt, run.collect(), reference)
        assert kept.tripped_at_step is None
    assert tripped >= 3


def test_a_timed_lead_prices_shorter_drafts_at_what_they_cost() -> None:
    """Where the drafter times each draft's first forward apart, c is a further forward's
    cost and the first forward's excess is added once per drafting step: at the served
    k both readings price a step alike, but one mean per token priced a shorter draft
    cheaper than it is (k = 1 at 0.15 per token where it costs 0.3)."""
    guard = LossGuard(4)
    stats = GenerationStats()
    for _ in range(3):  # a lead of 0.3 t, then 0.1 t per further forward
        stats.observe_step(
            requested=4,
            drafted=4,
            accepted=1,
            draft_time_s=(0.3 + 3 * 0.1) * PLAIN_STEP_S,
            verify_time_s=PLAIN_STEP_S * 1.2,
            further_time_s=3 * 0.1 * PLAIN_STEP_S,
            further_forwards=3,
        )
    assert guard.draft_cost(stats) == pytest.approx(0.1)
    assert guard.draft_lead(stats) == pytest.approx(0.2)
    timed = step_speedups(0.5, 4, guard.draft_cost(stats), 0.05, lead=guard.draft_lead(stats))
    mean = step_speedups(0.5, 4, 0.15, 0.05)
    assert timed[4] == pytest.approx(mean[4])  # the served k: the same step cost
    assert timed[1] == pytest.approx(1.5 / (1 + 0.2 + 0.15))
    assert timed[1] < mean[1]
    # A fixed cost (a sampled run) has no lead.
    assert LossGuard(4, draft_cost_ratio=0.1).draft_lead(stats) == 0.0
