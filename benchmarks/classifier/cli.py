"""``specroute bench classifier``: the classifier measured on the built-in world's corpus."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from benchmarks.outputs import writable_file
from classifiers.cli import print_evaluation


def bench_command(
    world: Annotated[
        Path | None,
        typer.Option(
            "--world",
            exists=True,
            file_okay=False,
            help="A built world (default: the default-scale corpus, built in memory).",
        ),
    ] = None,
    json_path: Annotated[
        Path | None, typer.Option("--json", callback=writable_file, help="Write JSON here.")
    ] = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
) -> None:
    """Classifier accuracy, OOD recall, discovery ARI and latency beside scikit-learn."""
    from benchmarks.classifier.bench import run_classifier_bench
    from router.bundle import ModelBundle

    corpus_dir = ModelBundle.load(world).corpus_dir if world is not None else None
    payload: dict[str, Any] = run_classifier_bench(corpus_dir, seed=seed)
    print_evaluation(payload)
    typer.echo(
        f"test false flags {payload['test_false_flags']:.3f}; OOD false flags on test "
        f"(held-out runs) {payload['ood_false_flags_test_mean']:.3f}"
    )
    discovery = payload["discovery"]
    typer.echo(f"discovery: {discovery['clusters_found']} clusters, ARI {discovery['ari']:.3f}")
    typer.echo(
        f"ONNX vs scikit-learn max |dp| {payload['onnx_sklearn_max_abs_diff']:.2e}; "
        f"load average {payload['machine']['load_average_1m']:.2f} "
        f"on {payload['machine']['cpus']} CPUs"
    )
    if json_path:
        json_path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


def register(app: typer.Typer, bench: typer.Typer) -> None:
    """Add ``bench classifier``."""
    bench.command("classifier")(bench_command)
