"""``none``: always plain decoding."""

from __future__ import annotations

import pytest

from router.policy.base import Context, Decision
from router.policy.registry import make_policy


def test_none_never_speculates() -> None:
    policy = make_policy("none", ["a", "b"])
    assert {policy.select(Context(c, b), ["a", "b"]) for c in "xyz" for b in range(4)} == {
        Decision("none", 0)
    }
    with pytest.raises(ValueError):
        make_policy("none", ["a"], {"k": 3})
