"""The fleet benchmark's machinery: configurations, policies, the summary and the refusal
of a world vLLM's CPU build cannot serve."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from benchmarks.fleet.bench import (
    FleetBenchOptions,
    LeastLoaded,
    PolicyRun,
    check_world,
    first_difference,
    fleet_configurations,
    hindsight,
    learnt_choices,
    round_robin,
    summarise,
    warm_up,
)
from benchmarks.fleet.vllm_process import (
    Speculation,
    VllmServer,
    VllmUnavailableError,
    check_servable,
    fleet_toml,
)
from benchmarks.replay.client import ArmPin
from benchmarks.replay.metrics import RequestResult
from benchmarks.replay.trace import TraceRequest
from router.fleet.config import parse_fleet
from tests.conftest import process_alive, wait_gone


def result(
    request_id: str,
    task: str,
    tokens: int,
    wall: float,
    ids: tuple[int, ...],
    drafter: str = "none",
) -> RequestResult:
    return RequestResult(
        index=0,
        request_id=request_id,
        task=task,
        cluster=task,
        drafter=drafter,
        draft_length=0,
        explored=False,
        greedy=True,
        prompt_tokens=5,
        generated_tokens=tokens,
        steps=tokens,
        drafted=0,
        accepted=0,
        wall_time_s=wall,
        output_ids=ids,
    )


def write_config(directory: Path, hidden: int, heads: int) -> Path:
    directory.mkdir(parents=True)
    config = {"hidden_size": hidden, "num_attention_heads": heads}
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def test_configurations_are_none_ngram_generic_and_task_drafters() -> None:
    names = ["generic", "code", "math", "chat"]
    tasks = ["chat", "code", "math"]
    assert fleet_configurations(names, tasks, FleetBenchOptions(task_drafters=2)) == [
        "none",
        "ngram",
        "generic",
        "chat",
        "code",
    ]
    assert fleet_configurations(["code"], ["code"], FleetBenchOptions()) == [
        "none",
        "ngram",
        "code",
    ]


def test_worlds_vllm_cannot_serve_are_refused_in_one_line(tmp_path: Path) -> None:
    check_servable(write_config(tmp_path / "ok", 128, 2))  # head_dim 64
    with pytest.raises(VllmUnavailableError) as refused:
        check_servable(write_config(tmp_path / "v1", 160, 4))  # head_dim 40
    assert "head_dim 40" in str(refused.value) and "\n" not in str(refused.value)

    small = write_config(tmp_path / "small", 64, 2)  # head_dim 32
    world = SimpleNamespace(target_dir=tmp_path / "ok", drafter_dirs={"generic": small})
    with pytest.raises(VllmUnavailableError, match="head_dim 32"):
        check_world(world, ["none", "ngram", "generic"])


def test_first_difference() -> None:
    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert first_difference([1, 2], [1, 2, 3]) == 2


def test_summary_speedups_jain_and_differences() -> None:
    baseline = PolicyRun(
        {
            "a": result("a", "code", 10, 1.0, (1, 2, 3)),
            "b": result("b", "chat", 10, 2.0, (4, 5)),
        }
    )
    run = PolicyRun(
        {
            "a": result("a", "code", 10, 0.5, (1, 2, 3), "code"),
            "b": result("b", "chat", 10, 2.0, (4, 6), "ngram"),
        },
        errors=["c: boom"],
    )
    summary = summarise(run, baseline, {"a": "code", "b": "chat"})
    assert summary["per_task"]["code"]["speedup"] == pytest.approx(2.0)
    assert summary["per_task"]["chat"]["speedup"] == pytest.approx(1.0)
    assert summary["mean_speedup"] == pytest.approx(1.5)
    assert summary["min_speedup"] == pytest.approx(1.0)
    assert summary["jain"] == pytest.approx(9 / (2 * 5))
    assert summary["errors"] == 1
    assert not summary["lossless"]
    assert summary["differences"] == [{"request_id": "b", "task": "chat", "position": 1}]
    assert summary["configurations"] == {"code": 1, "ngram": 1}
    # Each request as served, with its own speed-up over the plain run of its prompt.
    first = summary["requests"][0]
    assert (first["request_id"], first["configuration"], first["generated_tokens"]) == (
        "a",
        "code",
        10,
    )
    assert [r["speedup"] for r in summary["requests"]] == [pytest.approx(2.0), 1.0]
    same = summarise(baseline, baseline, {})
    assert same["lossless"] and same["mean_speedup"] == pytest.approx(1.0)

    summaries = {
        "single:none": same,
        "single:code": {**summary, "lossless": True},
    }
    best = hindsight(summaries, ["none", "code"])
    assert best["per_task"]["code"]["configuration"] == "code"
    assert best["per_task"]["chat"]["configuration"] == "none"  # ties keep the first
    assert best["mean_speedup"] == pytest.approx(1.5)


def test_the_policys_learnt_choices_are_reported_per_context() -> None:
    from router.pb import router_pb2 as pb

    state = pb.PolicyState(
        policy="thompson",
        contexts=[
            pb.ContextState(
                task_cluster="summarization",
                length_bucket=1,
                chosen_drafter="ngram",
                chosen_k=3,
                requests=5,
                arms=[
                    pb.ArmState(
                        drafter="ngram",
                        acceptance_mean=0.61234,
                        best_k=3,
                        expected_speedup=1.2345,
                        decisions=4,
                    )
                ],
            )
        ],
    )
    assert learnt_choices(state) == [
        {
            "cluster": "summarization",
            "length_bucket": 1,
            "requests": 5,
            "chosen": "ngram@3",
            "arms": {
                "ngram": {
                    "acceptance": 0.612,
                    "best_k": 3,
                    "expected_speedup": 1.234,
                    "decisions": 4,
                }
            },
        }
    ]


def test_each_replica_is_warmed_up_by_a_request_nothing_learns_from() -> None:
    sent: list[tuple[str, object, bool]] = []

    class Recorder:  # the one ReplayClient call that replay makes
        def generate(self, request: TraceRequest, *, index: int, pin: Any, no_update: bool) -> Any:
            sent.append((request.id, pin, no_update))
            return SimpleNamespace(drafter=pin.drafter)

    request = TraceRequest(id="x", prompt="p", max_new_tokens=4)
    warm_up(Recorder(), [request], ["none", "ngram", "code"], 3)  # type: ignore[arg-type]
    assert sent == [
        ("x", ArmPin("none", 0), True),
        ("x", ArmPin("ngram", 3), True),
        ("x", ArmPin("code", 3), True),
    ]


def test_round_robin_and_least_loaded_choosers() -> None:
    request = TraceRequest(id="x", prompt="p", max_new_tokens=4)
    chooser = round_robin(["none", "ngram", "code"], 3)
    picked = [chooser(i, request) for i in range(4)]
    assert [(p.drafter, p.draft_length) for p in picked if p] == [
        ("none", 0),
        ("ngram", 3),
        ("code", 3),
        ("none", 0),
    ]
    balancer = LeastLoaded(["none", "ngram"], 3)
    first, second = balancer.choose(0, request), balancer.choose(1, request)
    assert {first.drafter, second.drafter} == {"none", "ngram"}
    balancer.done(first)
    assert balancer.choose(2, request).drafter == first.drafter  # the idle one


def test_fleet_file_for_running_servers_is_valid(tmp_path: Path) -> None:
    servers = [
        VllmServer(tmp_path, Speculation("none"), 8001, tmp_path / "a.log"),
        VllmServer(tmp_path, Speculation("code", 3, tmp_path), 8002, tmp_path / "b.log"),
    ]
    import tomllib

    fleet = parse_fleet(tomllib.loads(fleet_toml(servers, health_interval_s=0.5)))
    assert [(r.url, r.speculative, r.draft_length) for r in fleet.replicas] == [
        ("http://127.0.0.1:8001", "none", 0),
        ("http://127.0.0.1:8002", "code", 3),
    ]
    assert fleet.health_interval_s == 0.5
    assert servers[1].speculation.vllm_config() == {
        "method": "draft_model",
        "model": str(tmp_path),
        "num_speculative_tokens": 3,
    }
    assert Speculation("none").vllm_config() is None


def test_bench_fleet_refuses_a_world_vllm_cannot_serve(tiny_world: Any, tmp_path: Path) -> None:
    """The tiny world's manifest with a target of 40-wide heads (the v1 worlds' shape):
    `specroute bench fleet` stops in one line, status 2, before starting anything."""
    world = tmp_path / "world"
    world.mkdir()
    shutil.copy(Path(tiny_world.root) / "manifest.json", world / "manifest.json")
    manifest = json.loads((world / "manifest.json").read_text())
    write_config(world / manifest["target"], 160, 4)
    done = subprocess.run(
        [sys.executable, "-m", "router.cli", "bench", "fleet", "--world", str(world)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "head_dim 40 cannot be served" in errors[0], done.stderr


STAND_IN = """
import sys, time
from pathlib import Path
from benchmarks.fleet import vllm_process
from benchmarks.fleet.vllm_process import Speculation, VllmServer, vllm_fleet

root = Path(sys.argv[1])
# A stand-in for vllm serve: a static HTTP server whose /health answers 200.
VllmServer.command = lambda self: [
    sys.executable, "-m", "http.server", str(self.port), "--bind", "127.0.0.1",
    "--directory", str(root),
]
vllm_process.check_servable = lambda path: None
with vllm_fleet(root, [Speculation("none")], root / "logs") as servers:
    print(servers[0].process.pid, flush=True)
    while True:
        time.sleep(0.05)
"""


@pytest.mark.timeout(120)
def test_sigterm_to_the_bench_stops_its_replicas(tmp_path: Path) -> None:
    """Each replica runs in its own session: without the handler a bench sent SIGTERM (a
    job scheduler, ``kill``) left them all serving."""
    import signal

    (tmp_path / "health").write_text("ok")
    launcher = subprocess.Popen(
        [sys.executable, "-c", STAND_IN, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert launcher.stdout is not None
        replica = int(launcher.stdout.readline())
        assert process_alive(replica)  # serving
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(timeout=60) != 0
        assert wait_gone([replica], timeout=30), f"replica {replica} still runs after SIGTERM"
    finally:
        if launcher.poll() is None:
            launcher.kill()


def test_a_kill_replica_the_fleet_lacks_is_refused_before_anything_starts(
    tiny_world: Any,
) -> None:
    """A misspelt --kill-replica was a ValueError traceback once every replica and the
    sidecar had started (minutes of vLLM start-up on a CPU)."""
    command = [sys.executable, "-m", "router.cli", "bench", "fleet"]
    done = subprocess.run(
        [*command, "--world", str(tiny_world.root), "--kill-replica", "genric"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert "--kill-replica 'genric' is not a configuration of the fleet" in done.stderr
