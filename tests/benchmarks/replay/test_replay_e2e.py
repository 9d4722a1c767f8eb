"""A small replay end to end: the tiny world, a real sidecar (``specroute serve`` subprocess),
every policy through gRPC Generate, lossless outputs and the report's keys."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks.replay.background import BackgroundLoadConfig
from benchmarks.replay.builtin import TraceOptions
from benchmarks.replay.calibration import CalibrationOptions
from benchmarks.replay.runner import ReplayConfig, ReplayOutcome, format_task_table, run_replay

POLICIES = ("none", "generic", "static", "thompson", "oracle")
SMALL_TRACE = TraceOptions(per_task=2, max_new_tokens_cap=24)
SMALL_CALIBRATION = CalibrationOptions(
    prompts_per_task=1, k_grid=(2, 4), top_drafters=1, warmup_requests=1, progress=False
)


@pytest.fixture(scope="module")
def outcome(tiny_world: Any, tmp_path_factory: pytest.TempPathFactory) -> ReplayOutcome:
    config = ReplayConfig(
        trace="uniform",
        out_dir=tmp_path_factory.mktemp("replay") / "uniform",
        policies=POLICIES,
        world_dir=Path(tiny_world.root),
        trace_options=SMALL_TRACE,
        calibration=SMALL_CALIBRATION,
        progress=False,
        # A light load while the policies replay: the report must say it ran.
        background=BackgroundLoadConfig("bursty", 1, seed=5, spell_s=(0.05, 0.1)),
    )
    return run_replay(config)


def test_every_policy_is_lossless_and_reported(outcome: ReplayOutcome, tiny_world: Any) -> None:
    report = json.loads(outcome.report_path.read_text())
    assert list(report["policies"]) == [*POLICIES, "oracle-hindsight"]
    tasks = set(tiny_world.tasks)
    for label, section in report["policies"].items():
        assert section["lossless"] is True, (label, section["lossless_mismatches"])
        assert set(section["per_task"]) == tasks
        for row in section["per_task"].values():
            assert row["speedup"] > 0 and row["tokens_per_s"] > 0
        for key in (
            "mean_speedup",
            "min_speedup",
            "max_over_min",
            "cv",
            "jain",
            "fraction_of_oracle",
        ):
            assert key in section
    assert report["policies"]["none"]["mean_speedup"] == pytest.approx(1.0)
    reference = report["oracle_reference"]
    assert reference in ("oracle", "oracle-hindsight")
    assert report["policies"][reference]["fraction_of_oracle"] == pytest.approx(1.0)
    assert (
        report["policies"]["oracle-hindsight"]["mean_speedup"]
        >= max(report["policies"][p]["mean_speedup"] for p in ("none", "generic", "static")) - 1e-6
    )
    folder = outcome.report_path.parent
    for name in (
        "report.md",
        "speedup_by_task.png",
        "acceptance_heatmap.png",
        "regret.png",
        "arms_thompson.png",
        "requests/thompson.jsonl",
    ):
        assert (folder / name).is_file(), name


def test_outputs_are_real_generations_identical_across_policies(outcome: ReplayOutcome) -> None:
    baseline = {r.request_id: r for r in outcome.runs["none"].results}
    assert len(baseline) == len(outcome.trace.requests)
    assert any(r.generated_tokens > 1 for r in baseline.values())
    for label, run in outcome.runs.items():
        for result in run.results:
            assert result.output_ids == baseline[result.request_id].output_ids, label
            assert len(result.output_ids) == result.generated_tokens


def test_policies_played_the_arms_they_were_set_to(outcome: ReplayOutcome) -> None:
    assert {(r.drafter, r.draft_length) for r in outcome.runs["none"].results} == {("none", 0)}
    assert all(r.drafted == 0 for r in outcome.runs["none"].results)
    generic_k = outcome.calibration.generic_k
    assert {(r.drafter, r.draft_length) for r in outcome.runs["generic"].results} == {
        ("generic", generic_k)
    }
    oracle = outcome.calibration.oracle
    for result in outcome.runs["oracle"].results:
        if result.cluster in oracle:
            choice = oracle[result.cluster]
            expected = ("none", 0) if choice.k == 0 else (choice.drafter, choice.k)
            assert (result.drafter, result.draft_length) == expected
    versions = [r.policy_version for r in outcome.runs["thompson"].results]
    assert versions[-1] > versions[0]  # the learning policy was updated by the replay


def test_task_table_lists_every_task(outcome: ReplayOutcome, tiny_world: Any) -> None:
    text = format_task_table(outcome.report)
    for task in tiny_world.tasks:
        assert any(line.split()[:1] == [task] for line in text.splitlines())
    assert "report.md" in text


def test_the_report_says_which_background_load_ran(outcome: ReplayOutcome) -> None:
    load = json.loads(outcome.report_path.read_text())["background_load"]
    assert (load["mode"], load["procs"], load["seed"]) == ("bursty", 1, 5)
    assert load["seconds"] > 0 and len(load["busy_s"]) == 1 and load["busy_s"][0] > 0
    line = "background load: bursty, 1 process, spells 0.05-0.1 s, seed 5"
    assert line in format_task_table(outcome.report).splitlines()[0]
    assert line in (outcome.report_path.parent / "report.md").read_text()


def test_new_drafter_trace_withholds_then_registers_it_sequentially(
    tiny_world: Any, tmp_path: Path
) -> None:
    config = ReplayConfig(
        trace="new-drafter",
        out_dir=tmp_path / "new-drafter",
        policies=("none", "thompson"),
        world_dir=Path(tiny_world.root),
        trace_options=TraceOptions(per_task=1, max_new_tokens_cap=16),
        calibration=SMALL_CALIBRATION,
        schedule="sequential",  # each run registers code-new half-way, then removes it
        progress=False,
        plots=False,
    )
    outcome = run_replay(config)
    removed, registered = outcome.trace.events
    assert (removed.kind, registered.kind) == ("remove_drafter", "register_drafter")
    assert removed.drafter not in outcome.calibration.probe_speedup  # not served at start
    for run in outcome.runs.values():
        assert all(r.drafter != removed.drafter for r in run.results)
    assert all(section["lossless"] for section in outcome.report["policies"].values())
    assert outcome.report["trace"]["event_request_indices"] == [0, len(outcome.trace.requests) // 2]


def test_a_sidecar_replayed_against_serves_its_own_policy_again(
    tiny_world: Any, tmp_path: Path
) -> None:
    """A replay through --address left the sidecar serving the last policy it replayed
    (`none` by default: plain decoding for all its traffic)."""
    import grpc

    from benchmarks.replay.client import ReplayClient, RequestRefusedError
    from benchmarks.replay.replay import PolicySetting, replay_policies
    from benchmarks.replay.trace import TraceRequest, parse_trace_lines
    from router.launch import launch_sidecar

    trace = parse_trace_lines(['{"id": "a", "prompt": "2 + 2 =", "max_new_tokens": 4}'], name="t")
    with (
        launch_sidecar(tiny_world.root, admin_token="tok", http=False, metrics=False) as sidecar,
        ReplayClient(sidecar.grpc_address, "tok") as client,
    ):
        assert client.policy_state().policy == "thompson"
        runs = replay_policies(client, trace, [PolicySetting("none", "none")], progress=False)
        assert [r.generated_tokens for r in runs["none"].results] == [4]
        assert client.policy_state().policy == "thompson"
        # A request the sidecar refuses is named: the replay stopped on "the prompt has
        # 1190 tokens, over the limit of 1024" without saying which request.
        long = TraceRequest(id="long-1", task="qa", prompt="word " * 3000, max_new_tokens=4)
        with pytest.raises(RequestRefusedError) as refused:
            client.generate(long)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert refused.value.details().startswith("trace request 'long-1' (task qa): the prompt")
