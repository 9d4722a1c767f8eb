"""The report from hand-made runs: the fixed JSON keys, the numbers, markdown and plots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.replay.calibration import ArmChoice, Calibration
from benchmarks.replay.metrics import RequestResult
from benchmarks.replay.replay import PolicyRun, PolicySetting
from benchmarks.replay.report import build_report, read_requests, task_table_rows, write_report
from benchmarks.replay.trace import Trace, TraceEvent, TraceRequest
from tests.benchmarks.replay.helpers import result

TASKS = ("a", "b")


def make_trace() -> Trace:
    requests = [
        TraceRequest(id=f"r{i}", task=TASKS[i % 2], prompt="p", max_new_tokens=8) for i in range(4)
    ]
    event = TraceEvent(kind="register_drafter", drafter="x-new", source="x")
    return Trace("toy", (*requests[:2], event, *requests[2:]))


def run(
    label: str,
    walls: list[float],
    drafter: str = "d",
    k: int = 2,
    outputs: list[tuple[int, ...]] | None = None,
) -> PolicyRun:
    drafts = {"steps": 5, "drafted": 10, "accepted": 5} if k else {}
    results: list[RequestResult] = [
        result(
            i,
            TASKS[i % 2],
            w,
            drafter=drafter,
            k=k,
            **drafts,  # type: ignore[arg-type]
            output=(outputs[i] if outputs else (1, 2, 3)),
        )
        for i, w in enumerate(walls)
    ]
    setting = PolicySetting(label, label, learns=label == "thompson")
    return PolicyRun(setting, results, seconds=sum(walls))


@pytest.fixture()
def runs() -> dict[str, PolicyRun]:
    return {
        "none": run("none", [1.0, 1.0, 1.0, 1.0], drafter="none", k=0),
        "generic": run("generic", [0.5, 1.0, 0.5, 1.0]),  # a: 2x, b: 1x
        "thompson": run(
            "thompson",
            [0.5, 0.5, 0.5, 0.8],  # a: 2x, b: 20/1.3
            outputs=[(1, 2, 3), (1, 2, 3), (1, 2, 3), (9,)],
        ),
        "oracle": run("oracle", [0.5, 0.5, 0.5, 0.5]),  # 2x everywhere
    }


def calibration() -> Calibration:
    return Calibration(
        method="hand-made",
        prompts_per_task=1,
        probe_k=4,
        acceptance={"d": {"a": 0.8, "b": 0.4}, "generic": {"a": 0.5, "b": 0.5}},
        oracle={"a": ArmChoice("d", 4, 2.0), "b": ArmChoice("d", 2, 2.0)},
        static={"a": ArmChoice("d", 4, 2.0), "b": ArmChoice("d", 2, 2.0)},
    )


def test_report_json_has_the_issue_keys_and_numbers(runs: dict[str, PolicyRun]) -> None:
    report = build_report(make_trace(), runs, calibration(), address="x:1", world="w")
    assert report["trace"]["tasks"] == {"a": 2, "b": 2}
    assert report["trace"]["event_request_indices"] == [2]
    for label, section in report["policies"].items():
        for key in (
            "per_task",
            "mean_speedup",
            "min_speedup",
            "max_over_min",
            "cv",
            "jain",
            "lossless",
            "fraction_of_oracle",
        ):
            assert key in section, (label, key)
        for task in TASKS:
            assert set(section["per_task"][task]) >= {"speedup", "tokens_per_s", "acceptance"}
    generic = report["policies"]["generic"]
    assert generic["per_task"]["a"]["speedup"] == pytest.approx(2.0)
    assert generic["per_task"]["b"]["speedup"] == pytest.approx(1.0)
    assert generic["mean_speedup"] == pytest.approx(1.5)
    assert generic["max_over_min"] == pytest.approx(2.0)
    assert generic["jain"] == pytest.approx(9 / 10)
    assert generic["fraction_of_oracle"] == pytest.approx(0.75)
    assert generic["regret_s"] == pytest.approx(1.0)
    assert generic["lossless"] is True
    thompson = report["policies"]["thompson"]
    assert thompson["lossless"] is False and thompson["lossless_mismatches"] == ["r3"]
    assert report["policies"]["none"]["per_task"]["a"]["acceptance"] is None
    assert report["oracle_method"] == "hand-made"
    # hindsight: per task the fastest fixed-arm policy (a: generic, b: oracle); it ties the
    # replayed oracle's mean, so the replayed oracle stays the reference.
    hindsight = report["policies"]["oracle-hindsight"]
    assert hindsight["derived"] is True
    assert hindsight["config"] == {"per_task": {"a": "generic", "b": "oracle"}}
    assert hindsight["mean_speedup"] == pytest.approx(2.0)
    assert report["oracle_reference"] == "oracle"


def test_write_report_makes_json_markdown_requests_and_plots(
    runs: dict[str, PolicyRun], tmp_path: Path
) -> None:
    cal = calibration()
    report = build_report(make_trace(), runs, cal)
    path = write_report(report, runs, cal, tmp_path)
    assert json.loads(path.read_text())["policies"]["oracle"]["mean_speedup"] == pytest.approx(2.0)
    markdown = (tmp_path / "report.md").read_text()
    assert "| a | 2 |" in markdown and "speedup_by_task.png" in markdown
    for name in (
        "speedup_by_task",
        "speedup_by_length",
        "acceptance_heatmap",
        "regret",
        "arms_thompson",
    ):
        png = tmp_path / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert read_requests(tmp_path / "requests" / "generic.jsonl") == runs["generic"].results


def test_task_table_has_a_row_per_task_and_the_evenness_rows(runs: dict[str, PolicyRun]) -> None:
    header, rows = task_table_rows(build_report(make_trace(), runs, None))
    assert header == [
        "task",
        "requests",
        "none",
        "generic",
        "thompson",
        "oracle",
        "oracle-hindsight",
    ]
    names = [row[0] for row in rows]
    assert names[:2] == ["a", "b"] and "Jain" in names and names[-1] == "lossless"
    assert rows[-1][2:] == ["yes", "yes", "NO (1 of 4)", "yes", "yes"]


def test_format_task_table_prints_rows_and_where_the_report_is(
    runs: dict[str, PolicyRun], tmp_path: Path
) -> None:
    from benchmarks.replay.runner import format_task_table

    report = build_report(make_trace(), runs, None)
    report["out_dir"] = str(tmp_path)
    text = format_task_table(report)
    lines = text.splitlines()
    assert lines[0].startswith("Replay of 'toy' (4 requests)")
    assert lines[1].split()[:6] == ["task", "requests", "none", "generic", "thompson", "oracle"]
    assert lines[3].split()[:4] == ["a", "2", "1.00x", "2.00x"]
    assert f"{tmp_path}/report.md" in lines[-1]
    # thompson's output differs on one request: the table says what that means.
    assert "SPECROUTE_DTYPE=float32" in lines[-2]
    del runs["thompson"]
    assert "SPECROUTE_DTYPE" not in format_task_table(build_report(make_trace(), runs, None))


def test_calibration_round_trips_through_json() -> None:
    from benchmarks.replay.calibration import calibration_from_json

    cal = calibration()
    cal.arms = {"a": {"d:4": 2.0, "none:0": 1.0}}
    again = calibration_from_json(json.loads(json.dumps(cal.to_json())))
    assert again == cal


def test_rebuild_report_recomputes_the_same_figures(
    runs: dict[str, PolicyRun], tmp_path: Path
) -> None:
    from benchmarks.replay.report import rebuild_report

    cal = calibration()
    original = build_report(make_trace(), runs, cal)
    write_report(original, runs, cal, tmp_path, plots=False)
    rebuilt = rebuild_report(tmp_path, plots=False)
    assert rebuilt["policies"]["generic"]["per_task"] == original["policies"]["generic"]["per_task"]
    assert rebuilt["trace"]["event_request_indices"] == [2]
    assert rebuilt["policies"]["thompson"]["lossless"] is False


def test_a_faster_hindsight_composite_becomes_the_oracle_reference(
    runs: dict[str, PolicyRun],
) -> None:
    slow = dict(runs)
    slow["oracle"] = run("oracle", [1.0, 1.0, 1.0, 1.0])  # calibrated table no better than none
    report = build_report(make_trace(), slow, None)
    assert report["oracle_reference"] == "oracle-hindsight"
    # hindsight: a from generic (2x), b from none/generic (1x): mean 1.5
    assert report["policies"]["oracle-hindsight"]["mean_speedup"] == pytest.approx(1.5)
    assert report["policies"]["generic"]["fraction_of_oracle"] == pytest.approx(1.0)
    assert report["policies"]["oracle"]["fraction_of_oracle"] == pytest.approx(1 / 1.5)
