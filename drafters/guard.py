"""Cutting a request's losses: shorter drafts, then none, once its own drafts say the
router's draft length does not pay for this request.

The router picks a (drafter, k) per request from what the drafter accepted on earlier
requests of the same cluster. A request unlike them (a prompt the drafters were never
trained for, an answer that wanders off) may accept far less, and every step then pays
k drafter forwards and a wider target forward for little more than one token: at k = 3
to 8 a long answer decodes 1.5-3x slower than plainly. The guard watches the request's
own drafts and shortens them when even an optimistic reading of its acceptance says a
shorter draft pays more.

Within the request, per-token acceptance a has a Beta(1, 1) prior and the
truncated-geometric evidence of its steps so far (s accepted drafts, f steps whose draft
was rejected at some position, as the router's posterior counts them). Costs come from
the request's own timings, in units of t, its target step with the draft positions taken
off: a drafted token costs
c = (draft time per drafted token) / t and a verify of j drafts t (1 + slope j), with
t = (verify time per step) / (1 + slope * drafts per step) over its steps that drafted
something. Before each step, once
there are ``min_evidence`` observations, the guard takes the upper ``confidence``
quantile a+ of the posterior and drafts

    k' = argmax_{j = 0..k} S(a+, j),   S(a, j) = q (1 + a + ... + a^j) / (1 + (c + slope) j)

(S(a, 0) = 1; where the drafter times the forwards after each draft's first apart, c is
their cost per forward and the denominator adds the first forward's excess over it once
for j >= 1: ``draft_lead``), q the plain step's cost in units of t (``plain_step_ratio``: a
one-position forward may cost less than t, the intercept of the verify line; on the
built-in world on a CPU q ~ 0.7; the policy measures it and the sidecar passes it in, 1
where nothing measured it): a shorter draft only when even the optimistic a+ prefers it, and k' = 0,
plain decoding for the rest of the request, only when even a+ says no draft pays. k' may
grow back to k while it is above 0. The output is the same whatever the draft length
(lossless); what changes is the time of a request the router misjudged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.special import betaincinv

from drafters.stats import GenerationStats

DEFAULT_CONFIDENCE = 0.95
DEFAULT_MIN_EVIDENCE = 8
DEFAULT_VERIFY_SLOPE = 0.05


def step_speedups(
    acceptance: float,
    k: int,
    draft_cost: float,
    verify_slope: float,
    plain_step: float = 1.0,
    lead: float = 0.0,
) -> np.ndarray:
    """S(a, j) for j = 0..k (module doc), with S(a, 0) = 1; ``plain_step`` is q, ``lead``
    what a draft's first forward costs above ``draft_cost``, once per drafting step."""
    j = np.arange(k + 1)
    tokens = np.cumsum(acceptance ** j.astype(np.float64))
    speedups = plain_step * tokens / (1.0 + lead + (draft_cost + verify_slope) * j)
    speedups[0] = 1.0
    return speedups


@dataclass
class LossGuard:
    """A draft-length schedule (``engine.DraftLengthSchedule``) starting at ``k`` and
    shortened by the request's own acceptance and costs (module doc)."""

    k: int
    confidence: float = DEFAULT_CONFIDENCE
    min_evidence: int = DEFAULT_MIN_EVIDENCE
    verify_slope: float = DEFAULT_VERIFY_SLOPE
    # A drafted token's cost in units of t (module doc), fixed, instead of the request's
    # measured times: the schedule is then a function of the counts alone, as a sampled
    # run needs to be repeatable from its seed (the draws it consumes follow each step's k).
    draft_cost_ratio: float | None = None
    # q: a plain step's cost in units of a speculative step's intercept, as the policy
    # measures it with its verify slope ``plain_step_slope`` (None: this guard's own
    # ``verify_slope``); converted to this guard's unit per request (``plain_step``).
    plain_step_ratio: float = 1.0
    plain_step_slope: float | None = None
    tripped_at_step: int | None = None  # the step from which it drafts nothing
    shortest: int | None = None  # the shortest draft it asked for (None: never shortened)
    _seen_steps: int = field(default=0, repr=False)
    _successes: int = field(default=0, repr=False)
    _failures: int = field(default=0, repr=False)

    def __post_init__(self) -> None:
        if self.k < 0:
            raise ValueError(f"draft length must be >= 0, got {self.k}")
        if not 0.5 <= self.confidence < 1.0:
            raise ValueError(f"confidence must be in [0.5, 1), got {self.confidence}")
        if self.verify_slope < 0:
            raise ValueError(f"verify_slope must be >= 0, got {self.verify_slope}")
        if self.draft_cost_ratio is not None and self.draft_cost_ratio < 0:
            raise ValueError(f"draft_cost_ratio must be >= 0, got {self.draft_cost_ratio}")
        if not self.plain_step_ratio > 0:
            raise ValueError(f"plain_step_ratio must be > 0, got {self.plain_step_ratio}")
        if self.plain_step_slope is not None and self.plain_step_slope < 0:
            raise ValueError(f"plain_step_slope must be >= 0, got {self.plain_step_slope}")

    def __call__(self, steps: int, stats: GenerationStats) -> int:
        if self.tripped_at_step is not None:
            return 0
        self._count(stats)
        if self._successes + self._failures < self.min_evidence:
            return self.k
        optimistic = float(betaincinv(self._successes + 1, self._failures + 1, self.confidence))
        speedups = step_speedups(
            optimistic,
            self.k,
            self.draft_cost(stats),
            self.verify_slope,
            self.plain_step(stats),
            self.draft_lead(stats),
        )
        k = int(np.argmax(speedups))
        if k == 0:
            self.tripped_at_step = steps
        if k < self.k:
            self.shortest = k if self.shortest is None else min(self.shortest, k)
        return k

    def plain_step(self, stats: GenerationStats) -> float:
        """q in this guard's unit: the policy's unit is the verify step over
        (1 + s kbar) with its own slope s, this guard's over (1 + verify_slope kbar), so
        q (1 + verify_slope kbar) / (1 + s kbar) at the request's kbar so far."""
        q, slope = self.plain_step_ratio, self.plain_step_slope
        steps = stats.steps - stats.plain_steps
        if slope is None or steps <= 0:
            return q
        kbar = stats.drafted / steps
        return q * (1.0 + self.verify_slope * kbar) / (1.0 + slope * kbar)

    def draft_cost(self, stats: GenerationStats) -> float:
        """c: the request's draft time per drafted token over its unit t (module doc; or
        ``draft_cost_ratio`` when fixed); where its drafter timed the forwards after each
        draft's first apart, their time per forward (the first one's excess over it is
        ``draft_lead``)."""
        if self.draft_cost_ratio is not None:
            return self.draft_cost_ratio
        unit = self._unit(stats)
        if unit is None:
            return 0.0
        if stats.lead_steps and stats.further_forwards:
            return stats.further_time_s / stats.further_forwards / unit
        return stats.draft_time_s / stats.drafted / unit

    def draft_lead(self, stats: GenerationStats) -> float:
        """What a draft's first forward (the drafter's catch-up) costs above c, in units
        of t, where the request timed it apart; 0 otherwise, or with a fixed cost. Priced
        at one mean per token, a shorter draft than the one served looked cheaper than it
        is."""
        if self.draft_cost_ratio is not None or not stats.lead_steps or not stats.further_forwards:
            return 0.0
        unit = self._unit(stats)
        if unit is None:
            return 0.0
        return stats.lead_time_s / stats.lead_steps / unit - self.draft_cost(stats)

    def _unit(self, stats: GenerationStats) -> float | None:
        """t: the request's target step with the draft positions taken off, in seconds,
        over its steps that drafted something (a step without drafts is a one-position
        forward, timed apart as ``plain_verify_time_s``, no point of the verify line);
        None before any."""
        drafted = stats.drafted
        steps = stats.steps - stats.plain_steps
        verify_time = stats.verify_time_s - stats.plain_verify_time_s
        if drafted <= 0 or steps <= 0 or verify_time <= 0:
            return None
        return verify_time / steps / (1.0 + self.verify_slope * drafted / steps)

    def _count(self, stats: GenerationStats) -> None:
        """Take in the steps recorded since the last call. A step with no draft (an n-gram
        drafter without a match) is left out: it says nothing about how long a draft to
        ask for, which is all the guard decides (the policy, choosing between drafters,
        counts it as a rejection: ``Outcome.acceptance_counts``)."""
        drafted = stats.drafted_per_step
        accepted = stats.accepted_per_step
        for i in range(self._seen_steps, len(drafted)):
            if drafted[i] > 0:
                self._successes += accepted[i]
                self._failures += accepted[i] < drafted[i]
        self._seen_steps = len(drafted)
