"""``ucb``: UCB1 over independent (drafter, k) arms with the measured speed-up as reward.

The BanditSpec-style baseline. Per context, every (drafter, k) with k in 1..k_max and
the shared no-speculation arm ("none", 0) are separate arms. Untried eligible arms are
played first (in random order), then

    choose argmax_arm  mean_reward(arm) + c * sqrt(2 ln N / n(arm))

with N the plays in the context and the reward of a request the measured speed-up
t_ar * generated_tokens / (draft_time + verify_time) (t_ar as in ``costs.py``).
With ``gamma < 1`` counts and sums are discounted per update (discounted UCB).

A drafter served at one draft length only (``draft_length``: drafter -> k, a fleet
replica's k; the sidecar hints it) has that one arm, (drafter, k): its arms at other
lengths would be placed at k anyway and never learnt, so they would stay "untried" and
be played first for good. A length past ``k_max`` is kept in column ``k_max``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

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
from router.policy.costs import CostModel

#: The largest exploration weight a configuration may set (past it the bonus swamps every
#: measured speed-up anyway).
MAX_EXPLORATION = 1e3


class UcbConfig(BaseModel):
    """JSON configuration of ``ucb``."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    k_max: int = Field(8, ge=1, le=MAX_DRAFT_LENGTH)
    exploration: float = Field(1.0, ge=0.0, le=MAX_EXPLORATION)
    gamma: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = 0
    draft_length: dict[str, ServedLength] = Field(default_factory=dict)


def _on_grid(table: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``table`` [drafters, k + 1] cut or zero-padded to ``shape`` (untried arms are 0)."""
    fitted = np.zeros(shape)
    k = min(table.shape[1], shape[1])
    fitted[:, :k] = table[:, :k]
    return fitted


class _UcbArms:
    """Plays and reward sums of one context: row per drafter, column per k (0 = none)."""

    def __init__(self, drafters: int, k_max: int) -> None:
        self.plays = np.zeros((drafters, k_max + 1))
        self.rewards = np.zeros((drafters, k_max + 1))
        self.none_plays = 0.0
        self.none_rewards = 0.0
        self.acceptance = np.zeros((drafters, 2))  # accepted tokens, failed steps
        self.requests = 0


def measured_speedup(outcome: Outcome, t_ar: float, k: int) -> float:
    """Reward: plain-decoding time of the generated tokens over the time actually spent,
    at most max(k, 1) + 1 (a target step emits at most k + 1 tokens): a reported time of
    1e-300 made it infinite, and one such Report pinned the arm for good. The plain arm's
    bound is 2, not 1: its reward scatters around 1 with timing noise, and capping it at 1
    would cut off the upper half only and bias it below a drafter as slow."""
    spent = outcome.draft_time_s + outcome.verify_time_s or outcome.wall_time_s
    if spent <= 0 or outcome.generated_tokens <= 0:
        return 1.0
    return min(t_ar * outcome.generated_tokens / spent, max(k, 1) + 1.0)


class UcbPolicy:
    """UCB1 over (drafter, k) arms (module doc)."""

    name = "ucb"

    def __init__(
        self,
        drafters: Sequence[str] = (),
        *,
        k_max: int = 8,
        exploration: float = 1.0,
        gamma: float = 1.0,
        rng: np.random.Generator | None = None,
        costs: CostModel | None = None,
        draft_length: Mapping[str, int] | None = None,
    ) -> None:
        self.k_max = k_max
        self.exploration = exploration
        self.gamma = gamma
        self._rng = rng if rng is not None else np.random.default_rng()
        self.costs_ = costs if costs is not None else CostModel()
        self.drafters_: list[str] = [d for d in drafters if d != NONE_DRAFTER]
        self.contexts_: dict[Context, _UcbArms] = {}
        self.updates_ = 0
        self.draft_length_: dict[str, int] = {}
        self.set_drafter_hints(DrafterHints(draft_length=dict(draft_length or {})))

    @classmethod
    def from_config(
        cls, drafters: Sequence[str], config: Mapping[str, Any] | None = None
    ) -> UcbPolicy:
        cfg = UcbConfig.model_validate(dict(config or {}))
        return cls(
            drafters,
            k_max=cfg.k_max,
            exploration=cfg.exploration,
            gamma=cfg.gamma,
            rng=np.random.default_rng(cfg.seed),
            draft_length=cfg.draft_length,
        )

    @property
    def version(self) -> int:
        return self.updates_

    def set_drafter_hints(self, hints: DrafterHints) -> None:
        """Replace the served lengths (``hints.draft_length``), as the sidecar does when a
        drafter is registered or removed; UCB measures its rewards, so the cost hints, the
        cost shapes and the copy drafters are not read."""
        self.draft_length_ = {str(d): int(k) for d, k in hints.draft_length.items() if k > 0}

    def _served_columns(self, drafters: Sequence[str]) -> np.ndarray:
        """[len(drafters), k_max] True where (drafter, k = column + 1) may be played: every
        k, or the drafter's one served length (module doc)."""
        allowed = np.ones((len(drafters), self.k_max), dtype=bool)
        for row, drafter in enumerate(drafters):
            served = self.draft_length_.get(drafter)
            if served is not None:
                allowed[row] = False
                allowed[row, min(served, self.k_max) - 1] = True
        return allowed

    def _context(self, context: Context) -> _UcbArms:
        arms = self.contexts_.get(context)
        if arms is None:
            arms = self.contexts_[context] = _UcbArms(len(self.drafters_), self.k_max)
        return arms

    def select(self, context: Context, eligible: Sequence[str]) -> Decision:
        """Untried arms first, then the highest upper confidence bound."""
        index = [i for i, d in enumerate(self.drafters_) if d in eligible]
        arms = self.contexts_.get(context) or _UcbArms(len(self.drafters_), self.k_max)
        # Flat candidate list: the none arm first, then (drafter, k >= 1).
        names = [self.drafters_[i] for i in index]
        allowed = np.concatenate([[True], self._served_columns(names).ravel()])
        plays = np.concatenate([[arms.none_plays], arms.plays[index, 1:].ravel()])
        rewards = np.concatenate([[arms.none_rewards], arms.rewards[index, 1:].ravel()])
        untried = np.flatnonzero((plays <= 0) & allowed)
        means = rewards / np.maximum(plays, 1e-12)
        greedy = int(np.argmax(np.where((plays > 0) & allowed, means, -np.inf)))
        if untried.size:
            chosen = int(self._rng.choice(untried))
        else:
            # Discounted plays (gamma < 1) of the arms eligible now can sum below 1: log 0
            # at least, or the bonus is NaN and argmax picks the none arm every time.
            total = max(float(plays[allowed].sum()), 1.0)
            bonus = self.exploration * np.sqrt(2.0 * np.log(total) / np.maximum(plays, 1e-12))
            chosen = int(np.argmax(np.where(allowed, means + bonus, -np.inf)))
        explored = chosen != greedy
        if chosen == 0:
            return Decision(NONE_DRAFTER, 0, 1.0, explored)
        row, column = divmod(chosen - 1, self.k_max)
        drafter = names[row]
        expected = float(means[chosen]) if plays[chosen] > 0 else 1.0
        k = self.draft_length_.get(drafter, column + 1)
        return Decision(drafter, k, expected, explored)

    def select_many(self, contexts: Sequence[Context], eligible: Sequence[str]) -> list[Decision]:
        return [self.select(context, eligible) for context in contexts]

    def update(self, context: Context, decision: Decision, outcome: Outcome) -> None:
        """Add the measured speed-up to the played arm (discounting all arms first)."""
        self.costs_.observe(decision.drafter, outcome)
        t_ar = outcome.plain_token_time_s or self.costs_.plain_token_time()
        reward = measured_speedup(outcome, t_ar, decision.k)
        arms = self._context(context)
        arms.requests += 1
        if self.gamma < 1.0:
            arms.plays *= self.gamma
            arms.rewards *= self.gamma
            arms.none_plays *= self.gamma
            arms.none_rewards *= self.gamma
        if decision.k == 0:
            arms.none_plays += 1.0
            arms.none_rewards += reward
        elif decision.drafter in self.drafters_ and decision.k <= self._longest(decision.drafter):
            i = self.drafters_.index(decision.drafter)
            column = min(decision.k, self.k_max)
            arms.plays[i, column] += 1.0
            arms.rewards[i, column] += reward
            arms.acceptance[i] += outcome.acceptance_counts(decision.k)
        self.updates_ += 1

    def _longest(self, drafter: str) -> int:
        """The longest draft length of ``drafter``'s arms: k_max, or its served length."""
        return max(self.k_max, self.draft_length_.get(drafter, 0))

    def update_counterfactual(
        self,
        context: Context,
        drafter: str,
        accepted_per_step: Sequence[int],
        draft_length: int,
        drafted_per_step: Sequence[int] | None = None,
    ) -> None:
        """UCB learns from measured rewards only; counterfactual scores are ignored."""

    def add_drafter(self, name: str, similarity: Mapping[str, float] | None = None) -> None:
        check_drafter_name(name)
        if name in self.drafters_:
            return
        self.drafters_.append(name)
        for arms in self.contexts_.values():
            arms.plays = np.vstack([arms.plays, np.zeros(self.k_max + 1)])
            arms.rewards = np.vstack([arms.rewards, np.zeros(self.k_max + 1)])
            arms.acceptance = np.vstack([arms.acceptance, np.zeros(2)])

    def remove_drafter(self, name: str) -> None:
        if name not in self.drafters_:
            return
        i = self.drafters_.index(name)
        self.drafters_.pop(i)
        for arms in self.contexts_.values():
            arms.plays = np.delete(arms.plays, i, axis=0)
            arms.rewards = np.delete(arms.rewards, i, axis=0)
            arms.acceptance = np.delete(arms.acceptance, i, axis=0)
        self.costs_.forget_drafter(name)

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "policy": self.name,
            "updates": self.updates_,
            "k_max": self.k_max,
            "drafters": list(self.drafters_),
            "contexts": [
                {
                    **c.as_dict(),
                    "requests": a.requests,
                    "none": [a.none_plays, a.none_rewards],
                    "plays": a.plays.tolist(),
                    "rewards": a.rewards.tolist(),
                    "acceptance": a.acceptance.tolist(),
                }
                for c, a in self.contexts_.items()
            ],
            "costs": self.costs_.state_dict(),
            "rng": self._rng.bit_generator.state,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a saved state; one saved under another ``k_max`` keeps the arms both grids
        have (k up to the smaller k_max) and starts the others untried."""
        check_state(state, self.name)
        self.drafters_ = [str(d) for d in state["drafters"]]
        saved = (len(self.drafters_), int(state["k_max"]) + 1)
        shape = (len(self.drafters_), self.k_max + 1)
        self.contexts_ = {}
        for row in state["contexts"]:
            arms = _UcbArms(*shape)
            arms.requests = int(row["requests"])
            arms.none_plays, arms.none_rewards = (float(x) for x in row["none"])
            arms.plays = _on_grid(np.asarray(row["plays"], dtype=np.float64).reshape(saved), shape)
            arms.rewards = _on_grid(
                np.asarray(row["rewards"], dtype=np.float64).reshape(saved), shape
            )
            arms.acceptance = np.asarray(row["acceptance"], dtype=np.float64).reshape(-1, 2)
            self.contexts_[Context.from_dict(row)] = arms
        self.costs_.load_state_dict(state["costs"])
        self.updates_ = int(state["updates"])
        if state.get("rng"):
            self._rng.bit_generator.state = state["rng"]

    def describe(self) -> list[ContextSummary]:
        """Per context: observed acceptance, the best-mean k per drafter, the greedy arm."""
        summaries = []
        for context in sorted(self.contexts_, key=Context.sort_key):
            arms = self.contexts_[context]
            means = np.where(arms.plays > 0, arms.rewards / np.maximum(arms.plays, 1e-12), 0.0)
            means[:, 0] = -np.inf
            means[:, 1:][~self._served_columns(self.drafters_)] = -np.inf
            rows = []
            for i, drafter in enumerate(self.drafters_):
                k = int(np.argmax(means[i]))
                alpha, beta = 1.0 + arms.acceptance[i, 0], 1.0 + arms.acceptance[i, 1]
                rows.append(
                    ArmSummary(
                        drafter,
                        alpha / (alpha + beta),
                        alpha,
                        beta,
                        self.draft_length_.get(drafter, k),
                        float(max(means[i, k], 0.0)),
                        int(arms.plays[i].sum()),
                    )
                )
            none_mean = arms.none_rewards / arms.none_plays if arms.none_plays > 0 else -np.inf
            best = max(rows, key=lambda r: r.expected_speedup, default=None)
            chosen = (
                (best.drafter, best.best_k)
                if best and best.expected_speedup > none_mean and best.expected_speedup > 0
                else (NONE_DRAFTER, 0)
            )
            summaries.append(
                ContextSummary(
                    context.cluster,
                    context.length_bucket,
                    tuple(rows),
                    *chosen,
                    arms.requests,
                    context.structured,
                )
            )
        return summaries
