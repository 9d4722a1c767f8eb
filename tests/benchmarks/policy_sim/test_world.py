"""The simulated world: built-in table, the world's eval.json, random many-drafter worlds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from benchmarks.policy_sim.world import (
    BUILTIN_ACCEPTANCE,
    CREATIVE,
    NGRAM,
    TASKS,
    default_world,
    random_world,
)


def test_builtin_world_has_the_expected_shape_and_structure(tmp_path: Path) -> None:
    world = default_world(tmp_path)  # no eval.json here
    assert world.source == "built-in table"
    assert world.clusters == (*TASKS, CREATIVE)
    assert world.drafters == ("generic", *TASKS, NGRAM)
    assert world.acceptance.shape == (8, 2, 9)
    for task in TASKS:  # each fine-tuned drafter beats the generic one on its task
        assert BUILTIN_ACCEPTANCE[task][task] > BUILTIN_ACCEPTANCE["generic"][task]
    oracle = world.oracle_arms(world.drafters)
    assert oracle[(world.clusters.index(CREATIVE), 0)] == ("none", 0)
    assert oracle[(world.clusters.index("rag"), 1)][0] == NGRAM
    assert oracle[(world.clusters.index("code"), 0)][0] == "code"
    assert len({(c, b) for c, b in oracle}) == 16


def test_world_reads_the_measured_matrix(tmp_path: Path) -> None:
    matrix = {"generic": {"chat": 0.4, "code": 0.5}, "code": {"chat": 0.3, "code": 0.8}}
    (tmp_path / "eval.json").write_text(
        json.dumps({"tasks": ["chat", "code"], "acceptance": matrix})
    )
    world = default_world(tmp_path)
    assert world.source.startswith("measured")
    assert world.clusters == ("chat", "code", CREATIVE)
    assert world.drafters == ("generic", "code", NGRAM)
    assert world.acceptance[1, 0, 1] == 0.8  # code drafter on code, short prompts
    assert world.acceptance[1, 1, 1] == np.float64(0.78)  # long prompts: -0.02
    assert world.draft_cost[0] == 0.15  # no decode times: the built-in ratio
    timed = {"acceptance": matrix, "decode_step_ms": {"target": 8.0, "drafters": {"code": 2.0}}}
    (tmp_path / "eval.json").write_text(json.dumps(timed))
    world = default_world(tmp_path)
    assert world.t_ar == 0.008
    assert list(world.draft_cost) == [0.15, 0.25, 0.01]  # code: 2 ms / 8 ms
    (tmp_path / "eval.json").write_text("{not json")
    assert default_world(tmp_path).source == "built-in table"


def test_drift_changes_one_cell_and_moves_the_oracle() -> None:
    world = default_world(None)
    drifted = world.with_acceptance("code", "code", -0.35)
    c = world.clusters.index("code")
    assert np.allclose(
        drifted.acceptance[c, :, world.drafters.index("code")],
        world.acceptance[c, :, world.drafters.index("code")] - 0.35,
    )
    assert drifted.oracle_arms(world.drafters)[(c, 0)][0] != "code"


def test_random_world_is_reproducible() -> None:
    a, b = random_world(8, ("x", "y"), 3), random_world(8, ("x", "y"), 3)
    assert np.array_equal(a.acceptance, b.acceptance) and len(a.drafters) == 8
