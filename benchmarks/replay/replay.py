"""Replay a trace through a live sidecar under each policy, over gRPC ``Generate``.

For each policy the sidecar is switched with ``SetPolicy`` and the whole trace is replayed,
one request at a time (closed loop; arrival offsets only order the requests). ``none``
(plain decoding) always runs first: it is the baseline of every speed-up and the reference
of the lossless check (greedy outputs of every policy must equal it token for token).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from tqdm import tqdm

from benchmarks.replay.calibration import GENERIC_DRAFTER, Calibration
from benchmarks.replay.client import DrafterEntry, ReplayClient
from benchmarks.replay.metrics import RequestResult
from benchmarks.replay.trace import Trace, TraceEvent, TraceRequest
from router.bundle import read_finetune_sample

logger = logging.getLogger(__name__)

BASELINE_POLICY = "none"
DEFAULT_POLICIES: tuple[str, ...] = ("none", "generic", "static", "ucb", "thompson", "oracle")


class DrafterSource(Protocol):
    """Where registration events find drafter directories (``router.bundle.ModelBundle``)."""

    @property
    def drafter_dirs(self) -> Mapping[str, Path]: ...


@dataclass(frozen=True)
class PolicySetting:
    """How one benchmark policy maps onto the sidecar's ``SetPolicy``."""

    label: str
    policy: str
    config: Mapping[str, Any] = field(default_factory=dict)
    reset_state: bool = True
    # Only learning policies get updates; the others replay with no_update (which also
    # spares the sidecar's full-information scoring after every request).
    learns: bool = False


def _table(choices: Mapping[str, Any]) -> dict[str, list[object]]:
    return {task: [choice.drafter, choice.k] for task, choice in choices.items()}


# Benchmark policy name -> its sidecar policy and config, given the calibration.
POLICY_SETTINGS: dict[str, Callable[[Calibration], PolicySetting]] = {
    "none": lambda cal: PolicySetting("none", "none"),
    "generic": lambda cal: PolicySetting(
        "generic", "fixed", {"drafter": GENERIC_DRAFTER, "k": cal.generic_k}
    ),
    "static": lambda cal: PolicySetting("static", "static", {"table": _table(cal.static)}),
    "ucb": lambda cal: PolicySetting("ucb", "ucb", learns=True),
    "thompson": lambda cal: PolicySetting("thompson", "thompson", learns=True),
    "oracle": lambda cal: PolicySetting("oracle", "oracle", {"table": _table(cal.oracle)}),
}


def check_policy_labels(labels: Sequence[str]) -> None:
    """KeyError naming the labels that are no replay policy (``POLICY_SETTINGS``)."""
    unknown = [label for label in labels if label not in POLICY_SETTINGS]
    if unknown:
        raise KeyError(f"unknown policies {unknown}; known: {', '.join(POLICY_SETTINGS)}")


def check_schedule(schedule: str) -> None:
    if schedule not in SCHEDULES:
        raise KeyError(f"unknown schedule {schedule!r}; known: {', '.join(SCHEDULES)}")


def policy_settings(labels: Sequence[str], calibration: Calibration) -> list[PolicySetting]:
    """Settings for the requested policies, the ``none`` baseline first."""
    check_policy_labels(labels)
    ordered = [BASELINE_POLICY, *(label for label in labels if label != BASELINE_POLICY)]
    return [POLICY_SETTINGS[label](calibration) for label in dict.fromkeys(ordered)]


@dataclass
class PolicyRun:
    """One policy's replay of the trace."""

    setting: PolicySetting
    results: list[RequestResult]
    seconds: float


def withheld_drafters(trace: Trace) -> tuple[str, ...]:
    """Drafters the trace removes before its first request (a sidecar can start without them)."""
    withheld: list[str] = []
    for record in trace.records:
        if isinstance(record, TraceRequest):
            break
        if record.kind == "remove_drafter":
            withheld.append(record.drafter)
    return tuple(withheld)


EventHandlers = Mapping[str, Callable[[TraceEvent], None]]
"""Event kind -> what the replay does for it, beside registering and removing drafters."""


class EventApplier:
    """Applies a trace's drafter events and undoes them after the run."""

    def __init__(
        self,
        client: ReplayClient,
        world: DrafterSource | None,
        handlers: EventHandlers | None = None,
    ) -> None:
        self._client = client
        self._world = world
        self._handlers = dict(handlers or {})
        self._registered: list[str] = []
        self._removed: list[DrafterEntry] = []

    def _source_dir(self, name: str) -> Path:
        if self._world is None or name not in self._world.drafter_dirs:
            raise KeyError(
                f"drafter {name!r}: no path in the event and no world drafter of that name"
            )
        return Path(self._world.drafter_dirs[name])

    def apply(self, event: TraceEvent) -> None:
        handler = self._handlers.get(event.kind)
        if handler is not None:
            handler(event)
            return
        if event.kind == "await_drafter":
            raise ValueError(
                "an await_drafter event needs a sidecar that distils by itself: replay the "
                "built-in 'learn' trace (its flow starts such a sidecar)"
            )
        if event.kind == "remove_drafter":
            entry = next((d for d in self._client.list_drafters() if d.name == event.drafter), None)
            if entry is None:
                logger.info(
                    "drafter %s is not served (withheld at start); nothing to remove", event.drafter
                )
                return
            if entry.builtin:
                raise ValueError(
                    f"drafter {event.drafter!r} is built into this sidecar and cannot be removed; "
                    "replay this trace without --address (the replay then starts a sidecar "
                    "without it)"
                )
            self._client.remove_drafter(event.drafter)
            self._removed.append(entry)
            return
        from drafters import PATH_KINDS

        kind = event.drafter_kind
        sample, where = list(event.finetune_sample), ""  # an n-gram or self drafter: no path
        if kind in PATH_KINDS:
            path = event.path or str(self._source_dir(event.source or event.drafter))
            sample, where = sample or list(read_finetune_sample(Path(path))), path
        self._client.register_drafter(event.drafter, kind, where, event.tasks, sample)
        self._registered.append(event.drafter)

    def undo(self) -> None:
        for name in reversed(self._registered):
            self._client.remove_drafter(name)
        for entry in reversed(self._removed):
            sample = list(read_finetune_sample(Path(entry.path))) if entry.path else []
            self._client.register_drafter(entry.name, entry.kind, entry.path, entry.tasks, sample)
        self._registered.clear()
        self._removed.clear()


def _bar(trace: Trace, label: str, total: int, progress: bool) -> tqdm:
    return tqdm(total=total, desc=f"replay {trace.name} [{label}]", disable=not progress)


def replay_policy(
    client: ReplayClient,
    trace: Trace,
    setting: PolicySetting,
    *,
    world: DrafterSource | None = None,
    progress: bool = True,
    task_hints: bool = False,
    handlers: EventHandlers | None = None,
) -> PolicyRun:
    """Switch the sidecar to ``setting`` and replay the whole trace (events undone after)."""
    client.set_policy(setting.policy, setting.config, reset_state=setting.reset_state)
    events = EventApplier(client, world, handlers)
    results: list[RequestResult] = []
    started = time.perf_counter()
    bar = _bar(trace, setting.label, len(trace.requests), progress)
    try:
        for record in trace.records:
            if isinstance(record, TraceRequest):
                no_update = not setting.learns
                results.append(
                    client.generate(
                        record, index=len(results), no_update=no_update, task_hint=task_hints
                    )
                )
                bar.update(1)
            else:
                logger.info("event before request %d: %s", len(results), record.kind)
                events.apply(record)
    finally:
        bar.close()
        events.undo()
    return PolicyRun(setting, results, time.perf_counter() - started)


def replay_sequential(
    client: ReplayClient,
    trace: Trace,
    settings: Sequence[PolicySetting],
    *,
    world: DrafterSource | None = None,
    progress: bool = True,
    task_hints: bool = False,
    handlers: EventHandlers | None = None,
) -> dict[str, PolicyRun]:
    """The whole trace under one policy, then the next (``none`` first)."""
    return {
        s.label: replay_policy(
            client,
            trace,
            s,
            world=world,
            progress=progress,
            task_hints=task_hints,
            handlers=handlers,
        )
        for s in settings
    }


def replay_interleaved(
    client: ReplayClient,
    trace: Trace,
    settings: Sequence[PolicySetting],
    *,
    world: DrafterSource | None = None,
    progress: bool = True,
    task_hints: bool = False,
    handlers: EventHandlers | None = None,
) -> dict[str, PolicyRun]:
    """Each request under every policy back to back (order rotated per request).

    Paired measurements: a change in machine load hits every policy alike, which a shared
    CPU needs. Learning policies keep their state across the switches: the sidecar saves a
    policy's state when switching away and ``SetPolicy(reset_state=False)`` restores it; a
    restored version lower than the last one seen is logged as a lost state.
    """
    results: dict[str, list[RequestResult]] = {s.label: [] for s in settings}
    seconds = dict.fromkeys(results, 0.0)
    versions: dict[str, int] = {}
    events = EventApplier(client, world, handlers)
    bar = _bar(trace, "all policies", len(trace.requests) * len(settings), progress)
    index = 0
    try:
        for record in trace.records:
            if not isinstance(record, TraceRequest):
                logger.info("event before request %d: %s", index, record.kind)
                events.apply(record)
                continue
            for offset in range(len(settings)):
                setting = settings[(index + offset) % len(settings)]
                restore = setting.learns and setting.label in versions
                version = client.set_policy(setting.policy, setting.config, reset_state=not restore)
                if restore and version < versions[setting.label]:
                    logger.warning(
                        "policy %s lost its state (version %d < %d)",
                        setting.label,
                        version,
                        versions[setting.label],
                    )
                started = time.perf_counter()
                result = client.generate(
                    record, index=index, no_update=not setting.learns, task_hint=task_hints
                )
                seconds[setting.label] += time.perf_counter() - started
                results[setting.label].append(result)
                versions[setting.label] = max(version, result.policy_version)
                bar.update(1)
            index += 1
    finally:
        bar.close()
        events.undo()
    return {s.label: PolicyRun(s, results[s.label], seconds[s.label]) for s in settings}


SCHEDULES = {"interleaved": replay_interleaved, "sequential": replay_sequential}


def replay_policies(
    client: ReplayClient,
    trace: Trace,
    settings: Sequence[PolicySetting],
    *,
    schedule: str = "interleaved",
    world: DrafterSource | None = None,
    progress: bool = True,
    task_hints: bool = False,
    handlers: EventHandlers | None = None,
) -> dict[str, PolicyRun]:
    """Replay the trace under every setting with the named schedule, then set the policy
    the sidecar served before back (a sidecar replayed against was left serving the last
    setting, ``none`` by default: plain decoding for everyone)."""
    check_schedule(schedule)
    serving = client.policy_state().policy
    try:
        return SCHEDULES[schedule](
            client,
            trace,
            settings,
            world=world,
            progress=progress,
            task_hints=task_hints,
            handlers=handlers,
        )
    finally:
        # Its state restored (switching away saved it); a configuration it was given is
        # not readable through the API: it serves its defaults and the drafters' hints.
        client.set_policy(serving, reset_state=False)
        logger.info("replay: the sidecar's policy %s is served again", serving)
