"""The draft-cost benchmark's split (benchmarks/engine/draft_cost.py) over the engine's
statistics of made-up steps."""

from __future__ import annotations

import pytest

from benchmarks.engine.draft_cost import DraftTimes
from drafters.stats import GenerationStats


def _stats(steps: int, k: int, lead: float, further: float) -> GenerationStats:
    stats = GenerationStats()
    for _ in range(steps):
        stats.observe_step(
            requested=k,
            drafted=k,
            accepted=0,
            draft_time_s=lead + (k - 1) * further,
            verify_time_s=0.01,
            further_time_s=(k - 1) * further,
            further_forwards=k - 1,
        )
    return stats


def test_the_lead_and_the_further_tokens_are_split_per_step_and_per_token() -> None:
    # 10 steps of 4 drafts: a 1 ms lead each and 0.4 ms per further token.
    times = DraftTimes()
    times.add(_stats(10, 4, 0.001, 0.0004))
    assert times.lead_ms() == pytest.approx(1.0)
    assert times.further_ms() == pytest.approx(0.4)
    assert times.mean_ms() == pytest.approx(0.55)
    # k = 1: every draft is a lead; there is no further token to price.
    single = DraftTimes()
    single.add(_stats(5, 1, 0.001, 0.0004))
    assert single.further_ms() is None
