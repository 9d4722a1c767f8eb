"""Training the built-in world's causal LMs: tokenized, packed examples and one seeded loop.

Examples are encoded exactly as they are served: the chat template's prompt (with the
generation prompt) followed by the response tokens and ``<|im_end|>``. Several examples are
packed into one row (never split across rows) and see only themselves: a block-diagonal
causal mask and positions restarting at 0 per example make a packed example's logits
equal to those of the same example alone, as at serving time. The loss weights response
tokens 1 and prompt tokens ``prompt_weight`` (they still teach the language, but the
model's capacity goes to what it will have to generate).
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.world.corpus import Example

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncodedExample:
    """Token ids of one example and the split point between prompt and response."""

    task: str
    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


@dataclass(frozen=True)
class PackedBatch:
    """Rows of packed examples: ids, next-token labels and per-label loss weights."""

    input_ids: torch.Tensor  # [rows, seq_len]
    labels: torch.Tensor  # [rows, seq_len] (-100 where nothing is predicted)
    weights: torch.Tensor  # [rows, seq_len]
    position_ids: torch.Tensor  # [rows, seq_len], 0 at each example's first token
    segments: torch.Tensor  # [rows, seq_len], example index within the row, -1 for padding

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments of a causal LM's forward: ids, per-example positions and a
        4D additive mask letting each token attend causally within its own example."""
        seq_len = self.input_ids.shape[1]
        causal = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
        same = self.segments[:, :, None] == self.segments[:, None, :]
        allowed = same & causal | torch.eye(seq_len, dtype=torch.bool)  # padding sees itself
        mask = torch.zeros(allowed.shape).masked_fill_(~allowed, torch.finfo(torch.float32).min)
        return {
            "input_ids": self.input_ids,
            "position_ids": self.position_ids,
            "attention_mask": mask[:, None],
        }


@dataclass(frozen=True)
class TrainingConfig:
    """Hyper-parameters of one training run (learning rate: linear warm-up, cosine decay)."""

    steps: int
    rows: int
    seq_len: int
    learning_rate: float
    warmup_steps: int = 20
    weight_decay: float = 0.01
    prompt_weight: float = 0.1
    min_lr_ratio: float = 0.1
    bf16_autocast: bool = False  # used only where the CPU has native bf16 (cpu_has_bf16)
    seed: int = 0


def cpu_has_bf16() -> bool:
    """True if this CPU computes bf16 natively (AVX512-BF16 or AMX-BF16 in /proc/cpuinfo).

    Without it, autocast emulates bf16 and is slower than fp32, so training stays fp32.
    """
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def use_bf16(config: TrainingConfig) -> bool:
    """Whether a run with ``config`` autocasts to bf16 on this machine."""
    return config.bf16_autocast and cpu_has_bf16()


def encode_example(tokenizer: Any, example: Example) -> EncodedExample:
    """Prompt ids via the chat template, then response ids and the end-of-turn token."""
    prompt_ids = tokenizer.apply_chat_template(list(example.messages), add_generation_prompt=True)
    response_ids = tokenizer(example.response, add_special_tokens=False)["input_ids"]
    return EncodedExample(example.task, tuple(prompt_ids), (*response_ids, tokenizer.eos_token_id))


def fit_to_length(encoded: EncodedExample, seq_len: int) -> EncodedExample | None:
    """Drop the oldest prompt tokens of an over-long example; None if the response alone is."""
    room = seq_len - len(encoded.response_ids)
    if room < 8:
        return None
    if len(encoded.prompt_ids) <= room:
        return encoded
    return EncodedExample(encoded.task, encoded.prompt_ids[-room:], encoded.response_ids)


def mixture_stream(
    examples: Sequence[EncodedExample], task_weights: Mapping[str, float], rng: random.Random
) -> Callable[[], EncodedExample]:
    """Draw examples: a task with probability proportional to its weight, then the next
    example of that task from a reshuffled cycle (each example once per pass)."""
    by_task: dict[str, list[EncodedExample]] = {}
    for example in examples:
        by_task.setdefault(example.task, []).append(example)
    tasks = sorted(t for t in by_task if task_weights.get(t, 1.0) > 0)
    weights = [task_weights.get(t, 1.0) for t in tasks]
    cursors = dict.fromkeys(tasks, 0)
    orders = {t: list(range(len(by_task[t]))) for t in tasks}

    def draw() -> EncodedExample:
        task = rng.choices(tasks, weights)[0]
        if cursors[task] == 0:
            rng.shuffle(orders[task])
        example = by_task[task][orders[task][cursors[task]]]
        cursors[task] = (cursors[task] + 1) % len(by_task[task])
        return example

    return draw


class RowFiller:
    """Whole examples for packed rows, first fit: an example too long for what is left of a
    row waits (in draw order) and starts a later row, and a shorter one fills the gap.

    Every drawn example is used in time, so the task mixture is the stream's. On the default
    world's corpus (examples of 100-480 tokens, rows of 512) rows fill to 95% of their tokens
    where stopping at the first example that does not fit filled 85% (3 tries per gap: 92%,
    10: 95.4%).
    """

    # New draws tried for one gap before the row is closed, and the most that may wait.
    TRIES_PER_GAP = 6
    MAX_WAITING = 24

    def __init__(self, draw: Callable[[], EncodedExample]) -> None:
        self._draw = draw
        self._waiting: list[EncodedExample] = []

    def take(self, room: int) -> EncodedExample | None:
        """The first waiting example that fits ``room`` tokens, else a new draw that fits
        (the ones that do not are kept waiting), else None."""
        for index, example in enumerate(self._waiting):
            if example.length <= room:
                return self._waiting.pop(index)
        for _ in range(self.TRIES_PER_GAP):
            if len(self._waiting) >= self.MAX_WAITING:
                return None
            example = self._draw()
            if example.length <= room:
                return example
            self._waiting.append(example)
        return None


def pack_batch(
    source: RowFiller | Callable[[], EncodedExample],
    rows: int,
    seq_len: int,
    prompt_weight: float,
    pad_id: int,
) -> PackedBatch:
    """Fill ``rows`` rows of ``seq_len`` tokens with whole examples (first fit, ``RowFiller``;
    give the same filler for every batch of a run, so that no drawn example is lost)."""
    filler = source if isinstance(source, RowFiller) else RowFiller(source)
    input_ids = torch.full((rows, seq_len), pad_id, dtype=torch.long)
    labels = torch.full((rows, seq_len), -100, dtype=torch.long)
    weights = torch.zeros((rows, seq_len))
    position_ids = torch.zeros((rows, seq_len), dtype=torch.long)
    segments = torch.full((rows, seq_len), -1, dtype=torch.long)
    for row in range(rows):
        used = 0
        while seq_len - used >= 16:
            example = filler.take(seq_len - used)
            if example is None:
                if used == 0:
                    raise ValueError(f"no example fits in a row of {seq_len} tokens")
                break
            ids = list(example.prompt_ids) + list(example.response_ids)
            end = used + len(ids)
            input_ids[row, used:end] = torch.tensor(ids)
            # Label at position t is token t + 1 (within this example only).
            labels[row, used : end - 1] = torch.tensor(ids[1:])
            first_response = used + len(example.prompt_ids) - 1
            weights[row, used : end - 1] = prompt_weight
            weights[row, first_response : end - 1] = 1.0
            position_ids[row, used:end] = torch.arange(len(ids))
            segments[row, used:end] = int(segments[row].max()) + 1
            used = end
    return PackedBatch(input_ids, labels, weights, position_ids, segments)


def weighted_token_loss(logits: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    """Cross-entropy per label, weighted, normalised by the weight sum."""
    losses = torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        batch.labels.reshape(-1),
        ignore_index=-100,
        reduction="none",
    )
    weights = batch.weights.reshape(-1)
    return (losses * weights).sum() / weights.sum().clamp_min(1.0)


# The output head runs on the weighted positions, padded to a multiple of this many rows:
# each new row count makes oneDNN build and cache a new bf16 matmul kernel (up to 1024 of
# them), which grew a default build's memory by ~15 MB per step (5.3 GB RSS at 490 steps
# when it was killed for memory); with buckets the shapes repeat.
HEAD_ROW_BUCKET = 128


def weighted_lm_loss(model: torch.nn.Module, batch: PackedBatch) -> torch.Tensor:
    """``weighted_token_loss`` of a causal LM, its output head applied only at positions
    with a positive weight (the same value; with prompt weight 0 the vocabulary projection
    and softmax run on the response tokens only, a large share of a small model's cost).
    The positions are padded with weight-0 copies of the first to a multiple of
    ``HEAD_ROW_BUCKET``."""
    hidden = model.base_model(**batch.model_inputs())[0]  # type: ignore[operator]
    selected = (batch.weights.reshape(-1) > 0).nonzero().squeeze(1)
    padding = -len(selected) % HEAD_ROW_BUCKET
    index = torch.cat([selected, selected.new_zeros(padding)])
    weights = torch.cat([batch.weights.reshape(-1)[selected], torch.zeros(padding)])
    head_input = hidden.reshape(-1, hidden.shape[-1])[index]
    logits = model.get_output_embeddings()(head_input)  # type: ignore[operator]
    labels = batch.labels.reshape(-1)[index]
    losses = torch.nn.functional.cross_entropy(
        logits.float(), labels, ignore_index=-100, reduction="none"
    )
    return (losses * weights).sum() / weights.sum().clamp_min(1.0)


def learning_rate_at(step: int, config: TrainingConfig) -> float:
    """Linear warm-up to the peak, then cosine decay to ``min_lr_ratio`` of it."""
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return config.learning_rate * (config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine)


def make_optimizer(model: torch.nn.Module, config: TrainingConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on norms and biases."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": config.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=config.learning_rate,
        betas=(0.9, 0.95),
    )


def run_training(
    model: torch.nn.Module,
    next_batch: Callable[[], Any],
    loss_of: Callable[[torch.nn.Module, Any], torch.Tensor],
    config: TrainingConfig,
    *,
    description: str,
    progress: bool,
) -> list[float]:
    """The one optimisation loop (used for pre-training and for distillation)."""
    from tqdm.auto import tqdm

    optimizer = make_optimizer(model, config)
    model.train()
    losses: list[float] = []
    autocast = use_bf16(config)
    bar = tqdm(range(config.steps), desc=description, disable=not progress, leave=False)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(step, config)
        batch = next_batch()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = loss_of(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
    model.eval()
    logger.info("%s: %d steps, final loss %.3f", description, config.steps, losses[-1])
    return losses


def pretrain(
    model: torch.nn.Module,
    examples: Sequence[EncodedExample],
    task_weights: Mapping[str, float],
    config: TrainingConfig,
    pad_id: int,
    *,
    description: str,
    progress: bool,
) -> list[float]:
    """Next-token training on a weighted task mixture of packed examples."""
    torch.manual_seed(config.seed)
    filler = RowFiller(mixture_stream(examples, task_weights, random.Random(config.seed)))

    def next_batch() -> PackedBatch:
        return pack_batch(filler, config.rows, config.seq_len, config.prompt_weight, pad_id)

    return run_training(
        model, next_batch, weighted_lm_loss, config, description=description, progress=progress
    )
