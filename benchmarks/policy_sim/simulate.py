"""Run one policy through a simulated request stream and measure it against the oracle.

Each request has a cluster (from the ground truth's mix), a prompt length (hence a length
bucket) and a number of tokens to generate. The chosen (drafter, k) is simulated step by
step: the request's acceptance is the true one plus N(0, 0.04) noise, each step accepts
min(k, G) tokens with G geometric (truncated-geometric acceptance), and draft and verify
times are the true costs times log-normal noise (sigma 0.1). The policy sees only this
outcome; ``plain_token_time_s`` is not reported, so it must estimate t_ar itself.

A scenario may add a machine load (``LoadModel``): each request runs at a slowdown that
multiplies all its times (a busy or an idle spell of other work, lasting a geometric
number of requests), and a few requests stall (x10) in one of their two phases (draft or
verify). Regret stays in idle-machine target seconds: the load changes what the policy
measures, not which arm is best.

Regret is in saved target time, in expectation: a request of N tokens on an arm with true
speed-up S takes N * t_ar / S, so its regret against the oracle's S* is
N * t_ar * (1 / S - 1 / S*) seconds.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from benchmarks.policy_sim.ground_truth import COPY_RUN_MEAN, K_MAX, NGRAM, GroundTruth
from router.policy.base import Context, Outcome, Policy, length_bucket
from router.policy.registry import make_policy
from router.policy.static import StaticPolicy, table_key

ACCEPTANCE_NOISE = 0.04
COST_NOISE = 0.1
SWITCH_RUN = 10  # consecutive requests off the old arm that count as "switched"


@dataclass(frozen=True)
class Event:
    """Something that happens mid-stream: acceptance drift, or a drafter registered."""

    at: int
    kind: str  # "drift" | "add"
    cluster: str = ""
    drafter: str = ""
    delta: float = 0.0
    with_similarity: bool = False


@dataclass(frozen=True)
class LoadModel:
    """Other work on the machine, per request: busy spells slow every time of a request by
    a factor drawn from ``busy_slowdown``, idle spells by one from ``idle_slowdown``; a
    spell lasts a geometric number of requests (mean ``mean_spell``); a share
    ``stall_share`` of requests also stall, x ``stall_factor``, in one phase."""

    busy_slowdown: tuple[float, float] = (1.5, 3.0)
    idle_slowdown: tuple[float, float] = (1.0, 1.1)
    mean_spell: float = 5.0
    stall_share: float = 0.03
    stall_factor: float = 10.0

    def sample(self, n: int, seed: int) -> np.ndarray:
        """[n, 2]: the slowdown of each request's draft and verify times."""
        rng = np.random.default_rng(seed)
        busy = np.zeros(n, dtype=bool)
        state, i = bool(rng.random() < 0.5), 0
        while i < n:
            spell = int(rng.geometric(1.0 / self.mean_spell))
            busy[i : i + spell] = state
            state, i = not state, i + spell
        level = np.where(
            busy, rng.uniform(*self.busy_slowdown, size=n), rng.uniform(*self.idle_slowdown, size=n)
        )
        factors = np.repeat(level[:, None], 2, axis=1)
        stalled = rng.random(n) < self.stall_share
        phase = rng.integers(0, 2, size=n)
        factors[stalled, phase[stalled]] *= self.stall_factor
        return factors


@dataclass(frozen=True)
class Scenario:
    """A ground truth, the drafters registered at the start, and the events of the stream."""

    name: str
    description: str
    truth: GroundTruth
    initial_drafters: tuple[str, ...]
    events: tuple[Event, ...] = ()
    requests: int = 5000
    load: LoadModel | None = None


@dataclass(frozen=True)
class PolicySpec:
    """A policy to simulate: registry name and config; ``full_information`` scores all drafters."""

    label: str
    policy: str
    config: Mapping[str, Any] = field(default_factory=dict)
    full_information: bool = False


@dataclass(frozen=True)
class RequestStream:
    """The requests of one scenario (shared by every policy): cluster, prompt and output length."""

    cluster: np.ndarray
    prompt_tokens: np.ndarray
    tokens: np.ndarray
    slowdown: np.ndarray | None = None  # [n, 2]: draft and verify slowdown (a LoadModel)

    @classmethod
    def sample(
        cls, truth: GroundTruth, n: int, seed: int, load: LoadModel | None = None
    ) -> RequestStream:
        rng = np.random.default_rng(seed)
        cluster = rng.choice(len(truth.clusters), size=n, p=truth.cluster_weights)
        long = rng.random(n) < truth.long_prompt_share[cluster]
        prompt = np.where(long, rng.integers(64, 256, size=n), rng.integers(8, 64, size=n))
        mean = truth.mean_tokens[cluster]
        tokens = np.clip(np.round(mean * rng.lognormal(-0.08, 0.4, size=n)), 8, 512)
        slowdown = load.sample(n, seed + 7919) if load is not None else None
        return cls(cluster, prompt, tokens.astype(np.int64), slowdown)


def accepted_steps(rng: np.random.Generator, acceptance: float, k: int, tokens: int) -> np.ndarray:
    """Accepted draft tokens per step until ``tokens`` are generated (bonus included)."""
    # Successes before the first failure: G - 1 with G ~ Geometric(1 - a); truncated at k.
    accepted = np.minimum(rng.geometric(1.0 - acceptance, size=tokens) - 1, k)
    emitted = np.cumsum(accepted + 1)
    steps = int(np.searchsorted(emitted, tokens)) + 1
    return accepted[:steps]


def copy_steps(
    rng: np.random.Generator, match: float, keep: float, k: int, tokens: int
) -> tuple[list[int], list[int]]:
    """A copy drafter's (drafted, accepted) per step until ``tokens`` are generated: a
    lookup matches with ``match``; a match is a repeated stretch of R tokens (geometric,
    mean COPY_RUN_MEAN) with ``keep``, else rejected at once. A stretch takes full steps
    (k drafted and kept, the bonus token the copy's next) while more than k are left,
    then one that keeps the rest; an unmatched lookup drafts nothing."""
    drafted: list[int] = []
    accepted: list[int] = []
    emitted = 0
    while emitted < tokens:
        if rng.random() >= match:
            drafted.append(0)
            accepted.append(0)
            emitted += 1
            continue
        left = int(rng.geometric(1.0 / COPY_RUN_MEAN)) if rng.random() < keep else 0
        while left > k:
            drafted.append(k)
            accepted.append(k)
            left -= k + 1
            emitted += k + 1
        drafted.append(k)
        accepted.append(left)
        emitted += left + 1
    return drafted, accepted


def simulate_outcome(
    rng: np.random.Generator,
    truth: GroundTruth,
    cell: tuple[int, int],
    drafter: str,
    k: int,
    tokens: int,
    slowdown: np.ndarray | None = None,
) -> Outcome:
    """Run one request on (drafter, k) under the ground truth; ``slowdown`` (draft,
    verify) multiplies its measured times (a ``LoadModel``)."""
    noise = rng.lognormal(0.0, COST_NOISE, size=2)
    if slowdown is not None:
        noise = noise * slowdown
    if k == 0:
        return Outcome(
            (0,) * tokens,
            (0,) * tokens,
            0.0,
            tokens * truth.t_ar * noise[1],
            tokens * truth.t_ar * noise[1],
            tokens,
        )
    d = truth.drafters.index(drafter)
    mean = truth.acceptance[cell[0], cell[1], d]
    acceptance = float(np.clip(mean + rng.normal(0.0, ACCEPTANCE_NOISE), 0.01, 0.95))
    if truth.copy_match is not None and drafter == NGRAM:
        match = float(truth.copy_match[cell])
        drafted, kept = copy_steps(rng, match, acceptance, k, tokens)
        total = sum(drafted)
        draft = total * truth.draft_cost[d] * truth.t_ar * noise[0]
        verify = (len(drafted) + truth.verify_slope * total) * truth.t_ar * noise[1]
        return Outcome(
            tuple(drafted), tuple(kept), draft, verify, draft + verify, sum(kept) + len(kept)
        )
    accepted = accepted_steps(rng, acceptance, k, tokens)
    steps = len(accepted)
    draft = steps * k * truth.draft_cost[d] * truth.t_ar * noise[0]
    verify = steps * (1.0 + truth.verify_slope * k) * truth.t_ar * noise[1]
    return Outcome(
        (k,) * steps,
        tuple(accepted.tolist()),
        draft,
        verify,
        draft + verify,
        int(accepted.sum()) + steps,
    )


@dataclass
class _Phase:
    """What holds between two events: the ground truth, the present drafters, the oracle."""

    truth: GroundTruth
    present: list[str]
    speedups: np.ndarray
    oracle: dict[tuple[int, int], tuple[str, int]]

    @classmethod
    def of(cls, truth: GroundTruth, present: list[str]) -> _Phase:
        return cls(truth, present, truth.speedups(), truth.oracle_arms(present))

    def speedup(self, cell: tuple[int, int], drafter: str, k: int) -> float:
        if k == 0:
            return 1.0
        return float(self.speedups[cell[0], cell[1], self.truth.drafters.index(drafter), k])


def oracle_table(phase: _Phase) -> dict[str, tuple[str, int]]:
    """The oracle policy's config table: ``"<cluster>/<bucket>" -> (drafter, k)``."""
    return {
        table_key(Context(phase.truth.clusters[c], b)): arm for (c, b), arm in phase.oracle.items()
    }


def _apply(event: Event, phase: _Phase, policy: Policy) -> _Phase:
    if event.kind == "drift":
        return _Phase.of(
            phase.truth.with_acceptance(event.cluster, event.drafter, event.delta), phase.present
        )
    similarity = phase.truth.similarity.get(event.drafter) if event.with_similarity else None
    policy.add_drafter(event.drafter, similarity)
    return _Phase.of(phase.truth, [*phase.present, event.drafter])


def _first_run(flags: list[bool], run: int) -> int | None:
    """1-based index where the first run of ``run`` consecutive True flags starts."""
    streak = 0
    for i, flag in enumerate(flags):
        streak = streak + 1 if flag else 0
        if streak == run:
            return i - run + 2
    return None


def run_policy(
    scenario: Scenario, spec: PolicySpec, stream: RequestStream, seed: int
) -> dict[str, Any]:
    """Simulate ``spec`` on ``scenario``; returns the metrics of one policy (JSON-able)."""
    rng = np.random.default_rng(seed)
    phase = _Phase.of(scenario.truth, list(scenario.initial_drafters))
    config = dict(spec.config)
    if spec.policy == "oracle":
        config["table"] = oracle_table(phase)
    policy = make_policy(spec.policy, phase.present, config)
    events = sorted(scenario.events, key=lambda e: e.at)
    n = len(stream.cluster)
    regret = 0.0
    curve: list[float] = []
    on_oracle = np.zeros(n, dtype=bool)
    k0_chosen: list[bool] = []
    latencies = np.zeros(n)
    drift_flags: list[bool] = []
    added_flags: list[bool] = []
    drift = next((e for e in events if e.kind == "drift"), None)
    added = next((e for e in events if e.kind == "add"), None)
    for i in range(n):
        while events and events[0].at == i:
            phase = _apply(events.pop(0), phase, policy)
            if isinstance(policy, StaticPolicy) and spec.policy == "oracle":
                policy.table = oracle_table(phase)
        c = int(stream.cluster[i])
        cluster = phase.truth.clusters[c]
        context = Context(cluster, length_bucket(int(stream.prompt_tokens[i])))
        cell = (c, context.length_bucket)
        started = time.perf_counter_ns()
        decision = policy.select(context, phase.present)
        latencies[i] = (time.perf_counter_ns() - started) / 1000.0
        tokens = int(stream.tokens[i])
        best = phase.oracle[cell]
        regret += (
            tokens
            * phase.truth.t_ar
            * (
                1.0 / phase.speedup(cell, decision.drafter, decision.k)
                - 1.0 / phase.speedup(cell, *best)
            )
        )
        on_oracle[i] = (decision.drafter, decision.k) == best
        if i >= n // 2 and best[1] == 0:
            k0_chosen.append(decision.k == 0)
        if drift is not None and i >= drift.at and cluster == drift.cluster:
            drift_flags.append(decision.drafter != drift.drafter)
        if added is not None and i >= added.at and cluster == added.cluster:
            added_flags.append(decision.drafter == added.drafter)
        slowdown = stream.slowdown[i] if stream.slowdown is not None else None
        outcome = simulate_outcome(
            rng, phase.truth, cell, decision.drafter, decision.k, tokens, slowdown
        )
        policy.update(context, decision, outcome)
        if spec.full_information:
            _score_others(rng, policy, phase, context, cell, decision.drafter, decision.k, tokens)
        if (i + 1) % 500 == 0:
            curve.append(round(regret, 4))
    loop = select_latency_us(policy, _contexts(stream, phase.truth), phase.present)
    result: dict[str, Any] = {
        "regret": regret,
        "oracle_fraction_last_half": float(on_oracle[n // 2 :].mean()),
        "select_us_p50": float(np.median(loop)),
        "select_us_p99": float(np.percentile(loop, 99)),
        "select_us_p50_in_stream": float(np.median(latencies)),
        "k0_fraction_on_k0_contexts_last_half": float(np.mean(k0_chosen)) if k0_chosen else None,
        "regret_curve": curve,
    }
    if drift is not None:
        result["switch_after_drift"] = _first_run(drift_flags, SWITCH_RUN)
    if added is not None:
        result["new_drafter_first_use"] = _first_run(added_flags, 1)
        result["new_drafter_share_after_add"] = float(np.mean(added_flags)) if added_flags else 0.0
    return result


def _contexts(stream: RequestStream, truth: GroundTruth) -> list[Context]:
    pairs = {
        (int(c), length_bucket(int(p)))
        for c, p in zip(stream.cluster, stream.prompt_tokens, strict=True)
    }
    return [Context(truth.clusters[c], b) for c, b in sorted(pairs)]


def select_latency_us(
    policy: Policy, contexts: list[Context], eligible: list[str], rounds: int = 250
) -> np.ndarray:
    """select() wall time in microseconds, cycling over ``contexts`` in a tight loop.

    Measured apart from the simulation so the figure is the call's own cost, not the
    simulator's cache pollution (the in-stream figure is reported beside it).
    """
    timings = np.zeros(rounds * len(contexts))
    clock = time.perf_counter_ns
    for i in range(len(timings)):
        context = contexts[i % len(contexts)]
        started = clock()
        policy.select(context, eligible)
        timings[i] = (clock() - started) / 1000.0
    return timings


def _score_others(
    rng: np.random.Generator,
    policy: Policy,
    phase: _Phase,
    context: Context,
    cell: tuple[int, int],
    chosen: str,
    k: int,
    tokens: int,
) -> None:
    """Full information: every other drafter's teacher-forced accepts on this output."""
    draft_length = k or 4
    for drafter in phase.present:
        if drafter == chosen:
            continue
        mean = phase.truth.acceptance[cell[0], cell[1], phase.truth.drafters.index(drafter)]
        acceptance = float(np.clip(mean + rng.normal(0.0, ACCEPTANCE_NOISE), 0.01, 0.95))
        if phase.truth.copy_match is not None and drafter == NGRAM:
            match = float(phase.truth.copy_match[cell])
            drafted, copied = copy_steps(rng, match, acceptance, draft_length, tokens)
            # As the sidecar scores a lookup: its drafted counts too (DraftCounter).
            policy.update_counterfactual(context, drafter, copied, draft_length, drafted)
            continue
        accepted = accepted_steps(rng, acceptance, draft_length, tokens)
        policy.update_counterfactual(context, drafter, accepted.tolist(), draft_length)


def run_scenario(
    scenario: Scenario, specs: list[PolicySpec], seed: int
) -> dict[str, dict[str, Any]]:
    """Every policy on the same request stream; per policy the metrics of ``run_policy``."""
    stream = RequestStream.sample(scenario.truth, scenario.requests, seed, scenario.load)
    return {
        spec.label: run_policy(scenario, spec, stream, seed + 1 + j) for j, spec in enumerate(specs)
    }


__all__ = [
    "K_MAX",
    "Event",
    "LoadModel",
    "PolicySpec",
    "RequestStream",
    "Scenario",
    "run_policy",
    "run_scenario",
]
