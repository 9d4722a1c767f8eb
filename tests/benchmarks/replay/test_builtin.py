"""Built-in traces from hand-made examples: counts, mixes, drift, events, determinism."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace

import pytest

from benchmarks.replay.builtin import (
    CHAT_HEAVY_MIX,
    TraceOptions,
    apportion,
    builtin_trace,
    builtin_trace_names,
    max_new_tokens_for,
)

TASKS = ("chat", "translation", "summarization", "qa", "math", "rag", "code")


@dataclass(frozen=True)
class FakeExample:
    id: str
    task: str
    split: str
    messages: tuple[dict[str, str], ...]
    response: str


def examples(per_task: int = 5) -> list[FakeExample]:
    return [
        FakeExample(
            id=f"{task}-{i}",
            task=task,
            split="test",
            messages=(
                {"role": "system", "content": "s"},
                {"role": "user", "content": f"{task} {i}"},
            ),
            response="x" * (30 * (1 + TASKS.index(task))),
        )
        for task in TASKS
        for i in range(per_task)
    ]


def test_apportion_sums_to_total_and_follows_weights() -> None:
    counts = apportion(CHAT_HEAVY_MIX, 100)
    assert sum(counts.values()) == 100
    assert counts["chat"] == 50 and counts["code"] == 14
    assert apportion({"a": 1.0, "b": 1.0, "c": 1.0}, 10) in (
        {"a": 4, "b": 3, "c": 3},
        {"a": 3, "b": 4, "c": 3},
        {"a": 3, "b": 3, "c": 4},
    )
    assert apportion({"a": 0.0}, 10) == {}


def test_names_cover_single_task_and_mixed_traces() -> None:
    names = builtin_trace_names(TASKS)
    assert "single-math" in names and {"uniform", "chat-heavy", "drift", "new-drafter"} <= set(
        names
    )


def test_uniform_has_per_task_requests_interleaved_and_deterministic() -> None:
    options = TraceOptions(per_task=8, seed=1)
    trace = builtin_trace("uniform", examples(), options)
    assert Counter(r.task for r in trace.requests) == dict.fromkeys(TASKS, 8)
    ids = [r.id for r in trace.requests]
    assert len(set(ids)) == len(ids)  # cycling past 5 examples makes "#1" ids
    assert any(i.endswith("#1") for i in ids)
    assert [r.task for r in trace.requests[:7]] != list(TASKS)  # shuffled
    assert builtin_trace("uniform", examples(), options) == trace
    arrivals = [r.arrival_s for r in trace.requests]
    assert arrivals == sorted(arrivals) and arrivals[0] > 0


def test_structured_holds_each_request_free_and_under_the_json_grammar() -> None:
    from benchmarks.replay.builtin import JSON_ANSWER, STRUCTURED_SUFFIX
    from benchmarks.replay.client import generate_request

    trace = builtin_trace("structured", examples(), TraceOptions(per_task=4, seed=1))
    counts = Counter(r.task for r in trace.requests)
    assert counts == {**dict.fromkeys(TASKS, 4), **{f"{t}+json": 4 for t in TASKS}}
    by_id = {r.id: r for r in trace.requests}
    for request in trace.requests:
        if request.task and request.task.endswith(STRUCTURED_SUFFIX):
            free = by_id[request.id.removesuffix(STRUCTURED_SUFFIX)]
            assert request.messages == free.messages
            assert request.sampling.structured_output == JSON_ANSWER
            assert free.sampling.structured_output is None
            hinted = generate_request(request, pin=None, no_update=True, task_hint=True)
            assert hinted.task_hint == free.task  # the label's task, for --task-hints
    assert builtin_trace("structured", examples(), TraceOptions(per_task=4, seed=1)) == trace


def test_single_task_trace_only_holds_that_task() -> None:
    trace = builtin_trace("single-qa", examples(), TraceOptions(per_task=3))
    assert [r.task for r in trace.requests] == ["qa"] * 3
    assert trace.name == "single-qa"


def test_chat_heavy_is_mostly_chat() -> None:
    trace = builtin_trace("chat-heavy", examples(), TraceOptions(per_task=20))
    counts = Counter(r.task for r in trace.requests)
    assert counts["chat"] == 70 and counts.most_common(1)[0][0] == "chat"
    assert sum(counts.values()) == 140


def test_drift_changes_the_mix_halfway() -> None:
    trace = builtin_trace("drift", examples(), TraceOptions(per_task=20))
    requests = trace.requests
    half = len(requests) // 2
    first = Counter(r.task for r in requests[:half])
    second = Counter(r.task for r in requests[half:])
    early = {"chat", "translation", "qa"}
    assert sum(first[t] for t in early) >= 0.85 * half
    assert sum(second[t] for t in early) <= 0.15 * half


def test_new_drafter_trace_removes_then_registers_halfway() -> None:
    trace = builtin_trace("new-drafter", examples(), TraceOptions(per_task=4))
    kinds = [getattr(r, "kind", "") for r in trace.records]
    assert kinds[0] == "remove_drafter"
    registration = kinds.index("register_drafter")
    assert registration == 1 + len(trace.requests) // 2
    event = trace.events[1]
    assert event.drafter == "code-new" and event.source == "code" and event.tasks == ("code",)


def test_max_new_tokens_follows_the_reference_length_within_bounds() -> None:
    options = TraceOptions(max_new_tokens_cap=64)
    assert max_new_tokens_for("", options) == 24
    assert max_new_tokens_for("x" * 90, options) == 52
    assert max_new_tokens_for("x" * 10_000, options) == 64
    # A cap under the floor of 24 is still a cap (--max-new-tokens 8 ran 24 tokens).
    assert max_new_tokens_for("", replace(options, max_new_tokens_cap=8)) == 8


def test_unknown_trace_name_lists_the_known_ones() -> None:
    with pytest.raises(KeyError, match="uniform"):
        builtin_trace("nope", examples())
