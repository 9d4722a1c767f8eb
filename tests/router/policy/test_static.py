"""``static``: a cluster -> (drafter, k) table, with per-context keys and a default."""

from __future__ import annotations

import pytest

from router.policy.base import Context, Decision
from router.policy.registry import make_policy


def test_static_looks_up_context_then_cluster_then_default() -> None:
    table = {"code": ["code", 5], "code/2": ["ngram", 3], "chat": ["none", 0]}
    policy = make_policy(
        "static", ["code", "ngram", "generic"], {"table": table, "default": ["generic", 2]}
    )
    everyone = ["code", "ngram", "generic"]
    assert policy.select(Context("code", 0), everyone) == Decision("code", 5)
    assert policy.select(Context("code", 2), everyone) == Decision("ngram", 3)
    assert policy.select(Context("chat", 0), everyone) == Decision("none", 0)
    assert policy.select(Context("math", 0), everyone) == Decision("generic", 2)
    assert policy.select(Context("code", 0), ["generic"]) == Decision("none", 0)


def test_a_structured_context_has_its_own_key_and_falls_back_to_its_free_texts() -> None:
    table = {"code/0": ["code", 5], "code/0/structured": ["ngram", 4], "math": ["generic", 3]}
    policy = make_policy("static", ["code", "ngram", "generic"], {"table": table})
    everyone = ["code", "ngram", "generic"]
    assert policy.select(Context("code", 0, structured=True), everyone) == Decision("ngram", 4)
    assert policy.select(Context("code", 0), everyone) == Decision("code", 5)
    assert policy.select(Context("math", 1, structured=True), everyone) == Decision("generic", 3)


def test_static_rejects_malformed_config() -> None:
    with pytest.raises(ValueError):
        make_policy("static", [], {"table": {"code": ["code"]}})
    with pytest.raises(ValueError):
        make_policy("static", [], {"tabel": {}})
    # A k no engine drafts: served, it failed every Route with UNKNOWN.
    for k in (-1, 33, 10**30):
        with pytest.raises(ValueError, match=r"less than or equal|greater than"):
            make_policy("static", [], {"default": ["generic", k]})
        with pytest.raises(ValueError):
            make_policy("static", [], {"table": {"code": ["code", k]}})
