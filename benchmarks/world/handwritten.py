"""The handwritten, naturally worded prompts the world's classifier is checked on.

``handwritten_prompts.jsonl`` (beside this module) holds prompts written by hand, 7-8 per
task, worded as people write requests (other languages, other topics, other phrasings than
the corpus templates). They are never used for training (a test checks that none occurs in
the corpus); they measure how well the classifier trained on the corpus routes real
requests.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from classifiers.text import LabeledPrompt, read_labeled_jsonl

HANDWRITTEN_PATH = Path(__file__).with_name("handwritten_prompts.jsonl")


def handwritten_prompts(path: Path = HANDWRITTEN_PATH) -> list[LabeledPrompt]:
    """The handwritten prompts with their tasks."""
    return read_labeled_jsonl(path)


def routing_accuracy(
    predict: Callable[[Sequence[str]], Sequence[str]], prompts: Sequence[LabeledPrompt]
) -> dict[str, object]:
    """Share of ``prompts`` whose predicted task is their own, overall and per task, and the
    misrouted ones (text, task, predicted)."""
    predicted = list(predict([p.text for p in prompts]))
    per_task: dict[str, list[bool]] = {}
    misses = []
    for prompt, guess in zip(prompts, predicted, strict=True):
        per_task.setdefault(str(prompt.task), []).append(guess == prompt.task)
        if guess != prompt.task:
            misses.append({"text": prompt.text, "task": prompt.task, "predicted": guess})
    hits = [hit for rows in per_task.values() for hit in rows]
    return {
        "accuracy": sum(hits) / len(hits) if hits else 0.0,
        "per_task": {t: sum(r) / len(r) for t, r in sorted(per_task.items())},
        "prompts": len(hits),
        "misrouted": misses,
    }
