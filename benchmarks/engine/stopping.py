"""Fixed draft lengths against drafts stopped early, per task, on a built-in world.

``python -m benchmarks.engine.stopping [--prompts N] [--max-new-tokens N] [--rounds N]
[--self-exits 1,2] [--json PATH] [--tasks a,b]``: each task's own drafter at fixed k
(2 to 16) and at k = 8 and 16 with stop rules (``drafters/stopping.py``), plain decoding
as the reference; greedy, every configuration run once per prompt in an order rotated per
prompt (after one warm-up pass), so load drift on a shared machine spreads over all of
them. ``--self-exits`` adds the self-speculative drafter (the target's first layers) at
those exit layers, k = 4 and 8.

Per configuration: speed-up per output token after the target's prefill (as
``specroute bench engine``), tokens per step (bonus included), drafted tokens per step,
the fraction of steps the rule stopped, the acceptance of drafted tokens and outputs
different from plain decoding's (must be 0).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import DynamicCache

from benchmarks import module_parser
from benchmarks.engine.bench import PLAIN, TaskSetup, load_task_setups, open_world
from drafters.attention import cached_causal_mask
from drafters.base import Drafter
from drafters.engine import SpeculativeEngine
from drafters.registry import create_drafter
from drafters.sampling import SamplingConfig
from drafters.stopping import DraftStopRule

K_MAX = 16
COST_REPEATS = 25


@dataclass(frozen=True)
class StopConfiguration:
    """The task's own drafter (or the target's early exit at ``exit_layer``, the self
    drafter) at ``k``, stopped early by ``rule`` when given; k = 0 plain."""

    k: int
    rule: DraftStopRule | None = None
    exit_layer: int | None = None

    @property
    def label(self) -> str:
        if self.k == 0:
            return "plain"
        prefix = "" if self.exit_layer is None else f"self{self.exit_layer} "
        if self.rule is None:
            return f"{prefix}k={self.k}"
        return f"{prefix}k={self.k} {self.rule.kind}<{self.rule.threshold:g}"


def self_configurations(exit_layers: Sequence[int]) -> tuple[StopConfiguration, ...]:
    """The self drafter at each exit layer, k = 4 and 8."""
    return tuple(StopConfiguration(k, exit_layer=e) for e in exit_layers for k in (4, 8))


STOP_RULES = (
    *(DraftStopRule(t, "max_prob") for t in (0.1, 0.2, 0.3, 0.5)),
    *(DraftStopRule(t, "entropy", entropy_scale=0.25) for t in (0.1, 0.3, 0.5)),
)

DEFAULT_CONFIGURATIONS = (
    StopConfiguration(0),
    *(StopConfiguration(k) for k in (2, 4, 6, 8, 12, 16)),
    *(StopConfiguration(k, rule) for k in (8, 16) for rule in STOP_RULES),
)


@dataclass(frozen=True)
class StepCosts:
    """Load-robust costs, each the minimum over COST_REPEATS of the thread's CPU time
    (``time.thread_time``; torch runs on one thread, so waiting for a core on a loaded
    machine is not counted): the target's verify forward of d + 1 positions, d = 0..K_MAX
    (d = 0 is a plain step, t_ar), and one drafter forward, at the context length of the
    task's first prompt + 32."""

    t_verify: list[float]
    t_draft: float

    def verify_line(self) -> tuple[float, float]:
        """(t0, t1): the least-squares line t0 + d t1 through the verify times, which
        smooths the single timings; t0 is the plain step's time, t_ar."""
        slope, intercept = np.polyfit(np.arange(len(self.t_verify)), self.t_verify, 1)
        return float(intercept), float(slope)

    def priced_speedup(self, total: Totals, t_draft: float | None = None) -> float:
        """Tokens over the time the step counts cost at these costs: per step, (drafted,
        + 1 if the rule stopped it) drafter forwards and a verify of the drafts made:

            t0 * tokens / ((drafted + stopped) t_draft + steps t0 + drafted t1)
        """
        if not total.steps:
            return 0.0
        t0, t1 = self.verify_line()
        draft = self.t_draft if t_draft is None else t_draft
        spent = (total.drafted + total.stopped) * draft + total.steps * t0
        return total.tokens * t0 / (spent + total.drafted * t1)


@torch.inference_mode()
def measure_costs(engine: SpeculativeEngine, drafter: Drafter, prompt: list[int]) -> StepCosts:
    target = engine.target
    history = prompt + [prompt[-1]] * 32
    cache = DynamicCache()
    cached = len(history) - 1
    target.model(
        input_ids=torch.tensor([history[:-1]], device=target.device),
        past_key_values=cache,
        use_cache=True,
    )
    t_verify = []
    for d in range(K_MAX + 1):
        ids = torch.tensor([history[-1:] * (d + 1)], device=target.device)
        mask = cached_causal_mask(target.model, d + 1, cached, target.device)
        best = float("inf")
        for _ in range(COST_REPEATS):
            started = time.thread_time()
            target.model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
            best = min(best, time.thread_time() - started)
            cache.crop(cached)
        t_verify.append(best)
    session = drafter.start(history)
    session.prefill(history)
    greedy = SamplingConfig()
    session.propose(history, 1, greedy, None)  # catches up; later calls feed one token
    best = float("inf")
    for _ in range(COST_REPEATS):
        started = time.thread_time()
        session.propose(history, 1, greedy, None)
        best = min(best, time.thread_time() - started)
    return StepCosts(t_verify, best)


@dataclass
class Totals:
    tokens: int = 0
    decode_s: float = 0.0
    cpu_s: float = 0.0  # process CPU time of whole runs (prefills included)
    steps: int = 0
    drafted: int = 0
    accepted: int = 0
    stopped: int = 0
    mismatches: int = 0


def _drafter(engine: SpeculativeEngine, setup: TaskSetup, config: StopConfiguration) -> Drafter:
    if config.k == 0:
        return setup.drafters[PLAIN]
    if config.exit_layer is None:
        return setup.drafters[setup.task]
    return create_drafter(
        "self",
        name=f"self{config.exit_layer}",
        target=engine.target,
        options={"exit_layer": config.exit_layer},
    )


def measure_task(
    engine: SpeculativeEngine,
    setup: TaskSetup,
    configs: tuple[StopConfiguration, ...],
    max_new_tokens: int,
    rounds: int = 1,
) -> dict[str, Totals]:
    totals = {config.label: Totals() for config in configs}
    drafters = {config.label: _drafter(engine, setup, config) for config in configs}
    for index, prompt in enumerate(setup.prompts * rounds):
        shift = index % len(configs)
        order = configs[shift:] + configs[:shift]
        passes = 2 if index == 0 else 1  # the first prompt warms every configuration up
        reference: list[int] | None = None
        for attempt in range(passes):
            outputs: dict[str, list[int]] = {}
            for config in order:
                drafter = drafters[config.label]
                started = time.perf_counter()
                cpu_started = time.process_time()
                run = engine.generate(
                    prompt, drafter, config.k, max_new_tokens=max_new_tokens, stop_rule=config.rule
                )
                output = run.collect()
                seconds = time.perf_counter() - started
                cpu_seconds = time.process_time() - cpu_started
                outputs[config.label] = output
                if attempt + 1 < passes:
                    continue
                stats = run.stats
                total = totals[config.label]
                total.tokens += len(output)
                total.decode_s += seconds - stats.prefill_time_s
                total.cpu_s += cpu_seconds
                total.steps += stats.steps
                total.drafted += stats.drafted
                total.accepted += stats.accepted
                total.stopped += stats.stopped_steps
            reference = outputs["plain"]
            if attempt + 1 == passes:
                for label, output in outputs.items():
                    totals[label].mismatches += output != reference
    return totals


def summarize(
    totals: dict[str, Totals], costs: StepCosts, draft_costs: dict[str, float]
) -> list[dict[str, Any]]:
    """Per configuration (label); ``draft_costs`` the drafter forward's cost of the
    configurations not drafted by the task's own drafter."""
    plain = totals["plain"]
    t_ar = plain.decode_s / plain.tokens
    cpu_ar = plain.cpu_s / plain.tokens
    rows = []
    for label, total in totals.items():
        per_token = total.decode_s / total.tokens if total.tokens else 0.0
        rows.append(
            {
                "config": label,
                "speedup": t_ar / per_token if per_token else 0.0,
                "cpu_speedup": cpu_ar * total.tokens / total.cpu_s if total.cpu_s else 0.0,
                "priced_speedup": (
                    costs.priced_speedup(total, draft_costs.get(label)) if total.drafted else 1.0
                ),
                "tokens_per_step": (total.accepted + total.steps) / total.steps
                if total.steps
                else 0.0,
                "drafted_per_step": total.drafted / total.steps if total.steps else 0.0,
                "stopped_fraction": total.stopped / total.steps if total.steps else 0.0,
                "acceptance_of_drafted": total.accepted / total.drafted if total.drafted else 0.0,
                "mismatches": total.mismatches,
            }
        )
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = module_parser(__doc__)
    parser.add_argument("--world", type=Path, default=None)
    parser.add_argument("--tasks", default="")
    parser.add_argument("--prompts", type=int, default=6)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=1, help="passes over the prompts")
    parser.add_argument(
        "--self-exits", default="", help="exit layers of the self drafter to add (e.g. 1,2)"
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    opened = open_world(args.world)
    root, world, manifest, engine = opened.root, opened.world, opened.manifest, opened.engine
    target, tasks = opened.target, opened.tasks(args.tasks)
    setups = load_task_setups(world, target, tasks, args.prompts)
    report: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "world": {
            "root": str(root),
            "built_at": manifest.get("built_at"),
            "config_hash": manifest.get("config_hash"),
        },
        "load_average_before": os.getloadavg(),
        "settings": {
            "prompts": args.prompts,
            "rounds": args.rounds,
            "max_new_tokens": args.max_new_tokens,
        },
        "tasks": {},
    }
    exits = [int(e) for e in args.self_exits.split(",") if e]
    configs = DEFAULT_CONFIGURATIONS + self_configurations(exits)
    began = time.perf_counter()
    for setup in setups:
        totals = measure_task(engine, setup, configs, args.max_new_tokens, args.rounds)
        costs = measure_costs(engine, setup.drafters[setup.task], setup.prompts[0])
        draft_costs = {
            config.label: measure_costs(
                engine, _drafter(engine, setup, config), setup.prompts[0]
            ).t_draft
            for config in configs
            if config.exit_layer is not None
        }
        rows = summarize(totals, costs, draft_costs)
        t0, t1 = costs.verify_line()
        report["tasks"][setup.task] = {
            "costs": {"t_draft": costs.t_draft, "t0": t0, "t1": t1, "t_verify": costs.t_verify},
            "rows": rows,
        }
        print(f"== {setup.task}")
        print(
            f"   costs (CPU ms): t_draft {costs.t_draft * 1e3:.3f}, "
            f"verify {t0 * 1e3:.2f} + d {t1 * 1e3:.3f}"
        )
        for row in rows:
            print(
                f"  {row['config']:24s} speed-up {row['speedup']:.2f}x cpu "
                f"{row['cpu_speedup']:.2f}x priced "
                f"{row['priced_speedup']:.2f}x  tokens/step "
                f"{row['tokens_per_step']:.2f}  drafted/step {row['drafted_per_step']:.2f}  "
                f"stopped {row['stopped_fraction']:.2f}  acc {row['acceptance_of_drafted']:.2f}"
                f"  mismatches {row['mismatches']}",
                flush=True,
            )
    report["wall_s"] = time.perf_counter() - began
    report["load_average_after"] = os.getloadavg()
    print(f"load average before {report['load_average_before']}, after {os.getloadavg()}")
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
