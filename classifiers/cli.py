"""Commands: ``specroute classifier train|eval``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from classifiers.text import LabeledPrompt

CLASSIFIER_HELP = "Task classifier: train (or discover clusters), evaluate, reload on a sidecar."


def _parse_clusters(value: str | None) -> int | str | None:
    if value is None or value == "auto":
        return value
    try:
        count = int(value)
    except ValueError as error:
        raise typer.BadParameter("--clusters takes 'auto' or a number") from error
    if count < 2:  # 0 was falsy and silently meant "use the labels"
        raise typer.BadParameter("--clusters takes 'auto' or a number of at least 2")
    return count


def _with_discovered_labels(
    prompts: list[LabeledPrompt], clusters: int | str, seed: int
) -> tuple[list[LabeledPrompt], dict[str, object], dict[str, list[str]]]:
    """Replace tasks by discovered cluster names; ARI against the tasks when all had one."""
    from classifiers.discovery import discover_clusters

    try:
        found = discover_clusters([p.text for p in prompts], clusters, seed=seed)
    except ValueError as error:  # a cluster count the data cannot give
        raise typer.BadParameter(str(error), param_hint="--clusters") from None
    summary: dict[str, object] = {
        "clusters": found.k,
        "silhouette_by_k": {str(k): v for k, v in found.silhouette_by_k.items()},
    }
    if all(p.task is not None for p in prompts):
        summary["adjusted_rand_index"] = found.adjusted_rand_index([str(p.task) for p in prompts])
    relabeled = [
        LabeledPrompt(p.text, label) for p, label in zip(prompts, found.labels(), strict=True)
    ]
    terms = {name: list(t) for name, t in zip(found.names, found.top_terms, strict=True)}
    return relabeled, summary, terms


def _read_prompts(path: Path, option: str) -> list[LabeledPrompt]:
    """The prompts of a JSONL file; a file without any is a usage error naming it (an
    empty --data failed deep in training, an empty eval file in numpy, with tracebacks)."""
    from classifiers.text import read_labeled_jsonl

    prompts = read_labeled_jsonl(path)
    if not prompts:
        raise typer.BadParameter(f"{path} holds no prompts", param_hint=option)
    return prompts


def train_command(
    data: Annotated[
        Path,
        typer.Option(
            "--data", exists=True, dir_okay=False, help="JSONL of {text, task?} or corpus Examples."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", file_okay=False, help="Output directory.")],
    validation: Annotated[
        Path | None,
        typer.Option(
            "--validation",
            exists=True,
            dir_okay=False,
            help="Validation JSONL (default: 15% of --data).",
        ),
    ] = None,
    clusters: Annotated[
        str | None,
        typer.Option("--clusters", help="'auto' or N: discover clusters instead of using 'task'."),
    ] = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    false_flag_rate: Annotated[
        float,
        typer.Option(
            "--false-flag-rate",
            min=0.0,
            max=1.0,
            help="Share of known-task prompts flagged OOD.",
        ),
    ] = 0.05,
) -> None:
    """Train the task classifier and export classifier.onnx + classifier.json to --out."""
    from classifiers.train import split_validation, train_classifier

    train = _read_prompts(data, "--data")
    held = _read_prompts(validation, "--validation") if validation else []
    unlabeled = sum(p.task is None for p in [*train, *held])
    asked = _parse_clusters(clusters)
    if asked is None and 0 < unlabeled < len(train) + len(held):
        # One line without "task" switched the whole run to discovery and threw every
        # label away, silently.
        raise typer.BadParameter(
            f"{unlabeled} of {len(train) + len(held)} prompts have no 'task': label them "
            "all, or pass --clusters to discover clusters instead",
            param_hint="--data",
        )
    mode = asked if asked is not None else ("auto" if unlabeled else None)
    discovery, terms = None, None
    if mode is not None:
        relabeled, discovery, terms = _with_discovered_labels([*train, *held], mode, seed)
        train, held = relabeled[: len(train)], relabeled[len(train) :]
        typer.echo(f"discovered {discovery['clusters']} clusters: {', '.join(terms)}")
        if "adjusted_rand_index" in discovery:
            typer.echo(f"adjusted Rand index vs 'task': {discovery['adjusted_rand_index']:.3f}")
    if not held:
        train, held = split_validation(train, 0.15, seed)
    try:
        trained = train_classifier(
            train,
            held,
            seed=seed,
            false_flag_rate=false_flag_rate,
            cluster_terms=terms,
            discovery=discovery,
        )
    except ValueError as error:  # what the data cannot train (one task only, ...)
        raise typer.BadParameter(str(error), param_hint="--data") from None
    trained.save(out)
    meta = trained.metadata
    typer.echo(f"labels: {', '.join(meta.labels)}")
    typer.echo(f"validation accuracy {meta.validation.accuracy:.4f} on {meta.validation.examples}")
    typer.echo(
        f"OOD: top probability < {meta.ood.min_probability:.4f} "
        f"({meta.ood.validation_false_flags:.1%} of validation prompts flagged)"
    )
    typer.echo(f"wrote {out} (version {meta.version})")


def eval_command(
    model: Annotated[Path, typer.Option("--model", exists=True, file_okay=False)],
    data: Annotated[Path, typer.Option("--data", exists=True, dir_okay=False)],
    json_path: Annotated[Path | None, typer.Option("--json", help="Write JSON here.")] = None,
) -> None:
    """Accuracy per task, confusion, OOD recall (tasks the model lacks) and ONNX latency."""
    from classifiers.evaluate import compare_latency, evaluate_classifier
    from classifiers.runtime import OnnxTaskClassifier

    classifier = OnnxTaskClassifier.load(model)
    prompts = _read_prompts(data, "--data")
    try:
        report = evaluate_classifier(classifier, prompts)
    except ValueError as error:  # prompts without a task: nothing to score against
        raise typer.BadParameter(str(error), param_hint="--data") from None
    latency = compare_latency({"onnx": classifier.classify}, [p.text for p in prompts], rounds=1)
    payload = {**report.as_json(), "latency_us": latency["onnx"].as_json()}
    print_evaluation(payload)
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


def print_evaluation(payload: dict[str, Any]) -> None:
    """Print an evaluation: accuracy per task, OOD recall, latency (and scikit-learn's)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"accuracy {payload['accuracy']:.4f}")
    table.add_column("task")
    table.add_column("accuracy", justify="right")
    for task, value in payload["per_task"].items():
        table.add_row(task, f"{value:.3f}")
    console = Console()
    console.print(table)
    if payload.get("ood_recall") is not None:
        console.print(f"OOD recall {payload['ood_recall']:.3f}")
    lat = payload["latency_us"]
    line = f"latency p50 {lat['p50']:.1f} us, p99 {lat['p99']:.1f} us"
    if "sklearn_latency_us" in payload:
        ref = payload["sklearn_latency_us"]
        line += f"   (scikit-learn predict_proba: p50 {ref['p50']:.1f} us, p99 {ref['p99']:.1f} us)"
    console.print(line)


def register(app: typer.Typer, bench: typer.Typer) -> None:
    """Add ``classifier train|eval``, beside the sidecar's ``classifier reload`` when the
    router has created the group."""
    existing = [g.typer_instance for g in app.registered_groups if g.name == "classifier"]
    group = existing[0] if existing and existing[0] is not None else typer.Typer()
    group.command("train")(train_command)
    group.command("eval")(eval_command)
    if not existing:
        app.add_typer(group, name="classifier", help=CLASSIFIER_HELP)
