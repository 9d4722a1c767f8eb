"""The predicted-output benchmark (benchmarks/engine/prediction.py): its predictions, and a
run on the tiny world that reports every case, lossless."""

from __future__ import annotations

import logging

import pytest

from benchmarks.engine.prediction import cases, edited, main
from router.bundle import ModelBundle


def test_the_edited_prediction_replaces_every_sixth_word_and_unrelated_is_the_next() -> None:
    text = "a b c d e f g h i j k l m"
    assert edited(text) == "a b c changed e f g h i changed k l m"
    predictions = cases(["first", "second", "third"])
    assert predictions["exact"](1) == "second"
    assert predictions["unrelated"](2) == "first"


def test_a_run_reports_each_case_and_the_routed_arm(
    tiny_world: ModelBundle, caplog: pytest.LogCaptureFixture
) -> None:
    task = tiny_world.tasks[0]
    caplog.set_level(logging.INFO, logger="benchmarks.engine.prediction")
    argv = ["--world", str(tiny_world.root), "--tasks", task, "--prompts", "2"]
    main([*argv, "--tokens", "12", "--k", "4,8"])
    lines = caplog.messages
    for row in ("routed arm (k=4)", "exact k=4", "exact k=8", "edited k=8", "unrelated k=4"):
        assert any(line.startswith(f"{task} ") and row in line for line in lines), row
        assert any(line.startswith("all ") and row in line for line in lines), row
