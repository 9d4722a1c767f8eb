"""The policy registry: names, construction from JSON config, JSON-serialisable state."""

from __future__ import annotations

import json

import numpy as np
import pytest

from router.policy.base import STATE_VERSION, Context, Policy
from router.policy.registry import POLICIES, UnknownPolicyError, make_policy

from .helpers import geometric_outcome

CONFIGS = {
    "thompson": {"gamma": 0.995, "k_max": 8, "seed": 0},
    "ucb": {"seed": 0},
    "fixed": {"drafter": "generic", "k": 4},
    "static": {"table": {"code": ["code", 4]}},
    "oracle": {"table": {"code/0": ["code", 3]}},
    "none": None,
}


def test_registry_holds_exactly_the_six_policies() -> None:
    assert set(POLICIES) == set(CONFIGS)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_policy_honours_the_protocol(name: str) -> None:
    policy = make_policy(name, ["generic", "code", "none"], CONFIGS[name])
    assert isinstance(policy, Policy)
    assert policy.name == name
    rng = np.random.default_rng(0)
    context = Context("code", 0)
    for _ in range(5):
        decision = policy.select(context, ["generic", "code"])
        policy.update(context, decision, geometric_outcome(rng, decision, 0.6))
        policy.update_counterfactual(context, "generic", [1, 2, 0], 4)
    assert policy.version >= 5
    batch = policy.select_many([context, Context("math", 1), context], ["generic"])
    assert len(batch) == 3 and all(d.drafter in ("generic", "none") for d in batch)
    state = json.loads(json.dumps(policy.state_dict()))
    assert state["version"] == STATE_VERSION and state["policy"] == name
    fresh = make_policy(name, [], CONFIGS[name])
    fresh.load_state_dict(state)
    assert fresh.describe() == policy.describe()
    (summary,) = policy.describe()
    assert (summary.cluster, summary.length_bucket, summary.requests) == ("code", 0, 5)


def test_unknown_policy_names_the_registered_ones() -> None:
    with pytest.raises(UnknownPolicyError, match="registered: fixed, none, oracle"):
        make_policy("greedy", [])


def test_bad_config_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        make_policy("thompson", [], {"gamma": 2.0})
    with pytest.raises(ValueError):
        make_policy("thompson", [], {"unknown_knob": 1})
