"""``fixed``: one (drafter, k) everywhere, k = 0 when that drafter is unavailable."""

from __future__ import annotations

import json

from router.policy.base import Context, Decision, Outcome
from router.policy.registry import make_policy


def test_fixed_plays_its_arm_and_falls_back_to_none() -> None:
    policy = make_policy("fixed", ["generic", "code"], {"drafter": "generic", "k": 3})
    assert policy.select(Context("math", 2), ["generic", "code"]) == Decision("generic", 3, 1.0)
    assert policy.select(Context("math", 2), ["code"]) == Decision("none", 0)
    policy.remove_drafter("generic")
    assert policy.select(Context("math", 2), ["generic"]) == Decision("none", 0)


def test_fixed_reports_what_it_observed() -> None:
    policy = make_policy("fixed", ["generic"], {"drafter": "generic", "k": 4})
    context = Context("code", 1)
    outcome = Outcome.from_steps([4, 4], [4, 1], draft_time_s=0.01, verify_time_s=0.02)
    policy.update(context, Decision("generic", 4), outcome)
    (summary,) = policy.describe()
    (arm,) = summary.arms
    assert (summary.chosen_drafter, summary.chosen_k, summary.requests) == ("generic", 4, 1)
    assert (arm.alpha, arm.beta, arm.decisions) == (6.0, 2.0, 1)
    restored = make_policy("fixed", [], {"drafter": "generic", "k": 4})
    restored.load_state_dict(json.loads(json.dumps(policy.state_dict())))
    assert restored.describe() == policy.describe() and restored.version == 1
