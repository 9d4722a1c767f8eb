"""The learn replay end to end on the tiny world: a real sidecar captures the withheld task's
traffic, distils by itself in a child process, and the report carries the ``learn`` figures."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from benchmarks.replay.builtin import TraceOptions
from benchmarks.replay.calibration import CalibrationOptions
from benchmarks.replay.learn import LEARN_POLICIES, LearnOptions
from benchmarks.replay.runner import ReplayConfig, run_replay

FIGURES = (
    "speedup_before",
    "speedup_after",
    "reference_speedup",
    "min_speedup_before",
    "min_speedup_after",
    "distill_seconds",
    "generate_p99_ratio",
)


def test_learn_replay_distils_registers_or_says_why_and_reports(
    tiny_world: Any, tmp_path: Path
) -> None:
    config = ReplayConfig(
        trace="learn",
        out_dir=tmp_path / "learn",
        policies=LEARN_POLICIES,
        world_dir=Path(tiny_world.root),
        trace_options=TraceOptions(per_task=2, max_new_tokens_cap=24, learn_task="code"),
        calibration=CalibrationOptions(progress=False),
        progress=False,
        plots=False,
        learn=LearnOptions(
            steps=2, interval_s=0.5, reference_k=(2,), idle_probes=3, timeout_s=120.0
        ),
    )
    outcome = run_replay(config)
    report = json.loads(outcome.report_path.read_text())
    learn = report["learn"]
    assert learn["cluster"] == "code" and learn["policy"] == "thompson"
    for key in FIGURES:
        assert isinstance(learn[key], float) and math.isfinite(learn[key]), (key, learn)
    assert learn["probes_idle"] == 3 and learn["probes_during"] >= 1
    assert learn["distill_outcome"] in ("registered", "refused"), learn["distill_detail"]
    account = learn["distill_report"]  # the distillation's distill.json
    assert account["cluster"] == "code" and account["steps"] == 2
    assert 0.0 <= account["acceptance_after"] <= 1.0
    if learn["distill_outcome"] == "registered":
        assert learn["registered"] and learn["distilled_drafter"].startswith("code-auto-")
    else:  # validation discarded it, and the report says why
        assert not learn["registered"] and "not registered" in learn["distill_detail"]
    for label, section in report["policies"].items():
        assert section["lossless"] is True, label
    # The sidecar's log stays beside the report (the distillation's verdict is there).
    log = (outcome.report_path.parent / "sidecar.log").read_text()
    assert "auto-distillation of code on" in log
    assert "## Learning `code`" in (outcome.report_path.parent / "report.md").read_text()
