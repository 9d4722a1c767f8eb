"""The handwritten, naturally worded prompts the world's classifier is checked on.

``handwritten_prompts.jsonl`` (beside this module) holds prompts written by hand, 7-8 per
task, worded as people write requests (other languages, other topics, other phrasings than
the corpus templates). They are never used for training (a test checks that none occurs in
the corpus); they measure how well the classifier trained on the corpus routes real
requests.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from classifiers.text import LabeledPrompt, read_labeled_jsonl
from router.bundle import ModelBundle

HANDWRITTEN_PATH = Path(__file__).with_name("handwritten_prompts.jsonl")


def handwritten_prompts(path: Path = HANDWRITTEN_PATH) -> list[LabeledPrompt]:
    """The handwritten prompts with their tasks."""
    return read_labeled_jsonl(path)


@dataclass(frozen=True)
class RoutingReport:
    """How a classifier routes labeled prompts: overall and per-task accuracy, the misses."""

    accuracy: float
    per_task: dict[str, float]
    prompts: int
    misrouted: list[dict[str, str]]  # {"text", "task", "predicted"}


def routing_accuracy(
    predict: Callable[[Sequence[str]], Sequence[str]], prompts: Sequence[LabeledPrompt]
) -> RoutingReport:
    """Share of ``prompts`` whose predicted task is their own, overall and per task."""
    predicted = list(predict([p.text for p in prompts]))
    per_task: dict[str, list[bool]] = {}
    misses = []
    for prompt, guess in zip(prompts, predicted, strict=True):
        task = str(prompt.task)
        per_task.setdefault(task, []).append(guess == task)
        if guess != task:
            misses.append({"text": prompt.text, "task": task, "predicted": guess})
    hits = [hit for rows in per_task.values() for hit in rows]
    return RoutingReport(
        accuracy=sum(hits) / len(hits) if hits else 0.0,
        per_task={t: sum(r) / len(r) for t, r in sorted(per_task.items())},
        prompts=len(hits),
        misrouted=misses,
    )


def world_routing_accuracy(world: ModelBundle, seed: int = 0) -> dict[str, Any]:
    """``routing_accuracy`` of a built world's own classifier (trained from its corpus and
    cached in the world directory on first use, as the sidecar does) on the handwritten
    prompts. Out-of-distribution flags are not counted: the task it picks is."""
    from classifiers.runtime import OnnxTaskClassifier
    from classifiers.world import ensure_world_classifier

    classifier = OnnxTaskClassifier.load(
        ensure_world_classifier(world.root, world.corpus_dir, seed)
    )

    def predict(texts: Sequence[str]) -> list[str]:
        return [c.cluster for c in classifier.classify_batch(texts)]

    return asdict(routing_accuracy(predict, handwritten_prompts()))
