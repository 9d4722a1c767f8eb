"""The replay CLI: commands registered, defaults in step with the policies, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from benchmarks.replay.cli import BUILTIN_TRACES, DEFAULT_POLICIES
from benchmarks.replay.replay import POLICY_SETTINGS
from router.cli import build_app


def test_default_policies_are_the_known_ones_in_order() -> None:
    assert tuple(POLICY_SETTINGS) == DEFAULT_POLICIES


def test_the_help_names_every_built_in_trace() -> None:
    """--trace's help left out `structured`, which the builder serves."""
    from benchmarks.replay.builtin import MIXED_TRACES

    assert set(BUILTIN_TRACES) == {*MIXED_TRACES, "real", "single-<task>"}


def test_replay_and_study_are_registered() -> None:
    runner = CliRunner()
    app = build_app()
    replay = runner.invoke(app, ["replay", "--help"])
    assert replay.exit_code == 0 and "--trace" in replay.output and "--policies" in replay.output
    study = runner.invoke(app, ["study", "--help"])
    assert study.exit_code == 0 and "--out" in study.output


def test_a_bad_trace_file_fails_with_line_and_field(tmp_path: Path) -> None:
    trace = tmp_path / "bad.jsonl"
    trace.write_text(
        '{"id": "a", "prompt": "hi", "max_new_tokens": 8}\n'
        '{"id": "b", "prompt": "hi", "max_new_tokens": -1}\n'
    )
    result = CliRunner().invoke(
        build_app(), ["replay", "--trace", str(trace), "--address", "127.0.0.1:9", "--no-progress"]
    )
    assert result.exit_code == 2
    assert f"{trace}:2: field 'max_new_tokens'" in result.output


def test_options_a_trace_cannot_use_are_refused_before_anything_runs(tmp_path: Path) -> None:
    """learn at one request a task waited 15 minutes for a drafter its empty first half
    could never make; --learn-cluster beside another trace was ignored without a word."""
    runner, app = CliRunner(), build_app()
    out = ["--out", str(tmp_path / "out"), "--no-progress", "--no-plots"]
    learn = runner.invoke(app, ["replay", "--trace", "learn", "--per-task", "1", *out])
    assert learn.exit_code == 2 and "the learn trace needs at least 2" in learn.output
    other = runner.invoke(app, ["replay", "--trace", "uniform", "--learn-cluster", "chat", *out])
    assert other.exit_code == 2 and "is for --trace learn only" in other.output
    empty = runner.invoke(app, ["replay", "--trace", "uniform", "--policies", " , ", *out])
    assert empty.exit_code == 2 and "names no policy" in empty.output
    assert not (tmp_path / "out").exists()


def test_a_trace_without_task_labels_and_no_world_says_what_calibration_needs() -> None:
    """It failed inside the calibration with a StopIteration traceback."""
    from benchmarks.replay.builtin import TraceOptions
    from benchmarks.replay.runner import calibration_requests
    from benchmarks.replay.trace import parse_trace_lines

    trace = parse_trace_lines(['{"id": "a", "prompt": "hi", "max_new_tokens": 4}'], name="t")
    with pytest.raises(ValueError, match=r'no request has a "task".*--world'):
        calibration_requests(None, trace, TraceOptions(), 3)


def test_a_sidecar_not_there_at_once_is_said_to_be_awaited(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A replay at an address with nothing listening said nothing for a whole minute."""
    import logging

    import grpc

    from benchmarks.replay.client import ReplayClient

    with (
        caplog.at_level(logging.INFO, logger="benchmarks.replay.client"),
        ReplayClient("127.0.0.1:9") as client,
        pytest.raises(grpc.FutureTimeoutError),
    ):
        client.wait_ready(timeout_s=1.5)
    assert "waiting up to 2 s for the sidecar at 127.0.0.1:9" in caplog.text
