"""Commands contributed to the ``specroute`` CLI: ``specroute bench engine``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from benchmarks.outputs import writable_file


def render_engine_report(report: dict[str, Any]) -> None:
    """Print the per-task table of ``specroute bench engine``."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"specroute bench engine — {report['date']} — {report['machine']}")
    for column in (
        "task",
        "plain tok/s",
        "hf plain tok/s",
        "best (drafter, k)",
        "speed-up",
        "e2e",
        "a",
        "S(a,k)",
        "efficiency",
        "tok/s",
        "vs hf @best",
        "min vs hf",
        "mismatches",
    ):
        table.add_column(
            column, justify="left" if column in ("task", "best (drafter, k)") else "right"
        )

    def fmt(value: float | None, pattern: str = "{:.2f}") -> str:
        return "-" if value is None else pattern.format(value)

    for task, row in report["tasks"].items():
        best = row["best"]
        best_row = next(
            r
            for r in row["configurations"]
            if (r["drafter"], r["k"]) == (best["drafter"], best["k"])
        )
        table.add_row(
            task,
            fmt(row["ar_tokens_per_s"], "{:.1f}"),
            fmt(row["transformers_ar_tokens_per_s"], "{:.1f}"),
            f"{best['drafter']}, {best['k']}",
            fmt(best["speedup"]) + "x",
            fmt(best["speedup_end_to_end"]) + "x",
            fmt(best["acceptance"]),
            fmt(best["analytical_speedup"]) + "x",
            fmt(best["efficiency"]),
            fmt(best_row["tokens_per_s"], "{:.1f}"),
            fmt(row["vs_transformers"]),
            fmt(row["min_vs_transformers"]),
            str(row["mismatches"]),
        )
    console = Console(width=200)
    console.print(table)
    settings = report["settings"]
    lossless = report["lossless"]
    console.print(
        f"lossless: {lossless['outputs_compared']} greedy outputs on {lossless['prompts']} "
        f"prompts compared with the target's own generate(): {lossless['mismatches']} differ"
        + (
            f" (largest top-2 logit gap at a difference: "
            f"{lossless['max_top2_logit_gap_at_mismatch']:.2e})"
            if lossless["mismatches"]
            else ""
        )
    )
    console.print(
        f"{settings['prompts_per_task']} held-out prompts per task, greedy, "
        f"max_new_tokens={settings['max_new_tokens']}, k=1..{settings['k_max']}; speed-up: per "
        "output token after the target's prefill (e2e: tokens/s including it); "
        f"wall time {report['wall_time_s']:.0f} s"
    )


def register(app: typer.Typer, bench: typer.Typer) -> None:
    """Add ``specroute bench engine``."""

    @bench.command("engine")
    def bench_engine_command(
        world: Annotated[
            Path | None, typer.Option(help="World directory (default: the built-in default world)")
        ] = None,
        tasks: Annotated[
            list[str] | None, typer.Option(help="Tasks to run (repeat or comma-separate)")
        ] = None,
        k_max: Annotated[int, typer.Option(min=1, help="Draft lengths 1..k_max")] = 8,
        prompts: Annotated[int, typer.Option(min=1, help="Held-out prompts per task")] = 8,
        max_new_tokens: Annotated[
            int, typer.Option(min=1, help="Tokens generated per prompt")
        ] = 64,
        threads: Annotated[
            int,
            typer.Option(min=1, help="torch CPU threads (1 is fastest for the built-in models)"),
        ] = 1,
        transformers_everywhere: Annotated[
            bool,
            typer.Option(
                help="Run transformers at every (drafter, k), not only at our best (slow)"
            ),
        ] = False,
        json_path: Annotated[
            Path | None,
            typer.Option("--json", callback=writable_file, help="Write the report here"),
        ] = None,
    ) -> None:
        """Our engine vs plain decoding vs transformers' assisted generation, per task."""
        import torch

        from benchmarks.engine.bench import bench_engine
        from router.bundle import ModelBundle, default_bundle_dir

        torch.set_num_threads(threads)
        loaded = ModelBundle.load(world or default_bundle_dir())
        chosen = [t for item in tasks or [] for t in item.split(",") if t] or None
        unknown = sorted(set(chosen or ()) - set(loaded.tasks))
        if unknown:  # it was a traceback once the models had loaded
            raise typer.BadParameter(
                f"{', '.join(unknown)}: not a task of this world ({', '.join(loaded.tasks)})",
                param_hint="--tasks",
            )
        report = bench_engine(
            loaded,
            tasks=chosen,
            k_max=k_max,
            prompts_per_task=prompts,
            max_new_tokens=max_new_tokens,
            transformers_everywhere=transformers_everywhere,
        )
        render_engine_report(report)
        if json_path is not None:
            json_path.parent.mkdir(parents=True, exist_ok=True)
            json_path.write_text(json.dumps(report, indent=2) + "\n")
            typer.echo(f"wrote {json_path}")


def main() -> None:
    """``python -m benchmarks.engine.cli [OPTIONS]``: ``bench engine`` alone, from a source
    tree that was never installed (the device check runs it so)."""
    app = typer.Typer(add_completion=False)
    register(app, app)
    app()


if __name__ == "__main__":
    main()
