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
    lead_cost: float | None = None,
) -> Outcome:
    """One request: each step accepts min(k, G - 1) tokens, G ~ Geometric(1 - a). With
    ``lead_cost``, a draft's first forward costs that and each further token
    ``draft_cost`` (t_ar units), timed apart as the sidecar's engine times them."""
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
    lead = draft_cost if lead_cost is None else lead_cost
    draft = lead + (k - 1) * draft_cost
    return Outcome.from_steps(
        [k] * steps,
        accepted,
        draft_time_s=steps * draft * T_AR,
        verify_time_s=steps * (1.0 + verify_slope * k) * T_AR,
        wall_time_s=steps * (draft + 1.0 + verify_slope * k) * T_AR + fixed_time,
        draft_lead_steps=steps if lead_cost is not None else 0,
        draft_lead_time_s=steps * lead * T_AR if lead_cost is not None else 0.0,
        draft_further_forwards=steps * (k - 1) if lead_cost is not None else 0,
        draft_further_time_s=steps * (k - 1) * draft_cost * T_AR if lead_cost is not None else 0.0,
    )
