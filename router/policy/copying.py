"""Per-position posteriors of a copy drafter (prompt lookup) in one context.

A copy drafter's step finds a match and copies up to k tokens, or drafts nothing
(``speedup.py``, "copy drafters"). Per (context, copy drafter) and position i = 1..K:

    c_i ~ Beta   the chance that the step drafts position i given it drafted i - 1
                 (c_1: that the lookup matches),
    a_i ~ Beta   the chance that drafted token i is accepted given 1..i-1 were.

Evidence from a step that asked for k drafts, drafted m <= k and had n <= m accepted
(censored: a step says nothing of the positions it did not reach):

    c_i:  a success for i <= m, a failure at i = m + 1 when m < k,
    a_i:  a success for i <= n, a failure at i = n + 1 when n < m.

A counterfactual score gives only n at draft length k: a failure at n + 1 (n < k) is
either "not drafted" or "drafted and rejected", which the score cannot tell apart. So it
teaches a only: successes for i <= n, and the failure at n + 1 weighted by the chance
that the step drafted and was rejected, c (1 - a) / (1 - c a) at the position's
posterior means (the expected count of an EM step); c is learnt from the drafter's own
outcomes alone, which count the steps that drafted nothing. Were c learnt from scores
too, its split would have nothing to pin it and would drift below 1 with the prior,
pricing the verify step of drafts that are in fact made too cheaply.

The evidence is discounted like the scalar posterior (``acceptance.py``): before each
update every count is multiplied by the gamma of that update. The Beta of a position is
its evidence plus a prior of weight w borrowed from the position before it:

    position 1:   a_1 from the drafter's own prior (alpha0, beta0); c_1 from "it drafts",
                  "kept" below: until its own outcomes show steps that draft nothing, a
                  copy drafter is priced as one that drafts every step (the dearer
                  verify step), and one request's steps outweigh that prior;
    position 2:   "kept" for both, mean 0.999 and weight w: a copy whose first token was
                  right is expected to go on and be kept (what a copy is), until steps
                  reach position 2; the first position says little of the others (a_1
                  is "is this the right copy", a_2.. "does the copy go on matching");
    i >= 3:       mean m_{i-1} of position i - 1 (evidence and prior), prior w (m, 1 - m)
                  (m kept within [0.001, 0.999]),

so a position no step has reached yet is expected to behave like the last one reached
(a copy kept whole so far is expected to go on being kept, one rejected after a few
tokens to be rejected again), with a spread that Thompson draws explore, and its own
evidence outweighs the prior after a few steps.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from router.policy.speedup import FloatArray

#: Rows of the evidence and posterior arrays [4, K].
C_SUCCESS, C_FAILURE, A_SUCCESS, A_FAILURE = range(4)
#: A borrowed prior mean is kept this far from 0 and 1 (a mean of 1 would give Beta(w, 0)).
MEAN_FLOOR = 1e-3


def step_counts(
    drafted_per_step: Sequence[int], accepted_per_step: Sequence[int], k: int, positions: int
) -> FloatArray:
    """Evidence [4, positions] of steps that asked for ``k`` drafts (module doc); positions
    past ``positions`` are not modelled and ``k`` is clipped to it."""
    counts = np.zeros((4, positions))
    if not drafted_per_step or k <= 0:
        return counts
    k = min(int(k), positions)
    drafted = np.minimum(np.asarray(drafted_per_step, dtype=np.int64), k)
    accepted = np.minimum(np.asarray(accepted_per_step, dtype=np.int64), drafted)
    # reached[j] = #{steps: value >= j + 1}, the successes at position j + 1.
    for row, values in ((C_SUCCESS, drafted), (A_SUCCESS, accepted)):
        histogram = np.bincount(values, minlength=positions + 1)[: positions + 1]
        counts[row] = histogram[::-1].cumsum()[::-1][1:]
    stopped = drafted[drafted < k]  # a failure of c at position m + 1
    counts[C_FAILURE] = np.bincount(stopped, minlength=positions)[:positions]
    rejected = accepted[accepted < drafted]  # a failure of a at position n + 1
    counts[A_FAILURE] = np.bincount(rejected, minlength=positions)[:positions]
    return counts


def counterfactual_counts(
    accepted_per_step: Sequence[int],
    k: int,
    positions: int,
    continuation: FloatArray,
    acceptance: FloatArray,
) -> FloatArray:
    """Evidence [4, positions] of counterfactual steps at draft length ``k`` that accepted
    ``accepted_per_step``: acceptance only, the failure at n + 1 weighted by the chance
    that the step drafted, from the posterior means ``continuation`` and ``acceptance``
    [positions] (module doc); the continuation rows stay 0."""
    counts = np.zeros((4, positions))
    if not accepted_per_step or k <= 0:
        return counts
    k = min(int(k), positions)
    accepted = np.minimum(np.asarray(accepted_per_step, dtype=np.int64), k)
    histogram = np.bincount(accepted, minlength=positions + 1)[: positions + 1]
    reached = histogram[::-1].cumsum()[::-1][1:]
    failures = np.bincount(accepted[accepted < k], minlength=positions)[:positions]
    c, a = continuation, acceptance
    not_drafted = (1.0 - c) / np.maximum(1.0 - c * a, 1e-12)
    counts[A_SUCCESS] = reached
    counts[A_FAILURE] = failures * (1.0 - not_drafted)
    return counts


def chained_posterior(
    evidence: FloatArray,
    acceptance_prior: tuple[float, float],
    continuation_prior: tuple[float, float],
    weight: float,
) -> FloatArray:
    """The Beta parameters [4, K] (rows as the evidence: alpha_c, beta_c, alpha_a, beta_a)
    of ``evidence`` with the priors of the module doc: ``acceptance_prior`` and
    ``continuation_prior`` at position 1, "kept" (``kept_prior``) at position 2, each
    later one borrowed from the position before it."""
    rows: list[tuple[float, float, float, float]] = []
    c_prior, a_prior = continuation_prior, acceptance_prior
    # Python floats: a 16-position chain costs a few microseconds this way.
    for i, (c_success, c_failure, a_success, a_failure) in enumerate(
        zip(*evidence.tolist(), strict=True)
    ):
        c_alpha, c_beta = c_success + c_prior[0], c_failure + c_prior[1]
        a_alpha, a_beta = a_success + a_prior[0], a_failure + a_prior[1]
        rows.append((c_alpha, c_beta, a_alpha, a_beta))
        if i == 0:  # position 2: what a copy does once its first token is kept
            c_prior = a_prior = kept_prior(weight)
            continue
        # Kept inside [MEAN_FLOOR, 1 - MEAN_FLOOR] so the next prior stays a proper Beta.
        c_mean = min(max(c_alpha / (c_alpha + c_beta), MEAN_FLOOR), 1.0 - MEAN_FLOOR)
        a_mean = min(max(a_alpha / (a_alpha + a_beta), MEAN_FLOOR), 1.0 - MEAN_FLOOR)
        c_prior = (weight * c_mean, weight * (1.0 - c_mean))
        a_prior = (weight * a_mean, weight * (1.0 - a_mean))
    return np.array(rows, dtype=np.float64).T.reshape(4, evidence.shape[1])


def kept_prior(weight: float) -> tuple[float, float]:
    """Beta(w (1 - MEAN_FLOOR), w MEAN_FLOOR): mean 0.999, weight w ("it goes on")."""
    return weight * (1.0 - MEAN_FLOOR), weight * MEAN_FLOOR


class CopyPositions:
    """One (context, copy drafter): discounted evidence per position and its posterior."""

    def __init__(
        self,
        positions: int,
        acceptance_prior: tuple[float, float],
        continuation_prior: tuple[float, float],
        weight: float,
        evidence: FloatArray | None = None,
    ) -> None:
        self.acceptance_prior = (float(acceptance_prior[0]), float(acceptance_prior[1]))
        self.continuation_prior = (float(continuation_prior[0]), float(continuation_prior[1]))
        self.weight = float(weight)
        self.evidence = np.zeros((4, positions))
        if evidence is not None:
            columns = min(positions, evidence.shape[1])
            self.evidence[:, :columns] = evidence[:, :columns]
        self.posterior = self._derive()

    @property
    def positions(self) -> int:
        return int(self.evidence.shape[1])

    def _derive(self) -> FloatArray:
        return chained_posterior(
            self.evidence, self.acceptance_prior, self.continuation_prior, self.weight
        )

    def means(self) -> tuple[FloatArray, FloatArray]:
        """Posterior means (c_i, a_i), [K] each."""
        p = self.posterior
        return (
            p[C_SUCCESS] / (p[C_SUCCESS] + p[C_FAILURE]),
            p[A_SUCCESS] / (p[A_SUCCESS] + p[A_FAILURE]),
        )

    def observe(self, counts: FloatArray, gamma: float) -> None:
        """Discount the evidence by ``gamma``, add ``counts`` [4, K], derive the posterior."""
        self.evidence *= gamma
        self.evidence += counts
        self.posterior = self._derive()

    def to_list(self) -> list[list[float]]:
        return [[float(x) for x in row] for row in self.evidence]


def evidence_from_list(rows: Sequence[Sequence[float]]) -> FloatArray:
    """A saved evidence array [4, K] (``CopyPositions.to_list``), checked."""
    evidence = np.asarray(rows, dtype=np.float64)
    if evidence.ndim != 2 or evidence.shape[0] != 4 or not np.all(np.isfinite(evidence)):
        raise ValueError(f"copy evidence must be 4 rows of finite counts, got {evidence.shape}")
    return np.maximum(evidence, 0.0)
