"""A controlled background load: other work on the machine while a replay measures.

Production is never idle, so a replay can run ``procs`` background processes beside the
sidecar while it replays:

- ``steady``: each process spins (a busy loop) the whole time;
- ``bursty``: each process alternates busy and idle spells, each spell's length drawn
  uniformly from ``spell_s`` (0.2-2 s by default) from a generator seeded with
  ``seed + process index``, so two runs with the same seed load the machine alike.

The processes run at the replay's own priority (they are meant to compete with the
sidecar), stop when the ``background_load`` block ends (normally, on an error or on
Ctrl-C), and stop on their own when their parent disappears (a killed replay leaves no
spinning orphans). Each one counts its busy seconds, so the report says how much load
there actually was, not only how much was asked for.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

LOAD_MODES = ("none", "steady", "bursty")
DEFAULT_SPELL_S = (0.2, 2.0)
# How often a spinning process checks its stop flag and its parent (seconds).
_CHECK_EVERY_S = 0.05
_STOP_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class BackgroundLoadConfig:
    """What load to run: ``mode`` (none | steady | bursty), how many processes, the seed
    and the range of a bursty spell's length in seconds."""

    mode: str = "none"
    procs: int = 2
    seed: int = 0
    spell_s: tuple[float, float] = DEFAULT_SPELL_S

    def __post_init__(self) -> None:
        if self.mode not in LOAD_MODES:
            raise ValueError(
                f"unknown background load {self.mode!r}; known: {', '.join(LOAD_MODES)}"
            )
        if self.procs < 0:
            raise ValueError(f"load processes must be >= 0, got {self.procs}")
        low, high = self.spell_s
        if not 0 < low <= high:
            raise ValueError(f"spell lengths must satisfy 0 < low <= high, got {self.spell_s}")

    @property
    def active(self) -> bool:
        return self.mode != "none" and self.procs > 0


@dataclass
class LoadRecord:
    """What ran: the config, the process ids, and after the block the seconds it lasted
    and each process's busy and running seconds."""

    config: BackgroundLoadConfig
    pids: list[int]
    seconds: float = 0.0
    busy_s: tuple[float, ...] = ()
    alive_s: tuple[float, ...] = ()  # each process's time from its start to its stop

    def summary(self) -> dict[str, Any]:
        """The report's ``background_load`` entry (JSON); ``busy_fraction`` is the busy
        share of the processes' own running time (their start-up excluded)."""
        alive = sum(self.alive_s)
        busy_fraction = sum(self.busy_s) / alive if alive > 0 else 0.0
        return {
            "mode": self.config.mode if self.config.active else "none",
            "procs": self.config.procs if self.config.active else 0,
            "seed": self.config.seed,
            "spell_s": list(self.config.spell_s),
            "seconds": round(self.seconds, 3),
            "busy_s": [round(b, 3) for b in self.busy_s],
            "running_s": [round(a, 3) for a in self.alive_s],
            "busy_fraction": round(busy_fraction, 4),
        }


def describe_load(summary: dict[str, Any] | None) -> str:
    """One line for a printed report: what background load ran during the replay."""
    if not summary or summary.get("mode", "none") == "none":
        return "background load: none"
    low, high = summary["spell_s"]
    spells = f", spells {low:g}-{high:g} s" if summary["mode"] == "bursty" else ""
    return (
        f"background load: {summary['mode']}, {summary['procs']} "
        f"process{'es' if summary['procs'] != 1 else ''}{spells}, "
        f"seed {summary['seed']}, busy {100 * summary['busy_fraction']:.0f}% of "
        f"{summary['seconds']:.0f} s"
    )


def _spin(seconds: float, stop: Any, parent: int) -> float:
    """Busy-loop for ``seconds`` (or until stopped); returns the seconds spun."""
    started = time.perf_counter()
    deadline = started + seconds
    check = started
    count = 0
    while True:
        count += 1  # the work: keep one core busy in pure Python
        now = time.perf_counter()
        if now >= deadline:
            break
        if now - check >= _CHECK_EVERY_S:
            check = now
            if stop.is_set() or os.getppid() != parent:
                break
    return time.perf_counter() - started


def _idle(seconds: float, stop: Any, parent: int) -> None:
    """Sleep for ``seconds``, waking to check the stop flag and the parent."""
    deadline = time.monotonic() + seconds
    while not stop.is_set() and os.getppid() == parent:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        stop.wait(min(left, _CHECK_EVERY_S * 4))


def load_worker(
    mode: str,
    seed: int,
    spell_s: tuple[float, float],
    stop: Any,
    counters: Any,
    parent: int,
) -> None:
    """One background process: spin (steady) or alternate spin and sleep (bursty);
    ``counters`` (a shared array) gets its busy seconds and its running seconds."""
    started = time.perf_counter()
    rng = random.Random(seed)
    low, high = spell_s
    # A bursty process starts busy or idle at random, so processes do not move in step.
    spinning = mode == "steady" or rng.random() < 0.5
    while not stop.is_set() and os.getppid() == parent:
        spell = high if mode == "steady" else rng.uniform(low, high)
        if spinning:
            counters[0] += _spin(spell, stop, parent)
        else:
            _idle(spell, stop, parent)
        counters[1] = time.perf_counter() - started
        spinning = mode == "steady" or not spinning


@contextlib.contextmanager
def background_load(config: BackgroundLoadConfig) -> Iterator[LoadRecord]:
    """Run the configured load for the duration of the block (nothing for mode none)."""
    record = LoadRecord(config, [])
    if not config.active:
        yield record
        return
    # spawn: the replay holds gRPC channels and torch threads, which a fork would copy.
    context = multiprocessing.get_context("spawn")
    stop = context.Event()
    # Per process [busy seconds, running seconds], written by that process only.
    counters = [context.Array("d", 2) for _ in range(config.procs)]
    processes = [
        context.Process(
            target=load_worker,
            args=(config.mode, config.seed + i, config.spell_s, stop, counters[i], os.getpid()),
            name=f"specroute-load-{i}",
            daemon=True,
        )
        for i in range(config.procs)
    ]
    started = time.perf_counter()
    try:
        for process in processes:
            process.start()
            record.pids.append(int(process.pid or 0))
        logger.info("background load %s: %d processes %s", config.mode, config.procs, record.pids)
        yield record
    finally:
        record.seconds = time.perf_counter() - started
        stop_processes(processes, stop)
        record.busy_s = tuple(float(c[0]) for c in counters)
        record.alive_s = tuple(float(c[1]) for c in counters)


def stop_processes(processes: list[Any], stop: Any) -> None:
    """Ask the load processes to stop, then terminate and finally kill any that linger."""
    stop.set()
    deadline = time.monotonic() + _STOP_TIMEOUT_S
    for process in processes:
        if process.pid is not None:
            process.join(max(0.0, deadline - time.monotonic()))
    for process in processes:
        if process.is_alive():
            logger.warning("background load process %d did not stop; terminating", process.pid)
            process.terminate()
            process.join(1.0)
        if process.is_alive():
            process.kill()
            process.join(1.0)
