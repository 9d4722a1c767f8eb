"""The ``real`` trace: human-written prompts from sources the world is not built from."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from benchmarks.replay.builtin import TraceOptions
from benchmarks.replay.real import real_prompts, real_trace
from benchmarks.replay.runner import resolve_trace
from benchmarks.world.corpus import TASKS, Example, HeldOutText, build_corpus, leaks_into


def _as_examples(texts: list[str]) -> list[Example]:
    return [
        Example(f"real-{i}", "real", "real", ({"role": "user", "content": t},), "")
        for i, t in enumerate(texts)
    ]


def test_at_least_80_prompts_every_task_and_each_from_a_named_source() -> None:
    prompts = real_prompts()
    counts = Counter(p.task for p in prompts)
    assert len(prompts) >= 80
    assert set(counts) == set(TASKS)
    assert min(counts.values()) >= 5
    assert len({p.text for p in prompts}) == len(prompts)
    assert len({p.id for p in prompts}) == len(prompts)
    sources = Counter(p.source for p in prompts)
    assert set(sources) == {"handwritten", "gsm8k", "mmlu", "python-docs", "python-stdlib"}
    # Most of the trace comes from outside the team's own handwriting.
    assert sources["handwritten"] < len(prompts)


@pytest.mark.timeout(600)  # the default corpus: ~10 s of CPU, longer on busy cores
def test_no_real_prompt_occurs_in_the_training_text() -> None:
    corpus = build_corpus(seed=0, scale="default")
    held_out = HeldOutText.of(_as_examples([p.text for p in real_prompts()]))
    leaking = [e.id for e in corpus.train + corpus.validation if leaks_into(e, held_out)]
    assert leaking == []
    # The check itself sees a prompt that is in the training text.
    planted = HeldOutText.of(_as_examples([corpus.train[0].messages[-1]["content"]]))
    assert leaks_into(corpus.train[0], planted)


def test_the_trace_holds_every_prompt_once_shuffled_by_the_seed() -> None:
    options = TraceOptions(seed=3, max_new_tokens_cap=96)
    trace = real_trace(options)
    requests = list(trace.requests)
    assert trace.name == "real"
    assert sorted(r.id for r in requests) == sorted(p.id for p in real_prompts())
    assert {r.max_new_tokens for r in requests} == {96}
    assert all(not r.sampling.do_sample for r in requests)
    assert [r.id for r in real_trace(options).requests] == [r.id for r in requests]
    assert [r.id for r in real_trace(TraceOptions(seed=4)).requests] != [r.id for r in requests]
    # Only the world's tasks.
    only = real_trace(options, tasks=("math", "code"))
    assert {r.task for r in only.requests} == {"math", "code"}


@dataclass(frozen=True)
class _World:
    root: Path
    tasks: tuple[str, ...]
    corpus_dir: Path
    drafter_dirs: Mapping[str, Path]


def test_replay_resolves_the_name_real_to_the_trace(tmp_path: Path) -> None:
    world = _World(tmp_path, ("chat", "qa"), tmp_path / "corpus", {})
    trace = resolve_trace("real", world, TraceOptions())
    assert trace.name == "real"
    assert {r.task for r in trace.requests} == {"chat", "qa"}
