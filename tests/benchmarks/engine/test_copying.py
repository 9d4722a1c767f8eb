"""The copy-or-model benchmark's summary (benchmarks/engine/copying.py) on made-up totals."""

from __future__ import annotations

import pytest

from benchmarks.engine.bench import Configuration, ConfigurationTotals
from benchmarks.engine.copying import COPY_OR_MODEL, copy_configurations, summarize_task


def _totals(tokens_per_s: float, outputs: list[list[int]]) -> ConfigurationTotals:
    tokens = sum(len(o) for o in outputs)
    return ConfigurationTotals(
        runs=len(outputs), tokens=tokens, seconds=tokens / tokens_per_s, outputs=outputs
    )


def test_each_drafter_is_taken_at_its_best_k_and_outputs_are_checked() -> None:
    configs = copy_configurations("code", [2, 8])
    assert [(c.drafter, c.k) for c in configs] == [
        ("none", 0),
        ("code", 2),
        ("code", 8),
        ("ngram", 2),
        ("ngram", 8),
        (COPY_OR_MODEL, 2),
        (COPY_OR_MODEL, 8),
    ]
    plain = [[1, 2, 3], [4, 5]]
    speeds = {("none", 0): 100.0, ("code", 2): 160.0, ("code", 8): 150.0}
    speeds |= {("ngram", 2): 120.0, ("ngram", 8): 150.0}
    speeds |= {(COPY_OR_MODEL, 2): 170.0, (COPY_OR_MODEL, 8): 200.0}
    totals = {c: _totals(speeds[(c.drafter, c.k)], plain) for c in configs}
    totals[Configuration("ours", "ngram", 2)] = _totals(120.0, [[1, 2, 3], [4, 6]])
    summary = summarize_task(totals, "code")
    assert summary["best"]["code"] == {"k": 2, "speedup": pytest.approx(1.6)}
    assert summary["best"]["ngram"] == {"k": 8, "speedup": pytest.approx(1.5)}
    assert summary["best"][COPY_OR_MODEL] == {"k": 8, "speedup": pytest.approx(2.0)}
    assert summary["copy_or_model_over_best_single"] == pytest.approx(2.0 / 1.6)
    assert summary["mismatches"] == 1 and summary["mean_output_tokens"] == 2.5
