"""What a predicted output (OpenAI's ``prediction``) is worth, and what a wrong one costs.

    python -m benchmarks.engine.prediction [--world DIR] [--tasks math,chat]
        [--prompts 4] [--tokens 128] [--k 8,16,32] [--base-k 4]

Per task, its first ``prompts`` test prompts (chat template) are generated greedily,
``tokens`` at most: plainly (k 0); by the task's own drafter at ``base-k`` (the arm a
request without a prediction would run); and with a prediction in front of that arm
(``drafters/prediction.py``) at each k of ``--k``, for three predictions:

- ``exact``: the answer itself (the text the plain run wrote): an edit that changed
  nothing, the best case;
- ``edited``: the answer with every sixth word replaced: a rewrite with changes;
- ``unrelated``: another prompt's answer: a prediction that does not match.

Printed per task and case: the share of drafted prediction tokens accepted, and the
speed-up, the plain runs' time over the run's for the same outputs (every run checked
lossless against the plain one). Then the same over all tasks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks import module_parser
from benchmarks.engine.bench import chat_prompt_ids, open_world
from benchmarks.world.layout import read_examples
from drafters.engine import SpeculativeEngine
from drafters.prediction import PredictedDrafter
from drafters.registry import create_drafter

logger = logging.getLogger(__name__)

EDIT_EVERY = 6  # the edited case replaces every sixth word of the answer


@dataclass
class Tally:
    """Runs of one (case, k): their time, the plain runs' for the same prompts, and the
    prediction's drafted and accepted tokens."""

    time_s: float = 0.0
    plain_s: float = 0.0
    drafted: int = 0
    accepted: int = 0

    def add(self, other: Tally) -> None:
        self.time_s += other.time_s
        self.plain_s += other.plain_s
        self.drafted += other.drafted
        self.accepted += other.accepted

    def line(self) -> str:
        acceptance = self.accepted / self.drafted if self.drafted else 0.0
        return f"{acceptance:.2f} of {self.drafted:5d}, {self.plain_s / self.time_s:5.2f}x"


def edited(text: str) -> str:
    """``text`` with every ``EDIT_EVERY``-th word replaced."""
    words = text.split(" ")
    return " ".join(
        "changed" if i % EDIT_EVERY == EDIT_EVERY // 2 else w for i, w in enumerate(words)
    )


def cases(answers: Sequence[str]) -> dict[str, Callable[[int], str]]:
    """Each case's prediction for the i-th prompt (module doc)."""
    return {
        "exact": lambda i: answers[i],
        "edited": lambda i: edited(answers[i]),
        "unrelated": lambda i: answers[(i + 1) % len(answers)],
    }


def run_once(
    engine: SpeculativeEngine, prompt: list[int], drafter: Any, k: int, tokens: int
) -> tuple[list[int], float]:
    run = engine.generate(prompt, drafter, k, max_new_tokens=tokens)
    run.collect()
    return [int(t) for t in run.output_ids], run.stats.wall_time_s


def measure_task(
    engine: SpeculativeEngine,
    prompts: Sequence[list[int]],
    own: Any,
    plain: Any,
    ks: Sequence[int],
    base_k: int,
    tokens: int,
) -> dict[str, Tally]:
    """This task's tallies by row name ("routed arm" and "<case> k=<k>")."""
    tokenizer = engine.target.tokenizer
    outputs, plain_times = [], []
    for prompt in prompts:
        output, seconds = run_once(engine, prompt, plain, 0, tokens)
        outputs.append(output)
        plain_times.append(seconds)
    answers = [tokenizer.decode(o, skip_special_tokens=True) for o in outputs]
    rows: dict[str, Tally] = {}
    routed = rows.setdefault(f"routed arm (k={base_k})", Tally())
    for i, prompt in enumerate(prompts):
        output, seconds = run_once(engine, prompt, own, base_k, tokens)
        _check_lossless(output, outputs[i], "routed arm")
        routed.add(Tally(seconds, plain_times[i]))
    for case, prediction_for in cases(answers).items():
        for k in ks:
            row = rows.setdefault(f"{case} k={k}", Tally())
            for i, prompt in enumerate(prompts):
                ids = tuple(tokenizer.encode(prediction_for(i), add_special_tokens=False))
                drafter = PredictedDrafter(own, ids, base_k, engine.target.device)
                output, seconds = run_once(engine, prompt, drafter, max(k, base_k), tokens)
                _check_lossless(output, outputs[i], case)
                tally = drafter.tally
                row.add(Tally(seconds, plain_times[i], tally.drafted, tally.accepted))
    return rows


def _check_lossless(output: list[int], plain: list[int], case: str) -> None:
    if output != plain:
        raise SystemExit(f"{case}: the output differs from plain decoding's (not lossless)")


def main(argv: Sequence[str] | None = None) -> None:
    parser = module_parser(__doc__)
    parser.add_argument("--world", type=Path, default=None)
    parser.add_argument("--tasks", default="", help="comma-separated; all the world's if empty")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--k", default="8,16,32", help="comma-separated draft lengths")
    parser.add_argument("--base-k", type=int, default=4)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    ks = [int(k) for k in args.k.split(",") if k]
    opened = open_world(args.world)
    target, engine = opened.target, opened.engine
    test = read_examples(opened.world.corpus_dir, "test")
    plain = create_drafter("none", name="none", target=target)
    overall: dict[str, Tally] = {}
    logger.info("task, case: prediction tokens accepted of drafted, speed-up over plain")
    for task in opened.tasks(args.tasks):
        examples = [e for e in test if e.task == task][: args.prompts]
        prompts = [chat_prompt_ids(target.tokenizer, e.messages) for e in examples]
        own = create_drafter(
            "model", name=task, target=target, path=opened.world.drafter_dirs[task]
        )
        rows = measure_task(engine, prompts, own, plain, ks, args.base_k, args.tokens)
        for name, tally in rows.items():
            logger.info("%-13s %-20s %s", task, name, tally.line())
            overall.setdefault(name, Tally()).add(tally)
    for name, tally in overall.items():
        logger.info("%-13s %-20s %s", "all", name, tally.line())


if __name__ == "__main__":
    main()
