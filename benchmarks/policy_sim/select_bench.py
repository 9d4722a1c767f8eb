"""Thompson ``select`` latency for 8 drafters x draft lengths 0..8, against a 100 us budget.

    python -m benchmarks.policy_sim.select_bench [--selects 20000] [--seed 0] [--json PATH]

A ``thompson`` policy (k_max 8) over the 8 random drafters of the simulator's
``many_drafters`` ground truth first learns from ``warmup`` simulated requests on its 16
contexts (cluster x length bucket), then is timed, wall clock per call, three ways:

- ``select``: calls in a tight loop over the contexts, nothing changing in between;
- ``select, unseen context``: the same in contexts never updated (a length bucket the
  stream lacks), whose priors are built from their cluster's other buckets on each call;
- ``select after update``: each call follows one update (a learning sidecar);
- ``select_many of 8``: one call per batch of 8 contexts (a Route batch under load).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import module_parser
from benchmarks.policy_sim.ground_truth import CREATIVE, TASKS, GroundTruth, random_ground_truth
from benchmarks.policy_sim.simulate import RequestStream, simulate_outcome
from router.policy.base import Context, Policy, length_bucket
from router.policy.registry import make_policy

BUDGET_US = 100.0
DRAFTERS = 8
K_MAX = 8
BATCH = 8
UNSEEN_BUCKET = 3  # prompts of 1024+ tokens: never in the stream (at most 255)


def warmed_policy(truth: GroundTruth, requests: int, seed: int) -> tuple[Policy, list[Context]]:
    """A ``thompson`` policy that has learnt from ``requests`` simulated requests, and the
    contexts of its stream."""
    policy = make_policy("thompson", truth.drafters, {"k_max": K_MAX, "seed": seed})
    stream = RequestStream.sample(truth, requests, seed)
    rng = np.random.default_rng(seed + 1)
    contexts = []
    for c, prompt, tokens in zip(stream.cluster, stream.prompt_tokens, stream.tokens, strict=True):
        context = Context(truth.clusters[int(c)], length_bucket(int(prompt)))
        decision = policy.select(context, truth.drafters)
        cell = (int(c), context.length_bucket)
        outcome = simulate_outcome(rng, truth, cell, decision.drafter, decision.k, int(tokens))
        policy.update(context, decision, outcome)
        contexts.append(context)
    return policy, sorted(set(contexts), key=lambda c: (c.cluster, c.length_bucket))


def time_calls(call: Callable[[int], object], calls: int) -> np.ndarray:
    """Wall time of ``call(i)`` for i in 0..calls-1, in microseconds."""
    timings = np.zeros(calls)
    clock = time.perf_counter_ns
    for i in range(calls):
        started = clock()
        call(i)
        timings[i] = (clock() - started) / 1000.0
    return timings


def selects_after_updates(
    policy: Policy, truth: GroundTruth, contexts: Sequence[Context], calls: int, seed: int
) -> np.ndarray:
    """Wall time of ``select`` in microseconds when each call follows an update."""
    rng = np.random.default_rng(seed + 2)
    timings = np.zeros(calls)
    for i in range(calls):
        context = contexts[i % len(contexts)]
        started = time.perf_counter_ns()
        decision = policy.select(context, truth.drafters)
        timings[i] = (time.perf_counter_ns() - started) / 1000.0
        cell = (truth.clusters.index(context.cluster), context.length_bucket)
        outcome = simulate_outcome(rng, truth, cell, decision.drafter, decision.k, 100)
        policy.update(context, decision, outcome)
    return timings


def measure(selects: int = 20_000, seed: int = 0, warmup: int = 2_000) -> dict[str, Any]:
    """p50 and p99 of each way of timing (module doc), in microseconds."""
    truth = random_ground_truth(DRAFTERS, (*TASKS, CREATIVE), seed)
    policy, contexts = warmed_policy(truth, warmup, seed)
    eligible = list(truth.drafters)

    def select(i: int) -> object:
        return policy.select(contexts[i % len(contexts)], eligible)

    unseen = [Context(cluster, UNSEEN_BUCKET) for cluster in truth.clusters]

    def select_unseen(i: int) -> object:
        return policy.select(unseen[i % len(unseen)], eligible)

    def select_many(i: int) -> object:
        batch = [contexts[(i * BATCH + j) % len(contexts)] for j in range(BATCH)]
        return policy.select_many(batch, eligible)

    timings = {
        "select": time_calls(select, selects),
        "select, unseen context": time_calls(select_unseen, selects),
        "select after update": selects_after_updates(policy, truth, contexts, selects, seed),
        f"select_many of {BATCH}": time_calls(select_many, max(1, selects // BATCH)),
    }
    return {
        "drafters": DRAFTERS,
        "k_max": K_MAX,
        "contexts": len(contexts),
        "warmup_requests": warmup,
        "selects": selects,
        "seed": seed,
        "budget_us": BUDGET_US,
        "calls": {
            name: {
                "p50_us": round(float(np.median(values)), 1),
                "p99_us": round(float(np.percentile(values, 99)), 1),
                "calls": len(values),
            }
            for name, values in timings.items()
        },
    }


def format_result(result: dict[str, Any]) -> str:
    lines = [
        f"thompson, {result['drafters']} drafters x k 0..{result['k_max']}, "
        f"{result['contexts']} contexts, after {result['warmup_requests']} updates "
        f"(budget: select p50 <= {result['budget_us']:.0f} us)",
        f"{'call':<22} {'p50 us':>8} {'p99 us':>8} {'calls':>7}",
    ]
    for name, figures in result["calls"].items():
        lines.append(
            f"{name:<22} {figures['p50_us']:>8.1f} {figures['p99_us']:>8.1f} {figures['calls']:>7}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = module_parser(__doc__)
    parser.add_argument("--selects", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    result = measure(args.selects, args.seed)
    print(format_result(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
