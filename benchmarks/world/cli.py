"""``specroute world build`` and ``specroute world eval``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from benchmarks.outputs import writable_file

# With 2 shared cores, OpenMP threads that spin while waiting slow training 5-10x under
# load; passive waiting must be chosen before torch (libgomp) is loaded.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# The world's goals (docs/world.md): target quality on its task metric, and answers of
# realistic length, in generated tokens per test prompt.
QUALITY_GOAL = 0.6
LONG_ANSWER_TOKENS = 48


def render_evaluation(report: dict[str, Any]) -> None:
    """Print the evaluation report as tables (CLI output)."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    tasks = report["tasks"]
    quality = Table(title=f"Target quality on the held-out test split ({report['scale']} world)")
    for column in ("task", "metric", "quality", "n", "output tokens", f">= {QUALITY_GOAL}"):
        quality.add_column(column)
    output_tokens = report.get("output_tokens", {})
    for task in tasks:
        value = report["target_quality"][task]
        quality.add_row(
            task,
            report["quality_metric"][task],
            f"{value:.3f}",
            str(report["test_examples"][task]),
            f"{output_tokens[task]:.1f}" if task in output_tokens else "-",
            "yes" if value >= QUALITY_GOAL else "no",
        )
    console.print(quality)
    passing = sum(report["target_quality"][t] >= QUALITY_GOAL for t in tasks)
    console.print(f"tasks with target quality >= {QUALITY_GOAL}: {passing} of {len(tasks)}")
    if output_tokens:
        long_answers = sum(output_tokens[t] >= LONG_ANSWER_TOKENS for t in tasks)
        console.print(
            f"tasks averaging >= {LONG_ANSWER_TOKENS} generated tokens "
            f"(max_new_tokens {report.get('max_new_tokens')}): {long_answers} of {len(tasks)}"
        )

    k = report["draft_length"]
    for key, title in (
        ("acceptance", f"Per-token acceptance (greedy, k={k}), drafter x task"),
        ("accepted_per_step", f"Mean accepted draft tokens per step (greedy, k={k})"),
    ):
        matrix = Table(title=title)
        matrix.add_column("drafter")
        for task in tasks:
            matrix.add_column(task[:5])
        for name in report["drafters"]:
            matrix.add_row(name, *(f"{report[key][name][t]:.2f}" for t in tasks))
        console.print(matrix)
    margins = Table(title="Task drafter minus generic drafter on its own task (acceptance)")
    for task in tasks:
        margins.add_column(task[:5])
    margins.add_row(*(f"{report['task_drafter_margin'][t]:+.2f}" for t in tasks))
    console.print(margins)
    wins = sum(report["task_drafter_margin"][t] > 0 for t in tasks)
    console.print(f"task drafters beating generic on their own task: {wins} of {len(tasks)}")
    spread = report["generic_unevenness"]
    console.print(
        "generic drafter acceptance across tasks: "
        f"min {spread['min']:.2f}, max {spread['max']:.2f}, "
        f"max/min {spread['max_over_min']:.2f}, CV {spread['coefficient_of_variation']:.2f}, "
        f"Jain {spread['jain_index']:.3f}"
    )
    steps = report["decode_step_ms"]
    params = report["parameters"]
    console.print(
        f"decode step (batch 1, cached, this CPU, shared and noisy): target "
        f"{steps['target']:.2f} ms ({params['target'] / 1e6:.2f}M params) vs drafter "
        f"{steps['drafter_median']:.2f} ms ({params['drafter'] / 1e6:.2f}M params): "
        f"ratio {steps['target_over_drafter']:.1f}x"
    )
    if "head_dim" in report:
        heads = report["head_dim"]
        console.print(
            f"head_dim: target {heads['target']}, drafters "
            + ", ".join(f"{n} {d}" for n, d in heads["drafters"].items())
        )
    if report.get("build_seconds") is not None:
        console.print(f"world built in {report['build_seconds']:.0f} s")
    console.print(f"evaluation took {report['eval_seconds']:.0f} s")


def register(app: typer.Typer, bench: typer.Typer) -> None:
    """Add the ``world`` command group."""
    world_app = typer.Typer(help="The built-in multitask world: corpus, target and drafters.")
    app.add_typer(world_app, name="world")

    @world_app.command("build")
    def build(
        scale: Annotated[str, typer.Option(help="tiny (tests, < 1 min) or default.")] = "default",
        out: Annotated[
            Path | None, typer.Option(help="Directory (default $SPECROUTE_HOME/worlds/<scale>).")
        ] = None,
        force: Annotated[
            bool, typer.Option(help="Rebuild even when the cached world is current.")
        ] = False,
    ) -> None:
        """Build the world (cached: returns at once when already built from this config)."""
        from benchmarks.world.build import NotAWorldDirectoryError, UnknownScaleError, build_world

        try:
            world = build_world(out, scale, progress=True, force=force)
        except (NotAWorldDirectoryError, UnknownScaleError) as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(code=2) from exc
        timings = world.manifest.get("timings", {})
        typer.echo(f"world ({world.scale}) at {world.root}")
        seconds = world.manifest.get("build_seconds", timings.get("total_s"))
        if seconds is not None:
            typer.echo(f"built in {seconds:.0f} s at {world.manifest['built_at']}")

    @world_app.command("eval")
    def evaluate(
        world_dir: Annotated[
            Path | None, typer.Option("--world", help="A built world directory.")
        ] = None,
        scale: Annotated[
            str, typer.Option(help="Which default world, when --world is not given.")
        ] = "default",
        json_path: Annotated[
            Path | None,
            typer.Option("--json", callback=writable_file, help="Also write the report here."),
        ] = None,
        limit: Annotated[
            int | None, typer.Option(min=1, help="At most this many test prompts per task.")
        ] = None,
    ) -> None:
        """Evaluate a world: target quality, acceptance matrix (k=4, greedy), step times.
        A full evaluation (no --limit) is also saved in the world as eval.json, which the
        demo prints and the policy simulator reads."""
        from benchmarks.world.evaluate import evaluate_world, save_evaluation
        from router.bundle import ModelBundle, default_bundle_dir

        world = ModelBundle.load(world_dir or default_bundle_dir(scale))
        report = evaluate_world(world, limit=limit)
        if limit is None:
            save_evaluation(world, report)
        render_evaluation(report)
        if json_path is not None:
            json_path.parent.mkdir(parents=True, exist_ok=True)
            json_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
            typer.echo(f"report written to {json_path}")
