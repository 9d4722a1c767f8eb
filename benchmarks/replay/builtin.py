"""Built-in traces made from the world's held-out test split.

- ``single-<task>``: one task only;
- ``uniform``: every task equally often, interleaved;
- ``chat-heavy``: a mix shaped like LMSYS-Chat-1M traffic (mostly open-ended chat, then
  code and questions; the other tasks a few percent each);
- ``drift``: the mix changes halfway (chat/translation/qa first, then the other tasks);
- ``new-drafter``: the uniform mix, with one task's drafter removed at the start and a new
  drafter fine-tuned for that task registered halfway;
- ``learn``: one task's drafter withheld from the start and ``LEARN_WEIGHT`` times the other
  tasks' traffic for that task; halfway the replay waits for the sidecar to distil and
  register a drafter for it from the first half's captured traffic (its second-half
  prompts are others than its first half's);
- ``structured``: the uniform mix, each request twice: as it is, and with its answer held
  to a JSON object (``JSON_ANSWER``, what a JSON-mode application sends), labelled
  ``<task>+json``.

Traces are deterministic given the examples and the seed. Arrival offsets follow a Poisson
process (they order the requests; replays are closed-loop, one request at a time).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from benchmarks.replay.trace import (
    ChatTurn,
    Trace,
    TraceEvent,
    TraceRecord,
    TraceRequest,
    TraceSampling,
    TraceStructuredOutput,
)


class ExampleLike(Protocol):
    """What a trace needs of a corpus example (``benchmarks.world.corpus.Example``)."""

    @property
    def id(self) -> str: ...
    @property
    def task(self) -> str: ...
    @property
    def messages(self) -> Sequence[Mapping[str, str]]: ...
    @property
    def response(self) -> str: ...


# Shaped like LMSYS-Chat-1M (Zheng et al., 2023): open-ended chat dominates, coding is the
# largest specific task, then questions; the rest is a few percent each.
CHAT_HEAVY_MIX: dict[str, float] = {
    "chat": 0.50,
    "code": 0.14,
    "qa": 0.12,
    "translation": 0.06,
    "summarization": 0.06,
    "math": 0.06,
    "rag": 0.06,
}
DRIFT_FIRST_TASKS: tuple[str, ...] = ("chat", "translation", "qa")
# Share of each phase's traffic that goes to the other phase's tasks.
DRIFT_LEAK = 0.1
NEW_DRAFTER_TASK = "code"
# The learn trace's task gets this many times the other tasks' requests, so its first half
# captures enough pairs to distil from.
LEARN_WEIGHT = 4
# The prefix of drafters the sidecar's automatic distillation registers (router.auto_distill).
AUTO_DRAFTER_SUFFIX = "-auto"


@dataclass(frozen=True)
class TraceOptions:
    """How many requests and how long they may be."""

    per_task: int = 40
    seed: int = 0
    max_new_tokens_cap: int = 128
    # Chars per token of the world's byte-level BPE, roughly; sets max_new_tokens from the
    # reference response so tasks keep their different output lengths.
    chars_per_token: float = 2.5
    arrival_rate_per_s: float = 1.0
    # The learn trace's task (None: NEW_DRAFTER_TASK when the world has it).
    learn_task: str | None = None


def max_new_tokens_for(response: str, options: TraceOptions) -> int:
    """A per-request budget: the reference response's length in tokens, plus slack, at
    least 24, and never over the cap (``--max-new-tokens``; a cap under 24 was not one)."""
    estimate = round(len(response) / options.chars_per_token) + 16
    return min(options.max_new_tokens_cap, max(24, estimate))


def _by_task(examples: Sequence[ExampleLike]) -> dict[str, list[ExampleLike]]:
    grouped: dict[str, list[ExampleLike]] = {}
    for example in examples:
        grouped.setdefault(example.task, []).append(example)
    return grouped


def apportion(weights: Mapping[str, float], total: int) -> dict[str, int]:
    """Split ``total`` requests by weight (largest remainder; every count sums to total)."""
    positive = {task: w for task, w in weights.items() if w > 0}
    if not positive or total <= 0:
        return {}
    norm = sum(positive.values())
    exact = {task: total * w / norm for task, w in positive.items()}
    counts = {task: int(np.floor(x)) for task, x in exact.items()}
    leftover = total - sum(counts.values())
    by_remainder = sorted(positive, key=lambda task: (counts[task] - exact[task], task))
    for task in by_remainder[:leftover]:
        counts[task] += 1
    return {task: n for task, n in counts.items() if n > 0}


def _take(pool: list[ExampleLike], start: int, count: int) -> list[tuple[ExampleLike, int]]:
    """``count`` examples from ``pool`` from ``start`` on, cycling (with a pass number)."""
    return [(pool[(start + i) % len(pool)], (start + i) // len(pool)) for i in range(count)]


def request_from_example(example: ExampleLike, repeat: int, options: TraceOptions) -> TraceRequest:
    return TraceRequest(
        id=example.id if repeat == 0 else f"{example.id}#{repeat}",
        task=example.task,
        messages=tuple(ChatTurn(role=m["role"], content=m["content"]) for m in example.messages),  # type: ignore[arg-type]
        max_new_tokens=max_new_tokens_for(example.response, options),
    )


def _mixed(
    grouped: dict[str, list[ExampleLike]],
    counts: Mapping[str, int],
    offsets: dict[str, int],
    options: TraceOptions,
    rng: np.random.Generator,
) -> list[TraceRequest]:
    """Requests in the given per-task counts, shuffled; ``offsets`` advance per task."""
    requests: list[TraceRequest] = []
    for task, count in counts.items():
        for example, repeat in _take(grouped[task], offsets.get(task, 0), count):
            requests.append(request_from_example(example, repeat, options))
        offsets[task] = offsets.get(task, 0) + count
    order = rng.permutation(len(requests))
    return [requests[i] for i in order]


def with_arrivals(records: list[TraceRecord], options: TraceOptions) -> tuple[TraceRecord, ...]:
    """Give records Poisson arrival offsets in their order (events take the next request's)."""
    rng = np.random.default_rng(options.seed + 1)
    clock = 0.0
    timed: list[TraceRecord] = []
    for record in records:
        if isinstance(record, TraceRequest):
            clock += float(rng.exponential(1.0 / options.arrival_rate_per_s))
        timed.append(record.model_copy(update={"arrival_s": round(clock, 3)}))
    return tuple(timed)


def _weights(tasks: Sequence[str], mix: Mapping[str, float]) -> dict[str, float]:
    return {task: mix.get(task, 0.0) for task in tasks}


TraceBuilder = Callable[[dict[str, list[ExampleLike]], TraceOptions], list[TraceRecord]]


def _uniform(grouped: dict[str, list[ExampleLike]], options: TraceOptions) -> list[TraceRecord]:
    rng = np.random.default_rng(options.seed)
    counts = dict.fromkeys(grouped, options.per_task)
    return list(_mixed(grouped, counts, {}, options, rng))


def _chat_heavy(grouped: dict[str, list[ExampleLike]], options: TraceOptions) -> list[TraceRecord]:
    rng = np.random.default_rng(options.seed)
    total = options.per_task * len(grouped)
    counts = apportion(_weights(list(grouped), CHAT_HEAVY_MIX), total)
    return list(_mixed(grouped, counts, {}, options, rng))


def _drift(grouped: dict[str, list[ExampleLike]], options: TraceOptions) -> list[TraceRecord]:
    rng = np.random.default_rng(options.seed)
    first = [t for t in grouped if t in DRIFT_FIRST_TASKS] or list(grouped)[: len(grouped) // 2]
    second = [t for t in grouped if t not in first]
    half = options.per_task * len(grouped) // 2

    def phase(main: list[str], other: list[str]) -> dict[str, float]:
        leak = DRIFT_LEAK if other else 0.0
        weights = {t: (1.0 - leak) / len(main) for t in main}
        weights.update({t: leak / len(other) for t in other})
        return weights

    offsets: dict[str, int] = {}
    records: list[TraceRecord] = []
    records += _mixed(grouped, apportion(phase(first, second), half), offsets, options, rng)
    records += _mixed(grouped, apportion(phase(second, first), half), offsets, options, rng)
    return records


def _new_drafter(grouped: dict[str, list[ExampleLike]], options: TraceOptions) -> list[TraceRecord]:
    task = NEW_DRAFTER_TASK if NEW_DRAFTER_TASK in grouped else sorted(grouped)[-1]
    requests = _uniform(grouped, options)
    half = len(requests) // 2
    removal = TraceEvent(kind="remove_drafter", drafter=task)
    registration = TraceEvent(
        kind="register_drafter", drafter=f"{task}-new", source=task, tasks=(task,)
    )
    return [removal, *requests[:half], registration, *requests[half:]]


def learn_task_of(grouped: Mapping[str, object], options: TraceOptions) -> str:
    """The learn trace's task: the option's, else NEW_DRAFTER_TASK, else the last by name."""
    task = options.learn_task or (NEW_DRAFTER_TASK if NEW_DRAFTER_TASK in grouped else None)
    task = task or sorted(grouped)[-1]
    if task not in grouped:
        raise KeyError(f"learn task {task!r} is not a task of this world: {', '.join(grouped)}")
    return task


def _learn(grouped: dict[str, list[ExampleLike]], options: TraceOptions) -> list[TraceRecord]:
    task = learn_task_of(grouped, options)
    if options.per_task * LEARN_WEIGHT > len(grouped[task]):
        raise ValueError(
            f"learn: {options.per_task * LEARN_WEIGHT} requests of {task} but {len(grouped[task])}"
            " test prompts: the second half would replay the first half's (lower --per-task)"
        )
    rng = np.random.default_rng(options.seed)
    first_share = options.per_task // 2
    first = {t: first_share * (LEARN_WEIGHT if t == task else 1) for t in grouped}
    second = {t: options.per_task * (LEARN_WEIGHT if t == task else 1) - first[t] for t in grouped}
    offsets: dict[str, int] = {}  # the second half continues where the first stopped
    removal = TraceEvent(kind="remove_drafter", drafter=task)
    wait = TraceEvent(kind="await_drafter", drafter=f"{task}{AUTO_DRAFTER_SUFFIX}", tasks=(task,))
    return [
        removal,
        *_mixed(grouped, {t: n for t, n in first.items() if n > 0}, offsets, options, rng),
        wait,
        *_mixed(grouped, second, offsets, options, rng),
    ]


# The structured trace's grammar: an object with one string, compact (no whitespace
# between JSON's tokens, so a barely trained target cannot spend its budget on it).
JSON_ANSWER = TraceStructuredOutput(
    kind="json",
    spec=json.dumps(
        {
            "type": "object",
            "properties": {"answer": {"type": "string", "maxLength": 200}},
            "required": ["answer"],
            "additionalProperties": False,
        }
    ),
    disable_any_whitespace=True,
)
STRUCTURED_SUFFIX = "+json"  # the task label of a request held to JSON_ANSWER


def _structured(grouped: dict[str, list[ExampleLike]], options: TraceOptions) -> list[TraceRecord]:
    rng = np.random.default_rng(options.seed)
    requests: list[TraceRequest] = []
    for task, pool in grouped.items():
        for example, repeat in _take(pool, 0, options.per_task):
            free = request_from_example(example, repeat, options)
            held = free.model_copy(
                update={
                    "id": f"{free.id}{STRUCTURED_SUFFIX}",
                    "task": f"{task}{STRUCTURED_SUFFIX}",
                    "sampling": TraceSampling(structured_output=JSON_ANSWER),
                }
            )
            requests += [free, held]
    order = rng.permutation(len(requests))
    return [requests[i] for i in order]


def _single(task: str) -> TraceBuilder:
    def build(grouped: dict[str, list[ExampleLike]], options: TraceOptions) -> list[TraceRecord]:
        return [
            request_from_example(example, repeat, options)
            for example, repeat in _take(grouped[task], 0, options.per_task)
        ]

    return build


MIXED_TRACES: dict[str, TraceBuilder] = {
    "uniform": _uniform,
    "chat-heavy": _chat_heavy,
    "drift": _drift,
    "new-drafter": _new_drafter,
    "learn": _learn,
    "structured": _structured,
}


def builtin_trace_names(tasks: Sequence[str]) -> list[str]:
    """Every built-in trace name for a world with these tasks."""
    return [f"single-{task}" for task in tasks] + list(MIXED_TRACES)


def check_trace_name(name: str) -> None:
    """KeyError unless ``name`` can be a built-in trace (``single-<task>``, a mixed trace
    or ``real``): checked before a world is loaded, or built (minutes), for a typo."""
    if name.startswith("single-") or name in MIXED_TRACES or name == "real":
        return
    known = ", ".join(["single-<task>", *MIXED_TRACES, "real"])
    raise KeyError(f"unknown trace {name!r} (not a trace file either); built-in traces: {known}")


def builtin_trace(
    name: str, examples: Sequence[ExampleLike], options: TraceOptions = TraceOptions()
) -> Trace:
    """Build the named built-in trace from (test-split) examples."""
    grouped = _by_task(examples)
    if not grouped:
        raise ValueError("no examples to build a trace from")
    builders: dict[str, TraceBuilder] = {f"single-{t}": _single(t) for t in grouped}
    builders.update(MIXED_TRACES)
    if name not in builders:
        raise KeyError(f"unknown trace {name!r}; built-in traces: {', '.join(builders)}")
    return Trace(name=name, records=with_arrivals(builders[name](grouped, options), options))
