"""``specroute demo`` end to end on the tiny world: sidecar, gRPC replay, per-task table."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from benchmarks.demo import open_or_build_world
from benchmarks.world.evaluate import EVAL_FILE, cached_evaluation
from router.cli import build_app


def test_demo_replays_through_a_sidecar_and_prints_the_table(
    tiny_world: Any, tmp_path: Path
) -> None:
    """The table; the world's evaluation is not measured (about a minute of the first
    ``make demo`` on two cores), only pointed to."""
    out = tmp_path / "demo"
    world = tmp_path / "world"
    shutil.copytree(tiny_world.root, world)
    (world / EVAL_FILE).unlink(missing_ok=True)
    result = CliRunner().invoke(
        build_app(), ["demo", "--world", str(world), "--per-task", "1", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "the world's evaluation (target quality, acceptance): specroute world eval" in (
        result.output
    )
    assert not (world / EVAL_FILE).exists()
    assert "Replay of 'uniform'" in result.output
    for task in tiny_world.tasks:
        assert task in result.output
    report = json.loads((out / "report.json").read_text())
    policies = report["policies"]
    assert {"none", "thompson"} <= set(policies)
    assert all(entry["lossless"] for entry in policies.values())
    assert set(policies["thompson"]["per_task"]) == set(tiny_world.tasks)
    # A quick look (one request per task) is calibrated on one prompt per task, not two.
    assert report["calibration"]["prompts_per_task"] == 1


def test_world_eval_and_bench_policy_save_the_evaluation_the_demo_prints(
    tiny_world: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``world eval --limit`` saves nothing; a full ``world eval`` saves eval.json, which is
    then read, not measured again; ``bench policy`` on a world without one measures it
    first (its figures then come from the world's matrix whether or not a demo ran)."""
    import benchmarks.world.evaluate as evaluate

    world = tmp_path / "world"
    shutil.copytree(tiny_world.root, world)
    (world / EVAL_FILE).unlink(missing_ok=True)
    app = build_app()
    limited = CliRunner().invoke(app, ["world", "eval", "--world", str(world), "--limit", "1"])
    assert limited.exit_code == 0, limited.output
    assert not (world / EVAL_FILE).exists()
    full = CliRunner().invoke(app, ["world", "eval", "--world", str(world)])
    assert full.exit_code == 0, full.output
    saved = json.loads((world / EVAL_FILE).read_text())
    assert saved["tasks"] == list(tiny_world.tasks) and saved["acceptance"]
    # Read back, not measured again: an existing world is opened (not rebuilt), and a
    # change to its file comes back.
    opened = open_or_build_world(world, "default")
    assert Path(opened.root) == world
    (world / EVAL_FILE).write_text(json.dumps({**saved, "marker": 1}))
    assert cached_evaluation(opened)["marker"] == 1
    # The same measurement again, without spending it twice: bench policy measures a
    # world that has no eval.json, saves it, and simulates from it.
    (world / EVAL_FILE).unlink()
    monkeypatch.setattr(evaluate, "evaluate_world", lambda bundle, limit=None: saved)
    simulated = CliRunner().invoke(
        app,
        ["bench", "policy", "--world", str(world), "--requests", "200", "--scenario", "drift"],
    )
    assert simulated.exit_code == 0, simulated.output
    assert f"measured ({world / EVAL_FILE})" in simulated.output
    assert json.loads((world / EVAL_FILE).read_text()) == saved
