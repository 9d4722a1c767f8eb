"""Fine-tuning a drafter on served (prompt, verified output) pairs, and measuring it.

The run-time counterpart of the built-in world's distillation (which stays in the world
builder): a drafter is scored on predicting the target's verified output, so it learns
exactly that. Each pair is one row, prompt then output, right-padded. Positions that
predict an output token weigh 1, those that predict a prompt token ``prompt_weight``.
Right padding needs no attention mask: under causal attention a row's tokens attend only
to earlier positions, all of them its own, and the padding after them weighs 0 (a 2D
mask with padding would have transformers build a 4D one with ``torch.vmap`` at every
forward, for the same logits).

With the target at hand, the drafter minimises at every weighted position the
cross-entropy to the target's renormalised top-k next-token distribution,
H(p_k, q) = -sum_i p_k(i) log q(i) = KL(p_k || q) + const (soft labels: the target's
distributions, computed once per batch). Without it (the target serves elsewhere), it
minimises the cross-entropy to the verified tokens themselves (hard labels), which under
greedy decoding are the target's argmax.

Acceptance is measured the way the sidecar's counterfactual scoring does
(:func:`drafters.counterfactual.replay_greedy_steps`): greedy speculation with draft
length k replayed on each held-out verified output, summarised as the policy's per-token
acceptance estimate, accepted / (accepted + rejections).
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from drafters.counterfactual import score_model_counterfactual

logger = logging.getLogger(__name__)

FINETUNE_SAMPLE_FILE = "finetune_sample.jsonl"
FINETUNE_SAMPLE_SIZE = 64
IGNORED = -100

Scorer = Callable[[Sequence[int], Sequence[int], int], list[int]]
"""``(prompt_ids, output_ids, k) -> accepted drafts per step`` (a counterfactual score)."""


@dataclass(frozen=True)
class TrainingPair:
    """A prompt's token ids and the target's verified output ids for it."""

    prompt_ids: tuple[int, ...]
    output_ids: tuple[int, ...]


@dataclass(frozen=True)
class DistillConfig:
    """Hyper-parameters of one fine-tuning run (lr: linear warm-up, then cosine decay)."""

    steps: int = 100
    batch_rows: int = 8
    learning_rate: float = 1e-3
    warmup_steps: int = 10
    weight_decay: float = 0.01
    prompt_weight: float = 0.1
    min_lr_ratio: float = 0.1
    top_k: int = 16
    max_length: int = 512
    seed: int = 0


@dataclass(frozen=True)
class Acceptance:
    """Greedy acceptance of one drafter on a set of verified outputs at draft length k."""

    samples: int
    draft_length: int
    steps: int
    accepted: int
    rejections: int  # steps that stopped at a rejected draft (not at the output's end)

    @property
    def rate(self) -> float:
        """Per-token acceptance (the truncated-geometric estimate the policy keeps)."""
        trials = self.accepted + self.rejections
        return self.accepted / trials if trials else 0.0

    @property
    def accepted_per_step(self) -> float:
        return self.accepted / self.steps if self.steps else 0.0


def split_held_out(
    pairs: Sequence[TrainingPair], fraction: float, seed: int = 0
) -> tuple[list[TrainingPair], list[TrainingPair]]:
    """(training, held-out): a seeded shuffle of the distinct prompts, ``fraction`` of them
    held out (at least one of each) with every pair of theirs. A prompt served twice
    (greedy with two token budgets, or sampled) gives pairs that share text: split apart,
    the held-out one measured recall of training text and flattered the drafter."""
    prompts = list(dict.fromkeys(pair.prompt_ids for pair in pairs))
    if len(prompts) < 2:
        raise ValueError(f"need at least 2 distinct prompts to hold some out, got {len(prompts)}")
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"the held-out fraction must be in (0, 1), got {fraction}")
    random.Random(seed).shuffle(prompts)
    count = min(len(prompts) - 1, max(1, round(fraction * len(prompts))))
    held = set(prompts[:count])
    return (
        [pair for pair in pairs if pair.prompt_ids not in held],
        [pair for pair in pairs if pair.prompt_ids in held],
    )


def acceptance_of(score: Scorer, pairs: Sequence[TrainingPair], draft_length: int) -> Acceptance:
    """:class:`Acceptance` of a drafter's counterfactual ``score`` over ``pairs``."""
    steps = accepted = rejections = 0
    for pair in pairs:
        per_step = score(pair.prompt_ids, pair.output_ids, draft_length)
        steps += len(per_step)
        accepted += sum(per_step)
        rejections += rejected_steps(per_step, draft_length, len(pair.output_ids))
    return Acceptance(len(pairs), draft_length, steps, accepted, rejections)


def rejected_steps(accepted_per_step: Sequence[int], draft_length: int, output_length: int) -> int:
    """Steps of a replay that ended at a rejected draft: a step at output position i that
    accepted n < k drafts compared draft n + 1 with token i + n and lost, unless the output
    had ended there (i + n = its length: nothing was left to reject)."""
    rejections = 0
    position = 0
    for accepted in accepted_per_step:
        if accepted < draft_length and position + accepted < output_length:
            rejections += 1
        position += accepted + 1
    return rejections


def model_scorer(model: Any, vocabulary_size: int | None = None) -> Scorer:
    """A model drafter's counterfactual score (one teacher-forced forward per pair)."""

    def score(prompt_ids: Sequence[int], output_ids: Sequence[int], k: int) -> list[int]:
        return score_model_counterfactual(model, prompt_ids, output_ids, k, vocabulary_size)

    return score


@dataclass(frozen=True)
class PaddedBatch:
    """Rows of prompt + output, right-padded, with next-token labels and loss weights."""

    input_ids: torch.Tensor  # [rows, T]
    attention_mask: torch.Tensor  # [rows, T], 1 on real tokens
    labels: torch.Tensor  # [rows, T], the token at t + 1, IGNORED where none is predicted
    weights: torch.Tensor  # [rows, T]

    def to(self, device: torch.device) -> PaddedBatch:
        return PaddedBatch(
            *(
                t.to(device)
                for t in (self.input_ids, self.attention_mask, self.labels, self.weights)
            )
        )


def fitted_row(pair: TrainingPair, max_length: int) -> tuple[list[int], int]:
    """The row's ids (the oldest prompt tokens dropped to fit ``max_length``, then the end
    of an output longer than the rest) and its prompt length."""
    output = list(pair.output_ids[: max_length - 1])
    prompt = list(pair.prompt_ids[-(max_length - len(output)) :])
    return prompt + output, len(prompt)


def pad_batch(
    pairs: Sequence[TrainingPair], max_length: int, prompt_weight: float, pad_id: int
) -> PaddedBatch:
    """One right-padded batch of ``pairs``."""
    rows = [fitted_row(pair, max_length) for pair in pairs]
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORED, dtype=torch.long)
    weights = torch.zeros((len(rows), width))
    for row, (ids, prompt_length) in enumerate(rows):
        length = len(ids)
        input_ids[row, :length] = torch.tensor(ids)
        attention[row, :length] = 1
        labels[row, : length - 1] = torch.tensor(ids[1:])  # position t predicts token t + 1
        weights[row, : length - 1] = prompt_weight
        weights[row, prompt_length - 1 : length - 1] = 1.0  # these predict output tokens
    return PaddedBatch(input_ids, attention, labels, weights)


@dataclass(frozen=True)
class SoftLabels:
    """The target's renormalised top-k next-token distribution at every position."""

    top_ids: torch.Tensor  # [rows, T, k]
    top_probs: torch.Tensor  # [rows, T, k], each position sums to 1


@torch.no_grad()
def target_soft_labels(
    target: Any, batch: PaddedBatch, top_k: int, drafter_rows: int
) -> SoftLabels:
    """The target's top-k probabilities on ``batch``, one row at a time (a row's logits
    over a real vocabulary are the large tensor here) and over its own tokens only (the
    padding after them gets probability 0: it weighs 0). Ids the drafter has no row for
    get probability 0 before renormalising."""
    rows, width = batch.input_ids.shape
    device = batch.input_ids.device
    top_ids = torch.zeros((rows, width, top_k), dtype=torch.long, device=device)
    top_probs = torch.zeros((rows, width, top_k), device=device)
    for row, length in enumerate(batch.attention_mask.sum(dim=1).tolist()):
        logits = target(input_ids=batch.input_ids[row : row + 1, :length]).logits[0].float()
        top_log_probs, ids = torch.log_softmax(logits, dim=-1).topk(top_k, dim=-1)
        top_log_probs = top_log_probs.masked_fill(ids >= drafter_rows, -math.inf)
        top_ids[row, :length] = ids.clamp_max(drafter_rows - 1)
        top_probs[row, :length] = torch.softmax(top_log_probs, dim=-1)
    return SoftLabels(top_ids, top_probs)


def _weighted_mean(per_position: torch.Tensor, batch: PaddedBatch) -> torch.Tensor:
    return (per_position * batch.weights).sum() / batch.weights.sum().clamp_min(1e-9)


def soft_label_loss(logits: torch.Tensor, batch: PaddedBatch, soft: SoftLabels) -> torch.Tensor:
    """Weighted mean of H(p_k, q) over positions (module doc)."""
    log_q = torch.log_softmax(logits.float(), dim=-1)  # [rows, T, vocab]
    per_position = -(soft.top_probs * log_q.gather(-1, soft.top_ids)).sum(-1)  # [rows, T]
    return _weighted_mean(per_position, batch)


def hard_label_loss(logits: torch.Tensor, batch: PaddedBatch) -> torch.Tensor:
    """Weighted mean of the cross-entropy to the next verified token."""
    per_position = torch.nn.functional.cross_entropy(
        logits.float().transpose(1, 2), batch.labels, ignore_index=IGNORED, reduction="none"
    )  # [rows, T]
    return _weighted_mean(per_position, batch)


def learning_rate_at(step: int, config: DistillConfig) -> float:
    """Linear warm-up to the peak, then cosine decay to ``min_lr_ratio`` of it."""
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return config.learning_rate * (config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine)


def _optimizer(model: torch.nn.Module, config: DistillConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on norms and biases."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(
        [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=config.learning_rate,
        betas=(0.9, 0.95),
    )


def training_batches(
    pairs: Sequence[TrainingPair], config: DistillConfig, pad_id: int
) -> list[PaddedBatch]:
    """The pairs in a seeded order, ``batch_rows`` per batch, each pair in one batch."""
    order = list(pairs)
    random.Random(config.seed).shuffle(order)
    return [
        pad_batch(order[i : i + config.batch_rows], config.max_length, config.prompt_weight, pad_id)
        for i in range(0, len(order), config.batch_rows)
    ]


def distill(
    model: Any,
    pairs: Sequence[TrainingPair],
    config: DistillConfig,
    *,
    pad_id: int,
    target: Any = None,
    progress: bool = False,
    description: str = "distill",
) -> list[float]:
    """Fine-tune ``model`` in place on ``pairs`` for ``config.steps`` steps; the losses.

    Soft labels from ``target`` when given (computed once per batch), else hard labels.
    The batches are cycled in a reshuffled order each pass.
    """
    from tqdm.auto import tqdm

    if not pairs:
        raise ValueError("no training pairs")
    torch.manual_seed(config.seed)
    device = next(model.parameters()).device
    batches = [b.to(device) for b in training_batches(pairs, config, pad_id)]
    drafter_rows = int(model.get_output_embeddings().weight.shape[0])
    soft = (
        [target_soft_labels(target, b, config.top_k, drafter_rows) for b in batches]
        if target is not None
        else None
    )
    optimizer = _optimizer(model, config)
    rng = random.Random(config.seed)
    order: list[int] = []
    losses: list[float] = []
    model.train()
    bar = tqdm(range(config.steps), desc=description, disable=not progress, leave=False)
    for step in bar:
        if not order:
            order = list(range(len(batches)))
            rng.shuffle(order)
        index = order.pop()
        batch = batches[index]
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(step, config)
        logits = model(input_ids=batch.input_ids).logits  # right-padded: no mask (module doc)
        loss = (
            soft_label_loss(logits, batch, soft[index])
            if soft is not None
            else hard_label_loss(logits, batch)
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.item()))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    if losses:
        logger.info(
            "%s: %d steps, loss %.3f -> %.3f", description, len(losses), losses[0], losses[-1]
        )
    return losses


def save_drafter(
    model: Any,
    tokenizer: Any,
    directory: Path,
    sample_texts: Sequence[str],
    task: str,
    report: dict[str, Any] | None = None,
) -> Path:
    """A Hugging Face directory: safetensors weights, the tokenizer, ``finetune_sample.jsonl``
    (prompts of its fine-tuning data, ``{"task", "text"}`` per line, from which the sidecar
    computes the drafter's similarity prior) and, when given, ``distill.json``."""
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory), safe_serialization=True)
    tokenizer.save_pretrained(str(directory))
    lines = [
        json.dumps({"task": task, "text": text}) for text in sample_texts[:FINETUNE_SAMPLE_SIZE]
    ]
    (directory / FINETUNE_SAMPLE_FILE).write_text("\n".join(lines) + "\n", "utf-8")
    if report is not None:
        (directory / "distill.json").write_text(json.dumps(report, indent=2) + "\n", "utf-8")
    return directory
