"""The verifier: a pure function of drafts, draft probabilities and target logits.

Speculative sampling (Leviathan et al. 2023, arXiv 2211.17192; Chen et al. 2023,
arXiv 2302.01318). Over one step with k drafts x_1..x_k:

- accepted tokens: the leading drafts the target keeps;
- recovered token: at the first rejected position, a token resampled from the target;
- bonus token: when all k drafts are accepted, one more token from the target's
  distribution at position k + 1.

Every step therefore emits accepted + 1 tokens, and the output is distributed exactly as
the target's own (greedy: token for token).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from drafters.sampling import SamplingConfig, sample_from, sampling_probs


@dataclass(frozen=True)
class Verification:
    """The outcome of one step: how many drafts were accepted and the target's next token."""

    accepted: int
    next_token: int


def verify(
    draft_ids: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_logits: torch.Tensor,
    sampling: SamplingConfig,
    generator: torch.Generator | None,
) -> Verification:
    """Verify k drafts against the target's logits at the k + 1 positions.

    ``draft_ids`` [k]; ``draft_probs`` [k, vocab] or None for point-mass drafts (q = 1 on
    the proposed token, e.g. n-gram drafts); ``target_logits`` [k + 1, vocab], row i
    scoring the token after the i-th draft (row 0: after the last verified token).
    """
    if target_logits.shape[0] != draft_ids.shape[0] + 1:
        raise ValueError(
            f"need k + 1 = {draft_ids.shape[0] + 1} target rows, got {target_logits.shape[0]}"
        )
    if not sampling.do_sample:
        return greedy_verify(draft_ids, target_logits)
    return rejection_sample(
        draft_ids, draft_probs, sampling_probs(target_logits, sampling), generator
    )


def greedy_verify(draft_ids: torch.Tensor, target_logits: torch.Tensor) -> Verification:
    """Accept drafts while they equal the target's argmax; the next token is the argmax
    after the last accepted one (the correction, or the bonus when all k match)."""
    k = draft_ids.shape[0]
    if k == 0:  # plain decoding: skip the bookkeeping below
        return Verification(accepted=0, next_token=int(target_logits[0].argmax().item()))
    target_ids = target_logits.argmax(dim=-1)  # [k + 1]
    matches = (draft_ids == target_ids[:k]).to(torch.int32)  # [k]
    accepted = matches.cumprod(dim=0).sum()  # length of the leading run of matches
    both = torch.stack([accepted.to(target_ids.dtype), target_ids[accepted]])
    count, token = both.tolist()  # the one host sync of the step
    return Verification(accepted=int(count), next_token=int(token))


def rejection_sample(
    draft_ids: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    generator: torch.Generator | None,
) -> Verification:
    """Speculative sampling over k drafts; ``target_probs`` [k + 1, vocab] are p.

    Draft x_i is accepted with probability min(1, p_i(x_i) / q_i(x_i)); at the first
    rejection the next token is drawn from norm(max(0, p_i - q_i)); when all k are
    accepted it is drawn from p_{k+1}. Point-mass drafts have q_i = one_hot(x_i).
    """
    k = draft_ids.shape[0]
    rows = torch.arange(k, device=target_probs.device)
    p = target_probs[rows, draft_ids]  # [k]
    q = torch.ones_like(p) if draft_probs is None else draft_probs[rows, draft_ids]  # [k]
    uniform = torch.rand(k, generator=generator, device=target_probs.device)  # [k]
    # u < p / q, written without the division (q > 0 for a token drafted from q).
    kept = (uniform * q < p).to(torch.int32)
    accepted = int(kept.cumprod(dim=0).sum().item())
    if accepted == k:
        token = sample_from(target_probs[k], generator)
        return Verification(accepted=k, next_token=int(token.item()))
    draft_row = (
        torch.nn.functional.one_hot(draft_ids[accepted], target_probs.shape[-1]).to(p.dtype)
        if draft_probs is None
        else draft_probs[accepted]
    )
    residual = (target_probs[accepted] - draft_row).clamp_min(0.0)  # [vocab]
    total = residual.sum()
    # A rejection implies p(x) < q(x), so the residual has mass; guard rounding anyway.
    recovered = residual / total if total.item() > 0 else target_probs[accepted]
    token = sample_from(recovered, generator)
    return Verification(accepted=accepted, next_token=int(token.item()))
