"""The handwritten prompts: enough of them per task, never in the corpus, and routed to
their task by a classifier trained on the corpus (issue 20: at least 0.9)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import pytest

from benchmarks.world.corpus import TASKS, build_corpus, prompt_text
from benchmarks.world.handwritten import (
    handwritten_prompts,
    routing_accuracy,
    world_routing_accuracy,
)
from benchmarks.world.tasks.common import WINDOW, long_windows, words
from classifiers.text import LabeledPrompt
from classifiers.train import DEFAULT_GRID, train_classifier
from router.bundle import ModelBundle

MIN_ACCURACY = 0.9


def test_the_set_has_at_least_40_prompts_and_5_per_task() -> None:
    prompts = handwritten_prompts()
    counts = Counter(p.task for p in prompts)
    assert len(prompts) >= 40
    assert set(counts) == set(TASKS)
    assert min(counts.values()) >= 5
    assert len({p.text for p in prompts}) == len(prompts)


@pytest.mark.timeout(600)  # the default corpus: ~10 s of CPU, longer on busy cores
def test_no_handwritten_prompt_occurs_in_the_training_text() -> None:
    corpus = build_corpus(seed=0, scale="default")
    texts = [t for e in corpus.train + corpus.validation + corpus.test for t in e.texts()]
    runs: set[tuple[str, ...]] = set()
    for text in texts:
        runs |= long_windows(text)
    joined = "\n".join(f" {' '.join(words(t))} " for t in texts)
    for prompt in handwritten_prompts():
        tokens = words(prompt.text)
        if len(tokens) >= WINDOW:
            assert not long_windows(prompt.text) & runs, prompt.text
        assert f" {' '.join(tokens)} " not in joined, prompt.text


@pytest.mark.timeout(600)  # ~30 s on 2 free cores
def test_a_classifier_trained_on_the_corpus_routes_the_handwritten_prompts() -> None:
    """The 'small' corpus (240 training prompts per task) and the grid's first candidate:
    the world's own classifier (default corpus, whole grid) is reported by `world eval`."""
    corpus = build_corpus(seed=0, scale="small")
    train = [LabeledPrompt(prompt_text(e), e.task) for e in corpus.train]
    validation = [LabeledPrompt(prompt_text(e), e.task) for e in corpus.validation]
    trained = train_classifier(train, validation, seed=0, grid=[DEFAULT_GRID[0]])
    labels = trained.pipeline.labels

    def predict(texts: Sequence[str]) -> list[str]:
        return [labels[i] for i in trained.pipeline.predict_proba(texts).argmax(axis=1)]

    report = routing_accuracy(predict, handwritten_prompts())
    assert report.accuracy >= MIN_ACCURACY, report.misrouted


def test_world_eval_reports_the_worlds_own_classifier_on_them(tiny_world: ModelBundle) -> None:
    report = world_routing_accuracy(tiny_world)
    assert report["prompts"] == len(handwritten_prompts())
    assert 0.0 <= report["accuracy"] <= 1.0
    assert set(report["per_task"]) == set(TASKS)
    assert all(m["predicted"] != m["task"] for m in report["misrouted"])
