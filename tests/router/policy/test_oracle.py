"""``oracle``: plays the true best arm it is given; refuses to run without one."""

from __future__ import annotations

import pytest

from router.policy.base import Context, Decision
from router.policy.registry import make_policy


def test_oracle_plays_the_given_best_arm_per_context() -> None:
    policy = make_policy("oracle", ["a", "b"], {"table": {"x/0": ["a", 4], "x/1": ["b", 2]}})
    assert policy.name == "oracle"
    assert policy.select(Context("x", 0), ["a", "b"]) == Decision("a", 4)
    assert policy.select(Context("x", 1), ["a", "b"]) == Decision("b", 2)
    assert policy.select(Context("y", 0), ["a", "b"]) == Decision("none", 0)


def test_oracle_needs_a_table() -> None:
    with pytest.raises(ValueError, match="table"):
        make_policy("oracle", ["a"], {})
