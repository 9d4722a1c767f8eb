"""UCB1 over (drafter, k) arms with the measured speed-up as reward."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from router.policy.base import Context, Decision, IncompatibleStateError
from router.policy.registry import make_policy
from router.policy.ucb import UcbPolicy, measured_speedup

from .helpers import geometric_outcome

CODE = Context("code", 0)


def _run(
    policy: UcbPolicy, truth: dict[str, float], requests: int, seed: int = 0
) -> list[Decision]:
    rng = np.random.default_rng(seed)
    decisions = []
    for _ in range(requests):
        decision = policy.select(CODE, list(truth))
        policy.update(
            CODE, decision, geometric_outcome(rng, decision, truth.get(decision.drafter, 0))
        )
        decisions.append(decision)
    return decisions


def test_tries_every_arm_once_before_exploiting() -> None:
    policy = UcbPolicy(["a", "b"], k_max=3, rng=np.random.default_rng(0))
    first = _run(policy, {"a": 0.7, "b": 0.2}, 7)
    assert sorted((d.drafter, d.k) for d in first) == sorted(
        [("none", 0)] + [(d, k) for d in "ab" for k in (1, 2, 3)]
    )


def test_converges_to_the_highest_measured_speedup() -> None:
    policy = UcbPolicy(["a", "b"], k_max=3, exploration=0.3, rng=np.random.default_rng(1))
    decisions = _run(policy, {"a": 0.8, "b": 0.2}, 300)
    counts = Counter(d.drafter for d in decisions[-100:])
    assert counts["a"] >= 80
    summary = policy.describe()[0]
    assert summary.chosen_drafter == "a" and summary.chosen_k >= 2
    assert summary.requests == 300


def test_reward_is_plain_time_over_spent_time() -> None:
    outcome = geometric_outcome(np.random.default_rng(0), Decision("a", 2), 0.5)
    spent = outcome.draft_time_s + outcome.verify_time_s
    assert measured_speedup(outcome, 0.01) == pytest.approx(0.01 * outcome.generated_tokens / spent)


def test_state_round_trip_and_removed_drafters() -> None:
    policy = make_policy("ucb", ["a", "b"], {"seed": 3, "k_max": 4})
    assert isinstance(policy, UcbPolicy)
    _run(policy, {"a": 0.6, "b": 0.4}, 40)
    restored = make_policy("ucb", [], {"seed": 9, "k_max": 4})
    restored.load_state_dict(json.loads(json.dumps(policy.state_dict())))
    assert [restored.select(CODE, ["a", "b"]) for _ in range(30)] == [
        policy.select(CODE, ["a", "b"]) for _ in range(30)
    ]
    with pytest.raises(ValueError, match="k_max"):
        make_policy("ucb", [], {"k_max": 5}).load_state_dict(policy.state_dict())
    with pytest.raises(IncompatibleStateError):
        policy.load_state_dict({**policy.state_dict(), "version": 7})
    policy.remove_drafter("a")
    assert all(policy.select(CODE, ["a", "b"]).drafter != "a" for _ in range(50))
    policy.add_drafter("c")
    assert any(policy.select(CODE, ["c"]).drafter == "c" for _ in range(5))
