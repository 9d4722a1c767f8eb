"""The built-in world's multitask corpus: seven tasks as Qwen2.5 chat (messages, response) pairs.

Each task has its own generator (``TASK_GENERATORS``, a registry keyed by task name, in
``benchmarks.world.tasks``) that turns real text (see ``sources``) or a seeded procedure into
examples. Tasks differ the way real ones do: copy-heavy (summarization, rag, qa over a
passage), step-by-step procedures (math, code), a deterministic mapping learnt from data
(translation), and high entropy (chat); answers run from one sentence to a paragraph.

Splits: source items (documents, conversations, problems, messages, procedural
combinations) are partitioned between ``train``, ``validation`` and ``test``; ``test`` also
uses prompt wordings never used in training. ``build_corpus`` then drops any training or
validation example that shares a 12-word run with a test example, or contains a short test
prompt or reference whole (``leaks_into``), so no test prompt, passage or reference answer
occurs in the training text.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from benchmarks.world.tasks.chat import generate_chat
from benchmarks.world.tasks.code import generate_code
from benchmarks.world.tasks.common import WINDOW, TaskGenerator, long_windows, words
from benchmarks.world.tasks.documents import (
    generate_qa,
    generate_rag,
    generate_summarization,
    qa_answer,
)
from benchmarks.world.tasks.math import generate_math, math_answer
from benchmarks.world.tasks.translation import generate_translation
from classifiers.text import prompt_from_messages

__all__ = [
    "SCALES",
    "SPLITS",
    "TASKS",
    "TASK_GENERATORS",
    "Corpus",
    "Example",
    "SplitSizes",
    "build_corpus",
    "leaks_into",
    "math_answer",
    "prompt_text",
    "qa_answer",
]

TASKS: tuple[str, ...] = ("chat", "translation", "summarization", "qa", "math", "rag", "code")
SPLITS: tuple[str, ...] = ("train", "validation", "test")


@dataclass(frozen=True)
class Example:
    """One prompt (Qwen chat turns, the last one the user's) and its reference response."""

    id: str
    task: str
    split: str
    messages: tuple[dict[str, str], ...]
    response: str

    def to_json(self) -> str:
        """One JSON line."""
        return json.dumps(
            {
                "id": self.id,
                "task": self.task,
                "split": self.split,
                "messages": list(self.messages),
                "response": self.response,
            },
            ensure_ascii=False,
        )

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> Example:
        """Inverse of ``to_json`` (after ``json.loads``)."""
        return cls(
            id=str(row["id"]),
            task=str(row["task"]),
            split=str(row["split"]),
            messages=tuple({"role": m["role"], "content": m["content"]} for m in row["messages"]),
            response=str(row["response"]),
        )

    def texts(self) -> list[str]:
        """The conversation's texts that carry content: every non-system turn and the response."""
        return [m["content"] for m in self.messages if m["role"] != "system"] + [self.response]


@dataclass(frozen=True)
class Corpus:
    """Train, validation and test examples of every task."""

    seed: int
    scale: str
    train: list[Example] = field(default_factory=list)
    validation: list[Example] = field(default_factory=list)
    test: list[Example] = field(default_factory=list)

    def split(self, name: str) -> list[Example]:
        """Examples of one split by name."""
        return {"train": self.train, "validation": self.validation, "test": self.test}[name]

    def by_task(self, split: str, task: str) -> list[Example]:
        """Examples of one task in one split."""
        return [e for e in self.split(split) if e.task == task]


@dataclass(frozen=True)
class SplitSizes:
    """Examples per task in each split."""

    train: int
    validation: int
    test: int


SCALES: dict[str, SplitSizes] = {
    "tiny": SplitSizes(train=48, validation=8, test=8),
    # Corpus only (no world is built at this scale): quick checks of the whole task mix,
    # such as the classifier's routing of the handwritten prompts (tests).
    "small": SplitSizes(train=240, validation=16, test=16),
    "default": SplitSizes(train=1400, validation=40, test=50),
}


def prompt_text(example: Example) -> str:
    """What a classifier sees: the system prompt (if any) and the last user turn."""
    return prompt_from_messages(example.messages)


TASK_GENERATORS: dict[str, TaskGenerator] = {
    "chat": generate_chat,
    "translation": generate_translation,
    "summarization": generate_summarization,
    "qa": generate_qa,
    "math": generate_math,
    "rag": generate_rag,
    "code": generate_code,
}


def _examples_for(task: str, split: str, count: int, seed: int) -> list[Example]:
    """``count`` distinct examples of one task and split, seeded by (seed, task, split)."""
    rng = random.Random(f"{seed}:{task}:{split}")
    generate = TASK_GENERATORS[task]
    seen: set[str] = set()
    examples: list[Example] = []
    attempts = 0
    while len(examples) < count and attempts < 20:
        attempts += 1
        for messages, response in generate(rng, split, count - len(examples)):
            key = json.dumps(messages, ensure_ascii=False)
            if key in seen:
                continue
            seen.add(key)
            index = len(examples)
            examples.append(Example(f"{task}-{split}-{index:05d}", task, split, messages, response))
    return examples


@dataclass(frozen=True)
class HeldOutText:
    """What training text must not contain: the test split's 12-word runs, and its short
    prompts and references (under 12 words) whole, all as normalised words."""

    runs: frozenset[tuple[str, ...]]
    short: frozenset[str]

    @classmethod
    def of(cls, examples: Iterable[Example]) -> HeldOutText:
        runs: set[tuple[str, ...]] = set()
        short: set[str] = set()
        for example in examples:
            for text in example.texts():
                runs |= long_windows(text)
            for text in (example.messages[-1]["content"], example.response):
                tokens = words(text)
                if 0 < len(tokens) < WINDOW:
                    short.add(" ".join(tokens))
        return cls(frozenset(runs), frozenset(short))


def leaks_into(example: Example, held_out: HeldOutText) -> bool:
    """True if ``example`` shares a 12-word run with held-out text or contains a short
    held-out prompt or reference whole (as a run of whole words)."""
    for text in example.texts():
        if long_windows(text) & held_out.runs:
            return True
        padded = f" {' '.join(words(text))} "
        if any(f" {short} " in padded for short in held_out.short):
            return True
    return False


def build_corpus(seed: int = 0, scale: str = "default") -> Corpus:
    """Every task's train, validation and test examples, reproducible from ``seed``.

    Training and validation examples that leak test text (``leaks_into``) are dropped, so
    those splits can hold slightly fewer examples than ``SCALES`` asks for.
    """
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; choose from {sorted(SCALES)}")
    sizes = SCALES[scale]
    splits: dict[str, list[Example]] = {}
    for split in SPLITS:
        count = getattr(sizes, split)
        splits[split] = [e for t in TASKS for e in _examples_for(t, split, count, seed)]
    held_out = HeldOutText.of(splits["test"])
    for split in ("train", "validation"):
        splits[split] = [e for e in splits[split] if not leaks_into(e, held_out)]
    return Corpus(seed, scale, splits["train"], splits["validation"], splits["test"])
