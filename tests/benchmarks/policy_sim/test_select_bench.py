"""The select benchmark's mechanics (what it times and reports; never a timed assertion)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from typer.testing import CliRunner

from benchmarks.policy_sim.cli import register
from benchmarks.policy_sim.ground_truth import TASKS, random_ground_truth
from benchmarks.policy_sim.select_bench import format_result, measure, warmed_policy
from router.policy.thompson import ThompsonPolicy


def test_the_warmed_policy_is_thompson_over_8_drafters_and_k_up_to_8_that_has_learnt() -> None:
    truth = random_ground_truth(8, TASKS, 0)
    policy, contexts = warmed_policy(truth, 300, 0)
    assert isinstance(policy, ThompsonPolicy)
    assert len(policy.drafters_) == 8 and policy.k_max == 8
    assert policy.version == 300 and set(contexts) == set(policy.contexts_)


def test_measure_reports_p50_and_p99_of_each_kind_of_call_beside_the_budget() -> None:
    result = measure(selects=200, seed=1, warmup=200)
    assert result["budget_us"] == 100.0 and result["drafters"] == 8 and result["k_max"] == 8
    calls = result["calls"]
    assert list(calls) == [
        "select",
        "select, unseen context",
        "select after update",
        "select_many of 8",
    ]
    assert [c["calls"] for c in calls.values()] == [200, 200, 200, 25]
    assert all(0 < c["p50_us"] <= c["p99_us"] for c in calls.values())
    table = format_result(result)
    assert "select p50 <= 100 us" in table and "select after update" in table


def test_bench_select_command_prints_the_table_and_writes_json(tmp_path: Path) -> None:
    app, bench = typer.Typer(), typer.Typer()
    app.add_typer(bench, name="bench")
    register(app, bench)
    out = tmp_path / "select.json"
    result = CliRunner().invoke(
        app, ["bench", "select", "--selects", "100", "--json", str(out)], catch_exceptions=False
    )
    assert result.exit_code == 0
    assert "budget: select p50 <= 100 us" in result.output
    assert json.loads(out.read_text())["calls"]["select"]["calls"] == 100
