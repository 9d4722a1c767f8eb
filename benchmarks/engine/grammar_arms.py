"""Which drafts pay under a grammar: each task's own drafter and the n-gram drafter, with
and without structured output, on a built world.

    python -m benchmarks.engine.grammar_arms [--world DIR] [--tasks math,chat]
        [--prompts 4] [--k 4] [--tokens 64]

Per task, its first ``prompts`` test prompts (chat template) are generated greedily,
``tokens`` at most, by each drafter at ``k`` and plainly (k 0), freely and under a JSON
grammar (an object with one string field, "answer", compact: what an application asking
for JSON gets). Printed per task and drafter, for free text and for JSON side by side:
the acceptance (accepted / drafted tokens) and the speed-up, the plain run's time per
output token over the drafter's, both under the same grammar. The policy learns a
cluster's structured requests apart from its free text (``docs/policy.md``); this says
why.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks import module_parser
from benchmarks.engine.bench import chat_prompt_ids, open_world
from benchmarks.world.layout import read_examples
from drafters.engine import SpeculativeEngine
from drafters.grammar import OutputGrammar
from drafters.registry import create_drafter

logger = logging.getLogger(__name__)

JSON_ANSWER = OutputGrammar(
    "json",
    json.dumps(
        {
            "type": "object",
            "properties": {"answer": {"type": "string", "maxLength": 200}},
            "required": ["answer"],
            "additionalProperties": False,
        }
    ),
    any_whitespace=False,
)


def measure(
    engine: SpeculativeEngine,
    prompts: Sequence[list[int]],
    drafter: Any,
    plain: Any,
    k: int,
    tokens: int,
    grammar: OutputGrammar | None,
) -> tuple[float, float]:
    """(acceptance, speed-up) of ``drafter`` at ``k`` over ``prompts`` (module doc)."""
    drafted = accepted = 0
    speculative_s = plain_s = 0.0
    for prompt in prompts:
        run = engine.generate(prompt, drafter, k, max_new_tokens=tokens, grammar=grammar)
        run.collect()
        base = engine.generate(prompt, plain, 0, max_new_tokens=tokens, grammar=grammar)
        base.collect()
        drafted += sum(run.stats.drafted_per_step)
        accepted += sum(run.stats.accepted_per_step)
        # The same output (greedy, lossless): the plain run's time for as many tokens.
        speculative_s += run.stats.wall_time_s
        plain_s += base.stats.wall_time_s
    return accepted / max(drafted, 1), plain_s / speculative_s


def main(argv: Sequence[str] | None = None) -> None:
    parser = module_parser(__doc__)
    parser.add_argument("--world", type=Path, default=None)
    parser.add_argument("--tasks", default="", help="comma-separated; all the world's if empty")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    opened = open_world(args.world)
    target, engine = opened.target, opened.engine
    test = read_examples(opened.world.corpus_dir, "test")
    plain = create_drafter("none", name="none", target=target)
    ngram = create_drafter("ngram", name="ngram", target=target)
    logger.info("task, drafter at k=%d: acceptance and speed-up, free text | JSON", args.k)
    for task in opened.tasks(args.tasks):
        examples = [e for e in test if e.task == task][: args.prompts]
        prompts = [chat_prompt_ids(target.tokenizer, e.messages) for e in examples]
        own = create_drafter(
            "model", name=task, target=target, path=opened.world.drafter_dirs[task]
        )
        for name, drafter in ((task, own), ("ngram", ngram)):
            free = measure(engine, prompts, drafter, plain, args.k, args.tokens, None)
            held = measure(engine, prompts, drafter, plain, args.k, args.tokens, JSON_ANSWER)
            logger.info(
                "%-13s %-13s a %.2f, %.2fx | a %.2f, %.2fx",
                task,
                name,
                *free,
                *held,
            )


if __name__ == "__main__":
    main()
