"""``specroute bench fleet``: a vLLM fleet behind specroute, against fleet-level baselines.

One ``vllm serve`` per configuration on the world's target (no speculation, the n-gram
proposer, the generic drafter, one or two task drafters), specroute in front with
``--fleet``, and the uniform trace replayed through its gRPC Generate under each policy:

- ``single:<configuration>``: every request to that configuration (pinned);
- ``round-robin``: configurations in turn, whatever the prompt;
- ``least-loaded``: the configuration with the fewest of the replay's requests in flight
  (ties in turn): what a load balancer in front of the same replicas does;
- ``specroute``: the adaptive policy, after one learning pass over the trace (and
  learning on);
- ``hindsight``: per task the best ``single`` configuration, known after the fact.

Per task: tokens/s (generated tokens over the requests' summed wall time) and the
speed-up over ``single:none`` on the same prompts; per policy the mean and minimum
speed-up, Jain's index over tasks, errors, and whether every greedy output equals the
plain replica's (each difference with its first diverging position). The policies take
turns on each slice of requests, so they are measured side by side.
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from benchmarks.fleet.vllm_process import (
    Speculation,
    VllmServer,
    check_servable,
    fleet_toml,
    vllm_fleet,
)
from benchmarks.replay.builtin import TraceOptions, builtin_trace
from benchmarks.replay.client import ArmPin, ReplayClient
from benchmarks.replay.metrics import RequestResult, jain_index
from benchmarks.replay.trace import TraceRequest

logger = logging.getLogger(__name__)

ADMIN_TOKEN = "bench-fleet-admin"
KILL_DELAY_S = 0.05  # after a request to the replica is sent: it is in flight there
PLAIN = "none"


@dataclass(frozen=True)
class FleetBenchOptions:
    per_task: int = 8  # requests per task in the uniform trace (4 left minima to noise)
    max_new_tokens: int = 64  # cap of each request's budget
    draft_length: int = 3  # k of every speculative replica
    task_drafters: int = 2  # how many task drafters get a replica of their own
    concurrency: int = 2  # requests in flight during a replay
    seed: int = 0
    # A configuration whose replica is SIGKILLed a third of the way through the measured
    # replay and restarted at once ("" : none): no request may be lost, and the replica
    # must serve again once it is back.
    kill_replica: str = ""
    progress: bool = True  # progress bars on stderr for the replays
    # Each replica in one process (VllmServer.single_process). vLLM's default layout keeps
    # its worker busy-waiting for 1 s after each request; where the replicas share a few
    # CPU cores that wait slows whichever replica serves next, and the policy that happens
    # to follow another onto the same replica looks faster (2026-12-03, HISTORY.md).
    single_process: bool = True


@dataclass
class PolicyRun:
    """One policy's replay: its results by request id, and the errors."""

    results: dict[str, RequestResult] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


class FleetOptionError(ValueError):
    """An option the world's fleet cannot serve (told before any replica starts)."""


def fleet_configurations(
    drafter_names: Sequence[str], tasks: Sequence[str], options: FleetBenchOptions
) -> list[str]:
    """none, ngram, generic (when the world has it), then up to ``task_drafters`` task
    drafters in the world's task order."""
    chosen = [PLAIN, "ngram"]
    if "generic" in drafter_names:
        chosen.append("generic")
    task_drafters = [t for t in tasks if t in drafter_names][: options.task_drafters]
    return chosen + task_drafters


def speculations(world: Any, configurations: Sequence[str], k: int) -> list[Speculation]:
    result = []
    for name in configurations:
        if name in (PLAIN, "ngram"):
            result.append(Speculation(name, 0 if name == PLAIN else k))
        else:
            result.append(Speculation(name, k, Path(world.drafter_dirs[name])))
    return result


def check_world(world: Any, configurations: Sequence[str]) -> None:
    """Refuse (one line) a world whose target or drafters vLLM's CPU build cannot serve."""
    check_servable(Path(world.target_dir))
    for name in configurations:
        if name in world.drafter_dirs:
            check_servable(Path(world.drafter_dirs[name]))


def first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    """The first position where two outputs differ (the shorter length if one is a
    prefix of the other), or None when they are equal."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


Chooser = Callable[[int, TraceRequest], ArmPin | None]


def replay(
    client: ReplayClient,
    requests: Sequence[TraceRequest],
    choose: Chooser,
    concurrency: int,
    on_done: Callable[[ArmPin | None], None] | None = None,
    *,
    no_update: bool = True,
    bar: tqdm | None = None,
) -> PolicyRun:
    """Replay ``requests`` with ``concurrency`` in flight, each pinned by ``choose`` (None:
    the sidecar's policy decides); ``bar`` advances by one per request done."""
    run = PolicyRun()
    lock = threading.Lock()

    def one(index: int, request: TraceRequest) -> None:
        with lock:
            pin = choose(index, request)
        try:
            result = client.generate(request, index=index, pin=pin, no_update=no_update)
            with lock:
                run.results[request.id] = result
        except Exception as error:
            logger.warning("request %s failed: %s", request.id, error)
            with lock:
                run.errors.append(f"{request.id}: {error}")
        finally:
            with lock:
                if on_done is not None:
                    on_done(pin)
                if bar is not None:
                    bar.update(1)

    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        list(pool.map(lambda pair: one(*pair), enumerate(requests)))
    return run


def pin_for(configuration: str, k: int) -> ArmPin:
    return ArmPin(configuration, 0 if configuration == PLAIN else k)


def pinned(pin: ArmPin) -> Chooser:
    return lambda index, request: pin


def round_robin(configurations: Sequence[str], k: int) -> Chooser:
    cycle = itertools.cycle(configurations)
    return lambda index, request: pin_for(next(cycle), k)


class LeastLoaded:
    """The configuration with the fewest of the replay's requests in flight, ties in turn."""

    def __init__(self, configurations: Sequence[str], k: int) -> None:
        self.in_flight = dict.fromkeys(configurations, 0)
        self.k = k
        self._turn = itertools.count()

    def choose(self, index: int, request: TraceRequest) -> ArmPin:
        names = list(self.in_flight)
        start = next(self._turn) % len(names)
        ordered = names[start:] + names[:start]
        name = min(ordered, key=lambda n: self.in_flight[n])
        self.in_flight[name] += 1
        return pin_for(name, self.k)

    def done(self, pin: ArmPin | None) -> None:
        if pin is not None:
            self.in_flight[pin.drafter] -= 1


def task_rates(run: PolicyRun) -> dict[str, tuple[int, float]]:
    """Per task: (generated tokens, summed wall time)."""
    rates: dict[str, tuple[int, float]] = {}
    for result in run.results.values():
        tokens, wall = rates.get(result.task, (0, 0.0))
        rates[result.task] = (tokens + result.generated_tokens, wall + result.wall_time_s)
    return rates


def summarise(run: PolicyRun, baseline: PolicyRun, task_of: Mapping[str, str]) -> dict[str, Any]:
    """The policy's per-task tokens/s and speed-up over the plain replica on the same
    prompts, their mean, minimum and Jain index, errors, and the lossless check."""
    plain = task_rates(baseline)
    per_task: dict[str, dict[str, float]] = {}
    for task, (tokens, wall) in sorted(task_rates(run).items()):
        rate = tokens / wall if wall > 0 else 0.0
        base_tokens, base_wall = plain.get(task, (0, 0.0))
        base_rate = base_tokens / base_wall if base_wall > 0 else 0.0
        per_task[task] = {
            "tokens_per_s": rate,
            "speedup": rate / base_rate if base_rate > 0 else 0.0,
            "requests": sum(1 for r in run.results.values() if r.task == task),
        }
    differences = []
    for request_id, result in sorted(run.results.items()):
        reference = baseline.results.get(request_id)
        if reference is None or not result.greedy:
            continue
        position = first_difference(result.output_ids, reference.output_ids)
        if position is not None:
            differences.append(
                {
                    "request_id": request_id,
                    "task": task_of.get(request_id, ""),
                    "position": position,
                }
            )
    speedups = [entry["speedup"] for entry in per_task.values()]
    return {
        "per_task": per_task,
        "mean_speedup": sum(speedups) / len(speedups) if speedups else 0.0,
        "min_speedup": min(speedups, default=0.0),
        "jain": jain_index(speedups) if speedups else 0.0,
        "errors": len(run.errors),
        "error_messages": run.errors[:10],
        "lossless": not differences,
        "differences": differences,
        "configurations": _configuration_counts(run),
        "requests": [
            _request_record(result, baseline.results.get(request_id))
            for request_id, result in sorted(run.results.items())
        ],
    }


def _request_record(result: RequestResult, plain: RequestResult | None) -> dict[str, Any]:
    """One request as the policy served it, with its speed-up over the plain replica's
    run of the same prompt (None without one): what explains a task's figure."""
    rate = result.generated_tokens / result.wall_time_s if result.wall_time_s > 0 else 0.0
    plain_rate = (
        plain.generated_tokens / plain.wall_time_s if plain and plain.wall_time_s > 0 else 0.0
    )
    return {
        "request_id": result.request_id,
        "task": result.task,
        "configuration": result.drafter,
        "k": result.draft_length,
        "generated_tokens": result.generated_tokens,
        "wall_time_s": result.wall_time_s,
        "speedup": rate / plain_rate if plain_rate > 0 else None,
    }


def _configuration_counts(run: PolicyRun) -> dict[str, int]:
    counts: dict[str, int] = {}
    for result in run.results.values():
        counts[result.drafter] = counts.get(result.drafter, 0) + 1
    return dict(sorted(counts.items()))


def hindsight(
    summaries: Mapping[str, Mapping[str, Any]], configurations: Sequence[str]
) -> dict[str, Any]:
    """Per task the best ``single:`` configuration's figures, found after the fact."""
    per_task: dict[str, dict[str, Any]] = {}
    for configuration in configurations:
        summary = summaries[f"single:{configuration}"]
        for task, entry in summary["per_task"].items():
            if task not in per_task or entry["speedup"] > per_task[task]["speedup"]:
                per_task[task] = {**entry, "configuration": configuration}
    speedups = [entry["speedup"] for entry in per_task.values()]
    singles = [summaries[f"single:{c}"] for c in configurations]
    return {
        "per_task": per_task,
        "mean_speedup": sum(speedups) / len(speedups) if speedups else 0.0,
        "min_speedup": min(speedups, default=0.0),
        "jain": jain_index(speedups) if speedups else 0.0,
        "errors": sum(s["errors"] for s in singles),
        "lossless": all(s["lossless"] for s in singles),
        "differences": [],
    }


def _fleet_settings(path: Path, world_dir: Path, fleet_file: Path, tokens: int) -> Path:
    lines = [
        f"world_dir = {json.dumps(str(world_dir))}",
        f"fleet_file = {json.dumps(str(fleet_file))}",
        "[limits]",
        f"max_new_tokens = {max(tokens, 64)}",
        "max_prompt_tokens = 448",  # the replicas' context is 512 tokens
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass(frozen=True)
class Contender:
    """A policy of the comparison: how it pins each request, and whether it learns."""

    choose: Chooser
    on_done: Callable[[ArmPin | None], None] | None = None
    learns: bool = False


def contenders(configurations: Sequence[str], k: int) -> dict[str, Contender]:
    named = {f"single:{c}": Contender(pinned(pin_for(c, k))) for c in configurations}
    named["round-robin"] = Contender(round_robin(configurations, k))
    balancer = LeastLoaded(configurations, k)
    named["least-loaded"] = Contender(balancer.choose, balancer.done)
    named["specroute"] = Contender(lambda index, request: None, learns=True)
    return named


def merge(into: PolicyRun, run: PolicyRun) -> None:
    into.results.update(run.results)
    into.errors.extend(run.errors)


def run_policies(
    client: ReplayClient,
    requests: Sequence[TraceRequest],
    configurations: Sequence[str],
    options: FleetBenchOptions,
    fault: ReplicaFault | None = None,
) -> dict[str, dict[str, Any]]:
    """Every policy's replay and summary (module doc). The policies take turns on each
    slice of ``concurrency`` requests, in an order that rotates from slice to slice, so a
    change in the machine's load falls on all of them alike; the adaptive policy first
    learns from one pass over the trace."""
    # The fleet sidecar hints its configurations no separate drafting cost (vLLM's step
    # time includes drafting: FleetRouterService.drafter_hints), on SetPolicy too.
    warm_up(client, requests[:1], configurations, options.draft_length)
    client.set_policy("thompson", reset_state=True)
    with _bar("learning pass (specroute)", len(requests), options) as bar:
        replay(client, requests, lambda i, r: None, options.concurrency, no_update=False, bar=bar)
    named = contenders(configurations, options.draft_length)
    runs = {name: PolicyRun() for name in named}
    width = max(1, options.concurrency)
    order = list(named)
    starts = range(0, len(requests), width)
    with _bar(f"{len(named)} policies, side by side", len(requests) * len(named), options) as bar:
        for turn, start in enumerate(starts):
            if fault is not None:
                fault.on_turn(turn, len(starts))
            batch = requests[start : start + width]
            rotation = turn % len(order)
            for name in order[rotation:] + order[:rotation]:
                contender = named[name]
                choose = fault.watching(contender.choose) if fault else contender.choose
                run = replay(
                    client,
                    batch,
                    choose,
                    options.concurrency,
                    contender.on_done,
                    no_update=not contender.learns,
                    bar=bar,
                )
                merge(runs[name], run)
    task_of = {r.id: r.task or "" for r in requests}
    baseline = runs[f"single:{PLAIN}"]
    summaries = {name: summarise(run, baseline, task_of) for name, run in runs.items()}
    summaries["hindsight"] = hindsight(summaries, configurations)
    return summaries


def warm_up(
    client: ReplayClient, requests: Sequence[TraceRequest], configurations: Sequence[str], k: int
) -> None:
    """``requests`` pinned to each configuration, learnt from by nothing, so that what a
    freshly started vLLM replica does once is not learnt as its configuration's cost: the
    bench measures serving, not starting."""
    for configuration in configurations:
        replay(client, requests, pinned(pin_for(configuration, k)), 1)


def _bar(label: str, total: int, options: FleetBenchOptions) -> tqdm:
    return tqdm(total=total, desc=f"bench fleet: {label}", unit="req", disable=not options.progress)


class ReplicaFault:
    """Kills one configuration's replica a third of the way through the replay, while a
    request sent to it is in flight, restarts it at once (in the background), and records
    when it served again."""

    def __init__(self, server: VllmServer) -> None:
        self.server = server
        self.armed = False
        self.killed_at_turn: int | None = None
        self.back_at_turn: int | None = None
        self.turn = 0
        self.restart_s: float | None = None
        self._thread: threading.Thread | None = None

    def on_turn(self, turn: int, turns: int) -> None:
        self.turn = turn
        self.armed = self.killed_at_turn is None and turn >= turns // 3

    def watching(self, choose: Chooser) -> Chooser:
        """``choose``, killing the replica just after the first request pinned to its
        configuration once armed."""

        def chosen(index: int, request: TraceRequest) -> ArmPin | None:
            pin = choose(index, request)
            if self.armed and pin is not None and pin.drafter == self.server.speculation.drafter:
                self.armed = False
                self.killed_at_turn = self.turn
                self._thread = threading.Thread(target=self._kill_and_restart, daemon=True)
                self._thread.start()
            return pin

        return chosen

    def _kill_and_restart(self) -> None:
        time.sleep(KILL_DELAY_S)
        self.server.kill()
        logger.warning("killed the %s replica", self.server.speculation.drafter)
        started = time.perf_counter()
        self.server.start()
        self.server.wait_healthy()
        self.restart_s = time.perf_counter() - started
        self.back_at_turn = self.turn + 1  # the sidecar probes it within health_interval_s

    def report(self, runs: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
        if self._thread is not None:
            self._thread.join()
        return {
            "configuration": self.server.speculation.drafter,
            "killed_at_slice": self.killed_at_turn,
            "restarted_in_s": self.restart_s,
            "healthy_again_at_slice": self.back_at_turn,
            "errors": {name: summary["errors"] for name, summary in runs.items()},
        }


def run_fleet_bench(
    world_dir: Path, work_dir: Path, options: FleetBenchOptions = FleetBenchOptions()
) -> dict[str, Any]:
    """Start the fleet and specroute in front of it, replay, and summarise (module doc)."""
    from benchmarks.world.layout import read_examples
    from router.bundle import ModelBundle
    from router.launch import launch_sidecar

    world = ModelBundle.load(world_dir)
    tasks = list(world.tasks)
    configurations = fleet_configurations(list(world.drafter_dirs), tasks, options)
    check_world(world, configurations)
    if options.kill_replica and options.kill_replica not in configurations:
        # Told before the replicas start (minutes), not as a traceback once they serve.
        raise FleetOptionError(
            f"--kill-replica {options.kill_replica!r} is not a configuration of the fleet "
            f"({', '.join(configurations)})"
        )
    trace = builtin_trace(
        "uniform",
        read_examples(world.corpus_dir, "test"),
        TraceOptions(
            per_task=options.per_task, seed=options.seed, max_new_tokens_cap=options.max_new_tokens
        ),
    )
    requests = [r for r in trace.records if isinstance(r, TraceRequest)]
    work_dir.mkdir(parents=True, exist_ok=True)
    specs = speculations(world, configurations, options.draft_length)
    logger.info(
        "starting %d vLLM replicas (%s; logs in %s), then specroute in front of them",
        len(specs),
        ", ".join(configurations),
        work_dir / "logs",
    )
    started = time.monotonic()
    with vllm_fleet(
        Path(world.target_dir), specs, work_dir / "logs", single_process=options.single_process
    ) as servers:
        logger.info("replicas serving after %.0f s", time.monotonic() - started)
        fleet_file = work_dir / "fleet.toml"
        fleet_file.write_text(fleet_toml(servers, health_interval_s=1.0, metrics_interval_s=0.5))
        settings = _fleet_settings(
            work_dir / "sidecar.toml", Path(world.root), fleet_file, options.max_new_tokens
        )
        with (
            launch_sidecar(
                world.root,
                config_file=settings,
                admin_token=ADMIN_TOKEN,
                log_path=work_dir / "sidecar.log",
                state_dir=work_dir / "state",
            ) as sidecar,
            ReplayClient(sidecar.grpc_address, ADMIN_TOKEN) as client,
        ):
            client.wait_ready()
            logger.info(
                "sidecar serving at %s; %d requests per policy",
                sidecar.grpc_address,
                len(requests),
            )
            fault = _fault(servers, options.kill_replica)
            policies = run_policies(client, requests, configurations, options, fault)
            learnt = learnt_choices(client.policy_state())
            fault_report = fault.report(policies) if fault else None
            served_after = _served_after_restart(client, requests, options, fault)
        replicas = _replicas(servers)
    return {
        "fault": {**fault_report, "served_after_restart": served_after} if fault_report else None,
        "world": str(world.root),
        "configurations": configurations,
        "draft_length": options.draft_length,
        "requests": len(requests),
        "options": options.__dict__,
        "policies": policies,
        "learnt": learnt,
        "replicas": replicas,
    }


def learnt_choices(state: Any) -> list[dict[str, Any]]:
    """What the adaptive policy holds at the end, per context (GetPolicyState): the arm it
    would choose at its posterior means, and each configuration's acceptance, best k and
    expected speed-up, to read its choices by."""
    return [
        {
            "cluster": context.task_cluster,
            "length_bucket": context.length_bucket,
            "requests": context.requests,
            "chosen": f"{context.chosen_drafter}@{context.chosen_k}",
            "arms": {
                arm.drafter: {
                    "acceptance": round(arm.acceptance_mean, 3),
                    "best_k": arm.best_k,
                    "expected_speedup": round(arm.expected_speedup, 3),
                    "decisions": arm.decisions,
                }
                for arm in context.arms
            },
        }
        for context in state.contexts
    ]


def _fault(servers: Sequence[VllmServer], configuration: str) -> ReplicaFault | None:
    if not configuration:
        return None
    for server in servers:
        if server.speculation.drafter == configuration:
            return ReplicaFault(server)
    raise ValueError(f"--kill-replica {configuration!r} is not a configuration of the fleet")


def _served_after_restart(
    client: ReplayClient,
    requests: Sequence[TraceRequest],
    options: FleetBenchOptions,
    fault: ReplicaFault | None,
) -> int | None:
    """Requests pinned to the killed configuration, after its restart, that its replica
    served (the sidecar places a pinned request elsewhere while the replica is out)."""
    if fault is None:
        return None
    deadline = time.monotonic() + 120
    pin = pin_for(fault.server.speculation.drafter, options.draft_length)
    served = 0
    while served == 0 and time.monotonic() < deadline:
        run = replay(client, requests[:2], pinned(pin), 1)
        served = sum(r.drafter == pin.drafter for r in run.results.values())
        if served == 0:
            time.sleep(1.0)
    return served


def _replicas(servers: Sequence[VllmServer]) -> list[dict[str, Any]]:
    return [
        {
            "url": server.url,
            "speculative": server.speculation.drafter,
            "k": server.speculation.k,
            "drafter_dir": str(server.speculation.drafter_dir or ""),
        }
        for server in servers
    ]


def format_result(result: Mapping[str, Any]) -> str:
    """A table: one row per policy."""
    lines = [
        f"fleet: {', '.join(result['configurations'])} (k = {result['draft_length']}), "
        f"{result['requests']} requests",
        f"{'policy':<22} {'mean':>6} {'min':>6} {'jain':>6} {'errors':>6}  lossless",
    ]
    for name, summary in result["policies"].items():
        lines.append(
            f"{name:<22} {summary['mean_speedup']:>6.2f} {summary['min_speedup']:>6.2f} "
            f"{summary['jain']:>6.3f} {summary['errors']:>6}  {summary['lossless']}"
        )
    fault = result.get("fault")
    if fault:
        lines.append(
            f"killed the {fault['configuration']} replica at slice {fault['killed_at_slice']}: "
            f"errors {sum(fault['errors'].values())}, restarted in {fault['restarted_in_s']:.0f}s, "
            f"served {fault['served_after_restart']} pinned requests after"
        )
    return "\n".join(lines)
