"""Thompson sampling over drafters, with the draft length derived from the sampled acceptance.

Per (context, drafter) the per-token acceptance a has a Beta(alpha, beta) posterior
(truncated-geometric likelihood, discounted by gamma per update of the arm, by
gamma_drift when the request's acceptance is more than drift_z spreads away from the
posterior mean; see ``acceptance.py``). Costs are measured (``costs.StepRatios``), as
interquartile means of ratios taken within each request (the verify slope: a median), in
units of each request's speculative step intercept (a plain step is q of it, measured):
other work on the machine stretches a request's times
alike and leaves them be. A request in context c is decided by ``thompson_decisions``
over the eligible drafters d:

    a_d ~ Beta(alpha_cd, beta_cd)                            posterior draw
    S[d, k] = S_req(a_d, k),  k = 0..k_max                   expected speed-up
    (d*, k*) = argmax_{d, k} S[d, k]                         k* = 0 (drafter "none")
                                                             unless some S > 1

with (``speedup.py``) L(a, k) = (1 - a^(k+1)) / (1 - a) tokens per step and

    S_req(a, k) = (F_0 + N t_ar) / (F_d + (N / L(a, k)) (k t_draft + t_verify(k))),
    S_req(a, 0) = 1,

(where a drafter's first forward of a step is timed apart, k t_draft reads
t_lead + k t_draft: ``costs.StepRatios``, ``speedup.cost_gain``),
N the context's mean output length and F_0, F_d the measured fixed time per request of
plain decoding and of drafter d (``costs.RequestOverheads``): they decide whether drafting
pays for short outputs at all. Until a context has a measured output length (or with
``per_request`` off), F_0 = F_d = 0, where S_req is the per-step
S(a, k) = L(a, k) t_ar / (k t_draft + t_verify(k)). The decision is "explored" when
(d*, k*) differs from the same rule applied to the posterior means, and its
``expected_speedup`` is S at the posterior mean.

Copy drafters (``copy_drafters``: none by default here; the sidecar names its drafters of
kind ``ngram``, the prompt lookup, unless its config does) are priced by
their own model instead (``speedup.py`` and ``copying.py``, "copy drafters"): the chance
c that a lookup finds a match and the length R of the run of tokens the copy then
matches, through Beta posteriors of c and of the hazards h_i = P(R >= i | R >= i - 1),
read back from the outcomes' per-step drafts and accepts and drawn with the acceptances
above. At draft length k a run takes floor(R / (k + 1)) + 1 steps for R + 1 tokens, so

    S_req(k) = (F_0 + N t_ar) / (F_d + N E[cost](k) / E[tokens]),

E[tokens] = 1 + c E[R], E[cost](k) = t0 c E[run steps](k) + t_e (1 - c) + (t_draft + t1)
E[drafted](k) (t_e: an unmatched lookup's step, a one-position forward, as measured
within requests: ``StepRatios.empty_step``), for k
up to ``copy_k_max`` (16): runs longer than a few tokens make long drafts pay, which one
per-token acceptance cannot price. Model drafters keep k_max.

Drafters of one architecture (``cost_shape``, drafter -> key; the sidecar hints its model
drafters') share one measured cost per drafted token (``costs.StepRatios``).

Drafters served at one length only (``draft_length``: drafter -> k; a fleet replica runs
its drafter at the k it was started with) are priced and chosen at that k alone: the
other columns of their rows are left out of the argmax, so the arm compared is the one
that can be served. A k beyond the drafter's priced lengths (k_max, copy_k_max) is priced
at the longest one.

Full information: the sidecar scores the other drafters on each greedy request's verified
output (``update_counterfactual``), so every arm's posterior learns from every such request
whichever arm served it, and serving a worse arm teaches nothing the scores do not. An arm
that a score reached within its context's last ``scored_window`` requests (16; so does the
context's last served arm when a score arrives) is therefore decided at its posterior mean:
its draw is replaced by the mean. Arms no score reaches (sampled traffic, a fleet without
scoring, a fresh context, scoring that fell behind its budget) are drawn as above, and
``scored_window`` null draws every arm.

Cold start: a drafter added with ``similarity`` (cluster -> similarity of its fine-tuning
sample to the cluster) gets a prior whose mean grows with the similarity (weight
``similarity_weight``); without it, the neutral Beta(prior_alpha, prior_beta). A new
(cluster, length bucket) context starts from its cluster's other buckets, scaled to at
most ``transfer_weight`` pseudo-observations.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from router.policy.acceptance import (
    ContextArms,
    PriorSettings,
    cap_evidence,
    counts_from_steps,
)
from router.policy.base import (
    MAX_DRAFT_LENGTH,
    NONE_DRAFTER,
    STATE_VERSION,
    ArmSummary,
    Context,
    ContextSummary,
    Decision,
    DrafterHints,
    Outcome,
    check_drafter_name,
    check_state,
)
from router.policy.config_types import ServedLength
from router.policy.copying import (
    CopyRuns,
    counterfactual_counts,
    evidence_from_list,
    kept_prior,
    run_counts,
)
from router.policy.costs import RequestOverheads, StepRatios
from router.policy.speedup import (
    FloatArray,
    best_draft_length,
    copy_request_speedup,
    cost_gain,
    request_speedup,
    run_steps_matrix,
)

logger = logging.getLogger(__name__)

#: Drafters priced as copy drafters unless the config says otherwise: none, for a policy
#: that does not know its drafters' kinds; the sidecar configures its prompt-lookup
#: drafters (kind ``ngram``) as copy drafters (``router.policy.base.DrafterHints``).
DEFAULT_COPY_DRAFTERS: tuple[str, ...] = ()
#: A copy drafter's run lengths are modelled up to this many times its copy_k_max.
RUN_HORIZON_PER_K = 4
#: Requests of a context over which an arm's last counterfactual score keeps it decided
#: at its posterior mean (``scored_window``).
DEFAULT_SCORED_WINDOW = 16


#: The longest window of measured costs kept (each entry is saved with the policy's state).
MAX_WINDOW = 100_000
#: Bounds of the configuration's numbers (``ThompsonConfig``): a prior's or a transfer's
#: weight in pseudo-observations, a cost in plain target steps (a drafted token, or the
#: verify time one more draft token adds), a drift test's z.
MAX_WEIGHT = 1e6
MAX_COST_RATIO = 100.0
MAX_DRIFT_Z = 100.0
CostRatio = Annotated[float, Field(ge=0.0, le=MAX_COST_RATIO)]
Similarity = Annotated[float, Field(ge=-MAX_WEIGHT, le=MAX_WEIGHT)]


class ThompsonConfig(BaseModel):
    """JSON configuration of ``thompson`` (SetPolicy ``config_json``). Every number is
    finite and bounded: a value past these bounds overflowed the pricing or the learning
    (an OverflowError on Report), or made a state that cannot be saved as JSON."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    gamma: float = Field(0.99, gt=0.0, le=1.0)
    gamma_drift: float = Field(0.8, gt=0.0, le=1.0)
    drift_z: float | None = Field(3.0, gt=0.0, le=MAX_DRIFT_Z)
    k_max: int = Field(8, ge=1, le=MAX_DRAFT_LENGTH)
    seed: int | None = 0
    prior_alpha: float = Field(1.0, gt=0.0, le=MAX_WEIGHT)
    prior_beta: float = Field(1.0, gt=0.0, le=MAX_WEIGHT)
    similarity_weight: float = Field(8.0, gt=0.0, le=MAX_WEIGHT)
    similarity_low: float = Field(0.2, gt=0.0, lt=1.0)
    similarity_high: float = Field(0.9, gt=0.0, lt=1.0)
    evidence_cap: float | None = Field(None, gt=0.0, le=MAX_WEIGHT)
    transfer_weight: float = Field(16.0, ge=0.0, le=MAX_WEIGHT)
    cost_window: int = Field(512, ge=1, le=MAX_WINDOW)
    per_request: bool = True
    overhead_ewma: float = Field(0.05, gt=0.0, le=1.0)
    overhead_window: int = Field(16, ge=1, le=MAX_WINDOW)
    verify_slope_ratio: float = Field(0.05, ge=0.0, le=MAX_COST_RATIO)
    default_draft_cost_ratio: float = Field(0.1, ge=0.0, le=MAX_COST_RATIO)
    draft_cost_ratio: dict[str, CostRatio] = Field(default_factory=dict)
    similarity: dict[str, dict[str, Similarity]] = Field(default_factory=dict)
    copy_drafters: list[str] = Field(default_factory=lambda: list(DEFAULT_COPY_DRAFTERS))
    copy_k_max: int = Field(16, ge=1, le=MAX_DRAFT_LENGTH)
    draft_length: dict[str, ServedLength] = Field(default_factory=dict)
    cost_shape: dict[str, str] = Field(default_factory=dict)
    copy_prior_weight: float = Field(2.0, gt=0.0, le=MAX_WEIGHT)
    explore_length: Literal["mean", "draw"] = "mean"
    scored_window: int | None = Field(DEFAULT_SCORED_WINDOW, ge=1, le=MAX_WINDOW)

    @field_validator("cost_shape")
    @classmethod
    def _shape_is_no_plain_arm(cls, value: dict[str, str]) -> dict[str, str]:
        # Shapes key the fixed times beside the plain arm's: "none" would merge them.
        if NONE_DRAFTER in value.values():
            raise ValueError(f"a cost shape cannot be named {NONE_DRAFTER!r}")
        return value


@dataclass(frozen=True, slots=True)
class RequestPrices:
    """What S_req needs besides the acceptance, for R requests over D drafters."""

    t_ar: float
    gain: FloatArray  # [D, K + 1]: t_ar / (k t_draft + t_verify(k)), 1 at k = 0
    output_tokens: FloatArray  # [R]: N
    fixed_none: FloatArray  # [R]: F_0
    fixed_drafters: FloatArray  # [R, D]: F_d

    def speedups(self, acceptance: FloatArray) -> FloatArray:
        """S_req(a, k) for acceptances [..., R, D]: [..., R, D, K + 1]."""
        return request_speedup(
            acceptance,
            self.gain,
            t_ar=self.t_ar,
            output_tokens=self.output_tokens,
            fixed_none=self.fixed_none,
            fixed_drafters=self.fixed_drafters,
        )


@dataclass(frozen=True, slots=True)
class CopyTerms:
    """The copy drafters among the D drafters of a decision (``speedup.py``, "copy
    drafters"): their columns, run posteriors and step costs."""

    columns: tuple[int, ...]  # [Dc]: indices into the D drafters
    posterior: FloatArray  # [R, Dc, 4, H]: alpha_c, beta_c (column 0), alpha_h, beta_h
    t_draft: FloatArray  # [Dc]
    verify_line: tuple[float, float]  # t_verify(d) = t0 + t1 d for d >= 1 drafts
    t_unmatched: float  # a step whose lookup found nothing (a one-position forward)
    k_max: int  # draft lengths 1..k_max
    steps_matrix: FloatArray  # [H, k_max]: ``run_steps_matrix``

    def parameters(self) -> tuple[FloatArray, FloatArray]:
        """(alpha, beta) [R, Dc * (1 + H)]: per drafter c, then h_1..h_H."""
        rows = self.posterior.shape[0]
        alpha = np.concatenate([self.posterior[:, :, 0, :1], self.posterior[:, :, 2]], axis=-1)
        beta = np.concatenate([self.posterior[:, :, 1, :1], self.posterior[:, :, 3]], axis=-1)
        return alpha.reshape(rows, -1), beta.reshape(rows, -1)

    def speedups(self, values: FloatArray, prices: RequestPrices) -> FloatArray:
        """S_req(k) for values [..., R, Dc * (1 + H)] (as ``parameters``):
        [..., R, Dc, k_max + 1]."""
        runs = values.reshape(*values.shape[:-1], len(self.columns), -1)
        return copy_request_speedup(
            runs[..., 0],
            runs[..., 1:],
            k_max=self.k_max,
            t_ar=prices.t_ar,
            t_draft=self.t_draft,
            verify_line=self.verify_line,
            t_unmatched=self.t_unmatched,
            output_tokens=prices.output_tokens,
            fixed_none=prices.fixed_none,
            fixed_drafters=prices.fixed_drafters[:, list(self.columns)],
            steps_matrix=self.steps_matrix,
        )


def speedup_tables(
    acceptance: FloatArray,
    prices: RequestPrices,
    copy: CopyTerms | None = None,
    copy_values: FloatArray | None = None,
) -> FloatArray:
    """S_req [..., R, D, W] of every drafter for acceptances [..., R, D]; the copy
    drafters' rows are priced from their run parameters ``copy_values``
    [..., R, Dc * (1 + H)] (``CopyTerms.parameters``) instead. W = max(k_max, K) + 1; a
    drafter's columns past its own k_max repeat its k_max column (a k past the priced grid
    stands at its longest; argmax, taking the first of equals, still picks k_max): they
    were 0, and a model drafter served at one k past k_max (a fleet replica at k = 12)
    was priced 0 whenever a copy drafter widened the table, so never chosen."""
    geometric = prices.speedups(acceptance)
    if copy is None or copy_values is None:
        return geometric
    width = max(geometric.shape[-1], copy.k_max + 1)
    table = np.repeat(geometric[..., -1:], width, axis=-1)
    table[..., : geometric.shape[-1]] = geometric
    columns = list(copy.columns)
    copied = copy.speedups(copy_values, prices)  # [..., R, Dc, copy_k_max + 1]
    table[..., columns, : copy.k_max + 1] = copied
    # Past copy_k_max (below a larger k_max) a copy drafter stands at its longest too.
    table[..., columns, copy.k_max + 1 :] = copied[..., -1:]
    return table


def served_lengths_only(table: FloatArray, lengths: Sequence[int] | None) -> FloatArray:
    """``table`` [..., D, W] with, for each drafter d served at one length only
    (``lengths[d]`` > 0), every column but 0 and that length set to -inf, so that no argmax
    picks a k the drafter is not served at; a length past W - 1 stands at column W - 1.
    ``lengths[d]`` = 0: any k (the row is kept)."""
    if not lengths or not any(lengths):
        return table
    width = table.shape[-1]
    barred = np.zeros((len(lengths), width), dtype=bool)
    for d, k in enumerate(lengths):
        if k > 0:
            barred[d, 1:] = True
            barred[d, min(k, width - 1)] = False
    return np.where(barred, -np.inf, table)


def served_k(column: int, length: int) -> int:
    """The k of a decision at ``column`` of S for a drafter served at ``length`` only (0:
    any): that length, past the table too (priced at its last column), else the column."""
    return length if column and length > 0 else column


def at_mean(draw: FloatArray, mean: FloatArray, informed: np.ndarray | None) -> FloatArray:
    """``draw`` with the ``informed`` entries (bool, same shape) replaced by ``mean``."""
    return draw if informed is None else np.where(informed, mean, draw)


def thompson_decisions(
    drafters: Sequence[str],
    alpha: FloatArray,
    beta: FloatArray,
    prices: RequestPrices,
    rng: np.random.Generator,
    copy: CopyTerms | None = None,
    length_at_mean: bool = False,
    lengths: Sequence[int] | None = None,
    informed: np.ndarray | None = None,
) -> list[Decision]:
    """One Thompson decision per request r over the D ``drafters`` (module doc):

        a[r, d] ~ Beta(alpha[r, d], beta[r, d])
        S[r, d, k] = S_req(a[r, d], k)
        (d*, k*) = argmax_{d, k} S[r, d, k]

    ``alpha`` and ``beta`` are [R, D]: the posterior of request r's context. With
    ``copy``, each copy drafter's c and h_1..h_H are drawn from their posteriors as well
    (after the D acceptances of the same row) and its row of S is the copy model's.
    Only ``rng`` changes: its draws, in row order, are the whole randomness of the
    decisions; without copy drafters they are those of the model above alone.

    ``length_at_mean``: the draw picks the drafter d* only, and k is the best k >= 1 at
    d*'s posterior mean, argmax_k S[mean][r, d*, k]: an explored drafter is tried at the
    length its evidence so far supports, not at the length of an optimistic draw (a draft
    of 8 tokens the target rejects costs about three plain steps, one of 1-2 tokens about
    one and a half), and each step still tells whether its first token was accepted.

    ``lengths`` [D]: a drafter's only served length (0: any; ``served_lengths_only``).

    ``informed`` [R, D] (bool): arms whose posterior counterfactual scores keep up to date
    are decided at their mean, the draw replaced by it (a copy drafter's c and hazards
    with it); they are still drawn, so the other arms' draws are the same either way.
    """
    rows = alpha.shape[0]
    if not drafters:
        return [Decision(NONE_DRAFTER, 0, 1.0, False)] * rows
    if copy is None or not copy.columns:
        mean = alpha / (alpha + beta)
        acceptance = np.array([at_mean(rng.beta(alpha, beta), mean, informed), mean])  # [2, R, D]
        table = prices.speedups(acceptance)  # [2, R, D, K + 1]: S at the draw, at the mean
    else:
        copy_alpha, copy_beta = copy.parameters()
        every_alpha = np.concatenate([alpha, copy_alpha], axis=1)
        every_beta = np.concatenate([beta, copy_beta], axis=1)
        mean = every_alpha / (every_alpha + every_beta)
        if informed is not None:
            per_value = copy_alpha.shape[1] // len(copy.columns)  # c, h_1..h_H
            copy_informed = np.repeat(informed[:, list(copy.columns)], per_value, axis=1)
            informed = np.concatenate([informed, copy_informed], axis=1)
        values = np.array([at_mean(rng.beta(every_alpha, every_beta), mean, informed), mean])
        width = alpha.shape[1]
        table = speedup_tables(values[..., :width], prices, copy, values[..., width:])
    table = served_lengths_only(table, lengths)
    # Flat argmax over (d, k); ties go to the first arm, so when nothing beats S = 1 it is
    # (0, 0), the one no-speculation arm, whichever drafter's column 0 that is.
    chosen, greedy = table.reshape(2, rows, -1).argmax(axis=2).tolist()
    width = table.shape[-1]
    decisions = []
    for r, (arm, greedy_arm) in enumerate(zip(chosen, greedy, strict=True)):
        d, k = divmod(arm, width)
        if k > 0 and length_at_mean:
            k = 1 + int(np.argmax(table[1, r, d, 1:]))
            arm = d * width + k
        explored = arm != greedy_arm
        if k == 0:
            decisions.append(Decision(NONE_DRAFTER, 0, 1.0, explored))
        else:
            served = served_k(k, lengths[d] if lengths else 0)
            decisions.append(Decision(drafters[d], served, float(table[1, r, d, k]), explored))
    return decisions


def _siblings(other: Context, context: Context) -> bool:
    """Whether ``other``'s evidence may seed ``context``'s: the same cluster, and both
    free text or both structured (under a grammar other drafts pay: a structured
    context's evidence would mislead its free text's, and the other way round)."""
    return other.cluster == context.cluster and other.structured == context.structured


class ThompsonPolicy:
    """Thompson sampling with a shared acceptance posterior per drafter (module doc)."""

    name = "thompson"

    def __init__(
        self,
        drafters: Sequence[str] = (),
        *,
        gamma: float = 0.99,
        gamma_drift: float = 0.8,
        drift_z: float | None = 3.0,
        k_max: int = 8,
        rng: np.random.Generator | None = None,
        priors: PriorSettings | None = None,
        evidence_cap: float | None = None,
        transfer_weight: float = 16.0,
        costs: StepRatios | None = None,
        similarity: Mapping[str, Mapping[str, float]] | None = None,
        per_request: bool = True,
        overhead_ewma: float = 0.05,
        overhead_window: int = 16,
        copy_drafters: Sequence[str] = DEFAULT_COPY_DRAFTERS,
        copy_k_max: int = 16,
        copy_prior_weight: float = 2.0,
        explore_length: str = "mean",
        draft_length: Mapping[str, int] | None = None,
        scored_window: int | None = DEFAULT_SCORED_WINDOW,
    ) -> None:
        self.gamma = gamma
        self.gamma_drift = gamma_drift
        self.drift_z = drift_z
        self.k_max = k_max
        self.priors = priors or PriorSettings()
        self.evidence_cap = evidence_cap
        self.transfer_weight = transfer_weight
        self._rng = rng if rng is not None else np.random.default_rng()
        self.costs_ = costs if costs is not None else StepRatios()
        # None: price per step only (F_0 = F_d = 0).
        self.overheads_ = (
            RequestOverheads(window=overhead_window, ewma=overhead_ewma) if per_request else None
        )
        if self.overheads_ is not None:
            self.overheads_.set_cost_shapes(self.costs_.cost_shape)
        self.drafters_: list[str] = []
        self.index_: dict[str, int] = {}
        self.similarity_: dict[str, dict[str, float]] = {}
        # cluster -> (alpha0, beta0) over drafters_: the priors, derived from drafters_ and
        # similarity_ and rebuilt whenever either changes (``_drafters_changed``).
        self.cluster_priors_: dict[str, tuple[FloatArray, FloatArray]] = {}
        # Likewise a copy drafter's run posterior in a cluster with no statistics of it
        # yet: its priors alone (``_new_copy``), a chain of H Betas, derived once.
        self.copy_priors_: dict[tuple[str, str], FloatArray] = {}
        self.contexts_: dict[Context, ContextArms] = {}
        # Copy drafters: per context and drafter, the run statistics (``copying.py``),
        # priced by the copy model up to copy_k_max.
        self.copy_drafters = frozenset(copy_drafters)
        self.copy_k_max = copy_k_max
        # Run lengths modelled: H = 4 copy_k_max (longer runs count as H).
        self.copy_horizon = RUN_HORIZON_PER_K * copy_k_max
        self.copy_steps_ = run_steps_matrix(self.copy_horizon, copy_k_max)
        self.copy_prior_weight = copy_prior_weight
        self.copies_: dict[Context, dict[str, CopyRuns]] = {}
        self.length_at_mean = explore_length == "mean"
        # None: every arm is drawn; else arms scored within this many requests of their
        # context are decided at their posterior mean (module doc, "full information").
        self.scored_window = scored_window
        # drafter -> the one length it is served at (module doc); absent: any.
        self.draft_length_ = {str(d): int(k) for d, k in (draft_length or {}).items()}
        self.updates_ = 0
        for name in drafters:
            self.add_drafter(name, (similarity or {}).get(name))

    @classmethod
    def from_config(
        cls, drafters: Sequence[str], config: Mapping[str, Any] | None = None
    ) -> ThompsonPolicy:
        cfg = ThompsonConfig.model_validate(dict(config or {}))
        return cls(
            drafters,
            gamma=cfg.gamma,
            gamma_drift=cfg.gamma_drift,
            drift_z=cfg.drift_z,
            k_max=cfg.k_max,
            rng=np.random.default_rng(cfg.seed),
            priors=PriorSettings(
                cfg.prior_alpha,
                cfg.prior_beta,
                cfg.similarity_weight,
                cfg.similarity_low,
                cfg.similarity_high,
            ),
            evidence_cap=cfg.evidence_cap,
            transfer_weight=cfg.transfer_weight,
            costs=StepRatios(
                window=cfg.cost_window,
                verify_slope_ratio=cfg.verify_slope_ratio,
                default_draft_cost_ratio=cfg.default_draft_cost_ratio,
                draft_cost_ratio=cfg.draft_cost_ratio,
                cost_shape=cfg.cost_shape,
            ),
            similarity=cfg.similarity,
            per_request=cfg.per_request,
            overhead_ewma=cfg.overhead_ewma,
            overhead_window=cfg.overhead_window,
            copy_drafters=cfg.copy_drafters,
            copy_k_max=cfg.copy_k_max,
            copy_prior_weight=cfg.copy_prior_weight,
            explore_length=cfg.explore_length,
            draft_length=cfg.draft_length,
            scored_window=cfg.scored_window,
        )

    @property
    def version(self) -> int:
        return self.updates_

    def plain_step_terms(self) -> tuple[float, float]:
        """(q, s): a plain step's measured cost in units of a speculative step's intercept
        (1 until measured) and the verify slope those units are defined with
        (``costs.StepRatios``)."""
        return self.costs_.plain_token_time(), self.costs_.slope()

    # -- selection: gather the posteriors and prices, then ``thompson_decisions`` ----------

    def select(self, context: Context, eligible: Sequence[str]) -> Decision:
        """Thompson draw over the eligible drafters; k from the sampled acceptance."""
        return self.select_many([context], eligible)[0]

    def select_many(self, contexts: Sequence[Context], eligible: Sequence[str]) -> list[Decision]:
        """:meth:`select` for each context, drawn and priced at once: the same decisions,
        from the same draws, as one ``select`` per context in order."""
        if not contexts:
            return []
        wanted = set(eligible)
        index = [i for i, name in enumerate(self.drafters_) if name in wanted]
        names = [self.drafters_[i] for i in index]
        alpha, beta, prices, copy = self._inputs(
            contexts, index, [self._posterior(c) for c in contexts]
        )
        lengths = [self.draft_length_.get(name, 0) for name in names]
        informed = np.array([self._informed(c) for c in contexts], dtype=bool)[:, index]
        return thompson_decisions(
            names, alpha, beta, prices, self._rng, copy, self.length_at_mean, lengths, informed
        )

    def _informed(self, context: Context) -> np.ndarray:
        """Per drafter: whether ``context``'s posterior of it is decided at its mean (a
        counterfactual score within ``scored_window`` requests; never in a fresh context)."""
        arms = self.contexts_.get(context)
        if arms is None or self.scored_window is None:
            return np.zeros(len(self.drafters_), dtype=bool)
        return arms.informed(self.scored_window)

    def _inputs(
        self,
        contexts: Sequence[Context],
        index: Sequence[int],
        posteriors: Sequence[tuple[FloatArray, FloatArray]],
    ) -> tuple[FloatArray, FloatArray, RequestPrices, CopyTerms | None]:
        """What ``thompson_decisions`` reads for ``contexts`` over the drafters at ``index``:
        (alpha, beta) [R, D], the prices and the copy drafters' terms (None without any)."""
        names = [self.drafters_[i] for i in index]
        tokens, fixed_none, fixed_drafters = zip(*map(self._request_terms, contexts), strict=True)
        # [3, R, D]: each request's posterior (alpha, beta) and fixed times F_d, gathered in
        # one array and narrowed to the eligible drafters at once.
        alpha, beta, fixed = np.array(
            [
                [alpha for alpha, _ in posteriors],
                [beta for _, beta in posteriors],
                fixed_drafters,
            ]
        )[:, :, index]
        copies = [j for j, name in enumerate(names) if name in self.copy_drafters]
        step = self.costs_.step_costs(names, self.k_max)
        prices = RequestPrices(
            step.t_ar,
            cost_gain(step.t_ar, step.t_draft, step.t_verify, step.t_lead),
            np.array(tokens),
            np.array(fixed_none),
            fixed,
        )
        if not copies:
            return alpha, beta, prices, None
        copy = CopyTerms(
            tuple(copies),
            np.array([[self._copy_posterior(c, names[j]) for j in copies] for c in contexts]),
            step.t_draft[copies],
            (float(step.t_verify[0]), self.costs_.slope()),
            self.costs_.empty_step(),
            self.copy_k_max,
            self.copy_steps_,
        )
        return alpha, beta, prices, copy

    def _request_terms(self, context: Context) -> tuple[float, float, np.ndarray]:
        """(N, F_0, F_d per drafter) of ``context``; (1, 0, 0) prices it per step."""
        tokens = self.overheads_.output_tokens(context) if self.overheads_ is not None else None
        if self.overheads_ is None or tokens is None:
            return 1.0, 0.0, np.zeros(len(self.drafters_))
        fixed_none, fixed = self.overheads_.fixed_times(
            context, self.drafters_, self.costs_.plain_token_time()
        )
        return tokens, fixed_none, fixed

    def _posterior(self, context: Context) -> tuple[FloatArray, FloatArray]:
        """(alpha, beta) of the context; for one never updated, what it would start from."""
        arms = self.contexts_.get(context)
        return (arms.alpha, arms.beta) if arms is not None else self._fresh_posterior(context)

    def _prior(self, drafter: str, cluster: str) -> tuple[float, float]:
        similarity = self.similarity_.get(drafter)
        return (
            self.priors.from_similarity(similarity, cluster)
            if similarity
            else self.priors.neutral()
        )

    def _cluster_prior(self, cluster: str) -> tuple[FloatArray, FloatArray]:
        """(alpha0, beta0) over the drafters for contexts of ``cluster``."""
        prior = self.cluster_priors_.get(cluster)
        if prior is None:
            pairs = np.array([self._prior(name, cluster) for name in self.drafters_])
            pairs = pairs.reshape(-1, 2)
            prior = self.cluster_priors_[cluster] = (pairs[:, 0].copy(), pairs[:, 1].copy())
        return prior

    def _drafters_changed(self) -> None:
        """The drafter list, a similarity or the copy drafters changed: the priors are
        derived again."""
        self.cluster_priors_.clear()
        self.copy_priors_.clear()

    def _fresh_posterior(self, context: Context) -> tuple[FloatArray, FloatArray]:
        """(alpha, beta) of a context never updated: its cluster's prior plus the evidence
        of the cluster's other buckets (``_siblings``), scaled to at most
        ``transfer_weight``."""
        alpha0, beta0 = self._cluster_prior(context.cluster)
        siblings = [a for c, a in self.contexts_.items() if _siblings(c, context)]
        if not siblings or self.transfer_weight <= 0:
            return alpha0, beta0
        wins = sum(np.maximum(a.alpha - a.alpha0, 0.0) for a in siblings)
        losses = sum(np.maximum(a.beta - a.beta0, 0.0) for a in siblings)
        total = np.asarray(wins + losses)
        scale = np.minimum(1.0, self.transfer_weight / np.maximum(total, 1e-12))
        return alpha0 + wins * scale, beta0 + losses * scale

    def _fresh_context(self, context: Context) -> ContextArms:
        """The posterior a context starts from on its first update (``_fresh_posterior``)."""
        alpha0, beta0 = self._cluster_prior(context.cluster)
        arms = ContextArms(alpha0, beta0)
        alpha, beta = self._fresh_posterior(context)
        arms.alpha, arms.beta = np.array(alpha, dtype=np.float64), np.array(beta, dtype=np.float64)
        return arms

    def _new_copy(self, drafter: str, cluster: str, evidence: FloatArray | None = None) -> CopyRuns:
        """Copy statistics of ``drafter`` in a context of ``cluster``: h_1's prior is the
        drafter's own, c's "it matches" (``copying.py``)."""
        weight = self.copy_prior_weight
        return CopyRuns(
            self.copy_horizon, self._prior(drafter, cluster), kept_prior(weight), weight, evidence
        )

    def _copy_posterior(self, context: Context, drafter: str) -> FloatArray:
        """[4, H] Beta parameters of ``drafter``'s runs in ``context`` (``copying.py``);
        where it has no statistics yet, its cluster's other buckets' evidence, scaled to
        at most ``transfer_weight`` run starts, on top of the priors."""
        arm = self.copies_.get(context, {}).get(drafter)
        if arm is not None:
            return arm.posterior
        siblings = self._copy_siblings(context, drafter)
        if siblings and self.transfer_weight > 0:
            return self._fresh_copy(context, drafter, siblings).posterior
        prior = self.copy_priors_.get((context.cluster, drafter))
        if prior is None:
            prior = self.copy_priors_[(context.cluster, drafter)] = self._new_copy(
                drafter, context.cluster
            ).posterior
        return prior

    def _copy_siblings(self, context: Context, drafter: str) -> list[FloatArray]:
        """The run evidence of ``drafter`` in the other buckets of ``context``'s cluster."""
        return [
            arms[drafter].evidence
            for c, arms in self.copies_.items()
            if _siblings(c, context) and drafter in arms
        ]

    def _fresh_copy(self, context: Context, drafter: str, siblings: list[FloatArray]) -> CopyRuns:
        """New statistics of ``drafter`` in ``context``: its priors, plus the evidence of
        ``siblings`` (``_copy_siblings``) scaled to at most ``transfer_weight`` starts."""
        if not siblings or self.transfer_weight <= 0:
            return self._new_copy(drafter, context.cluster)
        evidence = np.sum(siblings, axis=0)
        # Starts as the c counts tell them, or as h_1's (scores of accepts alone add run
        # counts only: with c's alone, 200 of them passed over unscaled, 600 pseudo-counts).
        first = max(float(evidence[0, 0] + evidence[1, 0]), float(evidence[2, 0] + evidence[3, 0]))
        evidence *= min(1.0, self.transfer_weight / max(first, 1e-12))
        return self._new_copy(drafter, context.cluster, evidence)

    def _copy(self, context: Context, drafter: str) -> CopyRuns:
        """The context's copy statistics of ``drafter``, created on its first update."""
        arms = self.copies_.setdefault(context, {})
        arm = arms.get(drafter)
        if arm is None:
            arm = arms[drafter] = self._fresh_copy(
                context, drafter, self._copy_siblings(context, drafter)
            )
        return arm

    # -- learning -------------------------------------------------------------------------

    def _context(self, context: Context) -> ContextArms:
        """The context's posterior, created from its fresh prior on its first update."""
        arms = self.contexts_.get(context)
        if arms is None:
            arms = self.contexts_[context] = self._fresh_context(context)
        return arms

    def update(self, context: Context, decision: Decision, outcome: Outcome) -> None:
        """Learn costs from the outcome and the chosen drafter's acceptance."""
        arms = self._context(context)
        unit = self.costs_.observe(decision.drafter, outcome, context)
        if self.overheads_ is not None:
            self.overheads_.observe(
                context, decision.drafter, outcome, unit, self.costs_.plain_token_time()
            )
        arms.requests += 1
        i = self.index_.get(decision.drafter)
        arms.served = i
        if decision.k == 0 or i is None:
            arms.none_decisions += decision.k == 0
        else:
            gamma = self._learn(arms, i, *outcome.acceptance_counts(decision.k))
            arms.decisions[i] += 1
            if decision.drafter in self.copy_drafters and outcome.steps:
                counts = run_counts(
                    outcome.drafted_per_step,
                    outcome.accepted_per_step,
                    decision.k,
                    self.copy_horizon,
                    outcome.requested_per_step,
                )
                self._copy(context, decision.drafter).observe(counts, gamma)
        self.updates_ += 1

    def update_counterfactual(
        self,
        context: Context,
        drafter: str,
        accepted_per_step: Sequence[int],
        draft_length: int,
        drafted_per_step: Sequence[int] | None = None,
    ) -> None:
        """Full-information update: what ``drafter`` would have had accepted, no exploration.
        A score with its drafted counts (a lookup's) is read as the drafter's own outcome
        would be (``Outcome.acceptance_counts``; for a copy drafter ``copying.run_counts``,
        c as well as the run lengths); without them every step drafted ``draft_length``
        and a copy drafter learns its run lengths only (``copying.counterfactual_counts``).
        Drafted counts that do not pair up with the accepts raise ValueError (``Outcome``'s
        check) before anything is learnt."""
        i = self.index_.get(drafter)
        if i is None or draft_length <= 0 or not accepted_per_step:
            logger.debug("counterfactual for %r ignored (unknown drafter or empty)", drafter)
            return
        successes, failures = (
            counts_from_steps(accepted_per_step, draft_length)
            if drafted_per_step is None
            else Outcome.from_steps(
                drafted_per_step, accepted_per_step, draft_time_s=0.0, verify_time_s=0.0
            ).acceptance_counts(draft_length)
        )
        arms = self._context(context)
        gamma = self._learn(arms, i, successes, failures)
        arms.mark_scored(i)
        if drafter in self.copy_drafters:
            copy = self._copy(context, drafter)
            if drafted_per_step is not None:
                counts = run_counts(
                    drafted_per_step, accepted_per_step, draft_length, self.copy_horizon
                )
            else:
                match, hazard = copy.means()
                counts = counterfactual_counts(
                    accepted_per_step, draft_length, self.copy_horizon, match[0], hazard[0]
                )
            copy.observe(counts, gamma)
        self.updates_ += 1

    def _learn(self, arms: ContextArms, index: int, successes: float, failures: float) -> float:
        """Posterior update of one arm, discounted faster when the request is surprising;
        returns the discount used (``gamma`` when there was nothing to weigh)."""
        if successes + failures <= 0:
            return self.gamma  # nothing drafted (e.g. the request ended at once)
        successes, failures = cap_evidence(successes, failures, self.evidence_cap)
        surprise = arms.surprise(index, successes, failures, self.drift_z or 3.0)
        drifted = self.drift_z is not None and surprise > self.drift_z
        gamma = self.gamma_drift if drifted else self.gamma
        arms.observe(index, successes, failures, gamma)
        return gamma

    def add_drafter(self, name: str, similarity: Mapping[str, float] | None = None) -> None:
        """Make ``name`` selectable; its prior per cluster comes from ``similarity``."""
        check_drafter_name(name)
        if similarity:
            self.similarity_[name] = {str(c): float(s) for c, s in similarity.items()}
            self._drafters_changed()
        if name in self.index_:
            return
        self._drafters_changed()
        self.index_[name] = len(self.drafters_)
        self.drafters_.append(name)
        for context, arms in self.contexts_.items():
            arms.append(*self._prior(name, context.cluster))

    def set_drafter_hints(self, hints: DrafterHints) -> None:
        """Replace the configured hints (all of ``DrafterHints``), as the sidecar does when
        a drafter is registered or removed. A drafter that stops being a copy drafter loses
        its run statistics; one that becomes one starts from its priors."""
        self.costs_.draft_cost_ratio = {str(k): float(v) for k, v in hints.draft_cost_ratio.items()}
        self.costs_.set_cost_shapes(hints.cost_shape)
        if self.overheads_ is not None:
            self.overheads_.set_cost_shapes(hints.cost_shape)
        self.draft_length_ = {str(d): int(k) for d, k in hints.draft_length.items()}
        copies = frozenset(str(name) for name in hints.copy_drafters)
        if copies != self.copy_drafters:
            self.copy_drafters = copies
            for arms in self.copies_.values():
                for name in [n for n in arms if n not in copies]:
                    del arms[name]
            self._drafters_changed()

    def remove_drafter(self, name: str) -> None:
        """Forget ``name``: it is never selected again (re-adding starts from its prior)."""
        i = self.index_.get(name)
        if i is None:
            return
        for arms in self.contexts_.values():
            arms.delete(i)
        self.drafters_.pop(i)
        self.index_ = {drafter: j for j, drafter in enumerate(self.drafters_)}
        self.similarity_.pop(name, None)
        self._drafters_changed()
        for copies in self.copies_.values():
            copies.pop(name, None)
        self.costs_.forget_drafter(name)
        if self.overheads_ is not None:
            self.overheads_.forget_drafter(name)

    # -- persistence and introspection ----------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "policy": self.name,
            "updates": self.updates_,
            "drafters": list(self.drafters_),
            "similarity": {k: dict(v) for k, v in self.similarity_.items()},
            "contexts": [
                {**c.as_dict(), **a.to_dict(self.drafters_)} for c, a in self.contexts_.items()
            ],
            "costs": self.costs_.state_dict(),
            "overheads": self.overheads_.state_dict() if self.overheads_ else None,
            "copy": {
                "k_max": self.copy_k_max,
                "horizon": self.copy_horizon,
                "arms": [
                    [c.saved_cluster(), c.length_bucket, drafter, arm.to_list()]
                    for c, arms in self.copies_.items()
                    for drafter, arm in arms.items()
                ],
            },
            "rng": self._rng.bit_generator.state,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        check_state(state, self.name)
        drafters = [str(name) for name in state["drafters"]]
        self.drafters_ = drafters
        self.index_ = {name: i for i, name in enumerate(drafters)}
        self.similarity_ = {k: dict(v) for k, v in state["similarity"].items()}
        self._drafters_changed()
        self.contexts_ = {
            Context.from_dict(c): ContextArms.from_dict(c, drafters) for c in state["contexts"]
        }
        self.costs_.load_state_dict(state["costs"])
        # States of format version 1 have no copy statistics: they start from the priors.
        self.copies_ = {}
        for cluster, bucket, drafter, rows in (state.get("copy") or {}).get("arms", []):
            context = Context.from_saved(cluster, bucket)
            if str(drafter) in self.index_:
                arm = self._new_copy(str(drafter), context.cluster, evidence_from_list(rows))
                self.copies_.setdefault(context, {})[str(drafter)] = arm
        if self.overheads_ is not None:
            # States saved before per-request pricing have no "overheads": start empty.
            self.overheads_.load_state_dict(state.get("overheads") or {})
            self.overheads_.set_cost_shapes(self.costs_.cost_shape)
        self.updates_ = int(state["updates"])
        if state.get("rng"):
            self._rng.bit_generator.state = state["rng"]

    def describe(self) -> list[ContextSummary]:
        """Per context: posterior per drafter, its best k and S at the posterior mean."""
        summaries = []
        for context, arms in sorted(self.contexts_.items(), key=lambda item: item[0].sort_key()):
            mean = arms.mean()
            everyone = range(len(self.drafters_))
            _, _, prices, copy = self._inputs([context], everyone, [(arms.alpha, arms.beta)])
            copy_means = None
            if copy is not None:
                copy_alpha, copy_beta = copy.parameters()
                copy_means = copy_alpha / (copy_alpha + copy_beta)
            lengths = [self.draft_length_.get(name, 0) for name in self.drafters_]
            table = served_lengths_only(
                speedup_tables(mean[None], prices, copy, copy_means)[0], lengths
            )
            columns, best_s = best_draft_length(table)
            best_k = [served_k(k, n) for k, n in zip(columns.tolist(), lengths, strict=True)]
            summary_arms = tuple(
                ArmSummary(
                    name,
                    float(mean[i]),
                    float(arms.alpha[i]),
                    float(arms.beta[i]),
                    int(best_k[i]),
                    float(best_s[i]),
                    int(arms.decisions[i]),
                )
                for i, name in enumerate(self.drafters_)
            )
            chosen = int(np.argmax(best_s)) if len(self.drafters_) else -1
            if chosen < 0 or best_k[chosen] == 0:
                chosen_drafter, chosen_k = NONE_DRAFTER, 0
            else:
                chosen_drafter, chosen_k = self.drafters_[chosen], int(best_k[chosen])
            summaries.append(
                ContextSummary(
                    context.cluster,
                    context.length_bucket,
                    summary_arms,
                    chosen_drafter,
                    chosen_k,
                    arms.requests,
                    context.structured,
                )
            )
        return summaries
