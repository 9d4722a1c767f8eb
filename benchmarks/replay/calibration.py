"""Calibration: measure forced (drafter, k) arms per task to find the oracle and baselines' k.

Through the live API (``Generate`` with ``force_drafter`` / ``force_draft_length`` and
``no_update``), on a small slice of held-out prompts per task (the world's validation
split, disjoint from the test split the traces replay):

1. every drafter at the probe length k0 (the drafter x task acceptance heatmap);
2. per task, the generic drafter, the task's own drafter and the best ``top_drafters`` at k0,
   at every k of the grid.

Arms are interleaved request by request (all arms of one prompt back to back), so a change
in machine load hits every arm alike; each pass measures plain decoding among its arms, and
an arm's speed-up is over the plain runs of its own pass (the sweep divided by the probe
pass's, minutes older: a machine 15% slower by then rated every swept k 15% lower). The
oracle is the best measured arm per task (plain decoding, speed-up 1, included);
``static`` maps each task to its own drafter at that drafter's best k; ``generic_k`` is the
generic drafter's best k over all tasks.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from benchmarks.replay.client import ArmPin, DrafterEntry, ReplayClient
from benchmarks.replay.metrics import RequestResult, aggregate
from benchmarks.replay.trace import TraceRequest

logger = logging.getLogger(__name__)

GENERIC_DRAFTER = "generic"
NO_DRAFTER = "none"


@dataclass(frozen=True)
class CalibrationOptions:
    """How much to measure."""

    prompts_per_task: int = 3
    probe_k: int = 4
    k_grid: tuple[int, ...] = (1, 2, 3, 4, 6, 8)
    top_drafters: int = 2
    warmup_requests: int = 2
    progress: bool = True


@dataclass(frozen=True)
class ArmChoice:
    """A (drafter, k) arm with its measured speed-up."""

    drafter: str
    k: int
    speedup: float


@dataclass
class Calibration:
    """Measured arms per task and the tables derived from them."""

    method: str
    prompts_per_task: int
    probe_k: int
    baseline_tokens_per_s: dict[str, float] = field(default_factory=dict)
    # drafter -> task -> value, at probe_k
    acceptance: dict[str, dict[str, float]] = field(default_factory=dict)
    probe_speedup: dict[str, dict[str, float]] = field(default_factory=dict)
    # task -> "drafter:k" -> speed-up
    arms: dict[str, dict[str, float]] = field(default_factory=dict)
    oracle: dict[str, ArmChoice] = field(default_factory=dict)
    static: dict[str, ArmChoice] = field(default_factory=dict)
    generic_k: int = 4
    # The world directory its sidecar served (None: not recorded, a calibration saved
    # before it was): a study reuses a saved calibration only on the same world.
    world: str | None = None

    def to_json(self) -> dict[str, object]:
        def table(choices: Mapping[str, ArmChoice]) -> dict[str, object]:
            return {
                t: {"drafter": c.drafter, "k": c.k, "speedup": c.speedup}
                for t, c in choices.items()
            }

        return {
            "method": self.method,
            "prompts_per_task": self.prompts_per_task,
            "probe_k": self.probe_k,
            "baseline_tokens_per_s": self.baseline_tokens_per_s,
            "acceptance": self.acceptance,
            "probe_speedup": self.probe_speedup,
            "arms": self.arms,
            "oracle": table(self.oracle),
            "static": table(self.static),
            "generic_k": self.generic_k,
            "world": self.world,
        }


def calibration_from_json(data: Mapping[str, Any]) -> Calibration:
    """Rebuild a calibration written by ``Calibration.to_json``."""

    def table(rows: Mapping[str, Mapping[str, Any]]) -> dict[str, ArmChoice]:
        return {
            t: ArmChoice(str(r["drafter"]), int(r["k"]), float(r["speedup"]))
            for t, r in rows.items()
        }

    return Calibration(
        method=str(data["method"]),
        prompts_per_task=int(data["prompts_per_task"]),
        probe_k=int(data["probe_k"]),
        baseline_tokens_per_s=dict(data["baseline_tokens_per_s"]),
        acceptance={d: dict(row) for d, row in data["acceptance"].items()},
        probe_speedup={d: dict(row) for d, row in data["probe_speedup"].items()},
        arms={t: dict(row) for t, row in data["arms"].items()},
        oracle=table(data["oracle"]),
        static=table(data["static"]),
        generic_k=int(data["generic_k"]),
        world=str(data["world"]) if data.get("world") is not None else None,
    )


def stale_calibration(
    saved: Calibration, world: str | None, drafters: Sequence[str], options: CalibrationOptions
) -> str | None:
    """Why ``saved`` cannot stand for a calibration of ``drafters`` on ``world`` measured
    with ``options`` (None: it can). A study reused any calibration.json in its folder, of
    another world or drafters too, without a word."""
    if saved.world != world:
        return f"it was measured on the world {saved.world or '(not recorded)'}, not {world}"
    measured = sorted(saved.acceptance)
    served = sorted(name for name in drafters if name != NO_DRAFTER)
    if measured != served:
        return f"it measured the drafters {measured}, the sidecar serves {served}"
    if (saved.prompts_per_task, saved.probe_k) != (options.prompts_per_task, options.probe_k):
        return (
            f"it measured {saved.prompts_per_task} prompts a task at k={saved.probe_k}, "
            f"this study asks for {options.prompts_per_task} at k={options.probe_k}"
        )
    return None


def task_drafter(task: str, drafters: Sequence[DrafterEntry]) -> str | None:
    """The drafter fine-tuned for ``task``: named after it, else the first listing it."""
    names = {d.name for d in drafters}
    if task in names:
        return task
    return next((d.name for d in drafters if task in d.tasks and len(d.tasks) == 1), None)


def measure_arms(
    client: ReplayClient,
    requests: Sequence[TraceRequest],
    arms: Sequence[ArmPin],
    bar: tqdm | None,
) -> dict[ArmPin, list[RequestResult]]:
    """Every arm on every request, interleaved per request."""
    measured: dict[ArmPin, list[RequestResult]] = {arm: [] for arm in arms}
    for index, request in enumerate(requests):
        for arm in arms:
            measured[arm].append(client.generate(request, index=index, pin=arm, no_update=True))
            if bar is not None:
                bar.update(1)
    return measured


def _speedup(results: list[RequestResult], baseline_tps: float) -> float:
    tps = aggregate(results).tokens_per_s
    return tps / baseline_tps if baseline_tps > 0 else 0.0


def _best(arms: Mapping[str, float], prefix: str | None = None) -> ArmChoice:
    candidates = {a: s for a, s in arms.items() if prefix is None or a.split(":")[0] == prefix}
    arm, value = max(candidates.items(), key=lambda item: item[1])
    drafter, k = arm.rsplit(":", 1)
    return ArmChoice(drafter, int(k), value)


def calibrate(
    client: ReplayClient,
    requests_by_task: Mapping[str, Sequence[TraceRequest]],
    drafters: Sequence[DrafterEntry],
    options: CalibrationOptions = CalibrationOptions(),
    world: str | None = None,
) -> Calibration:
    """Measure forced arms per task and derive the oracle, static table and generic k
    (``world``: the world directory the sidecar serves, recorded)."""
    names = [d.name for d in drafters if d.name != NO_DRAFTER]
    slices = {t: list(rs)[: options.prompts_per_task] for t, rs in requests_by_task.items()}
    calibration = Calibration(
        method=(
            f"forced arms through Generate on {options.prompts_per_task} validation prompts per "
            f"task: every drafter at k={options.probe_k}, then the generic, the task's own and "
            f"the top {options.top_drafters} drafters at k in {list(options.k_grid)}; "
            "oracle = best measured arm per task (plain decoding included)"
        ),
        prompts_per_task=options.prompts_per_task,
        probe_k=options.probe_k,
        world=world,
    )
    warm_up(client, next(iter(slices.values())), names, options)

    probe_arms = [ArmPin(NO_DRAFTER, 0)] + [ArmPin(n, options.probe_k) for n in names]
    total = sum(len(s) for s in slices.values()) * len(probe_arms)
    with tqdm(total=total, desc="calibrate: probe", disable=not options.progress) as bar:
        probes = {
            task: measure_arms(client, reqs, probe_arms, bar) for task, reqs in slices.items()
        }
    for task, measured in probes.items():
        base = aggregate(measured[ArmPin(NO_DRAFTER, 0)]).tokens_per_s
        calibration.baseline_tokens_per_s[task] = base
        calibration.arms[task] = {f"{NO_DRAFTER}:0": 1.0}
        for arm in probe_arms[1:]:
            stats = aggregate(measured[arm])
            calibration.acceptance.setdefault(arm.drafter, {})[task] = stats.acceptance or 0.0
            value = _speedup(measured[arm], base)
            calibration.probe_speedup.setdefault(arm.drafter, {})[task] = value
            calibration.arms[task][f"{arm.drafter}:{arm.draft_length}"] = value

    sweeps = {task: _sweep_arms(task, calibration, drafters, options) for task in slices}
    plain = ArmPin(NO_DRAFTER, 0)
    total = sum(len(slices[t]) * (len(arms) + 1) for t, arms in sweeps.items())
    with tqdm(total=total, desc="calibrate: k sweep", disable=not options.progress) as bar:
        for task, arms in sweeps.items():
            measured = measure_arms(client, slices[task], [plain, *arms], bar)
            base = aggregate(measured[plain]).tokens_per_s
            for arm in arms:
                calibration.arms[task][f"{arm.drafter}:{arm.draft_length}"] = _speedup(
                    measured[arm], base
                )

    _derive_tables(calibration, drafters, options)
    return calibration


def warm_up(
    client: ReplayClient,
    requests: Sequence[TraceRequest],
    drafters: Sequence[str],
    options: CalibrationOptions = CalibrationOptions(),
) -> None:
    """Unmeasured Generates (plain, and the generic drafter's) on a fresh sidecar, so the
    first measured request does not pay its first-call costs: every replay after a
    calibration has them, and one that reuses a saved calibration needs them too."""
    for request in list(requests)[: options.warmup_requests]:
        client.generate(request, pin=ArmPin(NO_DRAFTER, 0), no_update=True)
        if GENERIC_DRAFTER in drafters:
            client.generate(request, pin=ArmPin(GENERIC_DRAFTER, options.probe_k), no_update=True)


def _sweep_arms(
    task: str,
    calibration: Calibration,
    drafters: Sequence[DrafterEntry],
    options: CalibrationOptions,
) -> list[ArmPin]:
    ranked = sorted(
        calibration.probe_speedup,
        key=lambda name: -calibration.probe_speedup[name].get(task, 0.0),
    )
    candidates = [GENERIC_DRAFTER, task_drafter(task, drafters), *ranked[: options.top_drafters]]
    chosen = list(dict.fromkeys(c for c in candidates if c and c in calibration.probe_speedup))
    return [ArmPin(d, k) for d in chosen for k in options.k_grid if k != options.probe_k]


def _derive_tables(
    calibration: Calibration, drafters: Sequence[DrafterEntry], options: CalibrationOptions
) -> None:
    for task, arms in calibration.arms.items():
        calibration.oracle[task] = _best(arms)
        own = task_drafter(task, drafters)
        calibration.static[task] = _best(
            arms, own if own in calibration.probe_speedup else GENERIC_DRAFTER
        )
    # The generic drafter's best k over all tasks (mean of per-task speed-ups).
    per_k: dict[int, list[float]] = {}
    for arms in calibration.arms.values():
        for arm, value in arms.items():
            drafter, k = arm.rsplit(":", 1)
            if drafter == GENERIC_DRAFTER:
                per_k.setdefault(int(k), []).append(value)
    if per_k:
        calibration.generic_k = max(per_k, key=lambda k: sum(per_k[k]) / len(per_k[k]))
    logger.info("oracle table: %s", {t: (c.drafter, c.k) for t, c in calibration.oracle.items()})
