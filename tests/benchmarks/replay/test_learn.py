"""The learn trace's construction and its report figures from hand-made records (no models)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.replay import cli
from benchmarks.replay.builtin import LEARN_WEIGHT, TraceOptions, builtin_trace
from benchmarks.replay.learn import (
    LEARN_PER_TASK,
    LEARN_POLICIES,
    DistillationFigures,
    LearnOptions,
    awaited,
    capture_threshold,
    default_learn_task,
    discarded_runs,
    distillation_runs,
    learn_figures,
    learn_markdown,
    learn_sidecar_env,
)
from benchmarks.replay.replay import EventApplier
from benchmarks.replay.runner import needs_calibration
from benchmarks.replay.trace import TraceEvent, parse_trace_lines, trace_lines
from router.settings import Settings
from tests.benchmarks.replay.helpers import result
from tests.benchmarks.replay.test_builtin import TASKS, examples


def test_learn_trace_withholds_the_task_weights_it_and_waits_halfway() -> None:
    trace = builtin_trace(
        "learn", examples(per_task=30), TraceOptions(per_task=6, learn_task="rag")
    )
    first = trace.records[0]
    assert isinstance(first, TraceEvent) and (first.kind, first.drafter) == (
        "remove_drafter",
        "rag",
    )
    found = awaited(trace)
    assert found is not None
    event, boundary = found
    assert (event.drafter, event.tasks) == ("rag-auto", ("rag",))
    counts = trace.task_counts()
    assert counts["rag"] == 6 * LEARN_WEIGHT
    assert all(counts[t] == 6 for t in TASKS if t != "rag")
    halves = trace.requests[:boundary], trace.requests[boundary:]
    assert boundary == len(trace.requests) // 2
    for half in halves:
        assert sum(r.task == "rag" for r in half) == 3 * LEARN_WEIGHT
        assert {r.task for r in half} == set(TASKS)
    # The second half's prompts of the task are others than the first half's.
    ids = [{r.id for r in half if r.task == "rag"} for half in halves]
    assert not ids[0] & ids[1]
    # Two policies capture each request twice; 80 % of that starts the distillation.
    assert capture_threshold(trace, 2, 0.8) == int(0.8 * 3 * LEARN_WEIGHT * 2)
    # The event survives a trace file.
    again = parse_trace_lines(list(trace_lines(trace)), name="learn")
    assert awaited(again) == found


def test_learn_task_defaults_to_code_and_refuses_an_unknown_one() -> None:
    trace = builtin_trace("learn", examples(per_task=8), TraceOptions(per_task=2))
    first = trace.records[0]
    assert isinstance(first, TraceEvent) and first.drafter == "code"
    with pytest.raises(KeyError, match="poetry"):
        builtin_trace("learn", examples(per_task=8), TraceOptions(per_task=2, learn_task="poetry"))
    # More requests of the task than test prompts would replay training prompts.
    with pytest.raises(ValueError, match="second half would replay"):
        builtin_trace("learn", examples(per_task=5), TraceOptions(per_task=2))


def test_default_learn_task_ranks_by_tokens_per_step_not_raw_acceptance(tmp_path: Path) -> None:
    # a: +0.30 acceptance from 0.02 (1.02 -> 1.43 tokens per step at k = 4);
    # b: +0.25 from 0.40 (1.66 -> 2.51): b gains more of what a speed-up is made of.
    acceptance = {
        "generic": {"a": 0.02, "b": 0.40, "c": 0.3},
        "a": {"a": 0.32},
        "b": {"b": 0.65},
        "c": {"c": 0.31},
    }
    path = tmp_path / "eval.json"
    path.write_text(json.dumps({"draft_length": 4, "acceptance": acceptance}))
    assert default_learn_task(path, ["a", "b", "c"]) == "b"
    assert default_learn_task(path, ["a", "c"]) == "a"
    assert default_learn_task(tmp_path / "missing.json", ["a"]) is None


def test_learn_sidecar_settings_parse_and_cap_capture_at_the_threshold(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    env = learn_sidecar_env("code", 32, LearnOptions(steps=7, interval_s=1.5))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    assert settings.capture.enabled and settings.capture.clusters == ["code"]
    assert settings.capture.samples_per_cluster == 32
    assert settings.auto_distill.enabled and settings.auto_distill.min_samples == 32
    assert (settings.auto_distill.steps, settings.auto_distill.interval_s) == (7, 1.5)


def test_await_drafter_without_a_learn_flow_is_refused() -> None:
    applier = EventApplier(None, None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="learn"):
        applier.apply(TraceEvent(kind="await_drafter", drafter="x-auto", tasks=("x",)))


def test_cli_defaults_match_the_learn_module_and_calibration_is_skipped_when_not_needed() -> None:
    assert (cli.LEARN_POLICIES, cli.LEARN_PER_TASK, cli.LEARN_WEIGHT) == (
        LEARN_POLICIES,
        LEARN_PER_TASK,
        LEARN_WEIGHT,
    )
    assert not needs_calibration(LEARN_POLICIES, None)
    assert not needs_calibration(("none", "generic", "thompson"), 4)
    assert needs_calibration(("none", "generic"), None)
    assert needs_calibration(("none", "static"), 4)


def _distillation(drafter: str | None = "code-auto-1") -> DistillationFigures:
    return DistillationFigures(
        drafter=drafter,
        outcome="registered" if drafter else "refused",
        detail="",
        seconds=120.0,
        wait_seconds=90.0,
        idle_s=(*(0.1,) * 99, 0.2),
        during_s=(*(0.1,) * 99, 0.5),
    )


def test_learn_figures_from_decided_records() -> None:
    # Requests 0-3 are the first half, 4-7 the second; "code" is the learn task.
    tasks = ["code", "chat", "code", "chat", "code", "chat", "code", "chat"]
    baseline = [result(i, t, wall=1.0, tokens=10) for i, t in enumerate(tasks)]
    walls = [0.8, 1.0, 0.8, 0.5, 0.5, 1.25, 0.5, 0.5]  # policy time per request
    drafters = ["generic", "chat", "generic", "chat", "code-auto-1", "chat", "generic", "chat"]
    learner = [
        result(i, t, wall=w, tokens=10, drafter=d)
        for i, (t, w, d) in enumerate(zip(tasks, walls, drafters, strict=True))
    ]
    figures = learn_figures(learner, baseline, "code", 4, {2: 1.8, 4: 2.5}, _distillation())
    assert figures["speedup_before"] == pytest.approx(1.25)  # 20 tokens in 1.6 s vs 2.0 s
    assert figures["speedup_after"] == pytest.approx(2.0)
    assert figures["after_over_before"] == pytest.approx(1.6)
    assert (figures["reference_speedup"], figures["reference_k"]) == (2.5, 4)
    assert figures["after_over_reference"] == pytest.approx(0.8)
    # Per task: first half code 1.25, chat 2 / 1.5 = 1.333; second half code 2.0, chat 1.143.
    assert figures["min_speedup_before"] == pytest.approx(1.25)
    assert figures["min_speedup_after"] == pytest.approx(2 / 1.75)
    assert figures["registered"] is True and figures["adoption_after"] == pytest.approx(0.5)
    assert figures["distill_seconds"] == 120.0
    assert figures["generate_p99_ratio"] == pytest.approx(
        figures["generate_p99_during_ms"] / figures["generate_p99_idle_ms"]
    )
    assert figures["generate_p99_during_ms"] > figures["generate_p99_idle_ms"] > 100.0
    assert json.dumps(figures, allow_nan=False)
    section = "\n".join(learn_markdown({"learn": figures}))
    assert "Learning `code`" in section and "1.600" in section


def test_learn_figures_without_a_drafter_or_a_distillation_stay_finite_or_null() -> None:
    baseline = [result(i, "code", wall=1.0) for i in range(4)]
    figures = learn_figures(
        baseline,
        baseline,
        "code",
        2,
        {},
        DistillationFigures(None, "timeout", "nothing recorded", None, 900.0, (0.1,), ()),
    )
    assert figures["speedup_before"] == figures["speedup_after"] == pytest.approx(1.0)
    assert figures["reference_speedup"] is None and figures["generate_p99_ratio"] is None
    assert figures["registered"] is False and figures["adoption_after"] == 0.0
    assert figures["distill_seconds"] is None
    assert json.dumps(figures, allow_nan=False)


def test_a_run_that_crashed_is_read_from_the_sidecar_log(tmp_path: Path) -> None:
    log = tmp_path / "sidecar.log"
    log.write_text(
        "2026-12-03 INFO router.auto_distill: auto-distillation of code on 38 captured samples\n"
        "2026-12-03 WARNING router.auto_distill: auto-distillation of code discarded after 12 s:"
        " Traceback: boom\n"
    )
    [run] = discarded_runs(log)
    assert (run.cluster, run.outcome, run.seconds, run.detail) == (
        "code",
        "failed",
        12.0,
        "Traceback: boom",
    )
    log.write_text("WARNING router.auto_distill: auto-distillation of code discarded after 0 s: \n")
    [silent] = discarded_runs(log)
    assert silent.detail.startswith("the child exited without output")
    assert discarded_runs(tmp_path / "missing.log") == [] and discarded_runs(None) == []
    assert distillation_runs(tmp_path) == []  # no capture database yet
