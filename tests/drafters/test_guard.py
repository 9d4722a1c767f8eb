"""The loss guard: a request whose drafts clearly do not pay stops drafting, losslessly."""

from __future__ import annotations

import pytest
from scipy.special import betainc

from drafters.engine import SpeculativeEngine
from drafters.guard import LossGuard, probability_below
from drafters.loader import LoadedModel
from drafters.registry import create_drafter
from drafters.stats import GenerationStats

from .conftest import TinyModels, assert_same_or_near_tie, make_prompts, reference_greedy

MAX_NEW = 64


@pytest.mark.parametrize(("x", "successes", "failures"), [(0.2, 0, 12), (0.2, 3, 9), (0.5, 7, 2)])
def test_probability_below_is_the_beta_cdf(x: float, successes: int, failures: int) -> None:
    expected = betainc(successes + 1, failures + 1, x)
    assert probability_below(x, successes, failures) == pytest.approx(expected, rel=1e-9)


def _steps(guard: LossGuard, accepted: list[int], k: int) -> list[int]:
    """Feed the guard one step at a time, as the engine does; the k it asks per step."""
    stats = GenerationStats()
    asked = []
    for n in accepted:
        k_step = guard(stats.steps, stats)
        asked.append(k_step)
        stats.observe_step(
            requested=k_step,
            drafted=k_step,
            accepted=min(n, k_step),
            draft_time_s=0.0,
            verify_time_s=0.0,
        )
    return asked


def test_every_draft_rejected_trips_after_13_steps_and_for_good() -> None:
    guard = LossGuard(4)
    asked = _steps(guard, [0] * 40, 4)
    assert asked[:13] == [4] * 13
    assert asked[13:] == [0] * 27
    assert guard.tripped_at_step == 13


def test_half_the_drafts_accepted_never_trips() -> None:
    guard = LossGuard(2)
    assert _steps(guard, [1] * 100, 2) == [2] * 100
    assert guard.tripped_at_step is None


def test_settings_are_checked() -> None:
    for bad in ({"k": -1}, {"k": 2, "break_even": 0.0}, {"k": 2, "confidence": 1.0}):
        with pytest.raises(ValueError):
            LossGuard(**bad)  # type: ignore[arg-type]


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
        # A drafter the target keeps agreeing with never trips it.
        kept = LossGuard(4)
        run = engine.generate(prompt, close, kept, max_new_tokens=MAX_NEW)
        assert_same_or_near_tie(target, prompt, run.collect(), reference)
        assert kept.tripped_at_step is None
    assert tripped >= 3
