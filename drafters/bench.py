"""`specroute bench engine`: our engine against plain decoding and transformers' assisted
generation on the built-in world's held-out prompts, per task, greedy, interleaved.

For each prompt every configuration runs once, in an order rotated per prompt, so load
drift on a shared machine spreads over all of them. Tokens/s are end-to-end (prefill
included) for both systems. The analytical speed-up of DESIGN.md uses the costs measured
in the same run:

    S(a, k) = [(1 - a^(k+1)) / (1 - a)] * t_ar / (k * t_draft + t_verify(k))

with t_ar the plain time per token, t_draft the draft time per requested draft position
and t_verify(k) the verify time per step; efficiency = measured / analytical speed-up.
"""

from __future__ import annotations

import logging
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from drafters.base import Drafter
from drafters.engine import SpeculativeEngine
from drafters.loader import LoadedModel, load_model
from drafters.registry import create_drafter

logger = logging.getLogger(__name__)

PLAIN = "none"
NGRAM = "ngram"


@dataclass(frozen=True)
class Configuration:
    """One measured setting: which system, which drafter, which draft length."""

    system: str  # "ours" or "transformers"
    drafter: str  # "none", "ngram", "generic" or a task drafter's name
    k: int


@dataclass
class Tally:
    """Totals of one configuration over a task's prompts."""

    runs: int = 0
    tokens: int = 0
    seconds: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0
    steps: int = 0
    slots: int = 0  # requested draft positions
    accepted: int = 0
    tried: int = 0
    mismatches: int = 0  # outputs differing from the target's plain greedy output
    outputs: list[list[int]] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.tried if self.tried else 0.0


def analytical_speedup(a: float, k: int, t_ar: float, t_draft: float, t_verify: float) -> float:
    """S(a, k) = [(1 - a^(k+1)) / (1 - a)] * t_ar / (k * t_draft + t_verify(k))."""
    expected_tokens = float(k + 1) if a >= 1.0 else (1.0 - a ** (k + 1)) / (1.0 - a)
    step_cost = k * t_draft + t_verify
    return expected_tokens * t_ar / step_cost if step_cost > 0 else 0.0


def chat_prompt_ids(tokenizer: Any, messages: Sequence[dict[str, str]]) -> list[int]:
    """The chat template's ids with the assistant turn opened."""
    ids: list[int] = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True)
    return [int(t) for t in ids]


def run_ours(
    engine: SpeculativeEngine, drafter: Drafter, k: int, prompt: list[int], max_new_tokens: int
) -> tuple[list[int], float, Any]:
    """One greedy generation with our engine: (output, seconds, stats)."""
    started = time.perf_counter()
    run = engine.generate(prompt, drafter, k, max_new_tokens=max_new_tokens)
    output = run.collect()
    return output, time.perf_counter() - started, run.stats


def run_transformers(
    target: LoadedModel,
    assistant: Any | None,
    drafter_kind: str,
    k: int,
    prompt: list[int],
    max_new_tokens: int,
    stop_ids: Sequence[int],
) -> tuple[list[int], float]:
    """One greedy ``generate`` call: plain, assisted (fixed k) or prompt lookup (k)."""
    options: dict[str, Any] = {}
    if drafter_kind == NGRAM:
        options = {"prompt_lookup_num_tokens": k, "max_matching_ngram_size": 3}
    elif assistant is not None:
        # ECOSYSTEM.md: the draft length is read from the assistant's generation config;
        # a constant schedule and no confidence threshold give a fixed k.
        config = assistant.generation_config
        config.num_assistant_tokens = k
        config.num_assistant_tokens_schedule = "constant"
        config.assistant_confidence_threshold = 0.0
        options = {"assistant_model": assistant}
    ids = torch.tensor([prompt], dtype=torch.long, device=target.device)
    started = time.perf_counter()
    with torch.inference_mode():
        out = target.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=list(stop_ids),
            pad_token_id=target.tokenizer.pad_token_id or next(iter(stop_ids)),
            **options,
        )
    seconds = time.perf_counter() - started
    return [int(t) for t in out[0, len(prompt) :]], seconds


@dataclass(frozen=True)
class TaskSetup:
    """A task's prompts and the drafters benchmarked on it."""

    task: str
    prompts: list[list[int]]
    drafters: dict[str, Drafter]  # by name: "generic", the task's own, "ngram", "none"


def configurations(setup: TaskSetup, k_max: int, with_transformers: bool) -> list[Configuration]:
    """Plain decoding (both systems) and every (drafter, k) for k = 1..k_max."""
    configs = [Configuration("ours", PLAIN, 0)]
    if with_transformers:
        configs.append(Configuration("transformers", PLAIN, 0))
    for name in setup.drafters:
        if name == PLAIN:
            continue
        for k in range(1, k_max + 1):
            configs.append(Configuration("ours", name, k))
            if with_transformers:
                configs.append(Configuration("transformers", name, k))
    return configs


def measure_task(
    engine: SpeculativeEngine,
    setup: TaskSetup,
    configs: list[Configuration],
    max_new_tokens: int,
    advance: Callable[[], None],
) -> dict[Configuration, Tally]:
    """Run every configuration on every prompt, interleaved, after one warm-up pass."""
    target = engine.target
    stop_ids = sorted(engine.stop_token_ids)
    tallies = {config: Tally() for config in configs}
    for round_index, prompt in enumerate(setup.prompts):
        order = configs[round_index % len(configs) :] + configs[: round_index % len(configs)]
        if round_index == 0:  # warm-up: first calls pay one-off allocation costs
            for config in order:
                _measure_one(engine, target, setup, config, prompt, 8, stop_ids)
        for config in order:
            output, seconds, stats = _measure_one(
                engine, target, setup, config, prompt, max_new_tokens, stop_ids
            )
            tally = tallies[config]
            tally.runs += 1
            tally.tokens += len(output)
            tally.seconds += seconds
            tally.outputs.append(output)
            if stats is not None:
                tally.draft_s += stats.draft_time_s
                tally.verify_s += stats.verify_time_s
                tally.steps += stats.steps
                tally.slots += sum(stats.requested_per_step)
                accepted, tried = stats.acceptance_trials()
                tally.accepted += accepted
                tally.tried += tried
            advance()
        reference = tallies[configs[0]].outputs[-1]
        for tally in tallies.values():
            tally.mismatches += int(tally.outputs[-1] != reference)
    return tallies


def _measure_one(
    engine: SpeculativeEngine,
    target: LoadedModel,
    setup: TaskSetup,
    config: Configuration,
    prompt: list[int],
    max_new_tokens: int,
    stop_ids: Sequence[int],
) -> tuple[list[int], float, Any]:
    drafter = setup.drafters[config.drafter]
    if config.system == "ours":
        return run_ours(engine, drafter, config.k, prompt, max_new_tokens)
    assistant = getattr(drafter, "model", None)
    output, seconds = run_transformers(
        target, assistant, drafter.kind, config.k, prompt, max_new_tokens, stop_ids
    )
    return output, seconds, None


def summarize_task(tallies: dict[Configuration, Tally]) -> dict[str, Any]:
    """Best (drafter, k) by measured speed-up, with its analytical speed-up and the
    comparison with transformers at the same (drafter, k)."""
    plain = tallies[Configuration("ours", PLAIN, 0)]
    ar_tps = plain.tokens_per_s
    t_ar = plain.seconds / plain.tokens if plain.tokens else 0.0
    rows: list[dict[str, Any]] = []
    for config, tally in tallies.items():
        if config.system != "ours" or config.drafter == PLAIN:
            continue
        t_draft = tally.draft_s / tally.slots if tally.slots else 0.0
        t_verify = tally.verify_s / tally.steps if tally.steps else 0.0
        analytical = analytical_speedup(tally.acceptance, config.k, t_ar, t_draft, t_verify)
        speedup = tally.tokens_per_s / ar_tps if ar_tps else 0.0
        theirs = tallies.get(Configuration("transformers", config.drafter, config.k))
        rows.append(
            {
                "drafter": config.drafter,
                "k": config.k,
                "tokens_per_s": tally.tokens_per_s,
                "speedup": speedup,
                "acceptance": tally.acceptance,
                "mean_accepted_length": 1.0 + tally.accepted / tally.steps if tally.steps else 0.0,
                "analytical_speedup": analytical,
                "efficiency": speedup / analytical if analytical else 0.0,
                "t_draft_s": t_draft,
                "t_verify_s": t_verify,
                "transformers_tokens_per_s": theirs.tokens_per_s if theirs else None,
                "vs_transformers": (
                    tally.tokens_per_s / theirs.tokens_per_s
                    if theirs and theirs.tokens_per_s
                    else None
                ),
                "mismatches": tally.mismatches,
            }
        )
    best = max(rows, key=lambda row: row["speedup"])
    transformers_plain = tallies.get(Configuration("transformers", PLAIN, 0))
    ratios = [row["vs_transformers"] for row in rows if row["vs_transformers"] is not None]
    return {
        "ar_tokens_per_s": ar_tps,
        "transformers_ar_tokens_per_s": transformers_plain.tokens_per_s
        if transformers_plain
        else None,
        "t_ar_s": t_ar,
        "best": {
            key: best[key]
            for key in ("drafter", "k", "speedup", "acceptance", "analytical_speedup", "efficiency")
        },
        "vs_transformers": best["vs_transformers"],
        "min_vs_transformers": min(ratios) if ratios else None,
        "prompts": plain.runs,
        "generated_tokens": plain.tokens,
        "mismatches": sum(t.mismatches for t in tallies.values()),
        "configurations": rows,
    }


def machine_description(device: torch.device) -> str:
    """CPU model (or GPU name), core count and torch threads, for the README table."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA, bf16)"
    model = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    return f"{model}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, fp32"


def load_task_setups(
    world: Any, target: LoadedModel, tasks: Sequence[str], prompts_per_task: int
) -> list[TaskSetup]:
    """Each task's first held-out prompts and its drafters: generic, its own, n-gram."""
    test = world.examples("test")
    shared = {
        PLAIN: create_drafter(PLAIN, name=PLAIN, target=target),
        NGRAM: create_drafter(NGRAM, name=NGRAM, target=target),
        "generic": create_drafter(
            "model", name="generic", target=target, path=world.drafter_dirs["generic"]
        ),
    }
    setups = []
    for task in tasks:
        examples = [e for e in test if e.task == task][:prompts_per_task]
        if not examples:
            raise ValueError(f"the world has no test examples for task {task!r}")
        own = create_drafter("model", name=task, target=target, path=world.drafter_dirs[task])
        prompts = [chat_prompt_ids(target.tokenizer, e.messages) for e in examples]
        setups.append(TaskSetup(task, prompts, {**shared, task: own}))
    return setups


def bench_engine(
    world: Any,
    *,
    tasks: Sequence[str] | None = None,
    k_max: int = 8,
    prompts_per_task: int = 8,
    max_new_tokens: int = 96,
    with_transformers: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Measure and summarise; returns the JSON report."""
    from tqdm import tqdm

    target = load_model(world.target_dir)
    engine = SpeculativeEngine(target)
    chosen = list(tasks or world.tasks)
    setups = load_task_setups(world, target, chosen, prompts_per_task)
    plans = [(s, configurations(s, k_max, with_transformers)) for s in setups]
    total = sum(len(c) * (len(s.prompts) + 1) for s, c in plans)
    began = time.perf_counter()
    report: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_description(target.device),
        "settings": {
            "world": str(world.root),
            "k_max": k_max,
            "prompts_per_task": prompts_per_task,
            "max_new_tokens": max_new_tokens,
            "greedy": True,
        },
        "tasks": {},
    }
    with tqdm(total=total, desc="bench engine", unit="run", disable=not progress) as bar:
        for setup, configs in plans:
            bar.set_postfix_str(setup.task)
            tallies = measure_task(engine, setup, configs, max_new_tokens, lambda: bar.update(1))
            report["tasks"][setup.task] = summarize_task(tallies)
            bar.update(len(configs))  # the warm-up pass
    report["wall_time_s"] = time.perf_counter() - began
    return report
