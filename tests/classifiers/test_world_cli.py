"""The world classifier cache, the CLI commands and the bench on a tiny real corpus."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from benchmarks.classifier.bench import run_classifier_bench
from classifiers import OnnxTaskClassifier, ensure_world_classifier
from classifiers.metadata import ClassifierMetadata
from classifiers.text import DataFileError, LabeledPrompt
from router.cli import build_app
from tests.classifiers.conftest import FAST_GRID
from tests.classifiers.synthetic import synthetic_prompts

BENCH_KEYS = {"accuracy", "per_task", "ood_recall", "latency_us", "sklearn_latency_us"}


@pytest.fixture(scope="module")
def corpus_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding only the tiny world corpus (``corpus/<split>.jsonl``)."""
    from benchmarks.world.corpus import build_corpus

    root = tmp_path_factory.mktemp("corpus_world")
    corpus = build_corpus(0, "tiny")
    (root / "corpus").mkdir()
    for split in ("train", "validation", "test"):
        lines = [
            json.dumps({"task": e.task, "messages": list(e.messages)}) for e in corpus.split(split)
        ]
        (root / "corpus" / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_world_classifier_is_trained_once_then_cached(corpus_world: Path) -> None:
    directory = ensure_world_classifier(corpus_world, corpus_world / "corpus", seed=0)
    assert directory == corpus_world / "classifier"
    classifier = OnnxTaskClassifier.load(directory)
    assert set(classifier.labels) == {
        "chat",
        "translation",
        "summarization",
        "qa",
        "math",
        "rag",
        "code",
    }
    stamp = (directory / "classifier.onnx").stat().st_mtime_ns
    assert ensure_world_classifier(corpus_world, corpus_world / "corpus", seed=0) == directory
    assert (directory / "classifier.onnx").stat().st_mtime_ns == stamp
    (directory / "classifier.onnx").write_bytes(b"corrupt")
    ensure_world_classifier(corpus_world, corpus_world / "corpus", seed=0)
    OnnxTaskClassifier.load(directory)  # retrained: a corrupt cache is not served


def _write_jsonl(path: Path, prompts: list[LabeledPrompt], with_task: bool = True) -> Path:
    rows = [{"text": p.text, **({"task": p.task} if with_task else {})} for p in prompts]
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return path


def test_cli_train_and_eval(tmp_path: Path) -> None:
    runner = CliRunner()
    app = build_app()
    data = _write_jsonl(tmp_path / "train.jsonl", synthetic_prompts(200, seed=0))
    held_out = [
        *synthetic_prompts(40, seed=5),
        LabeledPrompt("zebra giraffe savanna crocodile", "animals"),
    ]
    test_data = _write_jsonl(tmp_path / "test.jsonl", held_out)
    out = tmp_path / "model"
    result = runner.invoke(app, ["classifier", "train", "--data", str(data), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "validation accuracy" in result.output
    report_path = tmp_path / "report.json"
    result = runner.invoke(
        app,
        [
            "classifier",
            "eval",
            "--model",
            str(out),
            "--data",
            str(test_data),
            "--json",
            str(report_path),
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    assert report["accuracy"] >= 0.95
    assert report["unseen_tasks"] == ["animals"]
    assert report["ood_recall"] == 1.0
    assert set(report["latency_us"]) >= {"p50", "p99"}


def test_cli_refuses_data_it_cannot_use_in_one_line(tmp_path: Path) -> None:
    """An empty --data, or prompts of one task, failed with a traceback after the
    reading (a ValueError from training; numpy's on an empty eval file)."""
    app = build_app()
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    one_task = _write_jsonl(
        tmp_path / "one.jsonl", [LabeledPrompt(f"prompt {i}", "chat") for i in range(20)]
    )
    # One prompt a task: nothing is held out to validate on (scikit-learn's "Found array
    # with 0 sample(s)" was the message).
    one_each = _write_jsonl(
        tmp_path / "two.jsonl", [LabeledPrompt("hello there", "chat"), LabeledPrompt("2+2", "math")]
    )
    out = str(tmp_path / "model")
    cases = [
        (["train", "--data", str(empty), "--out", out], "holds no prompts"),
        (["train", "--data", str(one_task), "--out", out], "at least two tasks"),
        (["train", "--data", str(one_each), "--out", out], "nothing to validate on"),
        (["eval", "--model", out, "--data", str(empty)], "holds no prompts"),
    ]
    trained = _write_jsonl(tmp_path / "train.jsonl", synthetic_prompts(120, seed=0))
    ok = CliRunner().invoke(app, ["classifier", "train", "--data", str(trained), "--out", out])
    assert ok.exit_code == 0, ok.output
    # Lines that are JSON but not prompts raised AttributeError; an eval file without
    # tasks raised ValueError; both as tracebacks.
    unlabeled = tmp_path / "unlabeled.jsonl"
    unlabeled.write_text('{"text": "hello"}\n')
    cases.append((["eval", "--model", out, "--data", str(unlabeled)], "needs a task"))
    for args, said in cases:
        result = CliRunner().invoke(app, ["classifier", *args])
        assert result.exit_code == 2, (args, result.output, result.exception)
        assert said in " ".join(result.output.split()), result.output
    for number, line in enumerate(("[1, 2]", '"a string"', '{"messages": ["hi"]}')):
        shapes = tmp_path / f"shapes{number}.jsonl"
        shapes.write_text(line + "\n")
        for args in (["train", "--data", str(shapes), "--out", out], ["eval", "--model", out]):
            if args[0] == "eval":
                args += ["--data", str(shapes)]
            result = CliRunner().invoke(app, ["classifier", *args])
            # DataFileError: `specroute` (router.cli.main) prints it as one line, status 2.
            assert isinstance(result.exception, DataFileError), (line, result.exception)
            assert f"shapes{number}.jsonl:1" in str(result.exception)
    # --json into a directory that is not there yet: made, as world eval makes it.
    report = tmp_path / "reports" / "eval.json"
    done = CliRunner().invoke(
        app, ["classifier", "eval", "--model", out, "--data", str(trained), "--json", str(report)]
    )
    assert done.exit_code == 0 and json.loads(report.read_text())["accuracy"] >= 0.0


def test_cli_discovers_clusters_without_labels(tmp_path: Path) -> None:
    prompts = synthetic_prompts(240, seed=0)
    data = _write_jsonl(tmp_path / "unlabeled.jsonl", prompts, with_task=False)
    out = tmp_path / "discovered"
    result = CliRunner().invoke(
        build_app(),
        ["classifier", "train", "--data", str(data), "--out", str(out), "--clusters", "auto"],
    )
    assert result.exit_code == 0, result.output
    metadata = ClassifierMetadata.read(out)
    assert len(metadata.labels) == 4
    assert all(label in metadata.cluster_terms for label in metadata.labels)
    assert metadata.discovery is not None and metadata.discovery["clusters"] == 4


def test_bench_reports_the_agreed_keys(corpus_world: Path) -> None:
    payload: dict[str, Any] = run_classifier_bench(
        corpus_world / "corpus", seed=0, grid=FAST_GRID[:1]
    )
    assert set(payload) >= BENCH_KEYS
    assert set(payload["latency_us"]) == {"p50", "p99"}
    assert set(payload["sklearn_latency_us"]) == {"p50", "p99"}
    assert set(payload["per_task"]) == {
        "chat",
        "translation",
        "summarization",
        "qa",
        "math",
        "rag",
        "code",
    }
    assert 0.0 <= payload["ood_recall"] <= 1.0
    assert payload["onnx_sklearn_max_abs_diff"] < 1e-5
    assert payload["accuracy"] > 0.5
