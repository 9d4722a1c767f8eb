"""Thompson's draft length for an explored drafter: the posterior mean's best k, not the
draw's (``explore_length``)."""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from router.policy.base import Context
from router.policy.thompson import ThompsonPolicy

CONTEXT = Context("qa", 1)
DRAFTERS = ["generic", "qa", "rag", "chat"]
SIMILARITY = {
    "qa": {"qa": 0.9, "rag": 0.5, "chat": 0.1},
    "rag": {"qa": 0.5, "rag": 0.9, "chat": 0.1},
    "chat": {"qa": 0.1, "rag": 0.2, "chat": 0.9},
}


def _lengths(mode: str) -> dict[str, set[int]]:
    """The k each drafter is given over 300 selects in one context, nothing learnt."""
    policy = ThompsonPolicy(
        DRAFTERS, rng=np.random.default_rng(0), similarity=SIMILARITY, explore_length=mode
    )
    seen: dict[str, set[int]] = defaultdict(set)
    for _ in range(300):
        decision = policy.select(CONTEXT, DRAFTERS)
        if decision.k > 0:
            seen[decision.drafter].add(decision.k)
    return seen


def test_an_explored_drafter_is_tried_at_the_length_its_mean_supports() -> None:
    """Without updates the posterior means stay put: at the mean every drafter always
    gets the same k (several drafters are still explored); at the draw its k varies."""
    at_mean, at_draw = _lengths("mean"), _lengths("draw")
    assert len(at_mean) >= 2
    assert all(len(ks) == 1 for ks in at_mean.values())
    assert any(len(ks) > 1 for ks in at_draw.values())
    # The drafters explored are the same: only their lengths differ.
    assert set(at_mean) == set(at_draw)
