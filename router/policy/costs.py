"""Measured cost model: drafter time per drafted token, target verify time per step, t_ar.

Costs are learned from every outcome, never assumed:

- ``t_draft[d]``: running mean of draft_time / drafted tokens per drafter, turning into an
  EWMA (weight ``max(1/n, ewma)`` for the n-th observation) so it follows slow changes;
- ``t_verify(k) = t0 + k * t1``: discounted least squares of verify_time / steps on the
  mean k of each request, with a ridge penalty ``lam * (t1 - rho * t0)^2`` that keeps the
  slope near ``rho * t0`` until k varies enough to identify it;
- ``t_ar``: the same running mean / EWMA of ``plain_token_time_s`` when callers measure
  it. Otherwise it is the intercept t0: a verify step of k = 0 scores one position,
  which is a plain decoding step (k = 0 requests measure it directly, small-k steps pin
  it through the line).

Before anything is measured, costs are in units of t_ar = 1 and a drafter costs
``draft_cost_ratio`` (a per-drafter hint, else ``default_draft_cost_ratio``) per token.
Only ratios enter S(a, k), so the switch from units to seconds is harmless.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from router.policy.base import NONE_DRAFTER, Context, Outcome


class CostModel:
    """Online estimates of t_draft per drafter, t_verify(k) and t_ar (see module doc)."""

    def __init__(
        self,
        *,
        ewma: float = 0.01,
        verify_slope_ratio: float = 0.05,
        slope_prior_weight: float = 1.0,
        default_draft_cost_ratio: float = 0.1,
        draft_cost_ratio: Mapping[str, float] | None = None,
    ) -> None:
        self.ewma = ewma
        self.verify_slope_ratio = verify_slope_ratio
        self.slope_prior_weight = slope_prior_weight
        self.default_draft_cost_ratio = default_draft_cost_ratio
        self.draft_cost_ratio = dict(draft_cost_ratio or {})
        self.draft_token_time_: dict[str, float] = {}
        self.draft_observations_: dict[str, int] = {}
        self.plain_token_time_: float | None = None
        self.plain_observations_ = 0
        # Discounted normal equations of verify_time/step = t0 + kbar * t1.
        self.verify_xtx_ = np.zeros((2, 2))
        self.verify_xty_ = np.zeros(2)
        self.observations_ = 0

    def _blend(self, old: float | None, new: float, n: int) -> float:
        """Fold the n-th observation in with weight max(1/n, ewma)."""
        if old is None:
            return new
        weight = max(1.0 / n, self.ewma)
        return (1.0 - weight) * old + weight * new

    def observe(self, drafter: str, outcome: Outcome) -> None:
        """Fold one request's measured times into the estimates."""
        if outcome.plain_token_time_s:
            self.plain_observations_ += 1
            self.plain_token_time_ = self._blend(
                self.plain_token_time_, outcome.plain_token_time_s, self.plain_observations_
            )
        drafted = outcome.drafted_tokens
        if drafted > 0 and outcome.draft_time_s > 0:
            n = self.draft_observations_[drafter] = self.draft_observations_.get(drafter, 0) + 1
            self.draft_token_time_[drafter] = self._blend(
                self.draft_token_time_.get(drafter), outcome.draft_time_s / drafted, n
            )
        # A k = 0 request may come without steps: each generated token was one step.
        steps = outcome.steps or (outcome.generated_tokens if drafted == 0 else 0)
        target_time = outcome.verify_time_s
        if target_time <= 0 and drafted == 0:
            target_time = outcome.wall_time_s - outcome.draft_time_s
        if steps > 0 and target_time > 0:
            x = np.array([1.0, drafted / steps])
            keep = 1.0 - self.ewma if self.observations_ else 0.0
            self.verify_xtx_ = keep * self.verify_xtx_ + np.outer(x, x)
            self.verify_xty_ = keep * self.verify_xty_ + x * (target_time / steps)
            self.observations_ += 1

    def verify_line(self) -> tuple[float, float] | None:
        """(t0, t1) of t_verify(k) = t0 + k * t1, or None before any measurement."""
        if not self.observations_:
            return None
        rho, weight = self.verify_slope_ratio, self.slope_prior_weight
        # The normal equations plus the ridge penalty weight * (t1 - rho * t0)^2, a 2 x 2
        # system solved by Cramer's rule (in floats: this runs on every select).
        (xx00, xx01), (_, xx11) = self.verify_xtx_.tolist()
        xy0, xy1 = self.verify_xty_.tolist()
        xx00, xx01, xx11 = xx00 + weight * rho * rho, xx01 - weight * rho, xx11 + weight
        determinant = xx00 * xx11 - xx01 * xx01
        t0 = (xx11 * xy0 - xx01 * xy1) / determinant
        t1 = (xx00 * xy1 - xx01 * xy0) / determinant
        if t0 <= 0 or t1 < 0:
            # Noise gave a line with no physical meaning: keep the mean and the prior slope.
            mean_k = self.verify_xtx_[0, 1] / self.verify_xtx_[0, 0]
            mean_y = self.verify_xty_[0] / self.verify_xtx_[0, 0]
            t0 = mean_y / (1.0 + rho * mean_k)
            t1 = rho * t0
        return float(t0), float(t1)

    def plain_token_time(self) -> float:
        """t_ar: measured plain time per token, else the verify intercept, else 1 (units)."""
        if self.plain_token_time_ is not None:
            return self.plain_token_time_
        return self._plain_token_time(self.verify_line())

    def _plain_token_time(self, line: tuple[float, float] | None) -> float:
        """t_ar given the solved verify ``line``."""
        if self.plain_token_time_ is not None:
            return self.plain_token_time_
        return line[0] if line is not None else 1.0

    def verify_times(self, k_max: int) -> np.ndarray:
        """t_verify(k) for k = 0..k_max."""
        line = self.verify_line()
        return self._verify_times(line, self._plain_token_time(line), k_max)

    def _verify_times(
        self, line: tuple[float, float] | None, t_ar: float, k_max: int
    ) -> np.ndarray:
        """t_verify(k) = t0 + k * t1 for k = 0..k_max; before any measurement t0 = t_ar and
        t1 = rho * t0."""
        t0, t1 = line if line is not None else (t_ar, self.verify_slope_ratio * t_ar)
        return t0 + t1 * np.arange(k_max + 1)

    def draft_times(self, drafters: Iterable[str]) -> np.ndarray:
        """t_draft per drafted token for each drafter (measured, else ratio * t_ar)."""
        return self._draft_times(drafters, self.plain_token_time())

    def _draft_times(self, drafters: Iterable[str], t_ar: float) -> np.ndarray:
        measured, ratio, default = (
            self.draft_token_time_,
            self.draft_cost_ratio,
            self.default_draft_cost_ratio,
        )
        return np.array(
            [
                measured[name] if name in measured else ratio.get(name, default) * t_ar
                for name in drafters
            ],
            dtype=np.float64,
        )

    def step_costs(self, drafters: Sequence[str], k_max: int) -> StepCosts:
        """t_ar, t_draft per drafter and t_verify(k) for k = 0..k_max at once: the verify
        line is solved once (``select`` prices every call)."""
        line = self.verify_line()
        t_ar = self._plain_token_time(line)
        return StepCosts(
            t_ar, self._draft_times(drafters, t_ar), self._verify_times(line, t_ar, k_max)
        )

    def forget_drafter(self, drafter: str) -> None:
        self.draft_token_time_.pop(drafter, None)
        self.draft_observations_.pop(drafter, None)

    def state_dict(self) -> dict[str, Any]:
        return {
            "draft_token_time": dict(self.draft_token_time_),
            "draft_observations": dict(self.draft_observations_),
            "plain_token_time": self.plain_token_time_,
            "plain_observations": self.plain_observations_,
            "verify_xtx": self.verify_xtx_.tolist(),
            "verify_xty": self.verify_xty_.tolist(),
            "observations": self.observations_,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.draft_token_time_ = {str(k): float(v) for k, v in state["draft_token_time"].items()}
        self.draft_observations_ = {str(k): int(v) for k, v in state["draft_observations"].items()}
        self.plain_observations_ = int(state["plain_observations"])
        plain = state["plain_token_time"]
        self.plain_token_time_ = None if plain is None else float(plain)
        self.verify_xtx_ = np.asarray(state["verify_xtx"], dtype=np.float64).reshape(2, 2)
        self.verify_xty_ = np.asarray(state["verify_xty"], dtype=np.float64).reshape(2)
        self.observations_ = int(state["observations"])


@dataclass(frozen=True, slots=True)
class StepCosts:
    """The cost model's per-step costs for D drafters and k = 0..K."""

    t_ar: float  # plain decoding time per token
    t_draft: np.ndarray  # [D]: time per drafted token
    t_verify: np.ndarray  # [K + 1]: time of a verify step scoring k drafted tokens


class RequestOverheads:
    """Per context: each arm's fixed time per request and the mean output length.

    The fixed time of a request is what its measured wall time leaves after the
    per-step costs the ``CostModel`` predicts for its actual steps: for a plain request
    ``wall - tokens * t_ar``, for one drafted by d
    ``wall - drafted * t_draft[d] - steps * t_verify(mean k)``. It holds the target's
    prefill, the drafter's start-up and the engine's bookkeeping, which a short output
    cannot amortise. Both are running means that turn into EWMAs (weight
    ``max(1/n, ewma)``) and enter ``speedup.request_speedup``. A fixed time is used net
    of ``z`` (1) standard errors (EWMA variance over min(n, 1/ewma) requests), never below
    0, so cost-model noise, where there is no fixed time, does not move decisions.
    """

    def __init__(self, *, ewma: float = 0.05, z: float = 1.0) -> None:
        self.ewma = ewma
        self.z = z
        self.fixed_: dict[Context, dict[str, FixedTime]] = {}  # context -> arm -> estimate
        self.length_: dict[Context, tuple[float, int]] = {}

    def _weight(self, n: int) -> float:
        """Weight of the n-th observation: a running mean, then an EWMA."""
        return max(1.0 / n, self.ewma)

    def observe(self, context: Context, drafter: str, outcome: Outcome, costs: CostModel) -> None:
        """Fold one request in (call after ``costs.observe`` so its costs are current)."""
        tokens = outcome.generated_tokens
        if tokens <= 0 or outcome.wall_time_s <= 0:
            return
        drafted = outcome.drafted_tokens
        if drafted == 0:
            arm, predicted = NONE_DRAFTER, tokens * costs.plain_token_time()
        else:
            steps = outcome.steps
            verify = costs.verify_line() or (costs.plain_token_time(), 0.0)
            draft = float(costs.draft_times([drafter])[0])
            predicted = drafted * draft + steps * (verify[0] + verify[1] * drafted / steps)
            arm = drafter
        residual = outcome.wall_time_s - predicted
        arms = self.fixed_.setdefault(context, {})
        fixed = arms.get(arm)
        if fixed is None:
            fixed = arms[arm] = FixedTime(residual, 1)
        else:
            fixed.requests += 1
            weight = self._weight(fixed.requests)
            fixed.variance = (1.0 - weight) * fixed.variance + weight * (residual - fixed.mean) ** 2
            fixed.mean = (1.0 - weight) * fixed.mean + weight * residual
        fixed.net = self._net(fixed)
        length = self.length_.get(context)
        if length is None:
            self.length_[context] = (float(tokens), 1)
        else:
            weight = self._weight(length[1] + 1)
            self.length_[context] = ((1.0 - weight) * length[0] + weight * tokens, length[1] + 1)

    def output_tokens(self, context: Context) -> float | None:
        """Mean generated tokens of the context's requests, None before any."""
        entry = self.length_.get(context)
        return entry[0] if entry else None

    def fixed_times(self, context: Context, drafters: Sequence[str]) -> tuple[float, np.ndarray]:
        """(F_0, F_d per drafter), clamped at 0.

        Unmeasured arms are priced so that drafting is never overrated: an unmeasured plain
        arm costs 0 (all fixed time counts against drafting, so where that makes drafting
        lose, plain decoding is tried once and measured); an unmeasured drafter costs the
        cheapest measured drafter here, else the plain arm.
        """
        arms = self.fixed_.get(context, {})
        fixed_none = arms[NONE_DRAFTER].net if NONE_DRAFTER in arms else 0.0
        default = min((arms[name].net for name in drafters if name in arms), default=fixed_none)
        return fixed_none, np.array([arms[d].net if d in arms else default for d in drafters])

    def _net(self, fixed: FixedTime) -> float:
        """The mean less ``z`` standard errors over min(n, 1 / ewma) requests, at least 0."""
        effective = min(float(fixed.requests), 1.0 / self.ewma)
        return max(0.0, fixed.mean - self.z * (fixed.variance / effective) ** 0.5)

    def forget_drafter(self, drafter: str) -> None:
        for arms in self.fixed_.values():
            arms.pop(drafter, None)

    def state_dict(self) -> dict[str, Any]:
        return {
            "fixed": [
                [c.cluster, c.length_bucket, arm, f.mean, f.requests, f.variance]
                for c, arms in self.fixed_.items()
                for arm, f in arms.items()
            ],
            "length": [
                [c.cluster, c.length_bucket, value, n] for c, (value, n) in self.length_.items()
            ],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.fixed_ = {}
        for row in state.get("fixed", []):
            variance = float(row[5]) if len(row) > 5 else 0.0
            arms = self.fixed_.setdefault(Context(str(row[0]), int(row[1])), {})
            fixed = arms[str(row[2])] = FixedTime(float(row[3]), int(row[4]), variance)
            fixed.net = self._net(fixed)
        self.length_ = {
            Context(str(c), int(b)): (float(v), int(n)) for c, b, v, n in state.get("length", [])
        }


@dataclass(slots=True)
class FixedTime:
    """One arm's fixed time per request in one context: mean and EWMA variance, and the
    mean net of their standard error that prices requests (``RequestOverheads._net``),
    set whenever they change."""

    mean: float
    requests: int
    variance: float = 0.0
    net: float = 0.0
