"""CLI clients of a running sidecar, and ``bench load`` on a small load."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from benchmarks.load.load_bench import (
    compare_sidecars,
    format_comparison,
    format_result,
    run_load_bench,
)
from router.cli import build_app
from router.server import freeze_startup_heap
from tests.router.conftest import ADMIN_TOKEN, COMPLETION_PROMPT, ServingWorld, SidecarThread


def test_cli_route_generate_drafters_policy(
    sidecar: SidecarThread, serving_world: ServingWorld
) -> None:
    runner = CliRunner()
    app = build_app()
    address = ["--address", sidecar.running.address]

    routed = runner.invoke(app, ["route", serving_world.prompts["math"], *address])
    assert routed.exit_code == 0, routed.output
    assert json.loads(routed.output)["task_cluster"] in serving_world.tasks

    completion = ["generate", COMPLETION_PROMPT, "--raw", "--max-new-tokens", "5"]
    generated = runner.invoke(app, [*completion, "--drafter", "none", *address])
    assert generated.exit_code == 0, generated.output
    assert "5 tokens" in generated.output

    env = {"SPECROUTE_ADMIN_TOKEN": ADMIN_TOKEN}
    register = ["drafters", "register", "cli-spare", str(serving_world.spare_dir), *address]
    register += ["--kind", "copy-or-model", "--option", "model_k=2"]
    assert runner.invoke(app, register, env=env).exit_code == 0
    listed = runner.invoke(app, ["drafters", "list", *address])
    assert "cli-spare" in listed.output and "generic" in listed.output
    # Columns line up whatever the kind's length ("copy-or-model" against "none").
    origins = {
        max(line.find(" builtin "), line.find(" registered "))
        for line in listed.output.splitlines()
    }
    assert len(origins) == 1 and -1 not in origins, listed.output
    refused = runner.invoke(app, ["drafters", "remove", "cli-spare", *address], env={})
    assert refused.exit_code == 1 and "UNAUTHENTICATED" in refused.output
    removed = runner.invoke(app, ["drafters", "remove", "cli-spare", *address], env=env)
    assert removed.exit_code == 0
    assert "cli-spare" not in runner.invoke(app, ["drafters", "list", *address]).output

    lookup = ["drafters", "register", "cli-lookup", "--kind", "ngram", *address]
    added = runner.invoke(app, [*lookup, "--option", "max_n=4", "--option", "min_n=1"], env=env)
    assert added.exit_code == 0, added.output
    try:
        assert sidecar.service.drafters.get("cli-lookup").record.options == {
            "max_n": "4",
            "min_n": "1",
        }
        listed = runner.invoke(app, ["drafters", "list", *address]).output
        assert any(
            line.startswith("cli-lookup") and line.endswith("max_n=4 min_n=1")
            for line in listed.splitlines()
        ), listed
    finally:
        runner.invoke(app, ["drafters", "remove", "cli-lookup", *address], env=env)
    misspelt = runner.invoke(app, [*lookup, "--option", "maxn=4"], env=env)
    assert misspelt.exit_code == 1 and "has no option 'maxn'" in misspelt.output
    malformed = runner.invoke(app, [*lookup, "--option", "max_n"], env=env)
    assert malformed.exit_code == 2 and "KEY=VALUE" in malformed.output

    shown = runner.invoke(app, ["policy", "show", *address])
    assert shown.exit_code == 0 and shown.output.startswith("policy thompson")
    fixed = ["policy", "set", "fixed", "--config", '{"drafter": "generic", "k": 2}', *address]
    refused = runner.invoke(app, fixed, env={})
    assert refused.exit_code == 1 and "UNAUTHENTICATED" in refused.output
    bad = runner.invoke(app, ["policy", "set", "fixed", "--config", "[1]", *address], env=env)
    assert bad.exit_code == 1 and "INVALID_ARGUMENT" in bad.output and "config_json" in bad.output
    try:
        switched = runner.invoke(app, fixed, env=env)
        assert switched.exit_code == 0 and switched.output.startswith("policy fixed"), (
            switched.output
        )
        assert runner.invoke(app, ["policy", "show", *address]).output.startswith("policy fixed")
        routed = runner.invoke(app, ["route", serving_world.prompts["math"], *address])
        decision = json.loads(routed.output)
        assert (decision["drafter"], decision["draft_length"]) == ("generic", 2)
    finally:
        back = runner.invoke(app, ["policy", "set", "thompson", *address], env=env)
    assert back.exit_code == 0 and back.output.startswith("policy thompson"), back.output


def test_cli_classifier_reload(
    sidecar: SidecarThread, serving_world: ServingWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``specroute classifier reload PATH`` (admin) swaps the classifier, PATH relative to
    where it is typed; one refused names the status and the classifier keeps serving."""
    runner, app = CliRunner(), build_app()
    address = ["--address", sidecar.running.address]
    env = {"SPECROUTE_ADMIN_TOKEN": ADMIN_TOKEN}
    monkeypatch.chdir(serving_world.world.root)
    reloaded = runner.invoke(app, ["classifier", "reload", "classifier", *address], env=env)
    assert reloaded.exit_code == 0, reloaded.output
    info = json.loads(reloaded.output)
    assert info["path"] == str((serving_world.world.root / "classifier").resolve())
    assert set(info["labels"]) >= set(serving_world.tasks)
    unauthenticated = runner.invoke(app, ["classifier", "reload", "classifier", *address])
    assert unauthenticated.exit_code == 1 and "UNAUTHENTICATED" in unauthenticated.output
    outside = runner.invoke(app, ["classifier", "reload", "/", *address], env=env)
    assert outside.exit_code == 1 and "PERMISSION_DENIED" in outside.output, outside.output
    routed = runner.invoke(app, ["route", serving_world.prompts["math"], *address])
    assert json.loads(routed.output)["task_cluster"] in serving_world.tasks


def test_bench_load_reports_every_key(sidecar: SidecarThread, tmp_path: Path) -> None:
    result = run_load_bench(sidecar.running.address, requests=120, concurrency=8)
    for key in ("requests", "errors", "rps", "echo_rps", "latency_ms", "latency_c1_ms", "rss_mb"):
        assert key in result
    assert result["requests"] == 120 and result["errors"] == 0
    assert result["rps"] > 0 and result["echo_rps"] > 0
    assert set(result["latency_ms"]) == {"p50", "p99"} == set(result["latency_c1_ms"])
    assert result["latency_c1_ms"]["p50"] <= result["latency_c1_ms"]["p99"]
    assert result["rss_mb"]["before"] > 0  # the sidecar's pid was found from its port
    assert "echo ceiling" in format_result(result)
    json.dumps(result)  # JSON-ready


def test_bench_load_compare_interleaves_rounds_beside_echo(sidecar: SidecarThread) -> None:
    address = sidecar.running.address
    result = compare_sidecars([address], rounds=2, requests=40, concurrency=4)
    runs = result["sidecars"][address]
    assert len(runs["rps"]) == len(runs["echo_rps"]) == len(runs["ratio"]) == 2
    assert all(r > 0 for r in runs["rps"]) and sum(runs["errors"]) == 0
    for ratio, rps, echo in zip(runs["ratio"], runs["rps"], runs["echo_rps"], strict=True):
        assert abs(ratio - rps / echo) < 0.01
    assert address in format_comparison(result)


def test_bench_load_compare_with_the_floor_servicer(
    sidecar: SidecarThread, serving_world: ServingWorld
) -> None:
    """The floor servicer (echo + the route process's tokenizer and classifier work)
    answers every call at concurrency 1 and above, beside the sidecar."""
    address = sidecar.running.address
    for concurrency in (1, 4):
        result = compare_sidecars(
            [address],
            rounds=1,
            requests=30,
            concurrency=concurrency,
            floor_world=serving_world.world.root,
        )
        floor = result["sidecars"]["floor"]
        assert floor["errors"] == [0] and floor["rps"][0] > 0
        assert floor["median_p50_ms"] > 0 and floor["median_echo_p50_ms"] > 0
        assert "floor: Route/s" in format_comparison(result)


def test_floor_servicer_without_a_world_fails_clearly(
    sidecar: SidecarThread, tmp_path: Path
) -> None:
    with pytest.raises(RuntimeError, match="floor servicer did not start"):
        compare_sidecars([sidecar.running.address], rounds=1, requests=5, floor_world=tmp_path)


def test_bench_load_compare_refuses_clearly(tmp_path: Path) -> None:
    """No world for the floor: exit 2 naming it; no sidecar at the address: exit 1 with
    the gRPC status, not a traceback."""
    runner = CliRunner()
    app = build_app()
    compare = ["bench", "load-compare", "--address", "127.0.0.1:1", "--rounds", "1", "-n", "5"]
    no_world = runner.invoke(app, [*compare, "--floor", "--world", str(tmp_path)])
    assert no_world.exit_code == 2 and "no world at" in no_world.output
    unreachable = runner.invoke(app, compare)
    assert unreachable.exit_code == 1 and "UNAVAILABLE" in unreachable.output


def test_freeze_startup_heap_moves_live_objects_out_of_the_collector() -> None:
    kept = [[index] for index in range(1000)]  # lists: objects the collector tracks
    try:
        freeze_startup_heap()
        assert gc.get_freeze_count() >= len(kept)
    finally:
        gc.unfreeze()


def test_an_unreadable_fd_skips_that_fd_not_the_whole_process(tmp_path: Path) -> None:
    """An fd closed between listing /proc/<pid>/fd and reading its link (here: an entry
    that is no link) must not hide the process's other fds: the bench once lost the
    sidecar's pid that way (rss "nan")."""
    from benchmarks.load.load_bench import _socket_links

    fds = tmp_path / "4242" / "fd"
    fds.mkdir(parents=True)
    (fds / "3").write_text("")  # os.readlink raises OSError on it
    (fds / "7").symlink_to("socket:[123456]")

    assert _socket_links(tmp_path / "4242") == {"socket:[123456]"}
    assert _socket_links(tmp_path / "missing") == set()


@pytest.mark.parametrize(
    "command",
    [
        ["world", "eval", "--world", "{missing}"],
        ["bench", "engine", "--world", "{missing}"],
        ["world", "build", "--scale", "enormous", "--out", "{missing}"],
    ],
)
def test_a_missing_world_or_scale_is_one_line_and_exit_2(
    tmp_path: Path, command: list[str]
) -> None:
    """These printed a traceback (BundleNotFoundError, ValueError) before."""
    import subprocess
    import sys

    missing = str(tmp_path / "nowhere")
    argv = [sys.executable, "-m", "router.cli", *(a.format(missing=missing) for a in command)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: ") and len(done.stderr.splitlines()) == 1, done.stderr
    assert not (tmp_path / "nowhere").exists()


def test_a_registered_drafters_sample_is_read_as_distillation_writes_it(
    sidecar: SidecarThread, serving_world: ServingWorld, tmp_path: Path
) -> None:
    """``--sample finetune_sample.jsonl`` stored each JSON line as a prompt, braces and
    all; and a model directory registered without ``--sample`` gave its own
    finetune_sample.jsonl no say, where the world's drafters and ``drafter_dirs`` read it."""
    import shutil

    runner, app = CliRunner(), build_app()
    address = ["--address", sidecar.running.address]
    env = {"SPECROUTE_ADMIN_TOKEN": ADMIN_TOKEN}
    directory = serving_world.extra_root / "sampled"
    shutil.copytree(serving_world.spare_dir, directory, dirs_exist_ok=True)
    (directory / "finetune_sample.jsonl").write_text(
        json.dumps({"task": "math", "text": "What is 2 + 2?"}) + "\n" + json.dumps("Add 3.") + "\n"
    )
    sample = tmp_path / "chosen.jsonl"
    sample.write_text(json.dumps({"task": "math", "text": "Halve 10."}) + "\n")
    plain = tmp_path / "chosen.txt"
    plain.write_text('{"a line": "as it is"}\n')
    cases = [(["--sample", str(sample)], ("Halve 10.",)), ([], ("What is 2 + 2?", "Add 3."))]
    cases.append((["--sample", str(plain)], ('{"a line": "as it is"}',)))
    # More than a drafter keeps: the first 64, said (the sidecar refuses more); blank lines
    # were sent as empty prompts.
    many = tmp_path / "many.txt"
    many.write_text("\n\n".join(f"prompt {i}" for i in range(70)) + "\n")
    cases.append((["--sample", str(many)], tuple(f"prompt {i}" for i in range(64))))
    for flags, expected in cases:
        register = ["drafters", "register", "sampled", str(directory), *address, *flags]
        added = runner.invoke(app, register, env=env)
        assert added.exit_code == 0, added.output
        if flags and flags[1] == str(many):
            assert "holds 70 texts; the first 64 are sent" in added.output
        try:
            record = sidecar.service.drafters.get("sampled").record
            assert record.finetune_sample == expected
        finally:
            runner.invoke(app, ["drafters", "remove", "sampled", *address], env=env)
