"""The first-token benchmark (benchmarks/engine/first_token.py): its sums over made-up
timings, and a run of this checkout's engine against itself on the tiny world."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from benchmarks.engine.first_token import PLAIN_ARM, Comparison, load_other_engine, main
from drafters.engine import SpeculativeEngine
from router.bundle import ModelBundle

CHECKOUT = Path(__file__).resolve().parents[3]


def test_ratios_and_speedups_are_taken_over_summed_times() -> None:
    result = Comparison()
    for engine, first, plain, drafted in (
        ("before", 0.04, 0.30, 0.20),
        ("after", 0.03, 0.28, 0.16),
    ):
        result.add(engine, "math", PLAIN_ARM, first, plain)
        result.add(engine, "math", "own:3", first, drafted)
        result.add(engine, "code", "own:3", first, drafted)
    assert result.cells() == [("math", PLAIN_ARM), ("math", "own:3"), ("code", "own:3")]
    assert result.ratio(PLAIN_ARM, first=True) == pytest.approx(0.75)
    assert result.ratio("own:3", first=False) == pytest.approx(0.8)
    # Plain over the drafted requests' time: 0.30 / 0.40 before, 0.28 / 0.32 after.
    assert result.drafter_speedup("before") == pytest.approx(0.75)
    assert result.drafter_speedup("after") == pytest.approx(0.875)
    assert result.timings[("after", "math", "own:3")].mean_first_ms() == pytest.approx(30.0)


def test_another_checkouts_engine_is_loaded_beside_this_one(tmp_path: Path) -> None:
    other = load_other_engine(CHECKOUT)
    assert other is not SpeculativeEngine and other.__name__ == "SpeculativeEngine"
    with pytest.raises(FileNotFoundError, match="not a specroute checkout"):
        load_other_engine(tmp_path)


def test_the_engine_against_itself_reports_each_task_and_the_ratios(
    tiny_world: ModelBundle, caplog: pytest.LogCaptureFixture
) -> None:
    task = tiny_world.tasks[0]
    caplog.set_level(logging.INFO, logger="benchmarks.engine.first_token")
    main(
        [
            "--before",
            str(CHECKOUT),
            "--world",
            str(tiny_world.root),
            "--tasks",
            task,
            "--prompts",
            "1",
            "--max-new-tokens",
            "8",
        ]
    )
    lines = caplog.messages
    assert any(line.startswith(f"{task} {PLAIN_ARM}: ") for line in lines)
    assert any(line.startswith(f"{task} own:3: ") for line in lines)
    assert any(line.startswith("own:3: first token after / before ") for line in lines)
    assert any("speed-up over plain decoding: before" in line for line in lines)
