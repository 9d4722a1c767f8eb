"""What a model drafter's draft costs a step: its first forward against each further one.

    python -m benchmarks.engine.draft_cost [--world DIR] [--tasks math,code] [--prompts 6]
                                           [--lengths 1,2,4,8] [--max-new-tokens 128]

Each task's own drafter drafts for the task's first held-out prompts at each draft length,
greedy, through the sidecar's engine; the engine's statistics split the draft time into
each step's lead (the first forward, which catches the drafter's cache up on the verified
tokens, and the step's fixed work: ``GenerationStats.lead_time_s``) and the further
tokens' forwards. Prints, per task and k, the lead per drafting step, the time per further
token and the mean time per drafted token: a mean that falls with k is a lead that one
price per token cannot describe (``docs/policy.md``, "Cost model").
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks import module_parser
from benchmarks.engine.bench import load_task_setups, machine_description, open_world, run_ours
from drafters.stats import GenerationStats

logger = logging.getLogger(__name__)


@dataclass
class DraftTimes:
    """Totals over a task's prompts at one k."""

    drafted: int = 0
    lead_steps: int = 0
    further_forwards: int = 0
    draft_time_s: float = 0.0
    lead_time_s: float = 0.0
    further_time_s: float = 0.0

    def add(self, stats: GenerationStats) -> None:
        self.drafted += stats.drafted
        self.lead_steps += stats.lead_steps
        self.further_forwards += stats.further_forwards
        self.draft_time_s += stats.draft_time_s
        self.lead_time_s += stats.lead_time_s
        self.further_time_s += stats.further_time_s

    def lead_ms(self) -> float:
        return 1e3 * self.lead_time_s / max(self.lead_steps, 1)

    def further_ms(self) -> float | None:
        forwards = self.further_forwards
        return 1e3 * self.further_time_s / forwards if forwards else None

    def mean_ms(self) -> float:
        return 1e3 * self.draft_time_s / max(self.drafted, 1)


def measure(
    world_dir: Path | None,
    tasks: Sequence[str],
    prompts: int,
    lengths: Sequence[int],
    max_new_tokens: int,
) -> dict[tuple[str, int], DraftTimes]:
    """(task, k) -> the task's own drafter's draft times over its prompts."""
    opened = open_world(world_dir)
    results: dict[tuple[str, int], DraftTimes] = {}
    for setup in load_task_setups(opened.world, opened.engine.target, tasks, prompts):
        drafter = setup.drafters[setup.task]
        run_ours(opened.engine, drafter, max(lengths), setup.prompts[0], max_new_tokens)  # warm
        # The lengths interleaved per prompt, so that a change of load falls on all alike.
        for prompt in setup.prompts:
            for k in lengths:
                _, _, stats = run_ours(opened.engine, drafter, k, prompt, max_new_tokens)
                results.setdefault((setup.task, k), DraftTimes()).add(stats)
    return results


def main(argv: Sequence[str] | None = None) -> None:
    parser = module_parser(__doc__)
    parser.add_argument("--world", type=Path, default=None)
    parser.add_argument("--tasks", default="math,code")
    parser.add_argument("--prompts", type=int, default=6)
    parser.add_argument("--lengths", default="1,2,4,8")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    results = measure(
        args.world,
        [t for t in args.tasks.split(",") if t],
        args.prompts,
        [int(k) for k in args.lengths.split(",")],
        args.max_new_tokens,
    )
    logger.info("%s", machine_description(torch.device("cpu")))
    logger.info("task k: lead ms/step | further ms/token | mean ms/drafted token")
    for (task, k), times in results.items():
        further = times.further_ms()
        logger.info(
            "%s %d: %.3f | %s | %.3f",
            task,
            k,
            times.lead_ms(),
            "-" if further is None else f"{further:.3f}",
            times.mean_ms(),
        )


if __name__ == "__main__":
    main()
