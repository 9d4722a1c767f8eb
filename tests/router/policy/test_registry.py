"""The policy registry: names, construction from JSON config, JSON-serialisable state."""

from __future__ import annotations

import json

import numpy as np
import pytest

from router.policy.base import STATE_VERSION, Context, DrafterHints, Policy
from router.policy.registry import (
    POLICIES,
    UnknownPolicyError,
    make_policy,
    with_drafter_hints,
)

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
    # A window past any use: the integer overflowed inside the cost model (UNKNOWN).
    for window in ("cost_window", "overhead_window"):
        with pytest.raises(ValueError, match=window):
            make_policy("thompson", [], {window: 10**30})


def test_drafter_hints_fill_what_the_config_leaves_out() -> None:
    hints = DrafterHints({"ngram": 0.0, "self": 0.25}, ("ngram",), {"ngram": 3, "self": 2})
    config = {"gamma": 0.9, "draft_cost_ratio": {"self": 0.4}, "draft_length": {"self": 5}}
    assert with_drafter_hints("thompson", config, hints) == {
        "gamma": 0.9,
        "draft_cost_ratio": {"ngram": 0.0, "self": 0.4},
        "draft_length": {"ngram": 3, "self": 5},
        "copy_drafters": ["ngram"],
    }
    # The config's own copy drafters win, none included.
    chosen = with_drafter_hints("thompson", {"copy_drafters": []}, hints)
    assert chosen["copy_drafters"] == [] and chosen["draft_cost_ratio"] == {
        "ngram": 0.0,
        "self": 0.25,
    }
    # A policy that does not read them gets its config as given; ucb only the lengths.
    assert with_drafter_hints("static", {"x": 1}, hints) == {"x": 1}
    assert with_drafter_hints("ucb", {"gamma": 0.9}, hints) == {
        "gamma": 0.9,
        "draft_length": {"ngram": 3, "self": 2},
    }
    # A malformed value is left for the policy's own validation to refuse.
    malformed = with_drafter_hints("thompson", {"draft_cost_ratio": 0.3}, hints)
    with pytest.raises(ValueError):
        make_policy("thompson", ["ngram"], malformed)


def test_a_hinted_drafter_is_priced_by_its_hint_until_measured() -> None:
    """Before any outcome a drafter without a hint costs the default ratio (0.1 of a
    plain step per drafted token); a hinted one (a lookup: 0) costs its hint."""
    config = with_drafter_hints("thompson", {}, DrafterHints({"ngram": 0.0}, ("ngram",)))
    policy = make_policy("thompson", ["ngram", "small"], config)
    costs = policy.costs_.step_costs(["ngram", "small"], 4)  # type: ignore[attr-defined]
    assert costs.t_draft.tolist() == [0.0, pytest.approx(0.1 * costs.t_ar)]
    assert policy.copy_drafters == {"ngram"}  # type: ignore[attr-defined]
