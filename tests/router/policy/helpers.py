"""Outcome generators for policy tests (truncated-geometric acceptance, fixed costs)."""

from __future__ import annotations

import numpy as np

from router.policy.base import Decision, Outcome

T_AR = 0.01


def geometric_outcome(
    rng: np.random.Generator,
    decision: Decision,
    acceptance: float,
    *,
    draft_cost: float = 0.1,
    verify_slope: float = 0.05,
    tokens: int = 100,
    fixed_time: float = 0.0,
    plain_fixed_time: float = 0.0,
) -> Outcome:
    """One request: each step accepts min(k, G - 1) tokens, G ~ Geometric(1 - a)."""
    k = decision.k
    if k == 0:
        return Outcome.from_steps(
            [0] * tokens,
            [0] * tokens,
            draft_time_s=0.0,
            verify_time_s=tokens * T_AR,
            wall_time_s=tokens * T_AR + plain_fixed_time,
        )
    accepted: list[int] = []
    while sum(accepted) + len(accepted) < tokens:
        accepted.append(min(k, int(rng.geometric(1.0 - acceptance)) - 1))
    steps = len(accepted)
    return Outcome.from_steps(
        [k] * steps,
        accepted,
        draft_time_s=steps * k * draft_cost * T_AR,
        verify_time_s=steps * (1.0 + verify_slope * k) * T_AR,
        wall_time_s=steps * (k * draft_cost + 1.0 + verify_slope * k) * T_AR + fixed_time,
    )
