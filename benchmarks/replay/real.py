"""The ``real`` trace: human-written prompts the built-in world was not built from.

Every built-in trace but this one replays the world's own test split, which shares its
generators (templates, sources) with the training text. This one asks how the router
does on requests unlike its training traffic, where a drafter may accept little and
speculation must not make any task slower. Its prompts, all written by people:

- ``handwritten``: the world's handwritten, naturally worded prompts (7-8 per task), never
  used for training (``benchmarks/world/handwritten.py``);
- ``gsm8k``: the eight grade-school math word problems of GSM8K's chain-of-thought
  exemplars (Cobbe et al. 2021), as shipped in ``lm_eval/tasks/gsm8k/gsm8k-cot.yaml``;
- ``mmlu``: MMLU questions (Hendrycks et al. 2021) with their choices, from
  ``lm_eval/tasks/mmlu/flan_cot_fewshot/_cot_prompts.json``: closed-book subjects as qa, the
  history subjects (a quoted source, then a question about it) as rag;
- ``python-docs``: paragraphs and sentences of the Python reference manual
  (``pydoc_data.topics``, in the standard library) to summarise and to translate;
- ``python-stdlib``: signatures and docstrings of pure-Python standard-library functions,
  asked for as a function body.

Both ``lm_eval`` data files come with ``nvidia-lm-eval``, which the world installs for
another of its files (the RAG conversations); the corpus reads neither of them, nor the
Python documentation. The instructions around the sourced text ("Summarize ...",
"Translate into German: ...") are ours; the task labels are the source's, not the
classifier's. A test checks that no prompt occurs in the training text.
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import yaml

from benchmarks.replay.builtin import TraceOptions, with_arrivals
from benchmarks.replay.trace import ChatTurn, Trace, TraceRecord, TraceRequest
from benchmarks.world.handwritten import handwritten_prompts
from benchmarks.world.sources import normalize_space, package_dir, split_sentences

#: Sourced prompts per task (beside the handwritten ones).
PER_SOURCE = 6

QA_SUBJECTS = (
    "global_facts",
    "high_school_geography",
    "astronomy",
    "nutrition",
    "world_religions",
    "prehistory",
)
RAG_SUBJECTS = (
    "high_school_us_history",
    "high_school_european_history",
    "high_school_world_history",
)
SUMMARY_TOPICS = ("execmodel", "exceptions", "import", "naming", "context-managers", "calls")
TRANSLATION_TOPICS = ("truth", "booleans", "pass", "while", "for", "lambda")
TRANSLATION_LANGUAGES = ("German", "Spanish", "French", "Japanese", "Italian", "Portuguese")
CODE_FUNCTIONS = (
    "textwrap.dedent",
    "shlex.quote",
    "statistics.median",
    "posixpath.splitext",
    "html.escape",
    "calendar.leapdays",
)


@dataclass(frozen=True)
class RealPrompt:
    """One human-written prompt: its task (from its source), its text and where it is from."""

    id: str
    task: str
    text: str
    source: str


def _lm_eval_file(*parts: str) -> Path:
    return package_dir("lm_eval").joinpath("tasks", *parts)


def gsm8k_questions() -> list[str]:
    """The word problems of GSM8K's chain-of-thought exemplars."""
    config = yaml.safe_load(_lm_eval_file("gsm8k", "gsm8k-cot.yaml").read_text(encoding="utf-8"))
    return [normalize_space(s["question"]) for s in config["fewshot_config"]["samples"]]


@cache
def _mmlu_prompts() -> dict[str, str]:
    path = _lm_eval_file("mmlu", "flan_cot_fewshot", "_cot_prompts.json")
    prompts: dict[str, str] = json.loads(path.read_text(encoding="utf-8"))
    return prompts


def mmlu_questions(subject: str) -> list[str]:
    """The questions (stem and choices, without the worked answer) of one MMLU subject."""
    blocks = _mmlu_prompts()[subject].split("\n\nQ: ")[1:]
    return [block.split("\nA: ", 1)[0].strip() for block in blocks]


def _topic_paragraphs(topic: str, min_chars: int) -> list[str]:
    from pydoc_data.topics import topics

    paragraphs = (normalize_space(p) for p in re.split(r"\n\s*\n", topics[topic]))
    # Prose only: no headings, grammar rules, code or tables.
    return [
        p
        for p in paragraphs
        if len(p) >= min_chars
        and (p[0].isupper() or p[0] == '"')
        and "::=" not in p
        and ">>>" not in p
        and "|" not in p
    ]


def docs_paragraph(topic: str) -> str:
    """The first prose paragraph of at least 200 characters of a reference-manual topic."""
    return _topic_paragraphs(topic, 200)[0]


def docs_sentence(topic: str) -> str:
    """The first sentence of 8-40 words in a reference-manual topic's prose."""
    for paragraph in _topic_paragraphs(topic, 0):
        for sentence in split_sentences(paragraph):
            if 8 <= len(sentence.split()) <= 40:
                return sentence
    raise LookupError(f"no sentence of 8-40 words in topic {topic!r}")


def stdlib_function_prompt(dotted: str) -> str:
    """'Write this function' from a standard-library function's signature and docstring."""
    module_name, name = dotted.rsplit(".", 1)
    function: Callable[..., object] = getattr(importlib.import_module(module_name), name)
    doc = inspect.getdoc(function)
    if not doc:
        raise LookupError(f"{dotted} has no docstring")
    return (
        f"Write the Python function `{name}{inspect.signature(function)}`. "
        f"Its documentation says:\n\n{doc}"
    )


def _sourced() -> Iterator[tuple[str, str, str]]:
    """(task, source, text) of the sourced prompts."""
    for question in gsm8k_questions()[:PER_SOURCE]:
        yield "math", "gsm8k", question
    for subject in QA_SUBJECTS:
        yield "qa", "mmlu", mmlu_questions(subject)[0]
    for i in range(PER_SOURCE):
        subject = RAG_SUBJECTS[i % len(RAG_SUBJECTS)]
        yield "rag", "mmlu", mmlu_questions(subject)[i // len(RAG_SUBJECTS)]
    for topic in SUMMARY_TOPICS:
        yield (
            "summarization",
            "python-docs",
            (f"Summarize this paragraph in two or three sentences:\n\n{docs_paragraph(topic)}"),
        )
    for topic, language in zip(TRANSLATION_TOPICS, TRANSLATION_LANGUAGES, strict=True):
        yield "translation", "python-docs", f"Translate into {language}: {docs_sentence(topic)}"
    for dotted in CODE_FUNCTIONS:
        yield "code", "python-stdlib", stdlib_function_prompt(dotted)


@cache
def real_prompts() -> tuple[RealPrompt, ...]:
    """Every prompt of the ``real`` trace, handwritten first, in a fixed order."""
    prompts = [
        RealPrompt(f"real-handwritten-{i:03d}", str(p.task), p.text, "handwritten")
        for i, p in enumerate(handwritten_prompts())
    ]
    for i, (task, source, text) in enumerate(_sourced()):
        prompts.append(RealPrompt(f"real-{source}-{task}-{i:03d}", task, text, source))
    return tuple(prompts)


def real_trace(options: TraceOptions | None = None, tasks: Sequence[str] | None = None) -> Trace:
    """The ``real`` trace: every real prompt once (of ``tasks``, when given), shuffled by
    ``options.seed``, greedy, up to ``options.max_new_tokens_cap`` tokens each (the prompts
    have no reference answer to size them by); ``options.per_task`` does not apply."""
    options = options or TraceOptions()
    prompts = [p for p in real_prompts() if tasks is None or p.task in tasks]
    order = np.random.default_rng(options.seed).permutation(len(prompts))
    requests: list[TraceRecord] = [
        TraceRequest(
            id=prompts[i].id,
            task=prompts[i].task,
            messages=(ChatTurn(role="user", content=prompts[i].text),),
            max_new_tokens=options.max_new_tokens_cap,
        )
        for i in order
    ]
    return Trace(name="real", records=with_arrivals(requests, options))
