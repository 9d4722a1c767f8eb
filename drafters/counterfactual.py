"""Greedy acceptance of a drafter on an already verified output, without running speculation.

Under greedy decoding a drafter's j-th proposal in a step equals the target's token only if
all earlier proposals in that step matched, so its proposals are exactly its argmax
predictions on the verified sequence (teacher forcing). One forward pass of the drafter
over prompt + output therefore gives, for every output position, whether the drafter would
have proposed the verified token; speculative steps are then replayed on those matches.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from drafters.base import Drafter


def accepted_per_step_from_matches(matches: Sequence[bool], draft_length: int) -> list[int]:
    """Replay greedy speculation with a fixed ``draft_length`` over per-token matches.

    ``matches[i]`` says whether the drafter's greedy prediction for output token i (given
    the verified prefix) equals that token. A step starting at i accepts the leading run
    of matches in ``matches[i:i+k]`` (n tokens) and emits n + 1 tokens (the target's
    correction or bonus token), so the next step starts at i + n + 1.
    """
    if draft_length < 0:
        raise ValueError(f"draft_length must be >= 0, got {draft_length}")
    accepted: list[int] = []
    position = 0
    while position < len(matches):
        run = 0
        while run < draft_length and position + run < len(matches) and matches[position + run]:
            run += 1
        accepted.append(run)
        position += run + 1
    return accepted


@torch.inference_mode()
def teacher_forced_matches(
    model: Any, prompt_ids: Sequence[int], output_ids: Sequence[int]
) -> list[bool]:
    """For each output token, whether ``model``'s argmax on the verified prefix predicts it."""
    if not output_ids:
        return []
    if not prompt_ids:
        raise ValueError("prompt_ids must not be empty")
    device = next(model.parameters()).device
    ids = torch.tensor([list(prompt_ids) + list(output_ids)], device=device)  # [1, P + N]
    logits = model(input_ids=ids).logits[0]  # [P + N, vocab]
    # Position P - 1 + i predicts output token i.
    start = len(prompt_ids) - 1
    predicted = logits[start : start + len(output_ids)].argmax(dim=-1)  # [N]
    target = torch.tensor(list(output_ids), device=device)
    return [bool(x) for x in (predicted == target).tolist()]


def score_model_counterfactual(
    model: Any, prompt_ids: Sequence[int], output_ids: Sequence[int], draft_length: int
) -> list[int]:
    """Accepted draft tokens per step a model drafter would have had on a verified output."""
    matches = teacher_forced_matches(model, prompt_ids, output_ids)
    return accepted_per_step_from_matches(matches, draft_length)


def score_counterfactual(
    drafter: Drafter, prompt_ids: Sequence[int], output_ids: Sequence[int], draft_length: int
) -> list[int]:
    """Accepted drafts per step ``drafter`` would have had on a verified greedy output.

    Any drafter kind: a model drafter scores by one teacher-forced forward pass, the n-gram
    drafter by replaying its lookups, "none" accepts nothing.
    """
    return drafter.score_counterfactual(prompt_ids, output_ids, draft_length)
