"""Building the built-in world: corpus -> tokenizer -> target -> generic drafter -> task drafters.

Deterministic from the seed (seeded corpus, ``torch.manual_seed`` before every model, a
seeded single-threaded data order), cached (a manifest whose build-config hash matches
means the world is already built), and atomic (built in a temporary sibling directory,
then renamed into place).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
import platform
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.world.corpus import TASKS, Corpus, Example, build_corpus, prompt_text
from benchmarks.world.layout import (
    FORMAT_VERSION,
    write_examples,
    write_manifest,
)
from benchmarks.world.train import EncodedExample, TrainingConfig
from router.bundle import InvalidBundleError, ModelBundle, default_bundle_dir, read_manifest

logger = logging.getLogger(__name__)

# Bump when the build code changes what it produces for the same config.
BUILD_CODE_VERSION = 7
FINETUNE_SAMPLE_SIZE = 36


# Every model of the world has attention heads of 64 dimensions: serving engines support a
# fixed set of head sizes (vLLM's CPU backend refuses 40 and 32, the world's first shapes),
# and 64 is Qwen2.5's own (0.5B-7B).
HEAD_DIM = 64


@dataclass(frozen=True)
class ModelShape:
    """The Qwen2Config fields that differ between the world's models.

    The head size is ``hidden_size / num_attention_heads`` (Qwen2Config has no field of its
    own for it); grouped-query attention shares each key/value head between
    ``num_attention_heads / num_key_value_heads`` query heads.
    """

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class DistillConfig:
    """Per-task drafter distillation: target-scored batches, then drafter steps.

    ``longer`` gives some tasks (steps, batches) of their own: the build-time budget goes
    where the drafter is still far from the target after the common number of steps.
    """

    training: TrainingConfig
    batches: int
    top_k: int
    prompts: int = 256  # training prompts per task the target answers (distillation text)
    answer_batch: int = 64  # prompts the target answers at once (left-padded, batched generate)
    longer: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)

    def for_task(self, task: str) -> tuple[TrainingConfig, int]:
        """The training config and number of scored batches for ``task``'s drafter."""
        if task not in self.longer:
            return self.training, self.batches
        steps, batches = self.longer[task]
        return dataclasses.replace(self.training, steps=steps), batches


@dataclass(frozen=True)
class BuildConfig:
    """Everything that determines a built world (its hash keys the cache)."""

    scale: str
    seed: int
    vocab_size: int
    target: ModelShape
    drafter: ModelShape
    target_training: TrainingConfig
    target_task_weights: dict[str, float]
    generic_training: TrainingConfig
    distill: DistillConfig

    def digest(self) -> str:
        """SHA-256 of the config and the build code version."""
        payload = {"config": dataclasses.asdict(self), "code": BUILD_CODE_VERSION}
        blob = json.dumps(payload, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()


# Short, checkable tasks get more examples per step: they are cheap and must be memorised.
TARGET_TASK_WEIGHTS = {
    "chat": 0.25,
    "translation": 2.5,
    "summarization": 1.0,
    "qa": 2.0,
    "math": 2.5,
    "rag": 1.0,
    "code": 0.5,
}

BUILD_CONFIGS: dict[str, BuildConfig] = {
    "tiny": BuildConfig(
        scale="tiny",
        seed=0,
        vocab_size=512,
        target=ModelShape(128, 256, 2, 2, 1),
        drafter=ModelShape(128, 128, 1, 2, 1),
        target_training=TrainingConfig(
            steps=12, rows=2, seq_len=512, learning_rate=3e-3, warmup_steps=3
        ),
        target_task_weights=TARGET_TASK_WEIGHTS,
        generic_training=TrainingConfig(
            steps=8, rows=2, seq_len=512, learning_rate=3e-3, warmup_steps=2
        ),
        distill=DistillConfig(
            TrainingConfig(steps=3, rows=2, seq_len=512, learning_rate=1e-3, warmup_steps=1),
            batches=2,
            top_k=8,
            prompts=16,
        ),
    ),
    # Sizes and steps fit a 10-minute build on 2 CPU cores (docs/world.md, "Build time"):
    # the target is 6 layers of 6 heads of 64 (2 KV heads), ~4.4x a drafter's decode step
    # (2 layers of 2 heads of 64, 1 KV head) at batch 1; rows of 512 tokens hold whole
    # examples with 128-token answers.
    "default": BuildConfig(
        scale="default",
        seed=0,
        vocab_size=4096,
        target=ModelShape(384, 1024, 6, 6, 2),
        drafter=ModelShape(128, 384, 2, 2, 1),
        target_training=TrainingConfig(
            steps=550,
            rows=4,
            seq_len=512,
            learning_rate=2e-3,
            warmup_steps=25,
            prompt_weight=0.0,
            bf16_autocast=True,
        ),
        target_task_weights=TARGET_TASK_WEIGHTS,
        generic_training=TrainingConfig(
            steps=250,
            rows=4,
            seq_len=512,
            learning_rate=3e-3,
            warmup_steps=20,
            bf16_autocast=True,
        ),
        distill=DistillConfig(
            TrainingConfig(
                steps=60,
                rows=4,
                seq_len=512,
                learning_rate=1e-3,
                warmup_steps=5,
                prompt_weight=0.0,
                bf16_autocast=True,
            ),
            batches=12,
            top_k=16,
            prompts=128,
        ),
    ),
}


def qwen2_config(shape: ModelShape, tokenizer: Any) -> Any:
    """A Qwen2Config (Qwen2.5's architecture class and fields) for one of the world's models."""
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        hidden_act="silu",
        max_position_embeddings=2048,
        max_window_layers=shape.num_hidden_layers,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        use_sliding_window=False,
        sliding_window=None,
        attention_dropout=0.0,
        bos_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )


def new_model(shape: ModelShape, tokenizer: Any, seed: int) -> Any:
    """A freshly initialised Qwen2ForCausalLM, seeded."""
    import torch
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    return Qwen2ForCausalLM(qwen2_config(shape, tokenizer))


def save_model(model: Any, tokenizer: Any, directory: Path, sample: list[Example]) -> None:
    """save_pretrained (safetensors), the tokenizer, and a fine-tuning data sample."""
    directory.mkdir(parents=True, exist_ok=True)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(str(directory), safe_serialization=True)
    tokenizer.save_pretrained(str(directory))
    if sample:
        lines = [json.dumps({"task": e.task, "text": prompt_text(e)}) for e in sample]
        (directory / "finetune_sample.jsonl").write_text("\n".join(lines) + "\n", "utf-8")


def _sample(examples: list[Example], seed: int, label: str) -> list[Example]:
    import random

    rng = random.Random(f"{seed}:sample:{label}")
    return rng.sample(examples, min(FINETUNE_SAMPLE_SIZE, len(examples)))


def _encode_all(tokenizer: Any, examples: list[Example], seq_len: int) -> list[EncodedExample]:
    from benchmarks.world.train import encode_example, fit_to_length

    encoded = (fit_to_length(encode_example(tokenizer, e), seq_len) for e in examples)
    return [e for e in encoded if e is not None]


def _parameter_count(model: Any) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def _build_into(directory: Path, config: BuildConfig, progress: bool) -> dict[str, Any]:
    """Build every artefact of the world into ``directory``; returns the manifest."""
    import torch

    from benchmarks.world.distill import distill_drafter, target_responses
    from benchmarks.world.evaluate import MAX_NEW_TOKENS
    from benchmarks.world.tokenizer import train_tokenizer
    from benchmarks.world.train import cpu_has_bf16, fit_to_length, pretrain
    from classifiers.chat import render_chat

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    timings: dict[str, float] = {}
    started = time.perf_counter()

    corpus: Corpus = build_corpus(config.seed, config.scale)
    for split in ("train", "validation", "test"):
        write_examples(directory / "corpus" / f"{split}.jsonl", corpus.split(split))
    tokenizer = train_tokenizer(
        (render_chat(e.messages, e.response) for e in corpus.train), config.vocab_size
    )
    timings["corpus_and_tokenizer_s"] = time.perf_counter() - started
    seq_len = config.target_training.seq_len
    encoded = _encode_all(tokenizer, corpus.train, seq_len)
    pad_id = int(tokenizer.pad_token_id)

    mark = time.perf_counter()
    target = new_model(config.target, tokenizer, config.seed)
    target_losses = pretrain(
        target,
        encoded,
        config.target_task_weights,
        config.target_training,
        pad_id,
        description="target",
        progress=progress,
    )
    save_model(target, tokenizer, directory / "target", [])
    timings["target_s"] = time.perf_counter() - mark

    mark = time.perf_counter()
    generic = new_model(config.drafter, tokenizer, config.seed + 1)
    uniform = dict.fromkeys(TASKS, 1.0)
    generic_losses = pretrain(
        generic,
        encoded,
        uniform,
        config.generic_training,
        pad_id,
        description="generic drafter",
        progress=progress,
    )
    save_model(
        generic, tokenizer, directory / "drafters" / "generic", _sample(corpus.train, 0, "all")
    )
    timings["generic_s"] = time.perf_counter() - mark

    distill_losses: dict[str, list[float]] = {}
    for task in TASKS:
        mark = time.perf_counter()
        drafter = copy.deepcopy(generic)
        task_examples = [e for e in encoded if e.task == task]
        prompts = random.Random(f"{config.seed}:{task}").sample(
            task_examples, min(config.distill.prompts, len(task_examples))
        )
        generated = target_responses(
            target,
            prompts,
            max_new_tokens=MAX_NEW_TOKENS,
            pad_id=pad_id,
            eos_id=int(tokenizer.eos_token_id),
            batch_size=config.distill.answer_batch,
            description=f"target answers {task}",
            progress=progress,
        )
        timings[f"answers_{task}_s"] = time.perf_counter() - mark
        # The target's own responses (what the drafter is scored on) plus the task's human
        # text (breadth: the target answers only a sample of the prompts).
        as_written = [f for e in generated if (f := fit_to_length(e, seq_len)) is not None]
        training, batches = config.distill.for_task(task)
        distill_losses[task] = distill_drafter(
            drafter,
            target,
            as_written + task_examples,
            training,
            batches=batches,
            top_k=config.distill.top_k,
            pad_id=pad_id,
            description=f"drafter {task}",
            progress=progress,
        )
        sample = _sample(corpus.by_task("train", task), config.seed, task)
        save_model(drafter, tokenizer, directory / "drafters" / task, sample)
        timings[f"drafter_{task}_s"] = time.perf_counter() - mark
    timings["total_s"] = time.perf_counter() - started

    return {
        "format": FORMAT_VERSION,
        "build_seconds": round(timings["total_s"], 1),
        "scale": config.scale,
        "seed": config.seed,
        "config_hash": config.digest(),
        "config": dataclasses.asdict(config),
        "tasks": list(TASKS),
        "target": "target",
        "drafters": {"generic": "drafters/generic"} | {t: f"drafters/{t}" for t in TASKS},
        "corpus": "corpus",
        "parameters": {
            "target": _parameter_count(target),
            "drafter": _parameter_count(generic),
        },
        "head_dim": {"target": config.target.head_dim, "drafter": config.drafter.head_dim},
        "vocab_size": len(tokenizer),
        "examples": {s: len(corpus.split(s)) for s in ("train", "validation", "test")},
        "final_loss": {
            "target": _tail_mean(target_losses),
            "generic": _tail_mean(generic_losses),
        }
        | {t: _tail_mean(v) for t, v in distill_losses.items()},
        "timings": timings,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "bf16_autocast": cpu_has_bf16(),
        },
    }


def _tail_mean(losses: list[float]) -> float:
    tail = losses[-10:] or [float("nan")]
    return sum(tail) / len(tail)


def build_world(
    out: Path | None = None,
    scale: str = "default",
    *,
    progress: bool = True,
    force: bool = False,
) -> ModelBundle:
    """Build the world into ``out`` (default ``default_bundle_dir(scale)``), or open it if the
    directory already holds a world built from the same config."""
    if scale not in BUILD_CONFIGS:
        raise UnknownScaleError(f"unknown scale {scale!r}; choose from {sorted(BUILD_CONFIGS)}")
    config = BUILD_CONFIGS[scale]
    out = Path(out).expanduser().resolve() if out is not None else default_bundle_dir(scale)
    manifest = existing_manifest(out)
    refuse_foreign_directory(out, manifest)
    if not force and manifest is not None and manifest.get("config_hash") == config.digest():
        logger.info("world at %s is up to date (config %s)", out, config.digest()[:12])
        return ModelBundle.load(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.build-", dir=out.parent))
    try:
        logger.info("building the %s world into %s", scale, out)
        write_manifest(staging, _build_into(staging, config, progress))
        _replace_directory(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ModelBundle.load(out)


class UnknownScaleError(ValueError):
    """No built-in world has this scale."""


class NotAWorldDirectoryError(ValueError):
    """The output directory exists, holds files, and is not a specroute world."""


def existing_manifest(out: Path) -> dict[str, Any] | None:
    """The manifest of the world at ``out`` (None when there is none); ``{}`` when it
    cannot be read: the directory is a world's, damaged, and is built anew."""
    try:
        return read_manifest(out)
    except InvalidBundleError as error:
        logger.warning("%s; the world is built again", error)
        return {}


def refuse_foreign_directory(out: Path, manifest: dict[str, Any] | None) -> None:
    """Refuse to build into a non-empty directory that is not a world: a rebuild replaces
    the whole directory, and it must never delete an operator's own files."""
    if manifest is None and out.is_dir() and any(out.iterdir()):
        raise NotAWorldDirectoryError(
            f"refusing to build into {out}: it is not empty and holds no specroute world "
            "(no manifest.json); choose a new or empty directory"
        )
    if out.exists() and not out.is_dir():
        raise NotAWorldDirectoryError(f"refusing to build into {out}: it is not a directory")


def _replace_directory(new: Path, out: Path) -> None:
    """Move ``new`` to ``out``; an existing ``out`` (stale world) is moved aside, then deleted."""
    if out.exists():
        stale = out.with_name(f".{out.name}.stale-{os.getpid()}")
        os.replace(out, stale)
        shutil.rmtree(stale, ignore_errors=True)
    os.replace(new, out)
