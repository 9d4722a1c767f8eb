"""``specroute demo``: build the default world if it is not cached, then print its evaluation."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer, bench: typer.Typer) -> None:
    """Add the ``demo`` command."""

    @app.command("demo")
    def demo(
        scale: Annotated[str, typer.Option(help="World scale: default or tiny.")] = "default",
        world_dir: Annotated[
            Path | None, typer.Option("--world", help="World directory (built if missing).")
        ] = None,
        json_path: Annotated[
            Path | None, typer.Option("--json", help="Also write the evaluation report here.")
        ] = None,
    ) -> None:
        """Build (or reuse) the built-in world and print its evaluation."""
        import json

        from benchmarks.world.build import build_world
        from benchmarks.world.cli import render_evaluation
        from benchmarks.world.evaluate import evaluate_world

        world = build_world(world_dir, scale, progress=True)
        typer.echo(f"world ({world.scale}) at {world.root}")
        report = evaluate_world(world)
        render_evaluation(report)
        if json_path is not None:
            json_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
