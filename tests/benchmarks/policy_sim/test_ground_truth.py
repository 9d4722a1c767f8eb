"""The simulator's ground truth: built-in table, a world's eval.json, random many-drafter ones."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks.policy_sim.ground_truth import (
    BUILTIN_ACCEPTANCE,
    COPY_RUN_MEAN,
    CREATIVE,
    NGRAM,
    TASKS,
    default_ground_truth,
    random_ground_truth,
)
from router.policy.base import MAX_DRAFT_LENGTH


def test_builtin_table_has_the_expected_shape_and_structure(tmp_path: Path) -> None:
    truth = default_ground_truth(tmp_path)  # no eval.json here
    assert truth.source == "built-in table"
    assert truth.clusters == (*TASKS, CREATIVE)
    assert truth.drafters == ("generic", *TASKS, NGRAM)
    assert truth.acceptance.shape == (8, 2, 9)
    for task in TASKS:  # each fine-tuned drafter beats the generic one on its task
        assert BUILTIN_ACCEPTANCE[task][task] > BUILTIN_ACCEPTANCE["generic"][task]
    oracle = truth.oracle_arms(truth.drafters)
    assert oracle[(truth.clusters.index(CREATIVE), 0)] == ("none", 0)
    assert oracle[(truth.clusters.index("rag"), 1)][0] == NGRAM
    assert oracle[(truth.clusters.index("code"), 0)][0] == "code"
    assert len({(c, b) for c, b in oracle}) == 16


def test_ground_truth_reads_a_worlds_measured_matrix(tmp_path: Path) -> None:
    matrix = {"generic": {"chat": 0.4, "code": 0.5}, "code": {"chat": 0.3, "code": 0.8}}
    (tmp_path / "eval.json").write_text(
        json.dumps({"tasks": ["chat", "code"], "acceptance": matrix})
    )
    truth = default_ground_truth(tmp_path)
    assert truth.source.startswith("measured")
    assert truth.clusters == ("chat", "code", CREATIVE)
    assert truth.drafters == ("generic", "code", NGRAM)
    assert truth.acceptance[1, 0, 1] == 0.8  # code drafter on code, short prompts
    assert truth.acceptance[1, 1, 1] == np.float64(0.78)  # long prompts: -0.02
    assert truth.draft_cost[0] == 0.15  # no decode times: the built-in ratio
    timed = {"acceptance": matrix, "decode_step_ms": {"target": 8.0, "drafters": {"code": 2.0}}}
    (tmp_path / "eval.json").write_text(json.dumps(timed))
    truth = default_ground_truth(tmp_path)
    assert truth.t_ar == 0.008
    assert list(truth.draft_cost) == [0.15, 0.25, 0.01]  # code: 2 ms / 8 ms
    (tmp_path / "eval.json").write_text("{not json")
    assert default_ground_truth(tmp_path).source == "built-in table"


def test_drift_changes_one_cell_and_moves_the_oracle() -> None:
    truth = default_ground_truth(None)
    drifted = truth.with_acceptance("code", "code", -0.35)
    c = truth.clusters.index("code")
    assert np.allclose(
        drifted.acceptance[c, :, truth.drafters.index("code")],
        truth.acceptance[c, :, truth.drafters.index("code")] - 0.35,
    )
    assert drifted.oracle_arms(truth.drafters)[(c, 0)][0] != "code"


def test_random_ground_truth_is_reproducible() -> None:
    a, b = random_ground_truth(8, ("x", "y"), 3), random_ground_truth(8, ("x", "y"), 3)
    assert np.array_equal(a.acceptance, b.acceptance) and len(a.drafters) == 8


def test_the_ngram_drafter_may_draft_up_to_16_and_model_drafters_up_to_8() -> None:
    """The true table covers every k a policy may pick; the oracle lets the n-gram
    drafter (thompson's copy drafter) go to 16 and the model drafters to 8."""
    truth = default_ground_truth(None)
    assert truth.speedups().shape[-1] == MAX_DRAFT_LENGTH + 1
    sure = truth.with_acceptance("math", "math", 0.9).with_acceptance("rag", NGRAM, 0.9)
    oracle = sure.oracle_arms(sure.drafters)
    math, rag = sure.clusters.index("math"), sure.clusters.index("rag")
    assert oracle[(math, 0)] == ("math", 8)  # a = 0.95 would pay beyond 8
    assert oracle[(rag, 0)][0] == NGRAM and 8 < oracle[(rag, 0)][1] <= 16
    # Copy truth by runs: per lookup 1 + p q M tokens, 1 + p q E steps and p k (1 + q E)
    # drafts, E = rho^k / (1 - rho^(k + 1)) the extra steps of a stretch.
    copying = truth.with_copy_ngram(0.5)
    j = truth.drafters.index(NGRAM)
    q = truth.acceptance[rag, 0, j]
    rho = 1.0 - 1.0 / COPY_RUN_MEAN
    extra = rho**10 / (1.0 - rho**11)
    cost = 1.0 + 0.5 * q * extra + 0.5 * 10 * (1 + q * extra) * (0.01 + truth.verify_slope)
    tokens = 1.0 + 0.5 * q * COPY_RUN_MEAN
    assert copying.speedups()[rag, 0, j, 10] == pytest.approx(tokens / cost)
