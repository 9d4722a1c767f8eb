"""UCB1 over (drafter, k) arms with the measured speed-up as reward."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from router.policy.base import Context, Decision, DrafterHints, IncompatibleStateError
from router.policy.registry import make_policy, with_drafter_hints
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


def test_a_drafter_served_at_one_length_has_that_arm_only() -> None:
    """A fleet replica serves its drafter at one k, so a request placed there is learnt
    at that k (as the fleet places it). Without the served lengths, UCB's arms at the other
    k stayed untried and were played first for good: with two drafters at k_max 8, 16
    arms, two of which can be learnt."""
    served = {"a": 3, "b": 11}  # b's replica drafts past k_max: its arm sits in column 8
    policy = UcbPolicy(["a", "b"], k_max=8, rng=np.random.default_rng(0), draft_length=served)
    rng = np.random.default_rng(0)
    truth = {"a": 0.8, "b": 0.3}
    decisions = []
    for _ in range(60):
        decision = policy.select(CODE, list(truth))
        assert decision.k == served.get(decision.drafter, 0), decision
        policy.update(
            CODE, decision, geometric_outcome(rng, decision, truth.get(decision.drafter, 0))
        )
        decisions.append(decision)
    # Three arms (none, a@3, b@11) tried once each, then UCB settles on the best one.
    assert {(d.drafter, d.k) for d in decisions[:3]} == {("none", 0), ("a", 3), ("b", 11)}
    assert Counter(d.drafter for d in decisions[-20:])["a"] >= 15
    (summary,) = policy.describe()
    assert {arm.drafter: arm.best_k for arm in summary.arms} == served
    assert (summary.chosen_drafter, summary.chosen_k) == ("a", 3)


def test_the_sidecar_hints_ucb_its_served_lengths() -> None:
    hints = DrafterHints({"ngram": 0.0}, ("ngram",), {"ngram": 4})
    config = with_drafter_hints("ucb", {"gamma": 0.9}, hints)
    assert config == {"gamma": 0.9, "draft_length": {"ngram": 4}}
    policy = make_policy("ucb", ["ngram"], config)
    assert policy.select(CODE, ["ngram"]).k in (0, 4)
    # A registration re-hints it (PolicyHolder._rehint): the new length replaces the old.
    policy.set_drafter_hints(DrafterHints(draft_length={"ngram": 2}))  # type: ignore[attr-defined]
    assert {policy.select(CODE, ["ngram"]).k for _ in range(20)} <= {0, 2}


def test_reward_is_plain_time_over_spent_time() -> None:
    outcome = geometric_outcome(np.random.default_rng(0), Decision("a", 2), 0.5)
    spent = outcome.draft_time_s + outcome.verify_time_s
    assert measured_speedup(outcome, 0.01, 2) == pytest.approx(
        0.01 * outcome.generated_tokens / spent
    )


def test_a_report_of_no_time_cannot_pin_an_arm() -> None:
    """A Report with a verify time of 1e-300 made the reward infinite: that arm's mean won
    every selection from then on (and the snapshot kept it, as JSON's Infinity)."""
    from dataclasses import replace

    policy = UcbPolicy(["a", "b"], k_max=2, rng=np.random.default_rng(0))
    _run(policy, {"a": 0.2, "b": 0.9}, 40)
    outcome = geometric_outcome(np.random.default_rng(1), Decision("a", 1), 0.2)
    forged = replace(outcome, draft_time_s=0.0, verify_time_s=1e-300)
    assert measured_speedup(forged, 0.01, 1) == 2.0  # at most k + 1
    # The plain arm's noise above 1 is kept: capped at 1 it was biased low.
    plain = replace(outcome, draft_time_s=0.0, verify_time_s=outcome.generated_tokens * 0.009)
    assert measured_speedup(plain, 0.01, 0) == pytest.approx(0.01 / 0.009)
    assert measured_speedup(forged, 0.01, 0) == 2.0
    policy.update(CODE, Decision("a", 1), forged)
    assert np.isfinite(policy.contexts_[CODE].rewards).all()
    later = Counter(d.drafter for d in _run(policy, {"a": 0.2, "b": 0.9}, 200, seed=2))
    assert later["b"] > later["a"]


def test_discounted_plays_below_one_keep_the_bonus_finite() -> None:
    """With gamma < 1 the eligible arms' plays can sum below 1 (fleet mode narrows the
    eligible drafters every call): log of that total is negative, the bonus NaN, and
    argmax chose the none arm every time."""
    policy = UcbPolicy(["a", "b"], k_max=1, gamma=0.5, rng=np.random.default_rng(0))
    arms = policy._context(CODE)
    arms.plays[:] = [[0.0, 50.0], [0.0, 0.4]]
    arms.rewards[:] = [[0.0, 50.0], [0.0, 0.8]]  # b's mean speed-up 2.0
    arms.none_plays, arms.none_rewards = 0.3, 0.3
    with np.errstate(invalid="raise"):
        decision = policy.select(CODE, ["b"])
    assert decision.drafter == "b"


def test_state_round_trip_and_removed_drafters() -> None:
    policy = make_policy("ucb", ["a", "b"], {"seed": 3, "k_max": 4})
    assert isinstance(policy, UcbPolicy)
    _run(policy, {"a": 0.6, "b": 0.4}, 40)
    restored = make_policy("ucb", [], {"seed": 9, "k_max": 4})
    restored.load_state_dict(json.loads(json.dumps(policy.state_dict())))
    assert [restored.select(CODE, ["a", "b"]) for _ in range(30)] == [
        policy.select(CODE, ["a", "b"]) for _ in range(30)
    ]
    with pytest.raises(IncompatibleStateError):
        policy.load_state_dict({**policy.state_dict(), "version": 7})
    policy.remove_drafter("a")
    assert all(policy.select(CODE, ["a", "b"]).drafter != "a" for _ in range(50))
    policy.add_drafter("c")
    assert any(policy.select(CODE, ["c"]).drafter == "c" for _ in range(5))


def test_ucb_and_a_tally_keep_structured_contexts_apart_through_a_round_trip() -> None:
    structured = Context(CODE.cluster, CODE.length_bucket, structured=True)
    rng = np.random.default_rng(0)
    for name, config in (("ucb", {"seed": 3}), ("fixed", {"drafter": "a", "k": 3})):
        policy = make_policy(name, ["a", "b"], config)
        for context in (CODE, structured):
            policy.update(context, Decision("a", 3), geometric_outcome(rng, Decision("a", 3), 0.5))
        restored = make_policy(name, ["a", "b"], config)
        restored.load_state_dict(json.loads(json.dumps(policy.state_dict())))
        described = [(c.cluster, c.structured, c.requests) for c in restored.describe()]
        assert described == [(CODE.cluster, False, 1), (CODE.cluster, True, 1)], name


def test_a_state_saved_under_another_k_max_keeps_the_arms_both_grids_have() -> None:
    """Changing ``k_max`` and restoring (SetPolicy, a restart) keeps what was learnt; it
    failed with a ValueError (UNKNOWN over gRPC) before."""
    policy = make_policy("ucb", ["a"], {"seed": 3, "k_max": 4})
    assert isinstance(policy, UcbPolicy)
    _run(policy, {"a": 0.6}, 40)
    saved = json.loads(json.dumps(policy.state_dict()))
    plays = saved["contexts"][0]["plays"]  # [drafter][k], k = 0..4
    smaller = make_policy("ucb", [], {"k_max": 2})
    larger = make_policy("ucb", [], {"k_max": 6})
    assert isinstance(smaller, UcbPolicy) and isinstance(larger, UcbPolicy)
    smaller.load_state_dict(saved)
    larger.load_state_dict(saved)
    assert smaller.contexts_[CODE].plays.tolist() == [row[:3] for row in plays]
    assert larger.contexts_[CODE].plays.tolist() == [[*row, 0.0, 0.0] for row in plays]
    assert all(smaller.select(CODE, ["a"]).k <= 2 for _ in range(20))
    assert larger.select(CODE, ["a"]).k in (5, 6)  # the new arms are untried: first
