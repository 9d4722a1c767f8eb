"""``specroute bench policy`` (the policy simulator: thompson vs ucb, oracle and baselines)
and ``specroute bench select`` (thompson's select latency, ``select_bench.py``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from benchmarks.outputs import writable_file


def register(app: typer.Typer, bench: typer.Typer) -> None:
    """Add ``bench policy`` and ``bench select`` to the ``bench`` group."""

    @bench.command("policy")
    def bench_policy(
        json_path: Annotated[
            Path | None,
            typer.Option("--json", callback=writable_file, help="Write the results here."),
        ] = None,
        requests: Annotated[
            int, typer.Option("--requests", min=100, help="Requests per scenario.")
        ] = 5000,
        seed: Annotated[int, typer.Option("--seed", help="Seed of streams, noise, policies.")] = 0,
        world: Annotated[
            Path | None,
            typer.Option("--world", help="World dir with eval.json (default: the built-in's)."),
        ] = None,
        scenario: Annotated[
            list[str] | None, typer.Option("--scenario", help="Only these scenarios.")
        ] = None,
    ) -> None:
        """Simulate every policy on every scenario; print regret, oracle share, latency."""
        from benchmarks.policy_sim.report import format_table, run_all
        from benchmarks.policy_sim.scenarios import SCENARIO_NAMES

        unknown = [name for name in scenario or () if name not in SCENARIO_NAMES]
        if unknown:  # ran nothing and exited 0
            raise typer.BadParameter(
                f"unknown scenario {unknown[0]!r}; known: {', '.join(SCENARIO_NAMES)}",
                param_hint="--scenario",
            )
        from router.bundle import default_bundle_dir

        world_dir = world if world is not None else default_bundle_dir()
        measure_world_once(world_dir)
        report = run_all(world_dir, requests=requests, seed=seed, only=tuple(scenario or ()))
        typer.echo(f"{report['date']} | {report['machine']} | world: {report['world']}")
        typer.echo(
            "regret: expected target seconds lost vs the oracle; oracle%: last-half share on the "
            "oracle's (drafter, k); k0%: k = 0 share where k = 0 is best; switch / new use: "
            "requests of the affected cluster"
        )
        typer.echo(format_table(report))
        if json_path is not None:
            json_path.parent.mkdir(parents=True, exist_ok=True)
            json_path.write_text(json.dumps(report, indent=2) + "\n")
            typer.echo(f"wrote {json_path}")

    @bench.command("select")
    def bench_select(
        json_path: Annotated[
            Path | None,
            typer.Option("--json", callback=writable_file, help="Write the results here."),
        ] = None,
        selects: Annotated[
            int, typer.Option("--selects", min=100, help="Timed calls of each kind.")
        ] = 20_000,
        seed: Annotated[int, typer.Option("--seed", help="Seed of truth, stream, policy.")] = 0,
    ) -> None:
        """Time thompson's select (8 drafters x k 0..8) beside its 100 us budget."""
        from benchmarks.policy_sim.select_bench import format_result, measure

        result = measure(selects, seed)
        typer.echo(format_result(result))
        if json_path is not None:
            json_path.parent.mkdir(parents=True, exist_ok=True)
            json_path.write_text(json.dumps(result, indent=2) + "\n")
            typer.echo(f"wrote {json_path}")


def measure_world_once(world_dir: Path) -> None:
    """A built world's evaluation, measured and saved once if it has none, so that the
    simulator reads the world's own acceptance matrix whether or not anything evaluated it
    before (a directory without a world: the built-in table)."""
    from router.bundle import ModelBundle, read_manifest

    if read_manifest(world_dir) is None:
        return
    from benchmarks.world.evaluate import cached_evaluation

    cached_evaluation(ModelBundle.load(world_dir))
