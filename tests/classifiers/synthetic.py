"""A small labeled prompt set with distinct vocabularies per task, built from a seed."""

from __future__ import annotations

import random

from classifiers.text import LabeledPrompt

SHARED = ("please", "the", "a", "of", "and", "to", "in", "for", "this", "with", "can", "you")

VOCABULARY: dict[str, tuple[str, ...]] = {
    "translate": (
        "translate",
        "french",
        "german",
        "spanish",
        "sentence",
        "into",
        "language",
        "bonjour",
        "merci",
        "hola",
        "gracias",
        "danke",
        "english",
        "word",
        "phrase",
    ),
    "math": (
        "solve",
        "equation",
        "integer",
        "sum",
        "prove",
        "number",
        "divisible",
        "prime",
        "compute",
        "triangle",
        "area",
        "fraction",
        "remainder",
        "square",
        "root",
    ),
    "code": (
        "python",
        "function",
        "return",
        "def",
        "list",
        "string",
        "implement",
        "loop",
        "variable",
        "class",
        "import",
        "bug",
        "compile",
        "array",
        "test",
    ),
    "summarize": (
        "summarize",
        "article",
        "paragraph",
        "short",
        "summary",
        "main",
        "points",
        "report",
        "news",
        "document",
        "brief",
        "key",
        "text",
        "overview",
        "tldr",
    ),
}


def synthetic_prompts(
    count: int, seed: int, tasks: tuple[str, ...] = tuple(VOCABULARY)
) -> list[LabeledPrompt]:
    """``count`` prompts spread evenly over ``tasks``, 6-30 words each."""
    rng = random.Random(seed)
    prompts = []
    for index in range(count):
        task = tasks[index % len(tasks)]
        words = [
            rng.choice(VOCABULARY[task]) if rng.random() < 0.6 else rng.choice(SHARED)
            for _ in range(rng.randint(6, 30))
        ]
        prompts.append(LabeledPrompt(text=" ".join(words).capitalize() + "?", task=task))
    return prompts


UNRELATED_TEXTS: tuple[str, ...] = (
    "zebra giraffe savanna migration wildebeest crocodile river",
    "knitting wool needles scarf pattern purl stitch yarn",
    "volcano magma eruption lava basalt tectonic ash",
)
