"""Thompson sampling over drafters, with the draft length derived from the sampled acceptance.

Per (context, drafter) the per-token acceptance a has a Beta(alpha, beta) posterior
(truncated-geometric likelihood, discounted by gamma per update of the arm, by
gamma_drift when the request's acceptance is more than drift_z spreads away from the
posterior mean; see ``acceptance.py``).
Costs are measured (``costs.py``). For a request in context c:

    for each eligible drafter d:   a_d ~ Beta(alpha_cd, beta_cd)
                                   k_d = argmax_{k in 0..k_max} S(a_d, k)
    choose d* = argmax_d S(a_d, k_d)          (k = 0, i.e. drafter "none", when S <= 1)

with S(a, k) = [(1 - a^(k+1)) / (1 - a)] * t_ar / (k * t_draft + t_verify(k)) and
S(a, 0) = 1. Once the context has served requests, S is priced per request instead
(``speedup.request_speedup``): the context's mean output length and each arm's measured
fixed time per request (``costs.RequestOverheads``) decide whether drafting pays for
short outputs at all. The decision is "explored" when it differs from the same rule applied to
the posterior means, and its ``expected_speedup`` is S at the posterior mean.

Draw-ahead: when a context's next draw is needed while nothing that the decision
depends on has changed since its last one (no update, no cost or layout change, the
same eligible drafters), more rows are drawn at once and their decisions kept for the
following requests of that context: 1, then 2, 4, ... up to ``draw_ahead`` rows per draw.
Each row is still an independent sample of the current posterior, used once; any change
discards the rows kept. A policy updated between every two selections draws exactly as
without it (one row per request), so learning runs consume the generator identically.

Cold start: a drafter added with ``similarity`` (cluster -> similarity of its fine-tuning
sample to the cluster) gets a prior whose mean grows with the similarity (weight
``similarity_weight``); without it, the neutral Beta(prior_alpha, prior_beta). A new
(cluster, length bucket) context starts from its cluster's other buckets, scaled to at
most ``transfer_weight`` pseudo-observations.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, cast

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from router.policy.acceptance import (
    ContextArms,
    PriorSettings,
    cap_evidence,
    counts_from_steps,
)
from router.policy.base import (
    NONE_DRAFTER,
    STATE_VERSION,
    ArmSummary,
    Context,
    ContextSummary,
    Decision,
    Outcome,
    check_drafter_name,
    check_state,
)
from router.policy.costs import CostModel, RequestOverheads
from router.policy.speedup import (
    best_draft_length,
    cost_gain,
    request_speedup,
    speedup_table,
)

logger = logging.getLogger(__name__)


class ThompsonConfig(BaseModel):
    """JSON configuration of ``thompson`` (SetPolicy ``config_json``)."""

    model_config = ConfigDict(extra="forbid")

    gamma: float = Field(0.99, gt=0.0, le=1.0)
    gamma_drift: float = Field(0.8, gt=0.0, le=1.0)
    drift_z: float | None = Field(3.0, gt=0.0)
    k_max: int = Field(8, ge=1, le=32)
    seed: int | None = 0
    prior_alpha: float = Field(1.0, gt=0.0)
    prior_beta: float = Field(1.0, gt=0.0)
    similarity_weight: float = Field(8.0, gt=0.0)
    similarity_low: float = Field(0.2, gt=0.0, lt=1.0)
    similarity_high: float = Field(0.9, gt=0.0, lt=1.0)
    evidence_cap: float | None = Field(None, gt=0.0)
    transfer_weight: float = Field(16.0, ge=0.0)
    cost_ewma: float = Field(0.01, gt=0.0, le=1.0)
    per_request: bool = True
    overhead_ewma: float = Field(0.05, gt=0.0, le=1.0)
    draw_ahead: int = Field(16, ge=1, le=4096)
    verify_slope_ratio: float = Field(0.05, ge=0.0)
    default_draft_cost_ratio: float = Field(0.1, ge=0.0)
    draft_cost_ratio: dict[str, float] = Field(default_factory=dict)
    similarity: dict[str, dict[str, float]] = Field(default_factory=dict)


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
        costs: CostModel | None = None,
        similarity: Mapping[str, Mapping[str, float]] | None = None,
        per_request: bool = True,
        overhead_ewma: float = 0.05,
        draw_ahead: int = 16,
    ) -> None:
        if draw_ahead < 1:
            raise ValueError(f"draw_ahead must be >= 1, got {draw_ahead}")
        self.gamma = gamma
        self.gamma_drift = gamma_drift
        self.drift_z = drift_z
        self.k_max = k_max
        self.priors = priors or PriorSettings()
        self.evidence_cap = evidence_cap
        self.transfer_weight = transfer_weight
        self.draw_ahead = draw_ahead
        self._rng = rng if rng is not None else np.random.default_rng()
        self.costs_ = costs if costs is not None else CostModel()
        # None: price per step only (the plain S(a, k)).
        self.overheads_ = RequestOverheads(ewma=overhead_ewma) if per_request else None
        self.drafters_: list[str] = []
        self.index_: dict[str, int] = {}
        self.similarity_: dict[str, dict[str, float]] = {}
        self.contexts_: dict[Context, ContextArms] = {}
        self.updates_ = 0
        self._eligible_cache: dict[tuple[str, ...], np.ndarray] = {}
        self._gain_cache: tuple[tuple[int, int], np.ndarray] | None = None
        # Priors of contexts never updated, valid while (layout, updates) is unchanged:
        # Route traffic without reports must not rebuild them on every select().
        self._fresh_cache: dict[Context, tuple[tuple[int, int], ContextArms]] = {}
        self._request_cache: dict[
            Context, tuple[tuple[int, int, int], tuple[float, float, np.ndarray]]
        ] = {}
        self._layout_revision = 0
        # Decisions drawn ahead per context (module doc), valid while their key holds.
        self._stocks: dict[Context, _Stock] = {}
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
            costs=CostModel(
                ewma=cfg.cost_ewma,
                verify_slope_ratio=cfg.verify_slope_ratio,
                default_draft_cost_ratio=cfg.default_draft_cost_ratio,
                draft_cost_ratio=cfg.draft_cost_ratio,
            ),
            similarity=cfg.similarity,
            per_request=cfg.per_request,
            overhead_ewma=cfg.overhead_ewma,
            draw_ahead=cfg.draw_ahead,
        )

    @property
    def version(self) -> int:
        return self.updates_

    # -- derived quantities (caches, not learned state) ---------------------------------

    def _gain(self) -> np.ndarray:
        """t_ar / (k t_draft + t_verify(k)) per drafter and k, cached per cost revision."""
        key = (self.costs_.revision_, self._layout_revision)
        if self._gain_cache is None or self._gain_cache[0] != key:
            gain = cost_gain(
                self.costs_.plain_token_time(),
                self.costs_.draft_times(self.drafters_),
                self.costs_.verify_times(self.k_max),
            )
            self._gain_cache = (key, gain)
        return self._gain_cache[1]

    def _speedups(self, context: Context, acceptance: np.ndarray, index: np.ndarray) -> np.ndarray:
        """S of every (drafter in ``index``, k): per request once the context has a
        measured output length, else per step."""
        gain = self._gain()[index]
        terms = self._request_terms(context)
        if terms is None:
            return speedup_table(acceptance, gain)
        tokens, fixed_none, fixed = terms
        return request_speedup(
            acceptance,
            gain,
            t_ar=self.costs_.plain_token_time(),
            output_tokens=tokens,
            fixed_none=fixed_none,
            fixed_drafters=fixed[index],
        )

    def _request_terms(self, context: Context) -> tuple[float, float, np.ndarray] | None:
        """(output tokens, F_none, F per drafter) of a context, cached until it changes;
        None while per-request pricing is off or the context has no measured length."""
        overheads = self.overheads_
        if overheads is None:
            return None
        tokens = overheads.output_tokens(context)
        if tokens is None:
            return None
        key = (
            overheads.revision_,
            overheads.context_revision_.get(context, 0),
            self._layout_revision,
        )
        cached = self._request_cache.get(context)
        if cached is not None and cached[0] == key:
            return cached[1]
        if len(self._request_cache) > 4096:  # bounded: contexts are (cluster, bucket) pairs
            self._request_cache.clear()
        fixed_none, fixed = overheads.fixed_times(context, self.drafters_)
        terms = (tokens, fixed_none, fixed)
        self._request_cache[context] = (key, terms)
        return terms

    def _eligible_index(self, eligible: Sequence[str]) -> np.ndarray:
        key = tuple(eligible)
        index = self._eligible_cache.get(key)
        if index is None:
            known = sorted({self.index_[name] for name in key if name in self.index_})
            index = np.array(known, dtype=np.intp)
            self._eligible_cache[key] = index
        return index

    def _prior(self, drafter: str, cluster: str) -> tuple[float, float]:
        similarity = self.similarity_.get(drafter)
        return (
            self.priors.from_similarity(similarity, cluster)
            if similarity
            else self.priors.neutral()
        )

    def _fresh_context(self, context: Context) -> ContextArms:
        """Priors for a context never updated, plus evidence moved from its cluster's buckets."""
        priors = np.array([self._prior(name, context.cluster) for name in self.drafters_])
        priors = priors.reshape(-1, 2)
        arms = ContextArms(priors[:, 0], priors[:, 1])
        siblings = [a for c, a in self.contexts_.items() if c.cluster == context.cluster]
        if siblings and self.transfer_weight > 0:
            wins = sum(np.maximum(a.alpha - a.alpha0, 0.0) for a in siblings)
            losses = sum(np.maximum(a.beta - a.beta0, 0.0) for a in siblings)
            total = np.asarray(wins + losses)
            scale = np.minimum(1.0, self.transfer_weight / np.maximum(total, 1e-12))
            arms.alpha = arms.alpha + wins * scale
            arms.beta = arms.beta + losses * scale
        return arms

    def _cached_fresh_context(self, context: Context) -> ContextArms:
        """:meth:`_fresh_context`, memoised until the drafters or any posterior change."""
        key = (self._layout_revision, self.updates_)
        cached = self._fresh_cache.get(context)
        if cached is not None and cached[0] == key:
            return cached[1]
        if len(self._fresh_cache) > 4096:  # bounded: contexts are (cluster, bucket) pairs
            self._fresh_cache.clear()
        arms = self._fresh_context(context)
        self._fresh_cache[context] = (key, arms)
        return arms

    def _context(self, context: Context) -> ContextArms:
        arms = self.contexts_.get(context)
        if arms is None:
            arms = self._fresh_context(context)
            self.contexts_[context] = arms
        return arms

    # -- the policy ---------------------------------------------------------------------

    def select(self, context: Context, eligible: Sequence[str]) -> Decision:
        """Thompson draw over the eligible drafters; k from the sampled acceptance."""
        return self.select_many([context], eligible)[0]

    def select_many(self, contexts: Sequence[Context], eligible: Sequence[str]) -> list[Decision]:
        """:meth:`select` for each context: one posterior sample per request, in the order
        one ``select`` per request, grouped by context, would use them. The rows that
        the batch lacks are drawn and priced at once (one beta draw and one speed-up
        table), each distinct context's greedy arm from its posterior mean; rows drawn
        ahead (module doc) are used first."""
        if len(contexts) == 1:  # a lone call (light load): its next decision drawn ahead
            stock = self._stocks.get(contexts[0])
            if stock is not None and stock.available and stock.key == self._stock_key(eligible):
                return stock.take(1)
        index = self._eligible_index(eligible)
        if index.size == 0:
            return [Decision(NONE_DRAFTER, 0, 1.0, False) for _ in contexts]
        if not contexts:
            return []
        groups = _group_by_context(contexts)
        key = self._stock_key(eligible)
        if len(self._stocks) > 4096:  # bounded: contexts are (cluster, bucket) pairs
            self._stocks.clear()
        stocks = [self._stock(context, key) for context in groups]
        short = [
            (context, stock.rows_to_draw(len(slots), self.draw_ahead))
            for (context, slots), stock in zip(groups.items(), stocks, strict=True)
            if stock.available < len(slots)
        ]
        if short:
            drawn = self._draw([c for c, _ in short], [n for _, n in short], index)
            for (context, _), decisions in zip(short, drawn, strict=True):
                self._stocks[context].decisions.extend(decisions)
        chosen: list[Decision | None] = [None] * len(contexts)
        for slots, stock in zip(groups.values(), stocks, strict=True):
            for slot, decision in zip(slots, stock.take(len(slots)), strict=True):
                chosen[slot] = decision
        return cast(list[Decision], chosen)  # every slot is in a group

    def _stock_key(self, eligible: Sequence[str]) -> tuple[Any, ...]:
        """What a drawn decision depends on besides its sample: the posteriors (updates),
        the costs, the per-request overheads, the drafters and the eligible ones."""
        overheads = self.overheads_.revision_ if self.overheads_ is not None else None
        return (
            self.updates_,
            self.costs_.revision_,
            overheads,
            self._layout_revision,
            tuple(eligible),
        )

    def _stock(self, context: Context, key: tuple[Any, ...]) -> _Stock:
        """The context's decisions drawn ahead under ``key``; a new, empty stock when
        the key changed (what was drawn before is discarded)."""
        stock = self._stocks.get(context)
        if stock is None or stock.key != key:
            stock = _Stock(key)
            self._stocks[context] = stock
        return stock

    def _draw(
        self, contexts: Sequence[Context], counts: Sequence[int], index: np.ndarray
    ) -> list[list[Decision]]:
        """``counts[g]`` fresh decisions for each context ``contexts[g]``: one posterior
        sample per decision, drawn and priced for all at once."""
        arms = [self.contexts_.get(c) or self._cached_fresh_context(c) for c in contexts]
        if len(arms) == 1:  # one context: no stacking
            alpha, beta = arms[0].alpha[index][None], arms[0].beta[index][None]
            of_sample = np.zeros(counts[0], dtype=np.intp)
            samples = self._rng.beta(alpha[0], beta[0], size=(counts[0], index.size))
        else:
            alpha = np.stack([a.alpha[index] for a in arms])  # [groups, drafters]
            beta = np.stack([a.beta[index] for a in arms])
            of_sample = np.repeat(np.arange(len(arms)), counts)
            samples = self._rng.beta(alpha[of_sample], beta[of_sample])  # a row per decision
        acceptance = np.concatenate([samples, alpha / (alpha + beta)])  # then the means
        of_row = np.concatenate([of_sample, np.arange(len(arms))])
        table = self._row_speedups(list(contexts), of_row, acceptance, index)
        width = self.k_max + 1
        best = table.reshape(len(of_row), -1).argmax(axis=1).tolist()
        names = [self.drafters_[i] for i in index.tolist()]
        drawn: list[list[Decision]] = []
        row = 0
        for group, count in enumerate(counts):
            mean = len(of_sample) + group
            at_mean = table[mean].tolist()  # S at the posterior mean, per drafter and k
            greedy_drafter, greedy_k = divmod(best[mean], width)
            greedy_arm = (greedy_k, greedy_drafter if greedy_k else 0)
            # A group's rows share its posterior mean, so one Decision per (drafter, k).
            made: dict[int, Decision] = {}
            decisions = []
            for arm in best[row : row + count]:
                decision = made.get(arm)
                if decision is None:
                    drafter, k = divmod(arm, width)
                    explored = (k, drafter if k else 0) != greedy_arm
                    if k == 0:
                        decision = Decision(NONE_DRAFTER, 0, 1.0, explored)
                    else:
                        decision = Decision(names[drafter], k, at_mean[drafter][k], explored)
                    made[arm] = decision
                decisions.append(decision)
            row += count
            drawn.append(decisions)
        return drawn

    def _row_speedups(
        self,
        contexts: Sequence[Context],
        of_row: np.ndarray,
        acceptance: np.ndarray,
        index: np.ndarray,
    ) -> np.ndarray:
        """:meth:`_speedups` of each acceptance row, row r in ``contexts[of_row[r]]``: per
        request where the context has a measured output length, else per step."""
        if len(contexts) == 1:
            return self._speedups(contexts[0], acceptance, index)
        gain = self._gain()[index]
        terms = [self._request_terms(context) for context in contexts]
        priced = [group for group, found in enumerate(terms) if found is not None]
        if not priced:
            return speedup_table(acceptance, gain)
        rows = np.flatnonzero(np.isin(of_row, priced)) if len(priced) < len(terms) else None
        chosen = of_row if rows is None else of_row[rows]
        width = index.size
        tokens = np.array([t[0] if t is not None else 0.0 for t in terms])[chosen]
        fixed_none = np.array([t[1] if t is not None else 0.0 for t in terms])[chosen]
        fixed = np.stack([t[2][index] if t is not None else np.zeros(width) for t in terms])[chosen]
        priced_table = request_speedup(
            acceptance if rows is None else acceptance[rows],
            gain,
            t_ar=self.costs_.plain_token_time(),
            output_tokens=tokens,
            fixed_none=fixed_none,
            fixed_drafters=fixed,
        )
        if rows is None:
            return priced_table
        table = speedup_table(acceptance, gain)
        table[rows] = priced_table
        return table

    def update(self, context: Context, decision: Decision, outcome: Outcome) -> None:
        """Learn costs from the outcome and the chosen drafter's acceptance."""
        arms = self._context(context)
        self.costs_.observe(decision.drafter, outcome)
        if self.overheads_ is not None:
            self.overheads_.observe(context, decision.drafter, outcome, self.costs_)
        arms.requests += 1
        i = self.index_.get(decision.drafter)
        if decision.k == 0 or i is None:
            arms.none_decisions += decision.k == 0
        else:
            self._learn(arms, i, *outcome.acceptance_counts())
            arms.decisions[i] += 1
        self.updates_ += 1

    def update_counterfactual(
        self,
        context: Context,
        drafter: str,
        accepted_per_step: Sequence[int],
        draft_length: int,
    ) -> None:
        """Full-information update: what ``drafter`` would have had accepted, no exploration."""
        i = self.index_.get(drafter)
        if i is None or draft_length <= 0 or not accepted_per_step:
            logger.debug("counterfactual for %r ignored (unknown drafter or empty)", drafter)
            return
        self._learn(self._context(context), i, *counts_from_steps(accepted_per_step, draft_length))
        self.updates_ += 1

    def _learn(self, arms: ContextArms, index: int, successes: float, failures: float) -> None:
        """Posterior update of one arm, discounted faster when the request is surprising."""
        if successes + failures <= 0:
            return  # nothing drafted (e.g. the request ended at once): no evidence to weigh
        successes, failures = cap_evidence(successes, failures, self.evidence_cap)
        surprise = arms.surprise(index, successes, failures, self.drift_z or 3.0)
        drifted = self.drift_z is not None and surprise > self.drift_z
        arms.observe(index, successes, failures, self.gamma_drift if drifted else self.gamma)

    def add_drafter(self, name: str, similarity: Mapping[str, float] | None = None) -> None:
        """Make ``name`` selectable; its prior per cluster comes from ``similarity``."""
        check_drafter_name(name)
        new_similarity = {str(c): float(s) for c, s in (similarity or {}).items()}
        changed = bool(new_similarity) and self.similarity_.get(name) != new_similarity
        if changed:
            self.similarity_[name] = new_similarity
        if name in self.index_:
            if changed:  # the priors of contexts never updated change: drop cached ones
                self._layout_changed()
            return
        self.index_[name] = len(self.drafters_)
        self.drafters_.append(name)
        for context, arms in self.contexts_.items():
            arms.append(*self._prior(name, context.cluster))
        self._layout_changed()

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
        self.costs_.forget_drafter(name)
        if self.overheads_ is not None:
            self.overheads_.forget_drafter(name)
        self._layout_changed()

    def _layout_changed(self) -> None:
        self._eligible_cache.clear()
        self._layout_revision += 1

    # -- persistence and introspection ---------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "policy": self.name,
            "updates": self.updates_,
            "drafters": list(self.drafters_),
            "similarity": {k: dict(v) for k, v in self.similarity_.items()},
            "contexts": [
                {
                    "cluster": c.cluster,
                    "length_bucket": c.length_bucket,
                    **a.to_dict(self.drafters_),
                }
                for c, a in self.contexts_.items()
            ],
            "costs": self.costs_.state_dict(),
            "overheads": self.overheads_.state_dict() if self.overheads_ else None,
            "rng": self._rng.bit_generator.state,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        check_state(state, self.name)
        drafters = [str(name) for name in state["drafters"]]
        self.drafters_ = drafters
        self.index_ = {name: i for i, name in enumerate(drafters)}
        self.similarity_ = {k: dict(v) for k, v in state["similarity"].items()}
        self.contexts_ = {
            Context(str(c["cluster"]), int(c["length_bucket"])): ContextArms.from_dict(c, drafters)
            for c in state["contexts"]
        }
        self.costs_.load_state_dict(state["costs"])
        if self.overheads_ is not None:
            # States saved before per-request pricing have no "overheads": start empty.
            self.overheads_.load_state_dict(state.get("overheads") or {})
        self.updates_ = int(state["updates"])
        if state.get("rng"):
            self._rng.bit_generator.state = state["rng"]
        self._layout_changed()

    def describe(self) -> list[ContextSummary]:
        """Per context: posterior per drafter, its best k and S at the posterior mean."""
        everyone = np.arange(len(self.drafters_), dtype=np.intp)
        summaries = []
        for context, arms in sorted(
            self.contexts_.items(), key=lambda item: (item[0].cluster, item[0].length_bucket)
        ):
            mean = arms.mean()
            best_k, best_s = best_draft_length(self._speedups(context, mean, everyone))
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
                )
            )
        return summaries


class _Stock:
    """Decisions drawn ahead for one context under one key, taken in order."""

    __slots__ = ("decisions", "key", "size", "taken")

    def __init__(self, key: tuple[Any, ...]) -> None:
        self.key = key
        self.decisions: list[Decision] = []
        self.taken = 0
        self.size = 0  # rows of the last draw under this key

    @property
    def available(self) -> int:
        return len(self.decisions) - self.taken

    def rows_to_draw(self, wanted: int, limit: int) -> int:
        """Rows to draw for ``wanted`` decisions: what is missing, and after a first draw
        under this key (the key held), twice the last draw's rows, up to ``limit``."""
        missing = wanted - self.available
        self.size = max(missing, min(2 * self.size, limit))
        return self.size

    def take(self, count: int) -> list[Decision]:
        """The next ``count`` decisions (available ones only)."""
        taken = self.decisions[self.taken : self.taken + count]
        self.taken += count
        if self.taken >= len(self.decisions):  # all used: start the list again
            self.decisions.clear()
            self.taken = 0
        return taken


def _group_by_context(contexts: Sequence[Context]) -> dict[Context, list[int]]:
    """Positions of each distinct context, in first-seen order."""
    groups: dict[Context, list[int]] = {}
    for slot, context in enumerate(contexts):
        groups.setdefault(context, []).append(slot)
    return groups
