"""Sampling settings and the token distribution they induce on a row of logits."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen: greedy (argmax) or sampled with temperature, min-p
    (vLLM's ``min_p``), top-k, top-p and typical-p (TGI's ``typical_p``, locally typical
    sampling).

    ``seed`` makes a sampled request reproducible; ``None`` draws a fresh seed.
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    typical_p: float = 1.0
    min_p: float = 0.0  # drop tokens below min_p times the row's most likely one; 0: off

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 < self.typical_p <= 1:
            raise ValueError(f"typical_p must be in (0, 1], got {self.typical_p}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")


def sampling_probs(logits: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """Probabilities [n, vocab] after temperature, then min-p (as vLLM: a token less likely
    than ``min_p`` times the row's most likely one, after temperature, is dropped), then
    top-k, then top-p, then typical-p (the order of transformers' warpers, and of TGI's).

    Each row's maximum is subtracted before dividing by the temperature: the softmax is
    the same, and a tiny temperature (down to the smallest positive float) sends the other
    scores to -inf, where dividing the raw logits overflowed the top ones to +inf and
    made the row NaN. A temperature below float32's smallest normal number (JSON can send
    1e-50) is divided as that number: in float32 it was 0, and 0 / 0 made the row NaN.
    """
    scores = logits.float()
    temperature = max(sampling.temperature, torch.finfo(scores.dtype).tiny)
    scores = (scores - scores.amax(dim=-1, keepdim=True)) / temperature  # [n, vocab]
    if sampling.min_p > 0:
        # The row's maximum is 0 here: p / p_max = exp(score), so the test is in log space.
        scores = scores.masked_fill(scores < math.log(sampling.min_p), float("-inf"))
    if 0 < sampling.top_k < scores.shape[-1]:
        kth = torch.topk(scores, sampling.top_k, dim=-1).values[..., -1:]  # [n, 1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p; keep the first
        # (a top_p below float32's smallest number, 1e-100, is 0 there and dropped it too).
        drop_sorted = (cumulative - sorted_scores.softmax(dim=-1)) >= sampling.top_p
        drop_sorted[..., 0] = False
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    if sampling.typical_p < 1.0:
        scores = _typical(scores, sampling.typical_p)
    return scores.softmax(dim=-1)


def _typical(scores: torch.Tensor, mass: float) -> torch.Tensor:
    """Locally typical sampling (Meister et al., 2022), as transformers'
    ``TypicalLogitsWarper``: keep the tokens whose surprisal is closest to the row's
    entropy until they hold ``mass`` of the probability; the closest is always kept."""
    log_probs = scores.log_softmax(dim=-1)  # [n, vocab]
    probs = log_probs.exp()
    entropy = -(log_probs * probs).nansum(dim=-1, keepdim=True)  # [n, 1]
    distance = (-log_probs - entropy).abs()
    sorted_distance, order = torch.sort(distance, dim=-1)
    cumulative = probs.gather(-1, order).cumsum(dim=-1)
    last = (cumulative < mass).sum(dim=-1, keepdim=True).clamp(max=scores.shape[-1] - 1)
    drop_sorted = sorted_distance > sorted_distance.gather(-1, last)
    drop_sorted[..., 0] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return scores.masked_fill(drop, float("-inf"))


def make_generator(sampling: SamplingConfig, device: torch.device) -> torch.Generator | None:
    """A generator seeded from ``sampling.seed`` (fresh seed when None); None for greedy."""
    if not sampling.do_sample:
        return None
    generator = torch.Generator(device=device)
    if sampling.seed is None:
        generator.seed()
    else:
        generator.manual_seed(sampling.seed)
    return generator


class NonFiniteDistributionError(RuntimeError):
    """A row to sample from holds NaN or infinity: the model's logits overflowed."""


def can_sample(probs: torch.Tensor) -> bool:
    """Whether a probability row holds no NaN or infinity (either carries into its sum)."""
    return bool(torch.isfinite(probs.sum()))


def sample_from(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token id [1] drawn from a probability row [vocab]; a row holding NaN or infinity
    is refused before ``torch.multinomial`` sees it, which on a GPU fails with a device-side
    assert that leaves the CUDA context unusable for every later request."""
    if not can_sample(probs):
        raise NonFiniteDistributionError(
            "the model's next-token distribution holds NaN or infinity (its logits "
            "overflowed): no token can be sampled from it"
        )
    return torch.multinomial(probs, 1, generator=generator)
