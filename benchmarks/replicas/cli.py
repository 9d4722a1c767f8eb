"""``specroute bench replicas``: pooled sidecars against isolated ones, and faults."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from benchmarks.outputs import writable_file


def replicas_command(
    json_path: Annotated[
        Path | None,
        typer.Option("--json", callback=writable_file, help="Write the report (JSON) here."),
    ] = None,
    world: Annotated[
        Path | None, typer.Option("--world", help="World directory (default: the default world).")
    ] = None,
    per_task: Annotated[
        int, typer.Option("--per-task", min=3, help="Shared/isolated replay.")
    ] = 100,
    fault_per_task: Annotated[
        int, typer.Option("--fault-per-task", min=12, help="Fault replay (>= 50 to the newcomer).")
    ] = 36,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    cost_hints: Annotated[
        bool,
        typer.Option(
            "--cost-hints/--no-cost-hints",
            help="Seed each replica's draft costs with the world's measured ratios.",
        ),
    ] = True,
) -> None:
    """Three sidecars sharing through Redis vs alone; Redis restart, SIGKILL, a new replica."""
    from benchmarks.replicas.bench import ReplicasConfig, run_replicas_bench, verdicts
    from benchmarks.replicas.redis_server import RedisUnavailableError
    from router.bundle import BundleNotFoundError

    config = ReplicasConfig(
        world_dir=world,
        per_task=per_task,
        fault_per_task=fault_per_task,
        seed=seed,
        cost_hints=cost_hints,
    )
    try:
        report = run_replicas_bench(config)
    except (RedisUnavailableError, BundleNotFoundError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
    text = json.dumps(report, indent=2)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(text + "\n")
    typer.echo(text)
    for line, met in verdicts(report):
        typer.echo(f"{'met' if met else 'NOT met'}: {line}")


def register(app: typer.Typer, bench: typer.Typer) -> None:
    bench.command("replicas")(replicas_command)
