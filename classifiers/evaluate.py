"""Measure a classifier: accuracy per task, confusion, OOD recall, latency beside sklearn."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from classifiers.api import TaskClassifier
from classifiers.text import LabeledPrompt


@dataclass(frozen=True)
class EvaluationReport:
    """Accuracy on known tasks, OOD behaviour on all prompts."""

    accuracy: float
    per_task: dict[str, float]
    confusion: dict[str, dict[str, int]]
    examples: int
    false_flag_rate: float
    ood_recall: float | None
    unseen_tasks: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, object]:
        return {
            "accuracy": self.accuracy,
            "per_task": self.per_task,
            "confusion": self.confusion,
            "examples": self.examples,
            "false_flag_rate": self.false_flag_rate,
            "ood_recall": self.ood_recall,
            "unseen_tasks": self.unseen_tasks,
        }


def evaluate_classifier(
    classifier: TaskClassifier, prompts: Sequence[LabeledPrompt]
) -> EvaluationReport:
    """Accuracy on prompts whose task is a known label; OOD recall on the others."""
    if any(p.task is None for p in prompts):
        raise ValueError("evaluation needs a task on every prompt")
    known = set(classifier.labels)
    results = classifier.classify_batch([p.text for p in prompts])
    seen = [(p, r) for p, r in zip(prompts, results, strict=True) if p.task in known]
    unseen = [(p, r) for p, r in zip(prompts, results, strict=True) if p.task not in known]
    confusion: dict[str, dict[str, int]] = {}
    for prompt, result in seen:
        row = confusion.setdefault(str(prompt.task), {})
        row[result.cluster] = row.get(result.cluster, 0) + 1
    per_task = {
        task: row.get(task, 0) / sum(row.values()) for task, row in sorted(confusion.items())
    }
    correct = sum(result.cluster == prompt.task for prompt, result in seen)
    return EvaluationReport(
        accuracy=correct / len(seen) if seen else 0.0,
        per_task=per_task,
        confusion=confusion,
        examples=len(prompts),
        false_flag_rate=float(np.mean([r.out_of_distribution for _, r in seen])) if seen else 0.0,
        ood_recall=float(np.mean([r.out_of_distribution for _, r in unseen])) if unseen else None,
        unseen_tasks=sorted({str(p.task) for p, _ in unseen}),
    )


@dataclass(frozen=True)
class LatencySummary:
    """Single-prompt latency percentiles in microseconds."""

    p50: float
    p99: float
    samples: int

    def as_json(self) -> dict[str, float]:
        return {"p50": self.p50, "p99": self.p99, "samples": self.samples}


def _summary(seconds: Sequence[float]) -> LatencySummary:
    micro = np.asarray(seconds) * 1e6
    return LatencySummary(
        p50=float(np.percentile(micro, 50)),
        p99=float(np.percentile(micro, 99)),
        samples=len(micro),
    )


def compare_latency(
    contenders: dict[str, Callable[[str], object]],
    texts: Sequence[str],
    rounds: int = 3,
    warmup: int = 20,
    block: int = 25,
) -> dict[str, LatencySummary]:
    """Time each contender on each text, one prompt per call, alternating in blocks.

    Contenders take turns every ``block`` prompts, so a burst of load on the shared
    machine hits all of them alike, while each still runs with its own data in cache
    (alternating every prompt let scikit-learn's memory traffic evict the ONNX graph's).
    """
    for text in texts[:warmup]:
        for run in contenders.values():
            run(text)
    timings: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for start in range(0, len(texts), block):
            chunk = texts[start : start + block]
            for name, run in contenders.items():
                for text in chunk:
                    began = time.perf_counter()
                    run(text)
                    timings[name].append(time.perf_counter() - began)
    return {name: _summary(values) for name, values in timings.items()}
