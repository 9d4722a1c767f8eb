"""``specroute bench classifier``: the classifier measured on the built-in world's corpus.

One run reports: accuracy per task on the held-out (differently worded) test prompts,
the confusion matrix, ONNX vs scikit-learn probability parity, out-of-distribution recall
with each task held out in turn, cluster discovery's adjusted Rand index with labels
hidden, and single-prompt latency of the ONNX path beside scikit-learn's predict_proba.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from classifiers.discovery import discover_clusters
from classifiers.evaluate import compare_latency, evaluate_classifier
from classifiers.runtime import OnnxTaskClassifier
from classifiers.text import LabeledPrompt
from classifiers.train import (
    DEFAULT_GRID,
    VALIDATION_DROPOUT_COPIES,
    VALIDATION_KEEP_PROBABILITY,
    CandidateConfig,
    TrainedClassifier,
    train_classifier,
    word_dropout,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CorpusSplits:
    """Labeled prompts of the three splits."""

    train: list[LabeledPrompt]
    validation: list[LabeledPrompt]
    test: list[LabeledPrompt]


def load_splits(corpus_dir: Path | None, seed: int) -> CorpusSplits:
    """A bundle's corpus from ``corpus_dir``, or the default-scale corpus built in memory."""
    if corpus_dir is not None:
        from classifiers.world import read_corpus_split

        return CorpusSplits(
            *(read_corpus_split(corpus_dir, s) for s in ("train", "validation", "test"))
        )
    from benchmarks.world.corpus import build_corpus, prompt_text

    corpus = build_corpus(seed, "default")
    return CorpusSplits(
        *(
            [LabeledPrompt(prompt_text(e), e.task) for e in split]
            for split in (corpus.train, corpus.validation, corpus.test)
        )
    )


def held_out_task_ood(
    splits: CorpusSplits, task: str, config: CandidateConfig, seed: int, false_flag_rate: float
) -> dict[str, float]:
    """Train without ``task``; how many of its test prompts are flagged, and how many others.

    Two thresholds are reported: the shipped one (calibrated on word-dropout copies of the
    validation prompts) and one calibrated on the plain validation prompts.
    """
    train = [p for p in splits.train if p.task != task]
    validation = [p for p in splits.validation if p.task != task]
    trained = train_classifier(
        train, validation, seed=seed, grid=[config], false_flag_rate=false_flag_rate
    )
    classifier = OnnxTaskClassifier.from_bytes(trained.onnx_bytes, trained.metadata)
    report = evaluate_classifier(classifier, splits.test)
    held = [p.text for p in splits.test if p.task == task]
    known = [p.text for p in splits.test if p.task != task]
    plain_threshold = float(
        np.quantile(
            classifier.scores([p.text for p in validation]).probabilities.max(axis=1),
            false_flag_rate,
            method="lower",
        )
    )
    held_top = classifier.scores(held).probabilities.max(axis=1)
    known_top = classifier.scores(known).probabilities.max(axis=1)
    return {
        "recall": float(report.ood_recall or 0.0),
        "test_false_flags": report.false_flag_rate,
        "validation_false_flags": trained.metadata.ood.validation_false_flags,
        "calibration_false_flags": trained.metadata.ood.calibration_false_flags,
        "recall_plain_validation_threshold": float(np.mean(held_top < plain_threshold)),
        "test_false_flags_plain_validation_threshold": float(np.mean(known_top < plain_threshold)),
    }


def _parity(
    trained: TrainedClassifier, classifier: OnnxTaskClassifier, texts: Sequence[str]
) -> float:
    onnx_probabilities = classifier.scores(texts).probabilities
    return float(np.abs(onnx_probabilities - trained.pipeline.predict_proba(texts)).max())


def _discovery(splits: CorpusSplits, seed: int) -> dict[str, object]:
    texts = [p.text for p in splits.train]
    found = discover_clusters(texts, "auto", seed=seed)
    return {
        "ari": found.adjusted_rand_index([str(p.task) for p in splits.train]),
        "clusters_found": found.k,
        "cluster_names": list(found.names),
        "silhouette_by_k": {str(k): v for k, v in found.silhouette_by_k.items()},
    }


def run_classifier_bench(
    corpus_dir: Path | None = None,
    seed: int = 0,
    false_flag_rate: float = 0.05,
    grid: Sequence[CandidateConfig] = DEFAULT_GRID,
) -> dict[str, object]:
    """Everything ``bench classifier`` prints, as one JSON-ready dict, for the corpus in
    ``corpus_dir`` (default: the default-scale corpus, built in memory)."""
    splits = load_splits(corpus_dir, seed)
    trained = train_classifier(
        splits.train, splits.validation, seed=seed, false_flag_rate=false_flag_rate, grid=grid
    )
    classifier = OnnxTaskClassifier.from_bytes(trained.onnx_bytes, trained.metadata)
    test_texts = [p.text for p in splits.test]
    report = evaluate_classifier(classifier, splits.test)
    latency = compare_latency(
        {
            "onnx": classifier.classify,
            "sklearn": lambda text: trained.pipeline.predict_proba([text]),
        },
        test_texts,
    )
    tasks = sorted({str(p.task) for p in splits.train})
    held_out = {
        task: held_out_task_ood(splits, task, trained.pipeline.config, seed, false_flag_rate)
        for task in tasks
    }
    perturbed_test = word_dropout(
        splits.test, VALIDATION_DROPOUT_COPIES, VALIDATION_KEEP_PROBABILITY, seed + 2
    )
    return {
        "accuracy": report.accuracy,
        "per_task": report.per_task,
        "ood_recall": float(np.mean([r["recall"] for r in held_out.values()])),
        "latency_us": {"p50": latency["onnx"].p50, "p99": latency["onnx"].p99},
        "sklearn_latency_us": {"p50": latency["sklearn"].p50, "p99": latency["sklearn"].p99},
        "latency_samples": latency["onnx"].samples,
        "confusion": report.confusion,
        "test_examples": report.examples,
        "test_false_flags": report.false_flag_rate,
        "word_dropout_test_accuracy": evaluate_classifier(classifier, perturbed_test).accuracy,
        "ood_per_held_out_task": held_out,
        "ood_false_flags_test_mean": float(
            np.mean([r["test_false_flags"] for r in held_out.values()])
        ),
        "ood_recall_plain_validation_threshold": float(
            np.mean([r["recall_plain_validation_threshold"] for r in held_out.values()])
        ),
        "ood_false_flags_test_plain_validation_threshold": float(
            np.mean([r["test_false_flags_plain_validation_threshold"] for r in held_out.values()])
        ),
        "onnx_sklearn_max_abs_diff": _parity(trained, classifier, test_texts),
        "discovery": _discovery(splits, seed),
        "model": {
            "version": trained.metadata.version,
            "hyperparameters": trained.metadata.hyperparameters,
            "vocabulary_size": trained.metadata.vocabulary_size,
            "validation_accuracy": trained.metadata.validation.accuracy,
            "ood_min_probability": trained.metadata.ood.min_probability,
            "candidate_scores": trained.candidate_accuracy,
        },
        "machine": {"cpus": os.cpu_count(), "load_average_1m": os.getloadavg()[0]},
    }
