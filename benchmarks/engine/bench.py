"""`specroute bench engine`: our engine against plain decoding and transformers' assisted
generation on the built-in world's held-out prompts, per task, greedy, interleaved.

For each prompt every configuration runs once, in an order rotated per prompt, so load
drift on a shared machine spreads over all of them. Tokens/s are end-to-end (prefill
included) for both systems. The analytical speed-up (docs/policy.md) uses the costs measured
in the same run:

    S(a, k) = [(1 - a^(k+1)) / (1 - a)] * t_ar / (k * t_draft + t_verify(k))

with t_ar the plain time per token, t_draft the draft time per requested draft position
and t_verify(k) the verify time per step; efficiency = measured / analytical speed-up.
The per-token acceptance a is the one whose i.i.d. expectation of tokens per step,
(1 - a^(k+1)) / (1 - a), equals the observed mean accepted length, so S(a, k) is the
speed-up the observed acceptance allows at the measured draft and verify costs, and the
efficiency shows what the engine loses outside drafting and verifying. (The
maximum-likelihood a of the same model is reported too, as ``acceptance_mle``; pooled
over prompts of unequal acceptance it overstates the tokens per step.)
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

from benchmarks.world.layout import read_examples
from drafters.base import Drafter
from drafters.engine import SpeculativeEngine
from drafters.loader import LoadedModel, load_model
from drafters.registry import create_drafter
from drafters.stats import mean_accepted_length

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
class ConfigurationTotals:
    """Totals of one configuration over a task's prompts."""

    runs: int = 0
    tokens: int = 0
    seconds: float = 0.0
    prefill_s: float = 0.0  # the target's prefill (our engine only)
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
    def decode_seconds_per_token(self) -> float:
        """Time per output token after the target's prefill (the drafter's prefill, a cost
        of speculation, stays in)."""
        return (self.seconds - self.prefill_s) / self.tokens if self.tokens else 0.0

    @property
    def acceptance_mle(self) -> float:
        """Maximum-likelihood per-token acceptance (``GenerationStats.per_token_acceptance``)."""
        return self.accepted / self.tried if self.tried else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens per step, the bonus/correction token included, over all runs."""
        return mean_accepted_length(self.accepted, self.steps)


def analytical_speedup(a: float, k: int, t_ar: float, t_draft: float, t_verify: float) -> float:
    """S(a, k) with the measured costs: the policy's formula (router.policy.speedup), 0 when
    no step cost was measured."""
    from router.policy.speedup import speedup

    if k * t_draft + t_verify <= 0:
        return 0.0
    return speedup(a, k, t_ar=t_ar, t_draft=t_draft, t_verify=t_verify)


def acceptance_from_mean_length(mean_tokens_per_step: float, k: int) -> float:
    """The per-token acceptance a whose i.i.d. expectation 1 + a + ... + a^k equals the
    observed tokens per step (bisection; the expectation is increasing in a)."""
    if k <= 0 or mean_tokens_per_step <= 1.0:
        return 0.0
    if mean_tokens_per_step >= k + 1:
        return 1.0
    low, high = 0.0, 1.0
    for _ in range(60):
        middle = (low + high) / 2
        expected = sum(middle**i for i in range(k + 1))
        low, high = (middle, high) if expected < mean_tokens_per_step else (low, middle)
    return (low + high) / 2


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
        # transformers reads the draft length from the assistant model's generation config
        # (generate's kwargs do not reach it), and its confidence threshold (0.4 by
        # default) ends drafts early; a constant schedule and no threshold give a fixed k,
        # the work our engine does.
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


def configurations(
    setup: TaskSetup, k_max: int, transformers_everywhere: bool
) -> list[Configuration]:
    """Plain decoding (both systems; transformers' output is the reference) and every
    (drafter, k) for k = 1..k_max, with transformers at each too if asked."""
    configs = [Configuration("ours", PLAIN, 0), Configuration("transformers", PLAIN, 0)]
    with_transformers = transformers_everywhere
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
) -> dict[Configuration, ConfigurationTotals]:
    """Run every configuration on every prompt, interleaved, after one warm-up pass."""
    target = engine.target
    stop_ids = sorted(engine.stop_token_ids)
    totals = {config: ConfigurationTotals() for config in configs}
    for round_index, prompt in enumerate(setup.prompts):
        order = configs[round_index % len(configs) :] + configs[: round_index % len(configs)]
        if round_index == 0:  # warm-up: first calls pay one-off allocation costs
            for config in order:
                _measure_one(engine, target, setup, config, prompt, 8, stop_ids)
        for config in order:
            output, seconds, stats = _measure_one(
                engine, target, setup, config, prompt, max_new_tokens, stop_ids
            )
            config_totals = totals[config]
            config_totals.runs += 1
            config_totals.tokens += len(output)
            config_totals.seconds += seconds
            config_totals.outputs.append(output)
            if stats is not None:
                config_totals.prefill_s += stats.prefill_time_s
                config_totals.draft_s += stats.draft_time_s
                config_totals.verify_s += stats.verify_time_s
                config_totals.steps += stats.steps
                config_totals.slots += sum(stats.requested_per_step)
                accepted, tried = stats.acceptance_trials()
                config_totals.accepted += accepted
                config_totals.tried += tried
            advance()
    return totals


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


def count_mismatches(
    target: LoadedModel,
    prompts: Sequence[list[int]],
    totals: dict[Configuration, ConfigurationTotals],
    reference: Configuration,
    max_new_tokens: int,
) -> list[float]:
    """Compare every output with the reference's for the same prompt; return, for each
    difference, the target's top-two logit gap at the first differing position (a gap
    under 1e-4 is a floating-point near-tie, anything larger a real defect)."""
    gaps: list[float] = []
    expected = totals[reference].outputs
    for config_totals in totals.values():
        for prompt, wanted, full in zip(prompts, expected, config_totals.outputs, strict=False):
            # transformers' prompt lookup can emit one token past max_new_tokens.
            got = full[:max_new_tokens]
            if got == wanted:
                continue
            config_totals.mismatches += 1
            first = next(
                (i for i, (a, b) in enumerate(zip(got, wanted, strict=False)) if a != b),
                min(len(got), len(wanted)),
            )
            ids = torch.tensor([prompt + wanted[:first]], device=target.device)
            with torch.inference_mode():
                top = target.model(input_ids=ids).logits[0, -1].float().topk(2).values
            # A length-only difference (one output a prefix of the other) is marked -1.
            prefix_only = first == min(len(got), len(wanted))
            gaps.append(-1.0 if prefix_only else float(top[0] - top[1]))
    return gaps


def summarize_task(
    totals: dict[Configuration, ConfigurationTotals],
    head_to_head: dict[Configuration, ConfigurationTotals] | None,
) -> dict[str, Any]:
    """Best (drafter, k) by measured speed-up, with its analytical speed-up and the
    comparison with transformers at the same (drafter, k) (from ``head_to_head``, the
    interleaved rerun of both at the best setting, when given)."""
    plain = totals[Configuration("ours", PLAIN, 0)]
    ar_tps = plain.tokens_per_s
    # Speed-ups are per output token in the decode phase: the target's prefill is the
    # same with and without speculation and is left out of both sides.
    t_ar = plain.decode_seconds_per_token
    rows: list[dict[str, Any]] = []
    for config, config_totals in totals.items():
        if config.system != "ours" or config.drafter == PLAIN:
            continue
        t_draft = config_totals.draft_s / config_totals.slots if config_totals.slots else 0.0
        t_verify = config_totals.verify_s / config_totals.steps if config_totals.steps else 0.0
        acceptance = acceptance_from_mean_length(config_totals.mean_accepted_length, config.k)
        analytical = analytical_speedup(acceptance, config.k, t_ar, t_draft, t_verify)
        spec_time = config_totals.decode_seconds_per_token
        speedup = t_ar / spec_time if spec_time else 0.0
        theirs = totals.get(Configuration("transformers", config.drafter, config.k))
        rows.append(
            {
                "drafter": config.drafter,
                "k": config.k,
                "tokens_per_s": config_totals.tokens_per_s,
                "speedup": speedup,
                "speedup_end_to_end": config_totals.tokens_per_s / ar_tps if ar_tps else 0.0,
                "acceptance": acceptance,
                "acceptance_mle": config_totals.acceptance_mle,
                "mean_accepted_length": config_totals.mean_accepted_length,
                "analytical_speedup": analytical,
                "efficiency": speedup / analytical if analytical else 0.0,
                "t_draft_s": t_draft,
                "t_verify_s": t_verify,
                "transformers_tokens_per_s": theirs.tokens_per_s if theirs else None,
                "vs_transformers": (
                    config_totals.tokens_per_s / theirs.tokens_per_s
                    if theirs and theirs.tokens_per_s
                    else None
                ),
                "mismatches": config_totals.mismatches,
            }
        )
    best = max(rows, key=lambda row: row["speedup"])
    if head_to_head is not None:
        ours = head_to_head[Configuration("ours", best["drafter"], best["k"])]
        theirs_best = head_to_head[Configuration("transformers", best["drafter"], best["k"])]
        best["transformers_tokens_per_s"] = theirs_best.tokens_per_s
        best["vs_transformers"] = ours.tokens_per_s / theirs_best.tokens_per_s
    transformers_plain = totals.get(Configuration("transformers", PLAIN, 0))
    ratios = [row["vs_transformers"] for row in rows if row["vs_transformers"] is not None]
    return {
        "ar_tokens_per_s": ar_tps,
        "ar_decode_tokens_per_s": 1.0 / t_ar if t_ar else 0.0,
        "transformers_ar_tokens_per_s": transformers_plain.tokens_per_s
        if transformers_plain
        else None,
        "t_ar_s": t_ar,
        "best": {
            key: best[key]
            for key in (
                "drafter",
                "k",
                "speedup",
                "speedup_end_to_end",
                "acceptance",
                "analytical_speedup",
                "efficiency",
            )
        },
        "vs_transformers": best["vs_transformers"],
        "min_vs_transformers": min(ratios) if ratios else None,
        "prompts": plain.runs,
        "generated_tokens": plain.tokens,
        "transformers_tokens_per_s_at_best": best["transformers_tokens_per_s"],
        "mismatches": sum(t.mismatches for t in totals.values()),
        "configurations": rows,
    }


@dataclass(frozen=True)
class OpenedWorld:
    """A built world opened for an engine benchmark script: where it is, its manifest, and
    the engine over its target."""

    root: Path
    world: Any  # router.bundle.ModelBundle
    manifest: dict[str, Any]
    engine: SpeculativeEngine

    @property
    def target(self) -> LoadedModel:
        return self.engine.target

    def tasks(self, spec: str) -> list[str]:
        """The tasks a comma-separated ``spec`` names; all the world's when it is empty."""
        return [t for t in spec.split(",") if t] or list(self.world.tasks)


def open_world(world_dir: Path | None) -> OpenedWorld:
    """Load ``world_dir`` (default: the built-in default world) and its target."""
    from router.bundle import ModelBundle, default_bundle_dir, read_manifest

    root = world_dir or default_bundle_dir()
    world = ModelBundle.load(root)
    target = load_model(world.target_dir)
    return OpenedWorld(root, world, read_manifest(Path(root)) or {}, SpeculativeEngine(target))


def machine_description(device: torch.device) -> str:
    """CPU model (or GPU name), core count and torch threads, for the table's title."""
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
    test = read_examples(world.corpus_dir, "test")
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
    max_new_tokens: int = 64,
    transformers_everywhere: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Measure and summarise; returns the JSON report.

    Per task, pass 1 runs plain decoding (ours and transformers') and our engine at every
    (drafter, k), interleaved per prompt; pass 2 reruns our best (drafter, k) and
    transformers' assisted generation at the same (drafter, k), interleaved. With
    ``transformers_everywhere`` pass 1 also runs transformers at every (drafter, k).
    """
    from tqdm import tqdm
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # assisted generation warns on every call
    target = load_model(world.target_dir)
    engine = SpeculativeEngine(target)
    chosen = list(tasks or world.tasks)
    setups = load_task_setups(world, target, chosen, prompts_per_task)
    plans = [(s, configurations(s, k_max, transformers_everywhere)) for s in setups]
    head_to_head_runs = 0 if transformers_everywhere else 2
    total = sum((len(c) + head_to_head_runs) * (len(s.prompts) + 1) for s, c in plans)
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
            "transformers_everywhere": transformers_everywhere,
        },
        "tasks": {},
    }
    all_gaps: list[float] = []
    with tqdm(total=total, desc="bench engine", unit="run", disable=not progress) as bar:
        for setup, configs in plans:
            bar.set_postfix_str(setup.task)
            totals = measure_task(engine, setup, configs, max_new_tokens, lambda: bar.update(1))
            bar.update(len(configs))  # the warm-up pass
            gaps = count_mismatches(
                target,
                setup.prompts,
                totals,
                Configuration("transformers", PLAIN, 0),
                max_new_tokens,
            )
            head_to_head = None
            if not transformers_everywhere:
                best = max(
                    (c for c in configs if c.system == "ours" and c.drafter != PLAIN),
                    key=lambda c: -totals[c].decode_seconds_per_token,
                )
                pair = [best, Configuration("transformers", best.drafter, best.k)]
                head_to_head = measure_task(
                    engine, setup, pair, max_new_tokens, lambda: bar.update(1)
                )
                bar.update(len(pair))
                gaps += count_mismatches(
                    target, setup.prompts, head_to_head, pair[0], max_new_tokens
                )
            summary = summarize_task(totals, head_to_head)
            summary["near_tie_gaps"] = gaps
            report["tasks"][setup.task] = summary
            all_gaps += gaps
    compared = sum(
        len(s.prompts) * len([c for c in configs if c.system == "ours"]) for s, configs in plans
    )
    report["lossless"] = {
        "reference": "transformers generate(do_sample=False) on the target",
        "outputs_compared": compared,
        "prompts": sum(len(s.prompts) for s in setups),
        "mismatches": len(all_gaps),
        "max_top2_logit_gap_at_mismatch": max(all_gaps) if all_gaps else None,
    }
    report["wall_time_s"] = time.perf_counter() - began
    return report
