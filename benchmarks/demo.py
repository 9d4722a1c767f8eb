"""``specroute demo``: the product end to end on the built-in world.

Builds the default world if it is not cached, prints its evaluation (cached in the world
as ``eval.json``), starts a sidecar on it, replays the built-in uniform multitask trace
through the sidecar's gRPC API under each policy, and prints the per-task speed-up table.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer

logger = logging.getLogger(__name__)

EVAL_FILE = "eval.json"


def cached_evaluation(world: Any) -> dict[str, Any]:
    """The world's evaluation report: read from ``<world>/eval.json``, else measured and saved.

    The world directory is immutable once built (its config hash names its contents), so the
    evaluation of a world is computed once; the policy simulator reads the same file.
    """
    from benchmarks.world.evaluate import evaluate_world

    path = Path(world.root) / EVAL_FILE
    if path.is_file():
        try:
            report: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
            if report.get("tasks"):
                return report
        except json.JSONDecodeError:
            logger.warning("ignoring unreadable %s; evaluating again", path)
    report = evaluate_world(world)
    write_json_atomic(path, report)
    return report


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temporary file beside ``path`` and rename it into place."""
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(handle, "w", encoding="utf-8") as stream:
        json.dump(data, stream, indent=2)
        stream.write("\n")
    os.replace(temporary, path)


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
            int, typer.Option(min=1, help="Replayed requests per task of the uniform trace.")
        ] = 10,
        out_dir: Annotated[
            Path, typer.Option("--out", help="Where the replay report and plots go.")
        ] = Path("out/demo"),
        skip_eval: Annotated[
            bool, typer.Option("--skip-eval", help="Do not print the world's evaluation.")
        ] = False,
    ) -> None:
        """Build (or reuse) the world, start a sidecar, replay the mixed trace, print speed-ups."""
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        from benchmarks.replay.runner import format_task_table, run_demo_replay
        from benchmarks.world.cli import render_evaluation

        world = open_or_build_world(world_dir, scale)
        typer.echo(f"world ({world.scale}) at {world.root}")
        if not skip_eval:
            render_evaluation(cached_evaluation(world))
        typer.echo("starting a sidecar on the world and replaying the uniform multitask trace")
        report = run_demo_replay(Path(world.root), out_dir, per_task=per_task)
        typer.echo(format_task_table(report))
