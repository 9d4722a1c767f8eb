"""No test prompt, source document or reference answer occurs in the training text.

Training text = every turn and response of the train and validation splits (the target
trains on train; the classifier on train + validation). A test text "occurs" if, as
lower-cased words, it shares a run of 12 words with a training text, or, when shorter
than 12 words, appears whole inside one.
"""

from __future__ import annotations

import pytest

from benchmarks.world.corpus import Corpus, Example, build_corpus
from benchmarks.world.tasks.chat import conversation_pools
from benchmarks.world.tasks.code import combination_pools, humaneval_pools
from benchmarks.world.tasks.common import WINDOW, long_windows, words
from benchmarks.world.tasks.documents import section_pools
from benchmarks.world.tasks.translation import message_pools


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    return build_corpus(seed=0, scale="default")


def _training_texts(corpus: Corpus) -> list[str]:
    return [text for e in corpus.train + corpus.validation for text in e.texts()]


@pytest.fixture(scope="module")
def training_runs(corpus: Corpus) -> set[tuple[str, ...]]:
    runs: set[tuple[str, ...]] = set()
    for text in _training_texts(corpus):
        runs |= long_windows(text)
    return runs


@pytest.fixture(scope="module")
def training_words(corpus: Corpus) -> str:
    return "\n".join(f" {' '.join(words(t))} " for t in _training_texts(corpus))


def occurs(text: str, runs: set[tuple[str, ...]], joined: str) -> bool:
    tokens = words(text)
    if len(tokens) >= WINDOW:
        return bool(long_windows(text) & runs)
    return bool(tokens) and f" {' '.join(tokens)} " in joined


def _leaks(examples: list[Example], runs: set[tuple[str, ...]], joined: str) -> list[str]:
    found = []
    for example in examples:
        prompt = example.messages[-1]["content"]
        for kind, text in (("prompt", prompt), ("reference", example.response)):
            if occurs(text, runs, joined):
                found.append(f"{example.id} {kind}: {text[:80]!r}")
    return found


@pytest.mark.timeout(600)  # the default corpus: ~10 s of CPU, longer on busy cores
def test_no_test_prompt_document_or_reference_occurs_in_training(
    corpus: Corpus, training_runs: set[tuple[str, ...]], training_words: str
) -> None:
    # Prompts and references of every test example.
    assert _leaks(corpus.test, training_runs, training_words) == []
    # The source documents the test prompts are built from, whole (not only the clipped
    # part a prompt shows): doc2dial sections, conversations, HumanEval problems, messages.
    documents = (
        [" ".join(s.sentences) for s in section_pools()["test"]]
        + [" ".join(c) for c in conversation_pools()["test"]]
        + [p.prompt + p.solution for p in humaneval_pools()["test"]]
        + [m.english for m in message_pools()["test"]]
        + [t for m in message_pools()["test"] for _, t in m.translations]
    )
    leaked = [d[:80] for d in documents if occurs(d, training_runs, training_words)]
    assert leaked == []


def test_procedural_test_items_are_new_combinations() -> None:
    pools = combination_pools()
    train = {(f.prefix, c.name) for f, c in pools["train"] + pools["validation"]}
    assert pools["test"]
    assert not {(f.prefix, c.name) for f, c in pools["test"]} & train


def test_the_check_would_catch_a_leak(
    corpus: Corpus, training_runs: set[tuple[str, ...]], training_words: str
) -> None:
    """The detector itself: a training passage pasted into a prompt is flagged."""
    trained = corpus.by_task("train", "summarization")[0]
    assert occurs(trained.messages[-1]["content"], training_runs, training_words)
    assert occurs(corpus.by_task("train", "math")[0].response, training_runs, training_words)
