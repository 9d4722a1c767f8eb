"""The ``learn`` replay: a task served without its own drafter learns one from its traffic.

The trace (``benchmarks.replay.builtin``, ``learn``) withholds one task's world drafter and
gives that task ``LEARN_WEIGHT`` times the other tasks' traffic. Its sidecar captures that
task's prompts and verified outputs (``[capture]``) and distils by itself
(``[auto_distill]``) once ``capture_share`` of the first half's captures are in; at the
halfway ``await_drafter`` event the replay waits for the distilled drafter to be
registered (or discarded) while it times lone Generates, then replays the second half.
Afterwards the withheld world drafter is registered under ``<task>-world`` and timed at
each k of ``reference_k`` on the second half's prompts of the task, beside plain decoding.

The report's ``learn`` section (:func:`learn_figures`) compares the learning policy's
speed-up on the task in the two halves, with that reference, and the p99 of lone
Generates during the distillation with their idle p99 before the replay.

Which task: ``--learn-cluster``, else :func:`default_learn_task`: the task whose own world
drafter gains most over the generic one in expected tokens per verify step at the world's
evaluation draft length (``eval.json``), the figure a speed-up is proportional to.
"""

from __future__ import annotations

import json
import math
import re
import sqlite3
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.replay.calibration import measure_arms
from benchmarks.replay.client import ArmPin, ReplayClient
from benchmarks.replay.metrics import RequestResult, per_task_speedup, speedup
from benchmarks.replay.replay import DrafterSource, PolicySetting
from benchmarks.replay.trace import Trace, TraceEvent, TraceRequest
from router.auto_distill import DISTILLED_DIR
from router.bundle import read_finetune_sample
from router.capture import DATABASE_NAME
from router.clusters import tokens_per_step

LEARN_TRACE = "learn"
# The learn replay's defaults: fewer requests and policies than the other traces, so that a
# run with its distillation fits in 20-30 minutes on 2 cores.
LEARN_PER_TASK = 12
LEARN_POLICIES: tuple[str, ...] = ("none", "thompson")
# Policies whose settings come from a calibration (run on a separate sidecar without capture,
# so its forced arms are not captured as traffic).
CALIBRATED_POLICIES = frozenset({"static", "oracle"})
LEARNING_POLICY = "thompson"
REFERENCE_SUFFIX = "-world"


@dataclass(frozen=True)
class LearnOptions:
    """How the learn replay captures, distils, waits and measures."""

    steps: int = 100  # optimiser steps of the automatic distillation
    # Share of the first half's captures (requests of the task x policies) that starts it.
    capture_share: float = 0.8
    interval_s: float = 2.0  # how often the sidecar looks for a cluster to distil
    cores: int = 1
    nice: int = 10
    reference_k: tuple[int, ...] = (2, 4, 6)
    idle_probes: int = 200  # as many as a p99 needs; about 10-20 s
    probe_max_new_tokens: int = 32
    timeout_s: float = 900.0  # the longest wait for the distillation at halfway


def default_learn_task(eval_path: Path, tasks: Sequence[str]) -> str | None:
    """The task whose own drafter gains most tokens per step over ``generic`` (module doc);
    None without an eval.json that has both."""
    if not eval_path.is_file():
        return None
    data = json.loads(eval_path.read_text())
    acceptance: Mapping[str, Mapping[str, float]] = data.get("acceptance", {})
    k = int(data.get("draft_length", 4))
    generic = acceptance.get("generic", {})
    gains = {
        task: tokens_per_step(acceptance[task][task], k) - tokens_per_step(generic[task], k)
        for task in tasks
        if task in acceptance and task in acceptance[task] and task in generic
    }
    return max(sorted(gains), key=lambda task: gains[task]) if gains else None


def awaited(trace: Trace) -> tuple[TraceEvent, int] | None:
    """The trace's first ``await_drafter`` event and the number of requests before it."""
    before = 0
    for record in trace.records:
        if isinstance(record, TraceRequest):
            before += 1
        elif record.kind == "await_drafter":
            return record, before
    return None


def capture_threshold(trace: Trace, policies: int, share: float) -> int:
    """Captured samples that start the distillation: ``share`` of the first half's requests
    of the awaited task times the policies (each replayed request is captured once per
    policy)."""
    found = awaited(trace)
    if found is None or not found[0].tasks:
        raise ValueError("the trace has no await_drafter event naming its task")
    event, boundary = found
    first = sum(1 for r in trace.requests[:boundary] if r.task in event.tasks)
    return max(2, math.floor(share * first * policies))


def learn_sidecar_env(task: str, min_samples: int, options: LearnOptions) -> dict[str, str]:
    """Settings (environment) of the learn sidecar: capture of ``task`` only, capped at
    ``min_samples`` (so the second half cannot start a second run), automatic distillation."""
    return {
        "SPECROUTE_CAPTURE__ENABLED": "true",
        "SPECROUTE_CAPTURE__CLUSTERS": json.dumps([task]),
        "SPECROUTE_CAPTURE__SAMPLES_PER_CLUSTER": str(min_samples),
        "SPECROUTE_AUTO_DISTILL__ENABLED": "true",
        "SPECROUTE_AUTO_DISTILL__MIN_SAMPLES": str(min_samples),
        "SPECROUTE_AUTO_DISTILL__INTERVAL_S": str(options.interval_s),
        "SPECROUTE_AUTO_DISTILL__STEPS": str(options.steps),
        "SPECROUTE_AUTO_DISTILL__CORES": str(options.cores),
        "SPECROUTE_AUTO_DISTILL__NICE": str(options.nice),
    }


def probe_request(trace: Trace, task: str, max_new_tokens: int) -> TraceRequest:
    """The latency probe: the trace's first request of another task (never captured)."""
    other = next((r for r in trace.requests if r.task and r.task != task), trace.requests[0])
    budget = min(max_new_tokens, other.max_new_tokens)
    return other.model_copy(update={"id": "latency-probe", "max_new_tokens": budget})


@dataclass(frozen=True)
class DistillationRun:
    """One automatic distillation as the sidecar recorded it (``distillation_runs``)."""

    cluster: str
    outcome: str
    detail: str
    seconds: float
    finished_unix: float


# router.auto_distill's verdict on a run that ended without recording one (a crash).
DISCARDED_LINE = re.compile(r"auto-distillation of (\S+) discarded after (\d+) s: (.*)")


def discarded_runs(log_path: Path | None) -> list[DistillationRun]:
    """Runs the sidecar's log says were discarded (those that failed early record nothing)."""
    if log_path is None or not log_path.is_file():
        return []
    found = DISCARDED_LINE.finditer(log_path.read_text(errors="replace"))
    silent = "the child exited without output (router.auto_distill logs no exit status)"
    return [
        DistillationRun(m[1], "failed", m[3].strip() or silent, float(m[2]), time.time())
        for m in found
    ]


def distillation_runs(state_dir: Path) -> list[DistillationRun]:
    """The runs recorded in a sidecar's capture database (none before it exists)."""
    path = state_dir / DATABASE_NAME
    if not path.is_file():
        return []
    db = sqlite3.connect(path, timeout=5.0)
    try:
        rows = db.execute(
            "SELECT cluster, outcome, detail, seconds, created_unix FROM distillation_runs"
            " ORDER BY id"
        ).fetchall()
    except sqlite3.OperationalError:  # the sidecar has not created its tables yet
        return []
    finally:
        db.close()
    return [DistillationRun(str(c), str(o), str(d), float(s), float(u)) for c, o, d, s, u in rows]


@dataclass
class DistillationWatch:
    """Times lone Generates while idle and while the sidecar distils; the ``await_drafter``
    handler of the learn replay."""

    client: ReplayClient
    state_dir: Path
    probe: TraceRequest
    learning: PolicySetting | None
    options: LearnOptions
    log_path: Path | None = None  # the sidecar's log
    idle: list[tuple[float, float]] = field(default_factory=list)  # (start unix, seconds)
    waiting: list[tuple[float, float]] = field(default_factory=list)
    run: DistillationRun | None = None
    registered: str | None = None
    wait_seconds: float = 0.0
    # The distillation's own account (distill.json: held-out acceptance before and after).
    account: dict[str, Any] = field(default_factory=dict)

    def _lone(self) -> tuple[float, float]:
        started_unix, started = time.time(), time.perf_counter()
        self.client.generate(self.probe, no_update=True, task_hint=True)
        return started_unix, time.perf_counter() - started

    def measure_idle(self, warmup: int = 2) -> None:
        """Lone Generates before the replay (the first ``warmup`` not kept)."""
        for _ in range(warmup):
            self._lone()
        self.idle = [self._lone() for _ in range(self.options.idle_probes)]

    def __call__(self, event: TraceEvent) -> None:
        # The sidecar picks the cluster from the serving policy's figures: serve the learner.
        if self.learning is not None:
            self.client.set_policy(self.learning.policy, self.learning.config, reset_state=False)
        started = time.perf_counter()
        deadline = started + self.options.timeout_s
        while self.run is None and time.perf_counter() < deadline:
            recorded = distillation_runs(self.state_dir) + discarded_runs(self.log_path)
            runs = [r for r in recorded if r.cluster in event.tasks]
            if runs:
                self.run = runs[0]
                break
            self.waiting.append(self._lone())
        self.wait_seconds = time.perf_counter() - started
        names = [d.name for d in self.client.list_drafters() if d.name.startswith(event.drafter)]
        self.registered = names[0] if names else None
        accounts = sorted((self.state_dir / DISTILLED_DIR).glob("*/distill.json"))
        self.account = json.loads(accounts[-1].read_text()) if accounts else {}

    def during(self) -> list[float]:
        """Latencies of the probes that started while the distillation ran."""
        if self.run is None:
            return []
        begin = self.run.finished_unix - self.run.seconds
        return [s for t, s in self.waiting if begin <= t <= self.run.finished_unix]


def measure_reference(
    client: ReplayClient,
    world: DrafterSource,
    task: str,
    requests: Sequence[TraceRequest],
    k_grid: Sequence[int],
) -> dict[int, float]:
    """The withheld world drafter's speed-up at each k on ``requests`` (beside plain decoding,
    interleaved per request), registered as ``<task>-world`` for the measurement only."""
    path = Path(world.drafter_dirs[task])
    name = f"{task}{REFERENCE_SUFFIX}"
    client.register_drafter(name, "model", str(path), (task,), read_finetune_sample(path))
    plain = ArmPin("none", 0)
    arms = [plain, *(ArmPin(name, k) for k in k_grid)]
    try:
        measured = measure_arms(client, requests, arms, None)
    finally:
        client.remove_drafter(name)
    baseline = {r.request_id: r for r in measured[plain]}
    return {arm.draft_length: speedup(measured[arm], baseline) for arm in arms[1:]}


def _percentile_ms(latencies: Sequence[float], q: float) -> float | None:
    return float(np.percentile(latencies, q)) * 1e3 if latencies else None


def _ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num is not None and den else None


@dataclass(frozen=True)
class DistillationFigures:
    """What the learn replay saw of the distillation."""

    drafter: str | None  # the registered drafter, None when discarded or not finished
    outcome: str  # registered, refused, failed, written, or "timeout"
    detail: str
    seconds: float | None  # as the distillation recorded it
    wait_seconds: float  # the replay's wait at halfway
    idle_s: tuple[float, ...]
    during_s: tuple[float, ...]
    account: Mapping[str, Any] = field(default_factory=dict)  # distill.json


def distillation_figures(watch: DistillationWatch) -> DistillationFigures:
    run = watch.run
    return DistillationFigures(
        drafter=watch.registered,
        outcome=run.outcome if run else "timeout",
        detail=run.detail if run else f"nothing recorded in {watch.options.timeout_s:.0f} s",
        seconds=run.seconds if run else None,
        wait_seconds=watch.wait_seconds,
        idle_s=tuple(s for _, s in watch.idle),
        during_s=tuple(watch.during()),
        account=watch.account,
    )


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def learn_figures(
    results: Sequence[RequestResult],
    baseline: Sequence[RequestResult],
    cluster: str,
    boundary: int,
    reference: Mapping[int, float],
    distillation: DistillationFigures,
) -> dict[str, Any]:
    """The report's ``learn`` section from the learning policy's and the baseline's requests
    (``boundary``: the first second-half request index)."""
    by_id = {r.request_id: r for r in baseline}
    halves = (
        [r for r in results if r.index < boundary],
        [r for r in results if r.index >= boundary],
    )
    own = [[r for r in half if r.task == cluster] for half in halves]
    per_task = [per_task_speedup(half, baseline) for half in halves]
    before, after = (speedup(rows, by_id) if rows else None for rows in own)
    best_k = max(reference, key=lambda k: reference[k], default=None)
    ref = reference[best_k] if best_k is not None else None
    adopted = Counter(r.drafter for r in own[1])
    name = distillation.drafter
    p99_idle = _percentile_ms(distillation.idle_s, 99)
    p99_during = _percentile_ms(distillation.during_s, 99)
    return {
        "cluster": cluster,
        "boundary_request": boundary,
        "requests_before": len(own[0]),
        "requests_after": len(own[1]),
        "speedup_before": _finite(before),
        "speedup_after": _finite(after),
        "after_over_before": _finite(_ratio(after, before)),
        "reference_speedup": _finite(ref),
        "reference_k": best_k,
        "reference_by_k": {str(k): _finite(v) for k, v in sorted(reference.items())},
        "after_over_reference": _finite(_ratio(after, ref)),
        "min_speedup_before": _finite(min(per_task[0].values(), default=math.nan)),
        "min_speedup_after": _finite(min(per_task[1].values(), default=math.nan)),
        "per_task_before": {t: _finite(v) for t, v in per_task[0].items()},
        "per_task_after": {t: _finite(v) for t, v in per_task[1].items()},
        "distilled_drafter": name,
        "registered": name is not None,
        "distill_outcome": distillation.outcome,
        "distill_detail": distillation.detail,
        "distill_seconds": _finite(distillation.seconds),
        "distill_wait_seconds": round(distillation.wait_seconds, 3),
        "distill_report": dict(distillation.account),
        "adoption_after": (adopted.get(name, 0) / len(own[1])) if name and own[1] else 0.0,
        "drafters_after": dict(adopted.most_common()),
        "generate_p50_idle_ms": _finite(_percentile_ms(distillation.idle_s, 50)),
        "generate_p50_during_ms": _finite(_percentile_ms(distillation.during_s, 50)),
        "generate_p99_idle_ms": _finite(p99_idle),
        "generate_p99_during_ms": _finite(p99_during),
        "generate_p99_ratio": _finite(_ratio(p99_during, p99_idle)),
        "probes_idle": len(distillation.idle_s),
        "probes_during": len(distillation.during_s),
    }


def learn_markdown(report: Mapping[str, Any]) -> list[str]:
    """The report.md section of a learn replay (nothing for other traces)."""
    learn = report.get("learn")
    if not learn:
        return []

    def fmt(value: object, digits: int = 3) -> str:
        return f"{value:.{digits}f}" if isinstance(value, float) else str(value)

    account = learn.get("distill_report") or {}
    rows = [
        ("speed-up on the task, first half", learn["speedup_before"]),
        ("speed-up on the task, second half", learn["speedup_after"]),
        ("second / first half", learn["after_over_before"]),
        (f"withheld world drafter at k = {learn['reference_k']}", learn["reference_speedup"]),
        ("second half / world drafter", learn["after_over_reference"]),
        ("minimum task speed-up, first half", learn["min_speedup_before"]),
        ("minimum task speed-up, second half", learn["min_speedup_after"]),
        ("distillation seconds", learn["distill_seconds"]),
        ("lone Generate p99 idle / during distillation (ms)",
         f"{fmt(learn['generate_p99_idle_ms'], 0)} / {fmt(learn['generate_p99_during_ms'], 0)}"),
        ("p99 during / idle", learn["generate_p99_ratio"]),
        ("second-half requests on the distilled drafter", learn["adoption_after"]),
        ("held-out acceptance (distill.json) before / after",
         f"{fmt(account.get('acceptance_before'))} / {fmt(account.get('acceptance_after'))}"),
    ]  # fmt: skip
    return [
        f"## Learning `{learn['cluster']}`",
        "",
        f"Distillation: {learn['distill_outcome']} ({learn['distill_detail']}); drafter "
        f"`{learn['distilled_drafter']}`. Speed-ups are {LEARNING_POLICY}'s over plain decoding "
        "on the same prompts; the world drafter's beside plain decoding, interleaved, after "
        "the replay, at its best k on the second half's prompts of the task.",
        "",
        "| figure | value |",
        "|---|---|",
        *(f"| {label} | {fmt(value)} |" for label, value in rows),
        "",
    ]
