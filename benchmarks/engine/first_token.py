"""Time to first token and request time: this checkout's engine against another's.

    python -m benchmarks.engine.first_token --before DIR [--world DIR] [--tasks math,code]
                                            [--prompts 4] [--k 3] [--max-new-tokens 64]
                                            [--rounds 2]

``DIR`` is another checkout of specroute (``git worktree add /tmp/before REV``). Its
``drafters/engine.py`` is loaded beside this checkout's, in this process, over the same
target and drafters (so it must run against this checkout's ``drafters`` package). Every
request runs on both engines back to back, the order alternating by round, so that a
change of the machine's speed falls on both alike (on a shared VM, two processes of the
same build differ by up to 15% in step time: separate runs cannot resolve a few percent).
Each task's first held-out prompts, greedy, plain decoding and the task's own drafter at
``k``. Prints per task and arm the mean time to the first streamed event and the mean
request time of each engine, then over all requests the ratios after / before and each
engine's speed-up of the drafter over plain decoding; fails if the outputs differ.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmarks import module_parser
from benchmarks.engine.bench import PLAIN, load_task_setups, machine_description, open_world
from drafters.base import Drafter
from drafters.engine import SpeculativeEngine

logger = logging.getLogger(__name__)

PLAIN_ARM = "plain"
ENGINES = ("before", "after")


@dataclass
class Timing:
    """Totals of one engine on one (task, arm)."""

    requests: int = 0
    first_s: float = 0.0
    total_s: float = 0.0

    def add(self, first_s: float, total_s: float) -> None:
        self.requests += 1
        self.first_s += first_s
        self.total_s += total_s

    def mean_first_ms(self) -> float:
        return 1e3 * self.first_s / max(self.requests, 1)

    def mean_total_ms(self) -> float:
        return 1e3 * self.total_s / max(self.requests, 1)


@dataclass
class Comparison:
    """(engine, task, arm) -> its timing."""

    timings: dict[tuple[str, str, str], Timing] = field(default_factory=dict)

    def add(self, engine: str, task: str, arm: str, first_s: float, total_s: float) -> None:
        self.timings.setdefault((engine, task, arm), Timing()).add(first_s, total_s)

    def cells(self) -> list[tuple[str, str]]:
        """The (task, arm) pairs in the order they were measured."""
        return list(dict.fromkeys((task, arm) for _, task, arm in self.timings))

    def total(self, engine: str, arm: str | None = None, *, first: bool = False) -> float:
        """Seconds summed over ``engine``'s requests (of ``arm``, or all)."""
        return sum(
            t.first_s if first else t.total_s
            for (e, _, a), t in self.timings.items()
            if e == engine and (arm is None or a == arm)
        )

    def ratio(self, arm: str, *, first: bool) -> float:
        """After over before, summed over the arm's requests."""
        return self.total("after", arm, first=first) / self.total("before", arm, first=first)

    def drafter_speedup(self, engine: str) -> float:
        """Plain decoding's request time over the drafters', summed over the tasks."""
        plain = self.total(engine, PLAIN_ARM)
        return plain / (self.total(engine) - plain)


def load_other_engine(checkout: Path) -> type[SpeculativeEngine]:
    """``SpeculativeEngine`` of ``checkout``'s ``drafters/engine.py``, as a module of its own."""
    path = checkout / "drafters" / "engine.py"
    if not path.is_file():
        raise FileNotFoundError(f"{checkout} is not a specroute checkout: no {path}")
    spec = importlib.util.spec_from_file_location("before_engine", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    engine: type[SpeculativeEngine] = module.SpeculativeEngine
    return engine


def timed_run(
    engine: Any, prompt: list[int], drafter: Drafter, k: int, max_new_tokens: int
) -> tuple[float, float, list[int]]:
    """(seconds to the first event, seconds in all, output) of one greedy request."""
    started = time.perf_counter()
    first: float | None = None
    run = engine.generate(prompt, drafter, k, max_new_tokens=max_new_tokens)
    for _ in run:
        if first is None:
            first = time.perf_counter() - started
    total = time.perf_counter() - started
    return (total if first is None else first), total, list(run.output_ids)


def compare(
    before: Any,
    after: Any,
    setups: Sequence[Any],
    k: int,
    max_new_tokens: int,
    rounds: int,
) -> Comparison:
    """Each prompt of each setup, plain and on its task's drafter, on both engines back
    to back (``before`` first in even rounds); raises if their outputs differ."""
    engines = {"before": before, "after": after}
    result = Comparison()
    for round_index in range(rounds):
        order = ENGINES if round_index % 2 == 0 else ENGINES[::-1]
        for setup in setups:
            arms = (
                (PLAIN_ARM, setup.drafters[PLAIN], 0),
                (f"own:{k}", setup.drafters[setup.task], k),
            )
            for prompt in setup.prompts:
                for arm, drafter, length in arms:
                    outputs = {}
                    for name in order:
                        first, total, output = timed_run(
                            engines[name], prompt, drafter, length, max_new_tokens
                        )
                        result.add(name, setup.task, arm, first, total)
                        outputs[name] = output
                    if outputs["before"] != outputs["after"]:
                        raise AssertionError(f"{setup.task} {arm}: the engines' outputs differ")
    return result


def report(result: Comparison) -> None:
    logger.info("task arm: first token ms before / after | request ms before / after")
    for task, arm in result.cells():
        before = result.timings[("before", task, arm)]
        after = result.timings[("after", task, arm)]
        logger.info(
            "%s %s: %.1f / %.1f | %.1f / %.1f",
            task,
            arm,
            before.mean_first_ms(),
            after.mean_first_ms(),
            before.mean_total_ms(),
            after.mean_total_ms(),
        )
    for arm in dict.fromkeys(a for _, a in result.cells()):
        logger.info(
            "%s: first token after / before %.3f, request time after / before %.3f",
            arm,
            result.ratio(arm, first=True),
            result.ratio(arm, first=False),
        )
    logger.info(
        "the task drafters' speed-up over plain decoding: before %.3f, after %.3f",
        result.drafter_speedup("before"),
        result.drafter_speedup("after"),
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = module_parser(__doc__)
    parser.add_argument("--before", type=Path, required=True)
    parser.add_argument("--world", type=Path, default=None)
    parser.add_argument("--tasks", default="")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    opened = open_world(args.world)
    before = load_other_engine(args.before)(opened.target)
    setups = load_task_setups(opened.world, opened.target, opened.tasks(args.tasks), args.prompts)
    result = compare(before, opened.engine, setups, args.k, args.max_new_tokens, args.rounds)
    logger.info("%s", machine_description(torch.device("cpu")))
    report(result)


if __name__ == "__main__":
    main()
