"""``specroute demo``: the product end to end on the built-in world.

Builds the default world if it is not cached, prints its evaluation when one is cached in
the world (``eval.json``: ``specroute world eval``, or ``--eval``), starts a sidecar on
it, replays the built-in uniform multitask trace through the sidecar's gRPC API under each
policy, and prints the per-task speed-up table. The evaluation is not measured by default:
it takes about a minute on two cores and changes no figure of the replay, and the first
``make demo`` (the world built from nothing) is then that much shorter.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from benchmarks.outputs import not_a_file

logger = logging.getLogger(__name__)


def open_or_build_world(world_dir: Path | None, scale: str) -> Any:
    """An existing world directory as it is (whatever its scale), else the cached or newly
    built world of ``scale``."""
    from benchmarks.world.build import build_world
    from router.bundle import ModelBundle, read_manifest

    if world_dir is not None and read_manifest(Path(world_dir)) is not None:
        return ModelBundle.load(Path(world_dir))
    return build_world(world_dir, scale, progress=True)


def register(app: typer.Typer, bench: typer.Typer) -> None:
    """Add the ``demo`` command."""

    @app.command("demo")
    def demo(
        scale: Annotated[str, typer.Option(help="World scale: default or tiny.")] = "default",
        world_dir: Annotated[
            Path | None, typer.Option("--world", help="World directory (built if missing).")
        ] = None,
        per_task: Annotated[
            int,
            typer.Option(
                min=1,
                help="Replayed requests per task of the uniform trace (calibrated on at most "
                "2 prompts per task, and on 1 for --per-task 1).",
            ),
        ] = 10,
        out_dir: Annotated[
            Path,
            typer.Option(
                "--out", callback=not_a_file, help="Where the replay report and plots go."
            ),
        ] = Path("out/demo"),
        evaluation: Annotated[
            bool | None,
            typer.Option(
                "--eval/--no-eval",
                help="Evaluate the world first if it has not been (about a minute), or never "
                "print its evaluation. Default: print it if one is cached.",
            ),
        ] = None,
    ) -> None:
        """Build (or reuse) the world, start a sidecar, replay the mixed trace, print speed-ups."""
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        from benchmarks.replay.runner import format_task_table, run_demo_replay
        from benchmarks.world.build import NotAWorldDirectoryError, UnknownScaleError
        from benchmarks.world.cli import render_evaluation
        from benchmarks.world.evaluate import cached_evaluation, saved_evaluation

        try:
            world = open_or_build_world(world_dir, scale)
        except (NotAWorldDirectoryError, UnknownScaleError) as error:  # as `world build`
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(code=2) from None
        typer.echo(f"world ({world.scale}) at {world.root}")
        if evaluation is not False:
            report = cached_evaluation(world) if evaluation else saved_evaluation(world)
            if report is not None:
                render_evaluation(report)
            else:
                typer.echo(
                    "the world's evaluation (target quality, acceptance): specroute world eval"
                )
        typer.echo("starting a sidecar on the world and replaying the uniform multitask trace")
        report = run_demo_replay(Path(world.root), out_dir, per_task=per_task)
        typer.echo(format_task_table(report))
