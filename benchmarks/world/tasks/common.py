"""What every task generator shares: chat turns, item partitions, held-out wording, n-grams.

Leakage is ruled out at the level of source items (documents, conversations, problems,
messages), not only of examples: ``partition`` gives each split its own items, and
``clean_partition`` also drops validation and test items that share a ``WINDOW``-word
run with any training item (doc2dial passages repeat boilerplate sentences).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")
Pair = tuple[tuple[dict[str, str], ...], str]
# (rng, split, count) -> list of (messages, response).
TaskGenerator = Callable[[random.Random, str, int], list[Pair]]

WINDOW = 12  # words: a shared run this long counts as text seen in training
_WORD = re.compile(r"\w+")


def turns(system: str | None, *user_and_assistant: str) -> tuple[dict[str, str], ...]:
    """Chat turns alternating user/assistant, optionally after a system prompt."""
    roles = ("user", "assistant")
    body = [{"role": roles[i % 2], "content": t} for i, t in enumerate(user_and_assistant)]
    head = [{"role": "system", "content": system}] if system else []
    return tuple(head + body)


def clip_words(text: str, limit: int) -> str:
    """The first ``limit`` whitespace-separated words of ``text``."""
    return " ".join(text.split()[:limit])


def words(text: str) -> list[str]:
    """Lower-cased word tokens (letters, digits, underscore; punctuation dropped)."""
    return _WORD.findall(text.lower())


def long_windows(text: str, size: int = WINDOW) -> set[tuple[str, ...]]:
    """Runs of exactly ``size`` words (none for a shorter text)."""
    tokens = words(text)
    # zip of shifted views builds the runs in C (several times faster than slicing).
    return set(zip(*(tokens[i:] for i in range(size)), strict=False))


def partition(items: Sequence[T], seed: int) -> dict[str, list[T]]:
    """Disjoint item pools: ~80% train, ~5% validation, ~15% test (shuffled by ``seed``)."""
    order = list(items)
    random.Random(seed).shuffle(order)
    n = len(order)
    cut_train, cut_validation = int(n * 0.80), int(n * 0.85)
    return {
        "train": order[:cut_train],
        "validation": order[cut_train:cut_validation],
        "test": order[cut_validation:],
    }


def clean_partition(
    items: Sequence[T], seed: int, texts_of: Callable[[T], Sequence[str]]
) -> dict[str, list[T]]:
    """``partition``, then validation and test items are dropped if one of their texts shares
    a ``WINDOW``-word run with a training item's texts or, shorter than that, occurs whole
    in one (test items are also checked against validation)."""
    pools = partition(items, seed)
    seen: set[tuple[str, ...]] = set()
    joined: list[str] = []

    def remember(item: T) -> None:
        for text in texts_of(item):
            seen.update(long_windows(text))
            joined.append(f" {' '.join(words(text))} ")

    def leaks(item: T, everything: str) -> bool:
        for text in texts_of(item):
            tokens = words(text)
            if len(tokens) >= WINDOW and long_windows(text) & seen:
                return True
            if 0 < len(tokens) < WINDOW and f" {' '.join(tokens)} " in everything:
                return True
        return False

    for item in pools["train"]:
        remember(item)
    everything = "\n".join(joined)
    pools["validation"] = [i for i in pools["validation"] if not leaks(i, everything)]
    for item in pools["validation"]:
        remember(item)
    everything = "\n".join(joined)
    pools["test"] = [i for i in pools["test"] if not leaks(i, everything)]
    return pools


def template_set(split: str, train: Sequence[T], test: Sequence[T]) -> Sequence[T]:
    """Test prompts use held-out wording; train and validation share the training wording."""
    return test if split == "test" else train
