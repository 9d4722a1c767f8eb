"""Beta posteriors over per-token acceptance, one per (context, drafter).

Likelihood: a step drafting k tokens that accepts n of them has probability
a^n (1 - a) when n < k and a^k when n = k (a geometric law truncated at k), so a
Beta(alpha, beta) prior stays conjugate:

    alpha <- alpha + n,   beta <- beta + [n < k].

Discounting (drift): before an arm's update its evidence shrinks toward its prior,

    alpha <- alpha0 + gamma * (alpha - alpha0),   beta <- beta0 + gamma * (beta - beta0),

so the posterior weighs roughly the last 1 / (1 - gamma) updates of that arm.

Change detection: a request whose acceptance a_hat = n_s / (n_s + n_f) is far from the
posterior mean m, z = |a_hat - m| / sqrt(max(v, m (1 - m) / (n_s + n_f))) > z0, with v an
EWMA of past squared residuals of that arm (between-request spread), is discounted with
the faster ``gamma_drift`` instead: after a real change the old evidence fades in a few
requests, while ordinary request-to-request spread keeps the slow gamma.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

#: Starting between-request variance of acceptance (a spread of 0.1) before any residual.
INITIAL_RESIDUAL_VAR = 0.01
#: EWMA weight of a new squared residual in the between-request variance.
RESIDUAL_WEIGHT = 0.05
#: ``ContextArms.scored_at`` of an arm no counterfactual score has reached.
NEVER_SCORED = -1


def counts_from_steps(accepted_per_step: Sequence[int], draft_length: int) -> tuple[int, int]:
    """(successes, failures) of steps that all drafted ``draft_length`` tokens."""
    successes = 0
    failures = 0
    for accepted in accepted_per_step:
        n = min(int(accepted), draft_length)
        successes += n
        failures += n < draft_length
    return successes, failures


def cap_evidence(successes: float, failures: float, cap: float | None) -> tuple[float, float]:
    """Scale one request's counts down to at most ``cap`` pseudo-observations.

    Acceptance varies between requests more than a single Beta allows (over-dispersion),
    so one long request should not count as thousands of independent tokens.
    """
    total = successes + failures
    if cap is None or total <= cap:
        return float(successes), float(failures)
    scale = cap / total
    return successes * scale, failures * scale


@dataclass(frozen=True)
class PriorSettings:
    """How priors are formed: neutral Beta, and the similarity-based cold start."""

    alpha: float = 1.0
    beta: float = 1.0
    similarity_weight: float = 8.0
    similarity_low: float = 0.2
    similarity_high: float = 0.9

    def neutral(self) -> tuple[float, float]:
        return self.alpha, self.beta

    def from_similarity(self, similarity: Mapping[str, float], cluster: str) -> tuple[float, float]:
        """Prior for ``cluster`` from a drafter's sample-to-cluster similarities.

        Similarities are rescaled over the clusters given, r = (s - min) / (max - min),
        and the prior mean is ``low + (high - low) * r`` with weight ``similarity_weight``:
        the best-matching cluster expects a strong drafter, the others a weak one.
        Unknown clusters (or flat similarities) get the neutral prior.
        """
        if cluster not in similarity or len(similarity) < 2:
            return self.neutral()
        values = list(similarity.values())
        spread = max(values) - min(values)
        if spread <= 1e-9:
            return self.neutral()
        relative = (similarity[cluster] - min(values)) / spread
        mean = self.similarity_low + (self.similarity_high - self.similarity_low) * relative
        return mean * self.similarity_weight, (1.0 - mean) * self.similarity_weight


class ContextArms:
    """Posterior arrays of one context, indexed like the policy's drafter list."""

    def __init__(self, alpha0: np.ndarray, beta0: np.ndarray) -> None:
        self.alpha0 = np.asarray(alpha0, dtype=np.float64).copy()
        self.beta0 = np.asarray(beta0, dtype=np.float64).copy()
        self.alpha = self.alpha0.copy()
        self.beta = self.beta0.copy()
        self.decisions: np.ndarray = np.zeros(self.alpha.shape, dtype=np.int64)
        self.residual_var: np.ndarray = np.full(self.alpha.shape, INITIAL_RESIDUAL_VAR)
        # ``requests`` when the arm last had a counterfactual score (-1: never).
        self.scored_at: np.ndarray = np.full(self.alpha.shape, NEVER_SCORED, dtype=np.int64)
        # The drafter of the context's last served request (not saved): a counterfactual
        # score of that request tells of it too (``mark_scored``).
        self.served: int | None = None
        self.none_decisions = 0
        self.requests = 0

    def mean(self) -> np.ndarray:
        return self.alpha / (self.alpha + self.beta)

    def observe(self, index: int, successes: float, failures: float, gamma: float) -> None:
        """Discount arm ``index`` toward its prior, then add the new counts."""
        self.alpha[index] = self.alpha0[index] + gamma * (self.alpha[index] - self.alpha0[index])
        self.beta[index] = self.beta0[index] + gamma * (self.beta[index] - self.beta0[index])
        self.alpha[index] += successes
        self.beta[index] += failures

    def mark_scored(self, index: int) -> None:
        """Arm ``index`` had a counterfactual score: it and the context's last served arm
        (the scored request's, unless another request of the context was learnt since)
        are known as of now."""
        self.scored_at[index] = self.requests
        if self.served is not None:
            self.scored_at[self.served] = self.requests

    def informed(self, window: int) -> np.ndarray:
        """Per arm: whether a counterfactual score reached it within the context's last
        ``window`` requests (bool array)."""
        return (self.scored_at >= 0) & (self.requests - self.scored_at < window)

    def surprise(self, index: int, successes: float, failures: float, clip_z: float = 3.0) -> float:
        """z-score of this request's acceptance against the posterior mean; tracks the spread.

        Residuals beyond ``clip_z`` spreads are outliers and leave the spread alone, so a
        persistent change stays surprising until the posterior mean has caught up.
        """
        n = successes + failures
        if n <= 0:
            return 0.0
        mean = self.alpha[index] / (self.alpha[index] + self.beta[index])
        squared = (successes / n - mean) ** 2
        variance = max(float(self.residual_var[index]), mean * (1.0 - mean) / n)
        if squared <= clip_z**2 * variance:
            self.residual_var[index] += RESIDUAL_WEIGHT * (squared - self.residual_var[index])
        return float(np.sqrt(squared / variance))

    def append(self, alpha0: float, beta0: float) -> None:
        """Add a drafter column with its prior."""
        self.alpha0 = np.append(self.alpha0, alpha0)
        self.beta0 = np.append(self.beta0, beta0)
        self.alpha = np.append(self.alpha, alpha0)
        self.beta = np.append(self.beta, beta0)
        self.decisions = np.append(self.decisions, 0)
        self.residual_var = np.append(self.residual_var, INITIAL_RESIDUAL_VAR)
        self.scored_at = np.append(self.scored_at, NEVER_SCORED)

    def delete(self, index: int) -> None:
        """Drop a drafter column."""
        self.served = None
        for name in ("alpha0", "beta0", "alpha", "beta", "decisions", "residual_var", "scored_at"):
            setattr(self, name, np.delete(getattr(self, name), index))

    def to_dict(self, drafters: Sequence[str]) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "none_decisions": self.none_decisions,
            "arms": {
                name: [
                    float(self.alpha[i]),
                    float(self.beta[i]),
                    float(self.alpha0[i]),
                    float(self.beta0[i]),
                    int(self.decisions[i]),
                    float(self.residual_var[i]),
                ]
                for i, name in enumerate(drafters)
            },
            # Beside "arms", whose rows builds before it read by position.
            "scored_at": {name: int(self.scored_at[i]) for i, name in enumerate(drafters)},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], drafters: Sequence[str]) -> ContextArms:
        arms = data["arms"]
        rows = np.array([arms[name] for name in drafters], dtype=np.float64).reshape(-1, 6)
        context = cls(rows[:, 2], rows[:, 3])
        context.alpha = rows[:, 0].copy()
        context.beta = rows[:, 1].copy()
        context.decisions = rows[:, 4].astype(np.int64)
        context.residual_var = rows[:, 5].copy()
        scored = data.get("scored_at") or {}  # absent in states saved before it
        context.scored_at = np.array(
            [int(scored.get(name, NEVER_SCORED)) for name in drafters], dtype=np.int64
        )
        context.requests = int(data["requests"])
        context.none_decisions = int(data["none_decisions"])
        return context
