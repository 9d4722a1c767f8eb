"""Copy where the context repeats, else draft with the model: against either one alone.

``python -m benchmarks.engine.copying [--world DIR] [--tasks a,b] [--prompts N]
[--max-new-tokens N] [--ks 2,3,4,6,8] [--model-k 3] [--min-match 3] [--json PATH]``: per
task of a built-in world, on its held-out prompts, greedy, plain decoding and, at every k
of ``--ks``, the task's own drafter, the n-gram lookup and the copy-or-model drafter
built on the task's drafter (``drafters/hybrid.py``), every configuration run once per
prompt in an order rotated per prompt after one warm-up pass (``specroute bench
engine``'s ``measure_task``), so load drift spreads over all of them.

Printed per task: each drafter's best k and its speed-up (tokens/s over plain decoding's,
prefill included, as a client sees it), and the copy-or-model drafter's best over the
better of the two it combines, measured in the same run. Outputs that differ from plain
decoding's are counted (must be 0).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from benchmarks import module_parser
from benchmarks.engine.bench import (
    NGRAM,
    PLAIN,
    Configuration,
    ConfigurationTotals,
    TaskSetup,
    load_task_setups,
    machine_description,
    measure_task,
    open_world,
)
from drafters.hybrid import DEFAULT_MIN_MATCH, DEFAULT_MODEL_K, CopyOrModelDrafter
from drafters.model_drafter import ModelDrafter

logger = logging.getLogger(__name__)

COPY_OR_MODEL = "copy-or-model"


def with_copy_or_model(setup: TaskSetup, min_match: int, model_k: int) -> TaskSetup:
    """``setup`` with the copy-or-model drafter on the task's own drafter."""
    own = setup.drafters[setup.task]
    assert isinstance(own, ModelDrafter)
    hybrid = CopyOrModelDrafter(name=COPY_OR_MODEL, base=own, min_match=min_match, model_k=model_k)
    return TaskSetup(setup.task, setup.prompts, {**setup.drafters, COPY_OR_MODEL: hybrid})


def copy_configurations(task: str, ks: Sequence[int]) -> list[Configuration]:
    """Plain decoding, then the own drafter, the lookup and copy-or-model at every k."""
    configs = [Configuration("ours", PLAIN, 0)]
    for drafter in (task, NGRAM, COPY_OR_MODEL):
        configs += [Configuration("ours", drafter, k) for k in ks]
    return configs


def best_of(
    totals: dict[Configuration, ConfigurationTotals], drafter: str, plain_tokens_per_s: float
) -> tuple[int, float]:
    """(best k, its speed-up) of ``drafter`` among the measured configurations."""
    measured = [
        (c.k, t.tokens_per_s / plain_tokens_per_s)
        for c, t in totals.items()
        if c.drafter == drafter
    ]
    return max(measured, key=lambda pair: pair[1])


def summarize_task(totals: dict[Configuration, ConfigurationTotals], task: str) -> dict[str, Any]:
    plain = totals[Configuration("ours", PLAIN, 0)]
    reference = plain.outputs
    mismatches = sum(
        sum(1 for ours, ref in zip(t.outputs, reference, strict=True) if ours != ref)
        for t in totals.values()
    )
    best = {d: best_of(totals, d, plain.tokens_per_s) for d in (task, NGRAM, COPY_OR_MODEL)}
    single = max(best[task][1], best[NGRAM][1])
    return {
        "mean_output_tokens": plain.tokens / max(plain.runs, 1),
        "best": {d: {"k": k, "speedup": s} for d, (k, s) in best.items()},
        "copy_or_model_over_best_single": best[COPY_OR_MODEL][1] / single,
        "speedups": {
            f"{c.drafter}:{c.k}": t.tokens_per_s / plain.tokens_per_s for c, t in totals.items()
        },
        "mismatches": mismatches,
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = module_parser(__doc__)
    parser.add_argument("--world", type=Path, default=None)
    parser.add_argument("--tasks", default="")
    parser.add_argument("--prompts", type=int, default=12)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--ks", default="2,3,4,6,8")
    parser.add_argument("--model-k", type=int, default=DEFAULT_MODEL_K)
    parser.add_argument("--min-match", type=int, default=DEFAULT_MIN_MATCH)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    ks = [int(k) for k in args.ks.split(",") if k]
    opened = open_world(args.world)
    root, world, manifest, engine = opened.root, opened.world, opened.manifest, opened.engine
    target, tasks = opened.target, opened.tasks(args.tasks)
    report: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_description(target.device),
        "world": {"root": str(root), "config_hash": manifest.get("config_hash")},
        "settings": {
            "prompts": args.prompts,
            "max_new_tokens": args.max_new_tokens,
            "ks": ks,
            "model_k": args.model_k,
            "min_match": args.min_match,
        },
        "load_average_before": os.getloadavg(),
        "tasks": {},
    }
    began = time.perf_counter()
    gains = []
    for setup in load_task_setups(world, target, tasks, args.prompts):
        setup = with_copy_or_model(setup, args.min_match, args.model_k)
        configs = copy_configurations(setup.task, ks)
        totals = measure_task(engine, setup, configs, args.max_new_tokens, lambda: None)
        summary = summarize_task(totals, setup.task)
        report["tasks"][setup.task] = summary
        gains.append(summary["copy_or_model_over_best_single"])
        best = summary["best"]
        logger.info(
            "%-14s %5.1f tokens  own %.2fx (k=%d)  ngram %.2fx (k=%d)  copy-or-model %.2fx "
            "(k=%d)  over the better single %.3f  mismatches %d",
            setup.task,
            summary["mean_output_tokens"],
            best[setup.task]["speedup"],
            best[setup.task]["k"],
            best[NGRAM]["speedup"],
            best[NGRAM]["k"],
            best[COPY_OR_MODEL]["speedup"],
            best[COPY_OR_MODEL]["k"],
            summary["copy_or_model_over_best_single"],
            summary["mismatches"],
        )
    report["copy_or_model_over_best_single_mean"] = sum(gains) / len(gains)
    report["wall_s"] = time.perf_counter() - began
    report["load_average_after"] = os.getloadavg()
    logger.info(
        "mean over tasks of copy-or-model's best / the better single drafter's best: %.3f "
        "(load average before %s, after %s)",
        report["copy_or_model_over_best_single_mean"],
        report["load_average_before"],
        report["load_average_after"],
    )
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
