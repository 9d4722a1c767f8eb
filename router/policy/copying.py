"""Posteriors of a copy drafter (prompt lookup) in one context: how often a run of
copied tokens starts, and how long it goes on.

A copy drafter's step finds a match and copies up to k tokens, or drafts nothing
(``speedup.py``, "copy drafters"). What does not depend on k is the **run**: from where
a lookup starts, the number R of tokens the copy matches the target's output (0: the
first copied token is wrong). At draft length k a run of R tokens takes
floor(R / (k + 1)) + 1 steps and emits R + 1 tokens (each full step's bonus token is the
copy's next one; the last step ends with the target's correction). Per (context, copy
drafter):

    c ~ Beta     that a run start finds a match (an unmatched start drafts nothing),
    h_i ~ Beta   that a matched run goes on to token i given it reached i - 1
                 (i = 1..H, H = 4 copy_k_max: h_1 is "the first copied token is kept").

Runs are read back from a request's steps at draft length k (drafted m, accepted n):
a step with m = 0 at a run start is an unmatched start; a full step (m = k, n = k) goes
on into the next step, adding k + 1 tokens; any other step ends the run with R = the
tokens so far + n. The last run of a request, and a run whose step drafted fewer than k
(an end-of-turn token, the last tokens of the budget) and had them all accepted, are
censored: they say R >= what was seen, not where it ended. Evidence:

    c:    a success per matched start, a failure per unmatched one,
    h_i:  a success for i <= R, a failure at i = R + 1 unless censored (R < H).

A step-level model (per-position acceptance of a step's i-th draft) is biased here: the
share of steps that match depends on k (a repeated stretch is split into more steps at
a small k), which run counts do not. On real n-gram steps of the default world's held-out
prompts, runs read at k = 16 or at k = 4 predict the tokens per step at every k to within
about 0.01-0.1 (``docs/policy.md``).

A counterfactual score with the drafted counts per step (the sidecar's lookup scores
them, ``drafters.base.DraftCounter``) is read with ``run_counts`` as the drafter's own
outcome is. A score of accepts alone gives only n per step at draft length k: a run
start with n = 0 is either unmatched or a match rejected at once, which it cannot tell
apart. So it teaches h only: that start counts as a failure at h_1 weighted by the
chance that it was a match, c (1 - h_1) / (1 - c h_1) at the posterior means (the
expected count of an EM step); c is learnt from outcomes that count the steps that
drafted nothing (learnt from such scores, c would drift with its prior).

The evidence is discounted like the scalar posterior (``acceptance.py``): before each
update every count is multiplied by the gamma of that update. The Beta of each
parameter is its evidence plus a prior of weight w:

    c:         "it matches", mean 0.999 and weight w ("kept" below): until the drafter's
               own outcomes show starts that draft nothing, it is priced as one that
               drafts every step (the dearer verify step); one request outweighs it;
    h_1:       the drafter's own prior (alpha0, beta0);
    h_2:       "kept", mean 0.999 and weight w: a copy whose first token was right is
               expected to go on (what a copy is); h_1 says little of the others;
    h_i, i>=3: mean m_{i-1} of h_{i-1} (evidence and prior), prior w (m, 1 - m)
               (m kept within [0.001, 0.999]),

so a run length no run has reached is expected to go on like the last one reached, with
a spread that Thompson draws explore, and its own evidence outweighs the prior after a
few runs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from router.policy.speedup import FloatArray

#: Rows of the evidence and posterior arrays [4, K].
C_SUCCESS, C_FAILURE, A_SUCCESS, A_FAILURE = range(4)
#: A borrowed prior mean is kept this far from 0 and 1 (a mean of 1 would give Beta(w, 0)).
MEAN_FLOOR = 1e-3


def runs_of_steps(
    drafted_per_step: Sequence[int],
    accepted_per_step: Sequence[int],
    k: int,
    requested_per_step: Sequence[int] = (),
) -> list[tuple[bool, int, bool]]:
    """(matched, R, censored) of each run start in a request's steps at draft length k
    (module doc). A step that asked for no draft (``requested_per_step`` 0: the loss
    guard's k' = 0, a last step capped at 0) is no start, matched or not, and a run it
    meets ends there censored: nothing was looked up (read as unmatched starts, such
    steps sank c with the length of the output, not with lookups that failed)."""
    runs: list[tuple[bool, int, bool]] = []
    run: int | None = None
    requested = requested_per_step or (k,) * len(accepted_per_step)
    for drafted, accepted, asked in zip(
        drafted_per_step, accepted_per_step, requested, strict=True
    ):
        if asked <= 0:
            if run is not None:
                runs.append((True, run, True))
                run = None
            continue
        if run is None and drafted <= 0:
            runs.append((False, 0, False))
            continue
        run = (run or 0) + accepted
        if drafted >= asked and accepted >= drafted:
            # A full step (as long as it asked: the loss guard's k' < k is one too): its
            # bonus token is the copy's next, the run goes on.
            run += 1
        elif accepted >= drafted > 0:
            runs.append((True, run, True))  # the draft was cut short, not refuted
            run = None
        else:
            runs.append((True, run, False))
            run = None
    if run is not None:
        runs.append((True, run, True))  # the request ended inside the run
    return runs


def _add_run(counts: FloatArray, length: int, censored: bool, weight: float = 1.0) -> None:
    reached = min(length, counts.shape[1])
    counts[A_SUCCESS, :reached] += weight
    if not censored and length < counts.shape[1]:
        counts[A_FAILURE, length] += weight


def run_counts(
    drafted_per_step: Sequence[int],
    accepted_per_step: Sequence[int],
    k: int,
    positions: int,
    requested_per_step: Sequence[int] = (),
) -> FloatArray:
    """Evidence [4, positions] of a request's steps at draft length ``k`` (module doc):
    c in column 0 of the first two rows, h_i in column i - 1 of the last two."""
    counts = np.zeros((4, positions))
    if k <= 0:
        return counts
    runs = runs_of_steps(drafted_per_step, accepted_per_step, k, requested_per_step)
    for matched, length, censored in runs:
        if not matched:
            counts[C_FAILURE, 0] += 1.0
            continue
        counts[C_SUCCESS, 0] += 1.0
        _add_run(counts, length, censored)
    return counts


def counterfactual_counts(
    accepted_per_step: Sequence[int], k: int, positions: int, match: float, first: float
) -> FloatArray:
    """Evidence [4, positions] of counterfactual steps at draft length ``k`` that accepted
    ``accepted_per_step``: h only, a run start with nothing accepted weighted by the
    chance that it was a match rejected at once, from the posterior means ``match`` (c)
    and ``first`` (h_1) (module doc); the c rows stay 0."""
    counts = np.zeros((4, positions))
    if k <= 0 or not accepted_per_step:
        return counts
    matched = match * (1.0 - first) / max(1.0 - match * first, 1e-12)
    drafted = [k] * len(accepted_per_step)
    accepted = [min(int(a), k) for a in accepted_per_step]
    for _, length, censored in runs_of_steps(drafted, accepted, k):
        _add_run(counts, length, censored, matched if length == 0 else 1.0)
    return counts


def chained_posterior(
    evidence: FloatArray,
    acceptance_prior: tuple[float, float],
    continuation_prior: tuple[float, float],
    weight: float,
) -> FloatArray:
    """The Beta parameters [4, H] (rows as the evidence: alpha_c, beta_c, alpha_h, beta_h;
    c in column 0) of ``evidence`` with the priors of the module doc:
    ``acceptance_prior`` for h_1 and ``continuation_prior`` for c, "kept"
    (``kept_prior``) for h_2, each later h_i borrowed from h_{i-1}."""
    rows: list[tuple[float, float, float, float]] = []
    c_prior, a_prior = continuation_prior, acceptance_prior
    # Python floats: a chain of H run lengths costs a few microseconds this way.
    for i, (c_success, c_failure, a_success, a_failure) in enumerate(
        zip(*evidence.tolist(), strict=True)
    ):
        c_alpha, c_beta = c_success + c_prior[0], c_failure + c_prior[1]
        a_alpha, a_beta = a_success + a_prior[0], a_failure + a_prior[1]
        rows.append((c_alpha, c_beta, a_alpha, a_beta))
        if i == 0:  # h_2: what a copy does once its first token is kept
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


class CopyRuns:
    """One (context, copy drafter): discounted evidence of c and h_1..h_H and the
    posterior it gives (rows alpha_c, beta_c, alpha_h, beta_h; c in column 0)."""

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
        """Posterior means of the c and h rows, [H] each (c in column 0)."""
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
    """A saved evidence array [4, K] (``CopyRuns.to_list``), checked."""
    evidence = np.asarray(rows, dtype=np.float64)
    if evidence.ndim != 2 or evidence.shape[0] != 4 or not np.all(np.isfinite(evidence)):
        raise ValueError(f"copy evidence must be 4 rows of finite counts, got {evidence.shape}")
    return np.maximum(evidence, 0.0)
