"""Replay metrics: per-task speed-up, acceptance, evenness across tasks, regret vs the oracle.

Speed-up of a policy on a task is its tokens/s divided by the tokens/s of the ``none``
replay (plain decoding) on the same requests, where tokens/s = sum of generated tokens /
sum of generation wall time (per request, as the sidecar measured it).
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from drafters.stats import mean_accepted_length

# Output-length buckets (generated tokens of the baseline run), upper bounds inclusive.
LENGTH_BUCKET_EDGES: tuple[int, ...] = (16, 32, 64, 128)


@dataclass(frozen=True)
class RequestResult:
    """What one replayed request produced and measured (from the Generate stream)."""

    index: int
    request_id: str
    task: str  # the trace's task label, else the classifier's cluster
    cluster: str
    drafter: str
    draft_length: int
    explored: bool
    greedy: bool
    prompt_tokens: int
    generated_tokens: int
    steps: int
    drafted: int
    accepted: int
    wall_time_s: float
    draft_time_s: float = 0.0
    verify_time_s: float = 0.0
    accepted_per_position: tuple[int, ...] = ()
    output_ids: tuple[int, ...] = ()
    finish_reason: str = ""
    policy_version: int = 0

    @property
    def arm(self) -> str:
        """The (drafter, k) arm as ``drafter:k``."""
        return f"{self.drafter}:{self.draft_length}"


@dataclass(frozen=True)
class TaskStats:
    """Aggregates of one policy's requests on one task."""

    requests: int
    generated_tokens: int
    wall_time_s: float
    steps: int
    drafted: int
    accepted: int
    arms: Mapping[str, int] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.wall_time_s if self.wall_time_s > 0 else 0.0

    @property
    def acceptance(self) -> float | None:
        """Per-token acceptance: accepted / drafted draft tokens (None when nothing drafted)."""
        return self.accepted / self.drafted if self.drafted else None

    @property
    def mean_accepted_length(self) -> float:
        """Tokens per target step, the bonus token included (1.0 for plain decoding)."""
        return mean_accepted_length(self.accepted, self.steps)


@dataclass(frozen=True)
class Evenness:
    """How evenly speed-up is spread across tasks."""

    mean: float  # traffic-weighted
    minimum: float
    maximum: float
    max_over_min: float
    cv: float
    jain: float


def aggregate(results: Sequence[RequestResult]) -> TaskStats:
    """Sum a group of request results."""
    return TaskStats(
        requests=len(results),
        generated_tokens=sum(r.generated_tokens for r in results),
        wall_time_s=sum(r.wall_time_s for r in results),
        steps=sum(r.steps for r in results),
        drafted=sum(r.drafted for r in results),
        accepted=sum(r.accepted for r in results),
        arms=dict(Counter(r.arm for r in results).most_common()),
    )


def group_by_task(results: Sequence[RequestResult]) -> dict[str, list[RequestResult]]:
    """Results per task, tasks in first-seen order."""
    grouped: dict[str, list[RequestResult]] = {}
    for result in results:
        grouped.setdefault(result.task, []).append(result)
    return grouped


def task_stats(results: Sequence[RequestResult]) -> dict[str, TaskStats]:
    """Aggregates per task."""
    return {task: aggregate(group) for task, group in group_by_task(results).items()}


def speedup(results: Sequence[RequestResult], baseline: Mapping[str, RequestResult]) -> float:
    """Tokens/s of ``results`` over the baseline's tokens/s on the same request ids."""
    matched = [baseline[r.request_id] for r in results if r.request_id in baseline]
    base = aggregate(matched).tokens_per_s
    mine = aggregate([r for r in results if r.request_id in baseline]).tokens_per_s
    return mine / base if base > 0 else 0.0


def per_task_speedup(
    results: Sequence[RequestResult], baseline: Sequence[RequestResult]
) -> dict[str, float]:
    """Speed-up per task over the baseline replay of the same prompts."""
    by_id = {r.request_id: r for r in baseline}
    return {task: speedup(group, by_id) for task, group in group_by_task(results).items()}


def paired_speedup(
    results: Sequence[RequestResult], baseline: Sequence[RequestResult]
) -> dict[str, float]:
    """Per task, the geometric mean of per-request speed-ups t_baseline(i) / t_policy(i).

    A robustness check beside the aggregate tokens/s ratio: with lossless decoding both runs
    produce the same tokens, so each request's time ratio is its speed-up, and the geometric
    mean is not dominated by a few long or preempted requests on a shared machine.
    """
    by_id = {r.request_id: r for r in baseline}
    logs: dict[str, list[float]] = {}
    for result in results:
        base = by_id.get(result.request_id)
        if base is not None and base.wall_time_s > 0 and result.wall_time_s > 0:
            logs.setdefault(result.task, []).append(math.log(base.wall_time_s / result.wall_time_s))
    return {task: math.exp(sum(v) / len(v)) for task, v in logs.items()}


def weighted_mean(values: Mapping[str, float], weights: Mapping[str, float]) -> float:
    """sum_t w_t x_t / sum_t w_t over the keys of ``values``."""
    total = sum(weights.get(k, 0.0) for k in values)
    if total <= 0:
        return 0.0
    return sum(x * weights.get(k, 0.0) for k, x in values.items()) / total


def coefficient_of_variation(values: Sequence[float]) -> float:
    """Population standard deviation over the mean (0 for fewer than two values)."""
    if len(values) < 2:
        return 0.0
    mean = sum(values) / len(values)
    variance = sum((x - mean) ** 2 for x in values) / len(values)
    return math.sqrt(variance) / mean if mean else 0.0


def jain_index(values: Sequence[float]) -> float:
    """Jain's fairness index (sum x)^2 / (n * sum x^2): 1 when all equal, 1/n at worst."""
    squares = sum(x * x for x in values)
    return (sum(values) ** 2) / (len(values) * squares) if squares else 0.0


def max_over_min(values: Sequence[float]) -> float:
    """Largest over smallest value (inf when the smallest is 0)."""
    low = min(values)
    return max(values) / low if low > 0 else math.inf


def evenness(speedups: Mapping[str, float], traffic: Mapping[str, float]) -> Evenness:
    """Evenness of per-task speed-ups; the mean is weighted by each task's traffic."""
    values = list(speedups.values())
    return Evenness(
        mean=weighted_mean(speedups, traffic),
        minimum=min(values),
        maximum=max(values),
        max_over_min=max_over_min(values),
        cv=coefficient_of_variation(values),
        jain=jain_index(values),
    )


def cumulative_regret(
    results: Sequence[RequestResult], oracle: Sequence[RequestResult]
) -> list[float]:
    """Cumulative regret in seconds: sum over requests of (own time - oracle's time).

    Requests are taken in replay order and matched by id; with lossless greedy decoding both
    produce the same tokens, so the difference is time the policy lost (or won, if negative)
    against the best fixed (drafter, k) per task.
    """
    oracle_time = {r.request_id: r.wall_time_s for r in oracle}
    total = 0.0
    curve: list[float] = []
    for result in results:
        if result.request_id in oracle_time:
            total += result.wall_time_s - oracle_time[result.request_id]
        curve.append(total)
    return curve


def regret_per_window(curve: Sequence[float], windows: int) -> list[float]:
    """Mean regret per request in ``windows`` consecutive slices of a cumulative curve.

    A learning policy's slope falls as it learns; after a drift it rises, then falls again.
    """
    n = len(curve)
    if n == 0 or windows <= 0:
        return []
    edges = [round(i * n / windows) for i in range(windows + 1)]
    slopes: list[float] = []
    for start, end in itertools.pairwise(edges):
        if end > start:
            before = curve[start - 1] if start > 0 else 0.0
            slopes.append((curve[end - 1] - before) / (end - start))
    return slopes


def dominant_arms(
    results: Sequence[RequestResult], boundaries: Sequence[int]
) -> list[dict[str, str]]:
    """Per phase (split at the request indices in ``boundaries``): cluster -> most chosen arm."""
    cuts = [0, *sorted(b for b in boundaries if 0 < b < len(results)), len(results)]
    phases: list[dict[str, str]] = []
    for start, end in itertools.pairwise(cuts):
        counts: dict[str, Counter[str]] = {}
        for result in results[start:end]:
            counts.setdefault(result.cluster, Counter())[result.arm] += 1
        phases.append({c: counter.most_common(1)[0][0] for c, counter in sorted(counts.items())})
    return phases


def length_bucket_name(tokens: int) -> str:
    """The output-length bucket of a token count, e.g. ``17-32`` or ``>128``."""
    low = 1
    for edge in LENGTH_BUCKET_EDGES:
        if tokens <= edge:
            return f"{low}-{edge}"
        low = edge + 1
    return f">{LENGTH_BUCKET_EDGES[-1]}"


def speedup_by_length(
    results: Sequence[RequestResult], baseline: Sequence[RequestResult]
) -> dict[str, float]:
    """Speed-up per output-length bucket (bucketed by the baseline's output length)."""
    by_id = {r.request_id: r for r in baseline}
    buckets: dict[str, list[RequestResult]] = {}
    for result in results:
        if result.request_id in by_id:
            name = length_bucket_name(by_id[result.request_id].generated_tokens)
            buckets.setdefault(name, []).append(result)
    order = [length_bucket_name(e) for e in LENGTH_BUCKET_EDGES] + [length_bucket_name(10**9)]
    return {name: speedup(buckets[name], by_id) for name in order if name in buckets}


def lossless_mismatches(
    results: Sequence[RequestResult], baseline: Sequence[RequestResult]
) -> list[str]:
    """Ids of greedy requests whose output tokens differ from the baseline's."""
    by_id = {r.request_id: r for r in baseline}
    return [
        r.request_id
        for r in results
        if r.greedy and r.request_id in by_id and r.output_ids != by_id[r.request_id].output_ids
    ]
