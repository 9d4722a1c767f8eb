"""Distillation of a drafter against the target on one task's text (top-k soft targets).

The text is the target's own: its greedy responses to the task's training prompts
(``target_responses``), since a drafter is scored on how well it predicts what the target
generates, not what a human wrote. The target's next-token distributions on the task's
packed rows are computed once
(the target is the expensive model) and kept as their top-k entries; the drafter then
minimises, per weighted position, the cross-entropy to the renormalised top-k target
distribution, H(p_k, q) = -sum_i p_k(i) log q(i), which equals KL(p_k || q) plus a constant.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from benchmarks.world.train import (
    EncodedExample,
    PackedBatch,
    RowFiller,
    TrainingConfig,
    mixture_stream,
    pack_batch,
    run_training,
    use_bf16,
)
from drafters.attention import padded_batch_masks


@torch.no_grad()
def target_responses(
    target: torch.nn.Module,
    examples: Sequence[EncodedExample],
    *,
    max_new_tokens: int,
    pad_id: int,
    eos_id: int,
    batch_size: int = 64,
    description: str = "target answers",
    progress: bool = False,
) -> list[EncodedExample]:
    """The same prompts with the target's greedy responses (ending in ``eos_id`` unless cut
    at ``max_new_tokens``).

    Batched generation with left padding, prompts of similar length batched together (they
    are ordered by length first, so little of a batch is padding); an empty response is
    dropped. The order of the result is the length order, not the order of ``examples``.
    """
    from tqdm.auto import tqdm

    ordered = sorted(examples, key=lambda e: (len(e.prompt_ids), e.prompt_ids))
    out: list[EncodedExample] = []
    starts = range(0, len(ordered), batch_size)
    for start in tqdm(starts, desc=description, disable=not progress, leave=False):
        chunk = ordered[start : start + batch_size]
        width = max(len(e.prompt_ids) for e in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, example in enumerate(chunk):
            ids[row, width - len(example.prompt_ids) :] = torch.tensor(example.prompt_ids)
            mask[row, width - len(example.prompt_ids) :] = 1
        with padded_batch_masks(target):
            generated = target.generate(  # type: ignore[operator]
                ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=eos_id,
                pad_token_id=pad_id,
            )[:, width:]
        for example, row in zip(chunk, generated.tolist(), strict=True):
            # A response cut at max_new_tokens keeps no end-of-turn token: the target did
            # not write one there, so the drafter must not learn to predict it.
            ended = eos_id in row
            response = [t for t in (row[: row.index(eos_id)] if ended else row) if t != pad_id]
            if response:
                end = (eos_id,) if ended else ()
                out.append(EncodedExample(example.task, example.prompt_ids, (*response, *end)))
    return out


@dataclass(frozen=True)
class SoftTargets:
    """One packed batch with the target's top-k next-token distribution at every position."""

    batch: PackedBatch
    top_ids: torch.Tensor  # [rows, seq_len, k]
    top_probs: torch.Tensor  # [rows, seq_len, k], rows sum to 1 (renormalised top-k)


@torch.no_grad()
def target_soft_targets(
    target: torch.nn.Module, batch: PackedBatch, top_k: int, bf16_autocast: bool
) -> SoftTargets:
    """The target's top-k next-token probabilities on one packed batch."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16_autocast):
        logits = target(**batch.model_inputs()).logits.float()  # [rows, T, vocab]
    log_probs = torch.log_softmax(logits, dim=-1)
    top_log_probs, top_ids = log_probs.topk(top_k, dim=-1)  # [rows, T, k]
    top_probs = torch.softmax(top_log_probs, dim=-1)
    return SoftTargets(batch, top_ids, top_probs.to(torch.float16))


def distillation_loss(drafter_logits: torch.Tensor, soft: SoftTargets) -> torch.Tensor:
    """Weighted mean over positions of H(p_k, q) (see module docstring)."""
    log_q = torch.log_softmax(drafter_logits.float(), dim=-1)  # [rows, T, vocab]
    log_q_top = log_q.gather(-1, soft.top_ids)  # [rows, T, k]
    per_position = -(soft.top_probs.float() * log_q_top).sum(-1)  # [rows, T]
    weights = soft.batch.weights
    return (per_position * weights).sum() / weights.sum().clamp_min(1.0)


def distill_drafter(
    drafter: torch.nn.Module,
    target: torch.nn.Module,
    examples: Sequence[EncodedExample],
    config: TrainingConfig,
    *,
    batches: int,
    top_k: int,
    pad_id: int,
    description: str,
    progress: bool,
) -> list[float]:
    """Fine-tune ``drafter`` towards ``target`` on ``examples`` (one task's training text).

    ``batches`` distinct packed batches are scored by the target once; the drafter then
    cycles through them for ``config.steps`` steps.
    """
    torch.manual_seed(config.seed)
    filler = RowFiller(mixture_stream(examples, {}, random.Random(config.seed)))
    targets = [
        target_soft_targets(
            target,
            pack_batch(filler, config.rows, config.seq_len, config.prompt_weight, pad_id),
            top_k,
            use_bf16(config),
        )
        for _ in range(batches)
    ]
    cursor = iter(range(10**9))

    def next_batch() -> SoftTargets:
        return targets[next(cursor) % len(targets)]

    def loss_of(net: torch.nn.Module, soft: SoftTargets) -> torch.Tensor:
        return distillation_loss(net(**soft.batch.model_inputs()).logits, soft)

    return run_training(
        drafter, next_batch, loss_of, config, description=description, progress=progress
    )
