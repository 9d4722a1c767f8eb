"""Stopping a draft early: a training-free rule on the drafter's own next-token distribution.

A draft session proposes up to k tokens. Before drafting position i >= 2 the drafter has
its next-token distribution q_i; when q_i says the token will probably be rejected, the
draft ends at i - 1 tokens and the step verifies only those. Two confidences of q_i:

- ``max_prob``: max_x q_i(x). Under greedy verification a draft is kept when it is the
  target's argmax; a drafter unsure of its own argmax is often wrong about the target's.
- ``entropy``: AdaEDL's entropy-based lower bound on the acceptance probability
  (Agrawal et al. 2024, arXiv 2410.18351), 1 - sqrt(gamma * H(q_i)) with H in nats.

The draft stops when confidence(q_i) < threshold (AdaEDL's lambda). The first draft is
always made: its drafter forward is paid in any case, and a one-token draft costs the
target about what a plain step costs.

The rule reads only the drafter's distribution, which is a function of the verified
history and the drafts so far, never of the target: stopping only shortens the proposal.
Verification of d <= k drafts is the same rejection sampling (bonus token from p_{d+1}
when all d pass), so the output is distributed exactly as the target's own, for any
threshold (greedy: token for token).

A drafter without a distribution (n-gram prompt lookup: point masses) ignores the rule.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

Confidence = Callable[[torch.Tensor, float], torch.Tensor]


def max_probability(probs: torch.Tensor, entropy_scale: float) -> torch.Tensor:
    """max_x q(x) of a probability row [vocab], as a 0-d tensor."""
    return probs.amax()


def entropy_acceptance_bound(probs: torch.Tensor, entropy_scale: float) -> torch.Tensor:
    """AdaEDL's lower bound on acceptance, 1 - sqrt(gamma * H(q)), H(q) in nats."""
    logs = torch.where(probs > 0, probs.log(), torch.zeros_like(probs))
    entropy = -(probs * logs).sum()
    return 1.0 - (entropy_scale * entropy.clamp_min(0.0)).sqrt()


STOP_CONFIDENCES: dict[str, Confidence] = {
    "max_prob": max_probability,
    "entropy": entropy_acceptance_bound,
}

#: The kind a threshold alone (e.g. a routing decision's) refers to.
DEFAULT_STOP_KIND = "entropy"
#: AdaEDL's gamma for the entropy kind (see :class:`DraftStopRule`).
DEFAULT_ENTROPY_SCALE = 0.25


@dataclass(frozen=True)
class DraftStopRule:
    """Stop drafting when confidence(q_i) < ``threshold`` (module doc).

    ``threshold`` lies in [0, 1); 0 never stops (the rule is off). ``entropy_scale`` is
    AdaEDL's gamma (the ``entropy`` kind only): the entropy kind stops when
    H(q_i) > (1 - threshold)^2 / gamma. With gamma = 1 every threshold > 0 cuts each draft
    whose entropy exceeds (1 - threshold)^2 <= 1 nat, while the built-in world's drafters
    make accepted drafts at 2-3 nats (chat: a median of 2.9 nats, 77% accepted); gamma =
    0.25 lets thresholds 0.1-0.5 cut at 3.2-1.0 nats (``benchmarks/engine/HISTORY.md``).
    """

    threshold: float
    kind: str = DEFAULT_STOP_KIND
    entropy_scale: float = DEFAULT_ENTROPY_SCALE

    def __post_init__(self) -> None:
        if not (math.isfinite(self.threshold) and 0.0 <= self.threshold < 1.0):
            raise ValueError(f"stop threshold must be in [0, 1), got {self.threshold}")
        if self.kind not in STOP_CONFIDENCES:
            raise ValueError(
                f"unknown stop rule {self.kind!r}; known: {', '.join(sorted(STOP_CONFIDENCES))}"
            )
        if not (math.isfinite(self.entropy_scale) and self.entropy_scale > 0):
            raise ValueError(f"entropy_scale must be > 0, got {self.entropy_scale}")

    @property
    def active(self) -> bool:
        return self.threshold > 0.0

    def confidence(self, probs: torch.Tensor) -> float:
        """The rule's confidence in a probability row [vocab] (one host sync)."""
        return float(STOP_CONFIDENCES[self.kind](probs, self.entropy_scale))

    def stops(self, probs: torch.Tensor) -> bool:
        """True when the next draft, drawn from ``probs``, should not be made."""
        return self.active and self.confidence(probs) < self.threshold


def stop_rule(threshold: float, kind: str = DEFAULT_STOP_KIND) -> DraftStopRule | None:
    """The rule for a threshold, or None when it is off (0)."""
    rule = DraftStopRule(threshold, kind)
    return rule if rule.active else None
