"""``specroute demo`` end to end on the tiny world: sidecar, gRPC replay, per-task table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from benchmarks.demo import EVAL_FILE, cached_evaluation, open_or_build_world
from router.cli import build_app


def test_evaluation_is_measured_once_and_cached(tiny_world: Any, tmp_path: Path) -> None:
    world = open_or_build_world(Path(tiny_world.root), "default")
    assert Path(world.root) == Path(tiny_world.root)  # an existing world is opened, not rebuilt
    first = cached_evaluation(world)
    saved = Path(world.root) / EVAL_FILE
    assert set(first) >= {"tasks", "target_quality", "acceptance", "drafters"}
    assert json.loads(saved.read_text()) == json.loads(json.dumps(first))
    # A second call reads the file: change it and the change comes back.
    marked = {**first, "marker": 1}
    saved.write_text(json.dumps(marked))
    assert cached_evaluation(world)["marker"] == 1


def test_demo_replays_through_a_sidecar_and_prints_the_table(
    tiny_world: Any, tmp_path: Path
) -> None:
    out = tmp_path / "demo"
    result = CliRunner().invoke(
        build_app(),
        ["demo", "--world", str(tiny_world.root), "--per-task", "1", "--out", str(out)],
    )
    assert result.exit_code == 0, result.output
    assert "Replay of 'uniform'" in result.output
    for task in tiny_world.tasks:
        assert task in result.output
    report = json.loads((out / "report.json").read_text())
    policies = report["policies"]
    assert {"none", "thompson"} <= set(policies)
    assert all(entry["lossless"] for entry in policies.values())
    assert set(policies["thompson"]["per_task"]) == set(tiny_world.tasks)
