"""Cutting a request's losses: plain decoding for the rest of it once its drafts clearly
do not pay.

The router picks a (drafter, k) per request from what the drafter accepted on earlier
requests of the same cluster. A request unlike them (a prompt the drafters were never
trained for, an answer that wanders off) may accept almost nothing, and every step then
pays k drafter forwards and a wider target forward for about one token: at k = 3 to 8 a
long answer decodes 1.5-3x slower than plainly. The guard watches the request's own
acceptance and stops drafting when it is clearly below what drafting needs.

Within the request, per-token acceptance a has a Beta(1, 1) prior and the
truncated-geometric evidence of its steps so far (s accepted drafts, f steps whose draft
was rejected at some position, as the router's posterior counts them). Before each step,
once there are at least ``min_evidence`` observations, the guard trips when

    P(a < break_even | s, f) >= confidence,

and every later step of the request drafts nothing (k = 0). ``break_even`` is about the
acceptance at which a one-token draft pays for itself: S(a, 1) = (1 + a) t / (t_draft +
t_verify(1)) = 1 gives a = t_draft / t + (t_verify(1) - t) / t, 0.1-0.25 for the model
drafters measured on CPU. With the defaults (0.2, 0.95) a request whose drafts are all
rejected stops drafting after 13 steps; simulated 128-token answers trip in 96% of
cases at a = 0.1, 17-20% at a = 0.2, 1-2% at a = 0.3 and under 1% at a = 0.4 (k = 2
and 5). A tripped request costs its steps so far plus plain decoding, and its output is
the same (the draft length never changes what is emitted).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from drafters.stats import GenerationStats

DEFAULT_BREAK_EVEN = 0.2
DEFAULT_CONFIDENCE = 0.95
DEFAULT_MIN_EVIDENCE = 8


def probability_below(x: float, successes: int, failures: int) -> float:
    """P(a < x) for a ~ Beta(successes + 1, failures + 1): the probability that a
    Binomial(successes + failures + 1, x) reaches successes + 1 (integer parameters)."""
    n = successes + failures + 1
    return sum(math.comb(n, j) * x**j * (1.0 - x) ** (n - j) for j in range(successes + 1, n + 1))


@dataclass
class LossGuard:
    """A draft-length schedule (``engine.DraftLengthSchedule``): ``k`` until the request's
    acceptance is clearly below ``break_even`` (module doc), then 0 for good."""

    k: int
    break_even: float = DEFAULT_BREAK_EVEN
    confidence: float = DEFAULT_CONFIDENCE
    min_evidence: int = DEFAULT_MIN_EVIDENCE
    tripped_at_step: int | None = None
    _seen_steps: int = field(default=0, repr=False)
    _successes: int = field(default=0, repr=False)
    _failures: int = field(default=0, repr=False)

    def __post_init__(self) -> None:
        if self.k < 0:
            raise ValueError(f"draft length must be >= 0, got {self.k}")
        if not 0.0 < self.break_even < 1.0:
            raise ValueError(f"break_even must be in (0, 1), got {self.break_even}")
        if not 0.5 <= self.confidence < 1.0:
            raise ValueError(f"confidence must be in [0.5, 1), got {self.confidence}")

    def __call__(self, steps: int, stats: GenerationStats) -> int:
        if self.tripped_at_step is not None:
            return 0
        self._count(stats)
        if self._successes + self._failures >= self.min_evidence and (
            probability_below(self.break_even, self._successes, self._failures) >= self.confidence
        ):
            self.tripped_at_step = steps
            return 0
        return self.k

    def _count(self, stats: GenerationStats) -> None:
        """Take in the steps recorded since the last call."""
        drafted = stats.drafted_per_step
        accepted = stats.accepted_per_step
        for i in range(self._seen_steps, len(drafted)):
            if drafted[i] > 0:
                self._successes += accepted[i]
                self._failures += accepted[i] < drafted[i]
        self._seen_steps = len(drafted)
