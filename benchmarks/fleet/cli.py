"""``specroute bench fleet``: specroute in front of a vLLM fleet (benchmarks.fleet.bench)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from benchmarks.outputs import writable_file


def bench_fleet_command(
    json_path: Annotated[
        Path | None, typer.Option("--json", callback=writable_file, help="Write the result here.")
    ] = None,
    world: Annotated[
        Path | None, typer.Option("--world", help="World directory (default: the built-in).")
    ] = None,
    per_task: Annotated[int, typer.Option("--per-task", min=1, help="Requests per task.")] = 8,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1)] = 64,
    draft_length: Annotated[
        int, typer.Option("--k", min=1, help="Draft length of every replica.")
    ] = 3,
    task_drafters: Annotated[int, typer.Option("--task-drafters", min=0)] = 2,
    concurrency: Annotated[int, typer.Option("--concurrency", "-c", min=1)] = 2,
    kill_replica: Annotated[
        str,
        typer.Option(
            "--kill-replica", help="SIGKILL this configuration's replica mid-replay, restart it."
        ),
    ] = "",
    work_dir: Annotated[
        Path | None,
        typer.Option(
            "--work-dir",
            help="Logs, fleet file and the sidecar's state (default: temporary).",
        ),
    ] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
    single_process: Annotated[
        bool,
        typer.Option(
            "--single-process/--vllm-processes",
            help="Each replica in one process (default), or vLLM's own process layout "
            "(its worker busy-waits after each request: on a CPU host the replicas "
            "slow each other).",
        ),
    ] = True,
) -> None:
    """Start vLLM replicas (none, ngram, generic, task drafters) and specroute in front of
    them; replay the uniform trace under each routing policy and compare speed-ups."""
    from benchmarks.fleet.bench import (
        FleetBenchOptions,
        FleetOptionError,
        format_result,
        run_fleet_bench,
    )
    from benchmarks.fleet.vllm_process import VllmUnavailableError
    from router.bundle import default_bundle_dir

    options = FleetBenchOptions(
        per_task=per_task,
        max_new_tokens=max_new_tokens,
        draft_length=draft_length,
        task_drafters=task_drafters,
        concurrency=concurrency,
        kill_replica=kill_replica,
        progress=progress,
        single_process=single_process,
    )
    world_dir = world or default_bundle_dir()
    try:
        if work_dir is not None:
            result = run_fleet_bench(world_dir, work_dir, options)
        else:
            with tempfile.TemporaryDirectory(prefix="specroute-fleet-") as scratch:
                result = run_fleet_bench(world_dir, Path(scratch), options)
    except VllmUnavailableError as error:
        typer.echo(f"error: {str(error).splitlines()[0]}", err=True)
        raise typer.Exit(2) from None
    except FleetOptionError as error:  # an option the world's fleet cannot serve
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
    typer.echo(format_result(result))
    if json_path is not None:
        json_path.write_text(json.dumps(result, indent=2) + "\n")


def register(app: typer.Typer, bench: typer.Typer) -> None:
    bench.command("fleet")(bench_fleet_command)
