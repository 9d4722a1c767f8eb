"""Greedy acceptance of a drafter on an already verified output, without running speculation.

Under greedy decoding a drafter's j-th proposal in a step equals the target's token only if
all earlier proposals in that step matched, so its proposals are exactly its argmax
predictions on the verified sequence (teacher forcing). One forward pass of the drafter
over prompt + output therefore gives, for every output position, the token the drafter
would have proposed; speculative steps are then replayed on those drafts by
:func:`replay_greedy_steps`, the replay the n-gram drafter's lookups go through as well.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from drafters.base import DraftCounter

if TYPE_CHECKING:
    from drafters.base import Drafter


DraftsAt = Callable[[int, int], Sequence[int]]
"""``(position, k) -> drafts``: what a drafter proposes, at most k tokens, for the output
tokens from ``position`` on, given the prompt and the verified output before it."""


def replay_greedy_steps(
    output_ids: Sequence[Any], draft_length: int, drafts_at: DraftsAt
) -> list[int]:
    """Accepted drafts per step of greedy speculation with a fixed ``draft_length``, replayed
    on an already verified output: :func:`replay_greedy_drafts`' accepts. The one replay
    behind every counterfactual score."""
    return replay_greedy_drafts(output_ids, draft_length, drafts_at)[1]


def replay_greedy_drafts(
    output_ids: Sequence[Any], draft_length: int, drafts_at: DraftsAt, *, keep_tail: bool = False
) -> tuple[list[int], list[int]]:
    """(drafted, accepted) per step of greedy speculation with a fixed ``draft_length``,
    replayed on an already verified output.

    The first output token is the prefill's (the engine's first step starts after it, at
    position 1). A step starting at output position i asks for drafts d_1..d_m (m <= k: a
    lookup may find fewer, or none), accepts the leading run n of d_j == output[i + j - 1] and emits
    n + 1 tokens (the target's correction or bonus token), so the next step starts at
    i + n + 1. k = 0 is plain decoding: one step per token, nothing drafted or accepted.

    A last step whose run of fewer than k matches reaches the output's end is left out:
    the output ends before it shows whether the drafter would have gone on matching, so
    it is not a rejection (counted as one, every score had a false failure at the end,
    which the engine, asking for fewer drafts near the end, never records). With
    ``keep_tail`` it is kept as a step that drafted only what it kept (drafted = accepted
    = its run): what the engine records there (it asks for fewer drafts near the budget's
    end, and a lookup's draft is cut after a stop token), and a start that matched, which
    a drafter's match rate must count as dropped unmatched starts never are.
    """
    if draft_length < 0:
        raise ValueError(f"draft_length must be >= 0, got {draft_length}")
    drafted: list[int] = []
    accepted: list[int] = []
    position = 1  # output_ids[0] came from the prefill
    while position < len(output_ids):
        drafts = list(drafts_at(position, draft_length))[:draft_length] if draft_length else []
        run = 0
        for draft, verified in zip(drafts, output_ids[position:], strict=False):
            if draft != verified:
                break
            run += 1
        if 0 < run < draft_length and position + run >= len(output_ids):
            # Censored by the output's end (a full step is a success all the same).
            if keep_tail:
                drafted.append(run)
                accepted.append(run)
            break
        drafted.append(len(drafts))
        accepted.append(run)
        position += run + 1
    return drafted, accepted


def accepted_per_step_from_matches(matches: Sequence[bool], draft_length: int) -> list[int]:
    """:func:`replay_greedy_steps` over per-token matches.

    ``matches[i]`` says whether the drafter's greedy prediction for output token i (given
    the verified prefix) equals that token. Replaying on the matches themselves, with
    drafts that all say "match", accepts exactly the leading run of matches of each step.
    """
    return replay_greedy_steps(matches, draft_length, lambda _position, k: [True] * k)


@torch.inference_mode()
def teacher_forced_predictions(
    model: Any,
    prompt_ids: Sequence[int],
    output_ids: Sequence[int],
    vocabulary_size: int | None = None,
) -> list[int]:
    """For each output token, ``model``'s argmax on the verified prefix before it, over the
    ids below ``vocabulary_size`` when given (those a model drafter drafts)."""
    if not output_ids:
        return []
    if not prompt_ids:
        raise ValueError("prompt_ids must not be empty")
    device = next(model.parameters()).device
    ids = torch.tensor([list(prompt_ids) + list(output_ids)], device=device)  # [1, P + N]
    # Logits of the last N + 1 positions only (positions P - 1 .. P + N - 1): the prompt's
    # others cost the LM head's work and [P, vocab] of memory for nothing (with Qwen2.5's
    # 151,936-row vocabulary and a 1,024-token prompt, about 600 MB in fp32).
    logits = model(input_ids=ids, logits_to_keep=len(output_ids) + 1).logits[0]
    # Counted from the end: some models (GPT-Neo, OPT, ...) take the argument in their
    # kwargs and return every position. Row P - 1 + i predicts output token i.
    rows = logits[-(len(output_ids) + 1) : -1, :vocabulary_size]  # [N, drafted ids]
    return [int(x) for x in rows.argmax(dim=-1).tolist()]


def teacher_forced_matches(
    model: Any, prompt_ids: Sequence[int], output_ids: Sequence[int]
) -> list[bool]:
    """For each output token, whether ``model``'s argmax on the verified prefix predicts it."""
    predicted = teacher_forced_predictions(model, prompt_ids, output_ids)
    return [p == int(o) for p, o in zip(predicted, output_ids, strict=True)]


def score_model_counterfactual(
    model: Any,
    prompt_ids: Sequence[int],
    output_ids: Sequence[int],
    draft_length: int,
    vocabulary_size: int | None = None,
) -> list[int]:
    """Accepted draft tokens per step a model drafter would have had on a verified output.

    Its drafts from position i are its teacher-forced predictions there: its j-th greedy
    draft equals prediction i + j - 1 whenever the drafts before it matched, and only those
    are ever accepted.
    """
    predicted = teacher_forced_predictions(model, prompt_ids, output_ids, vocabulary_size)
    return replay_greedy_steps(
        output_ids, draft_length, lambda position, k: predicted[position : position + k]
    )


def score_counterfactual(
    drafter: Drafter, prompt_ids: Sequence[int], output_ids: Sequence[int], draft_length: int
) -> list[int]:
    """Accepted drafts per step ``drafter`` would have had on a verified greedy output.

    Any drafter kind: a model drafter scores by one teacher-forced forward pass, the n-gram
    drafter by replaying its lookups, "none" accepts nothing.
    """
    return drafter.score_counterfactual(prompt_ids, output_ids, draft_length)


def score_counterfactual_drafts(
    drafter: Drafter, prompt_ids: Sequence[int], output_ids: Sequence[int], draft_length: int
) -> tuple[list[int] | None, list[int]]:
    """(drafted, accepted) per step ``drafter`` would have had on a verified greedy output;
    drafted is None unless the drafter counts its drafts (``drafters.base.DraftCounter``:
    a lookup's steps may draft nothing), as every other kind drafts k at each step."""
    if isinstance(drafter, DraftCounter):
        drafted, accepted = drafter.score_counterfactual_drafts(
            prompt_ids, output_ids, draft_length
        )
        return drafted, accepted
    return None, drafter.score_counterfactual(prompt_ids, output_ids, draft_length)
