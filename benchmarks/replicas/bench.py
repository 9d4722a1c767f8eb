"""``specroute bench replicas``: three sidecars that pool what they learn through Redis,
against the same three learning alone; then faults (Redis restarted mid-replay, a
replica killed with SIGKILL and a new one started).

Phases, every request Route + Report on a live sidecar with its outcome simulated from
the world's ground truth (``traffic.py``):

1. shared: a uniform replay of the world's test prompts, split round-robin over three
   pooled sidecars (one Redis, an append-only file as a production Redis keeps);
2. faults, on the same fleet, a second replay (another seed): Redis is stopped for a
   while and started again, then one replica is killed and a new one started, which
   replays the retained history before it serves and takes the killed one's share;
3. isolated: the first replay again on three fresh sidecars with pooling off, and a
   fresh unpooled sidecar given exactly the new replica's first 50 requests (cold).

Reports the regret against the hindsight oracle per replica and for the fleet, shared vs
isolated; the new replica's first-50 regret, warm (pooled) vs cold; outcomes published,
applied and dropped per pooled replica over both replays (with nothing lost, every
surviving replica's applied equals what all the others published); request errors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import secrets
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.policy_sim.ground_truth import default_ground_truth
from benchmarks.replay.builtin import TraceOptions, builtin_trace
from benchmarks.replay.trace import TraceRequest
from benchmarks.replicas.fleet import (
    PoolingTarget,
    RunningReplica,
    counters_of,
    start_replicas,
)
from benchmarks.replicas.redis_server import RedisServer
from benchmarks.replicas.traffic import (
    Decided,
    RegretTable,
    per_replica_regret,
    serve_one,
    total_regret,
)
from benchmarks.world.layout import read_examples
from router.launch import sigterm_as_exit

logger = logging.getLogger(__name__)

FLEET = ("replica-0", "replica-1", "replica-2")
NEWCOMER = "replica-3"
COLD = "cold"
# Policy seeds: one per replica; the isolated fleet has the shared one's, and the cold
# replica the new replica's.
SEEDS = {FLEET[0]: 0, FLEET[1]: 1, FLEET[2]: 2, NEWCOMER: 3, COLD: 3}
FIRST_DECISIONS = 50
SETTLE_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class ReplicasConfig:
    """How long each replay is (requests per task) and its seeds."""

    world_dir: Path | None = None
    per_task: int = 100
    fault_per_task: int = 36
    seed: int = 0
    max_new_tokens: int = 128
    # Fractions of the fault replay at which Redis stops, starts again, and a replica is
    # killed and replaced.
    redis_down_at: float = 0.15
    redis_up_at: float = 0.25
    replace_at: float = 0.33
    # Give every replica the world's measured draft cost per drafter (eval.json's decode
    # steps over the target's) as its policy's draft_cost_ratio hint. Costs are local by
    # design (never pooled): without hints each replica, pooled or not, first overrates
    # every drafter it has not run yet, a cost that sharing cannot remove.
    cost_hints: bool = True


def seeds(*names: str) -> dict[str, int]:
    return {name: SEEDS[name] for name in names}


def replay_requests(world_root: Path, per_task: int, seed: int, cap: int) -> list[TraceRequest]:
    """The uniform built-in trace of the world's test split (every task alike)."""
    options = TraceOptions(per_task=per_task, seed=seed, max_new_tokens_cap=cap)
    trace = builtin_trace("uniform", read_examples(world_root / "corpus", "test"), options)
    return list(trace.requests)


def round_robin(
    requests: Sequence[TraceRequest],
    fleet: Callable[[], Sequence[RunningReplica]],
    table: RegretTable,
    seed: int,
    before: Callable[[int], None] = lambda index: None,
) -> list[Decided]:
    """Request i to replica i mod n of the fleet as it is then (``before(i)`` first)."""
    decided = []
    for index, request in enumerate(requests):
        before(index)
        members = fleet()
        replica = members[index % len(members)].replica
        decided.append(serve_one(replica, request, index, table, seed))
    return decided


def served_drafters(replica: RunningReplica) -> list[str]:
    from router.pb import router_pb2

    reply = replica.replica.stub.ListDrafters(router_pb2.ListDraftersRequest(), timeout=30)
    return [d.name for d in reply.drafters]


def settle(fleet: Mapping[str, RunningReplica], timeout_s: float = SETTLE_TIMEOUT_S) -> None:
    """Wait until no replica has outcomes left to publish and the applied counts stop
    moving (every published entry read by every other replica)."""
    deadline = time.monotonic() + timeout_s
    previous: dict[str, dict[str, float]] = {}
    while time.monotonic() < deadline:
        counters = counters_of(fleet)
        if previous == counters and all(c["buffered"] == 0 for c in counters.values()):
            return
        previous = counters
        time.sleep(0.5)
    logger.warning("pooling counters still moving after %.0f s", timeout_s)


class FaultSchedule:
    """Stops and restarts Redis, then kills a replica and starts its successor, at the
    configured points of the fault replay."""

    def __init__(
        self,
        config: ReplicasConfig,
        total: int,
        redis: RedisServer,
        fleet: dict[str, RunningReplica],
        start_newcomer: Callable[[], RunningReplica],
    ) -> None:
        self._points = {
            round(config.redis_down_at * total): self._redis_down,
            round(config.redis_up_at * total): self._redis_up,
            round(config.replace_at * total): self._replace,
        }
        self._redis = redis
        self.fleet = fleet
        self._start_newcomer = start_newcomer
        self.killed_counters: dict[str, float] = {}
        self.newcomer_first: list[int] = []

    def before(self, index: int) -> None:
        action = self._points.get(index)
        if action is not None:
            action(index)

    def members(self) -> list[RunningReplica]:
        return list(self.fleet.values())

    def _redis_down(self, index: int) -> None:
        logger.info("request %d: stopping Redis", index)
        self._redis.stop()

    def _redis_up(self, index: int) -> None:
        logger.info("request %d: starting Redis again", index)
        self._redis.start()

    def _replace(self, index: int) -> None:
        victim = self.fleet[FLEET[-1]]
        settle({FLEET[-1]: victim}, timeout_s=10.0)
        self.killed_counters = victim.counters()
        logger.info("request %d: SIGKILL %s, starting %s", index, victim.name, NEWCOMER)
        victim.kill()
        del self.fleet[FLEET[-1]]
        self.fleet[NEWCOMER] = self._start_newcomer()


def newcomer_first_requests(
    decided: Sequence[Decided], requests: Sequence[TraceRequest]
) -> list[tuple[int, TraceRequest]]:
    """(index, request) of the new replica's first FIRST_DECISIONS requests."""
    indexes = [d.index for d in decided if d.replica == NEWCOMER][:FIRST_DECISIONS]
    return [(i, requests[i]) for i in indexes]


def outcome_report(
    counters: Mapping[str, Mapping[str, float]], killed: Mapping[str, float]
) -> dict[str, dict[str, int]]:
    """published / applied / dropped per replica of the pooled fleet, over its whole run
    (the shared replay, then the fault replay; the killed replica's as read just before
    SIGKILL, the new replica's including the history it replayed)."""
    everyone = {**counters, FLEET[-1]: killed}
    return {
        key: {name: int(values.get(key, 0)) for name, values in sorted(everyone.items())}
        for key in ("published", "applied", "dropped")
    }


def write_decisions(path: Path, phases: Mapping[str, Sequence[Decided]]) -> None:
    """Every decision of the run, one JSON object a line (for a closer look)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as out:
        for phase, decided in phases.items():
            for d in decided:
                out.write(json.dumps({"phase": phase, **dataclasses.asdict(d)}) + "\n")


def run_replicas_bench(
    config: ReplicasConfig, scratch: Path | None = None, decisions_path: Path | None = None
) -> dict[str, Any]:
    """All three phases; the report keyed as ``specroute bench replicas --json`` writes it."""
    from router.bundle import ModelBundle, default_bundle_dir

    # The cached world as it is (never rebuilt here): `specroute world build` makes it.
    world_root = Path(ModelBundle.load(config.world_dir or default_bundle_dir()).root)
    truth = default_ground_truth(world_root)
    first = replay_requests(world_root, config.per_task, config.seed, config.max_new_tokens)
    faults = replay_requests(
        world_root, config.fault_per_task, config.seed + 1, config.max_new_tokens
    )
    policy_config: dict[str, Any] = {}
    if config.cost_hints:
        ratios = dict(zip(truth.drafters, truth.draft_cost.tolist(), strict=True))
        policy_config["draft_cost_ratio"] = ratios
    with contextlib.ExitStack() as stack:
        stack.enter_context(sigterm_as_exit())  # SIGTERM stops Redis and the sidecars too
        if scratch is None:
            scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="replicas-")))
        redis = stack.enter_context(RedisServer(scratch / "redis", persist=True))
        target = PoolingTarget(redis.url, secrets.token_hex(16), f"bench-{uuid.uuid4().hex[:8]}")
        shared_fleet = start_replicas(
            seeds(*FLEET), world_root, scratch / "shared", target, stack, policy_config
        )
        table = RegretTable(truth, served_drafters(shared_fleet[FLEET[0]]))
        members = list(shared_fleet.values())
        shared = round_robin(first, lambda: members, table, config.seed)
        settle(shared_fleet)

        def newcomer() -> RunningReplica:
            started = start_replicas(
                seeds(NEWCOMER), world_root, scratch / "shared", target, stack, policy_config
            )
            return started[NEWCOMER]

        schedule = FaultSchedule(config, len(faults), redis, dict(shared_fleet), newcomer)
        fault_seed = config.seed + 1
        fault_run = round_robin(faults, schedule.members, table, fault_seed, schedule.before)
        settle(schedule.fleet)
        outcomes = outcome_report(counters_of(schedule.fleet), schedule.killed_counters)
        warm = [d for d in fault_run if d.replica == NEWCOMER][:FIRST_DECISIONS]

        alone = start_replicas(
            seeds(*FLEET, COLD), world_root, scratch / "isolated", None, stack, policy_config
        )
        isolated_members = [alone[name] for name in FLEET]
        isolated = round_robin(first, lambda: isolated_members, table, config.seed)
        cold = [
            serve_one(alone[COLD].replica, request, index, table, fault_seed)
            for index, request in newcomer_first_requests(fault_run, faults)
        ]
    all_decided = [*shared, *fault_run, *isolated, *cold]
    if decisions_path is not None:
        write_decisions(
            decisions_path,
            {"shared": shared, "faults": fault_run, "isolated": isolated, "cold": cold},
        )
    return {
        "shared": {
            "regret": total_regret(shared),
            "per_replica_regret": per_replica_regret(shared),
        },
        "isolated": {
            "regret": total_regret(isolated),
            "per_replica_regret": per_replica_regret(isolated),
        },
        "new_replica_first50_regret": {"warm": total_regret(warm), "cold": total_regret(cold)},
        "outcomes": outcomes,
        "errors": sum(1 for d in all_decided if d.error),
    }


def verdicts(report: Mapping[str, Any]) -> list[tuple[str, bool]]:
    """The issue's bars, each with whether this run met it."""
    shared, isolated = report["shared"]["regret"], report["isolated"]["regret"]
    warm = report["new_replica_first50_regret"]["warm"]
    cold = report["new_replica_first50_regret"]["cold"]
    outcomes = report["outcomes"]
    total = sum(outcomes["published"].values())
    survivors = [n for n in outcomes["applied"] if n != FLEET[-1]]
    nothing_lost = all(
        outcomes["applied"][n] == total - outcomes["published"][n] for n in survivors
    )
    return [
        (
            f"shared fleet regret {shared:.3f} s <= 0.5 x isolated {isolated:.3f} s",
            shared <= 0.5 * isolated,
        ),
        (
            f"new replica first-50 regret warm {warm:.3f} s <= 0.3 x cold {cold:.3f} s",
            warm <= 0.3 * cold,
        ),
        ("published = applied on every other surviving replica", nothing_lost),
        (f"request errors: {report['errors']}", report["errors"] == 0),
    ]
