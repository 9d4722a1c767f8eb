"""Route + Report traffic with outcomes simulated from the ground truth, and its regret.

A trace request (the replay's built-in traces, ``benchmarks.replay.builtin``) is routed
by a live sidecar over gRPC with its task as the hint; the chosen (drafter, k) is then
run in simulation on the world's measured ground truth (``benchmarks.policy_sim``:
per-token acceptance per task and drafter from ``eval.json``, true draft and verify
costs) and the outcome is reported back, so every decision has an exact expected cost.

Regret against the hindsight oracle, in seconds of target time: a request of N tokens on
an arm of true speed-up S takes N t_ar / S, the best arm of its (task, length bucket)
among the served drafters N t_ar / S*, so its regret is N t_ar (1 / S - 1 / S*).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
import numpy as np

from benchmarks.policy_sim.ground_truth import GroundTruth
from benchmarks.policy_sim.simulate import simulate_outcome
from benchmarks.replay.trace import TraceRequest
from router.pb import router_pb2, router_pb2_grpc
from router.policy.base import length_bucket

logger = logging.getLogger(__name__)

RPC_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Decided:
    """One request's decision on one replica and its regret (``error`` when it failed)."""

    replica: str
    index: int
    task: str
    drafter: str
    k: int
    regret_s: float
    error: str = ""


class RegretTable:
    """True speed-ups per (task, length bucket, drafter, k) and the oracle's per cell."""

    def __init__(self, truth: GroundTruth, served: Sequence[str]) -> None:
        self.truth = truth
        self.speedups = truth.speedups()  # [C, B, D, K + 1]
        mask = np.array([d in served for d in truth.drafters])
        table = np.where(mask[None, None, :, None], self.speedups, -np.inf)
        table[..., 0] = 1.0
        self.best = table.reshape(table.shape[0], table.shape[1], -1).max(axis=2)  # [C, B]

    def cell(self, task: str, prompt_tokens: int) -> tuple[int, int]:
        buckets = self.speedups.shape[1]
        return self.truth.clusters.index(task), min(length_bucket(prompt_tokens), buckets - 1)

    def regret(self, cell: tuple[int, int], drafter: str, k: int, tokens: int) -> float:
        c, b = cell
        if k == 0 or drafter not in self.truth.drafters:
            speedup = 1.0
        else:
            d = self.truth.drafters.index(drafter)
            speedup = float(self.speedups[c, b, d, min(k, self.speedups.shape[-1] - 1)])
        return tokens * self.truth.t_ar * (1.0 / speedup - 1.0 / float(self.best[c, b]))


def route_request(request: TraceRequest) -> router_pb2.RouteRequest:
    """The Route call for a trace request, its task as the hint."""
    message = router_pb2.RouteRequest(
        request_id="", task_hint=request.task or "", max_new_tokens=request.max_new_tokens
    )
    if request.prompt is not None:
        message.text = request.prompt
    else:
        for turn in request.messages or ():
            message.conversation.messages.add(role=turn.role, content=turn.content)
    return message


def outcome_rng(seed: int, index: int) -> np.random.Generator:
    """The noise of request ``index``: the same in every fleet, whichever arm it runs."""
    return np.random.default_rng([seed, index])


class Replica:
    """A sidecar's gRPC stub under a name."""

    def __init__(self, name: str, address: str) -> None:
        self.name = name
        self.address = address
        self._channel = grpc.insecure_channel(address)
        self.stub = router_pb2_grpc.RouterStub(self._channel)

    def close(self) -> None:
        self._channel.close()


def serve_one(
    replica: Replica,
    request: TraceRequest,
    index: int,
    table: RegretTable,
    seed: int,
) -> Decided:
    """Route ``request`` on ``replica``, simulate its arm, report; the regret of the arm."""
    task = request.task or ""
    try:
        decision = replica.stub.Route(route_request(request), timeout=RPC_TIMEOUT_S)
        cell = table.cell(task, int(decision.prompt_tokens))
        drafter, k = decision.drafter or "none", int(decision.draft_length)
        tokens = int(request.max_new_tokens)
        outcome = simulate_outcome(outcome_rng(seed, index), table.truth, cell, drafter, k, tokens)
        replica.stub.Report(
            router_pb2.RouteOutcome(
                request_id=decision.request_id,
                drafted_per_step=list(outcome.drafted_per_step),
                accepted_per_step=list(outcome.accepted_per_step),
                draft_time_s=outcome.draft_time_s,
                verify_time_s=outcome.verify_time_s,
                wall_time_s=outcome.wall_time_s,
                generated_tokens=outcome.generated_tokens,
            ),
            timeout=RPC_TIMEOUT_S,
        )
    except grpc.RpcError as error:
        logger.warning("request %d on %s failed: %s", index, replica.name, error)
        return Decided(replica.name, index, task, "", 0, 0.0, str(error.code()))
    return Decided(replica.name, index, task, drafter, k, table.regret(cell, drafter, k, tokens))


def total_regret(decided: Sequence[Decided]) -> float:
    return float(sum(d.regret_s for d in decided))


def per_replica_regret(decided: Sequence[Decided]) -> dict[str, float]:
    regrets: dict[str, float] = {}
    for d in decided:
        regrets[d.replica] = regrets.get(d.replica, 0.0) + d.regret_s
    return regrets
