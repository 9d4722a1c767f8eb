"""The draft-cost benchmark's split (benchmarks/engine/draft_cost.py) on made-up totals."""

from __future__ import annotations

import pytest

from benchmarks.engine.draft_cost import DraftTimes


def test_the_lead_and_the_further_tokens_are_split_per_step_and_per_token() -> None:
    # 10 steps of 4 drafts: a 1 ms lead each and 0.4 ms per further token.
    times = DraftTimes(drafted=40, lead_steps=10, draft_time_s=0.022, lead_time_s=0.010)
    assert times.lead_ms() == pytest.approx(1.0)
    assert times.further_ms() == pytest.approx(0.4)
    assert times.mean_ms() == pytest.approx(0.55)
    # k = 1: every draft is a lead; there is no further token to price.
    assert (
        DraftTimes(drafted=5, lead_steps=5, draft_time_s=0.005, lead_time_s=0.005).further_ms()
        is None
    )
