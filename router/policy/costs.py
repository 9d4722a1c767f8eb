"""Measured cost models: what a drafted token, a verify step and a plain token cost.

Two models share this module:

- ``StepRatios`` (``thompson``): costs as **ratios measured within each request**, in
  units of the request's own target step with the draft positions taken off (the
  intercept of its verify line, at that request's own load). A request reports its
  draft time, verify time and steps together, so other work on the machine (a busy
  neighbour, a batch, a stall) stretches them alike and the ratios stay put, where
  absolute times measured minutes apart would not. Each ratio is the **interquartile
  mean** of a bounded window of recent requests (``RobustWindow``; the verify slope's is
  its median), which one stalled request cannot move:

  - the request's unit ``u = (verify_time / steps) / (1 + s * kbar)``: its target step
    time with the draft positions taken off (kbar = drafted / steps, s the slope below),
    over its steps that drafted something when it measured the others apart
    (``plain_steps_time_s``, ``speculative_steps``); a plain request's is its own step
    (the plain arm's fixed times are kept in it and priced at q, ``RequestOverheads``);
  - ``c[d]``: draft_time / drafted / u per drafter d (its draft cost ratio), kept per
    cost shape where the drafter has one (``cost_shape``, drafter -> key: drafters of one
    architecture cost the same per drafted token, so they share one window: each one's
    figures price all of them, and one registered later is priced from the first request);
    where the request timed each draft's first forward apart (``draft_lead_time_s``: a
    model drafter in the sidecar's engine), a draft of d tokens costs ``c1 + (d - 1) c``
    instead: ``c1`` the first forward (it catches the drafter's cache up on the verified
    tokens; about twice a further token's time on the built-in world on a CPU),
    ``c`` then the time of the further forwards over their number
    (``draft_further_time_s``, ``draft_further_forwards``). One price per token, set at
    the k served most, overprices long drafts and underprices short ones;
  - ``t_e``: the mean time of a request's steps that drafted nothing, timed apart within
    it (the sidecar's engine: one-position forwards, which may cost less than the
    intercept u: ~6 ms against ~9 ms on the built-in world on a CPU) over u, else 1: a
    copy drafter's unmatched lookup (``empty_step``);
  - ``q`` = t_ar: one window of plain_token_time_s / u where the caller measures plain
    decoding (a fleet's plain replica, a client) and of t_e's samples where it does not
    (the same engine's plain step); 1 unit before any;
  - the verify step ``t_verify(k) = 1 + s * k`` units, where the slope s, which no
    single request measures (its k is one), comes from two consecutive requests of one
    context with different mean k (``slope_between``): as close together in time as
    requests of like prompt lengths get.

- ``CostModel`` (``ucb``): the same quantities in seconds, as running means turning into
  EWMAs (weight ``max(1/n, ewma)``).

``CostModel`` fits the verify line ``t_verify(k) = t0 + k * t1`` (``VerifyLine``): discounted least
squares of verify_time / steps on each request's mean k, with a ridge penalty
``lam * (t1 - rho * t0)^2`` that keeps the slope near ``rho * t0`` until k varies enough to
identify it. Without ``plain_token_time_s``, t_ar is the intercept t0: a verify step of
k = 0 scores one position, which is a plain decoding step.

Before anything is measured a drafter costs ``draft_cost_ratio`` (a per-drafter hint,
else ``default_draft_cost_ratio``) times t_ar. Only ratios enter S(a, k).
"""

from __future__ import annotations

import bisect
import statistics
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from router.policy.base import NONE_DRAFTER, Context, Outcome


def target_steps_and_time(outcome: Outcome) -> tuple[int, float]:
    """(target steps, target time) of a request; a k = 0 request may come without steps
    (each generated token was one step) and without a verify time (its wall time less
    draft time is the target's)."""
    drafted = outcome.drafted_tokens
    steps = outcome.steps or (outcome.generated_tokens if drafted == 0 else 0)
    target_time = outcome.verify_time_s
    if target_time <= 0 and drafted == 0:
        target_time = outcome.wall_time_s - outcome.draft_time_s
    return steps, target_time


def speculative_steps(outcome: Outcome, steps: int, target_time: float) -> tuple[int, float]:
    """(steps, target time) of the request's steps that drafted something. A step that
    drafted nothing (a lookup without a match, a step capped to no draft) is a
    one-position forward, which may cost less than the verify line's intercept (on a CPU
    the target's matrix products take another path for one row than for two or more:
    ~6 ms against ~9 ms on the built-in world); when the request timed those steps apart
    (``plain_steps_time_s``), they are taken out. Otherwise (a plain time measured
    elsewhere, as a fleet's or a client's, is no measure of this request's steps), or
    when taking them out leaves no step or no time, the request's totals."""
    plain_steps = outcome.drafted_per_step.count(0)
    plain_time = outcome.plain_steps_time_s
    if plain_time <= 0 or not plain_steps or plain_steps >= steps or plain_time >= target_time:
        return steps, target_time
    return steps - plain_steps, target_time - plain_time


class VerifyLine:
    """t_verify(k) = t0 + k * t1 by discounted, ridge-shrunk least squares (module doc)."""

    def __init__(
        self, *, ewma: float = 0.01, slope_ratio: float = 0.05, slope_prior_weight: float = 1.0
    ) -> None:
        self.ewma = ewma
        self.slope_ratio = slope_ratio
        self.slope_prior_weight = slope_prior_weight
        # Discounted normal equations of verify_time/step = t0 + kbar * t1.
        self.xtx_ = np.zeros((2, 2))
        self.xty_ = np.zeros(2)
        self.observations_ = 0
        self.solved_: tuple[float, float] | None = None

    def observe(self, mean_k: float, step_time: float) -> None:
        """Fold in one request: its mean draft length and target time per step."""
        x = np.array([1.0, mean_k])
        keep = 1.0 - self.ewma if self.observations_ else 0.0
        self.xtx_ = keep * self.xtx_ + np.outer(x, x)
        self.xty_ = keep * self.xty_ + x * step_time
        self.observations_ += 1
        self.solved_ = self._solve()

    def line(self) -> tuple[float, float] | None:
        """(t0, t1), or None before any measurement."""
        return self.solved_

    def slope(self) -> float:
        """s = t1 / t0: what each drafted position adds to a verify step, in steps."""
        line = self.solved_
        return line[1] / line[0] if line is not None else self.slope_ratio

    def _solve(self) -> tuple[float, float] | None:
        if not self.observations_:
            return None
        rho, weight = self.slope_ratio, self.slope_prior_weight
        # The normal equations plus the ridge penalty weight * (t1 - rho * t0)^2, a 2 x 2
        # system solved by Cramer's rule.
        (xx00, xx01), (_, xx11) = self.xtx_.tolist()
        xy0, xy1 = self.xty_.tolist()
        xx00, xx01, xx11 = xx00 + weight * rho * rho, xx01 - weight * rho, xx11 + weight
        determinant = xx00 * xx11 - xx01 * xx01
        t0 = (xx11 * xy0 - xx01 * xy1) / determinant
        t1 = (xx00 * xy1 - xx01 * xy0) / determinant
        if t0 <= 0 or t1 < 0:
            # Noise gave a line with no physical meaning: keep the mean and the prior slope.
            mean_k = self.xtx_[0, 1] / self.xtx_[0, 0]
            mean_y = self.xty_[0] / self.xtx_[0, 0]
            t0 = mean_y / (1.0 + rho * mean_k)
            t1 = rho * t0
        return float(t0), float(t1)

    def state_dict(self) -> dict[str, Any]:
        return {
            "verify_xtx": self.xtx_.tolist(),
            "verify_xty": self.xty_.tolist(),
            "observations": self.observations_,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.xtx_ = np.asarray(state["verify_xtx"], dtype=np.float64).reshape(2, 2)
        self.xty_ = np.asarray(state["verify_xty"], dtype=np.float64).reshape(2)
        self.observations_ = int(state["observations"])
        self.solved_ = self._solve()


class RobustWindow:
    """The last ``size`` samples and a robust location of them, kept current as samples
    arrive (reading it costs nothing on the select path): the mean of the middle
    ``1 - 2 * trim`` share of the sorted samples, so stalls and spikes in the outer
    ``trim`` share on either side do not move it (``trim`` 0.25: the interquartile mean;
    0.5: the median)."""

    def __init__(self, size: int, samples: Iterable[float] = (), *, trim: float = 0.25) -> None:
        self.trim = trim
        self.samples: deque[float] = deque(maxlen=size)
        self.sorted_: list[float] = []
        self.value: float | None = None
        for sample in samples:
            self.add(sample)

    def add(self, sample: float) -> None:
        sample = float(sample)
        if len(self.samples) == self.samples.maxlen:
            del self.sorted_[bisect.bisect_left(self.sorted_, self.samples[0])]
        self.samples.append(sample)
        bisect.insort(self.sorted_, sample)
        self.value = self._location()

    def _location(self) -> float:
        n = len(self.sorted_)
        if self.trim >= 0.5 or n < 3:
            return statistics.median(self.sorted_)
        cut = int(n * self.trim)
        middle = self.sorted_[cut : n - cut]
        return sum(middle) / len(middle)

    def __len__(self) -> int:
        return len(self.samples)


class StepRatios:
    """``thompson``'s cost model: per-step costs in units of each request's speculative
    step intercept, as
    interquartile means of ratios measured within each request, or the median of slopes
    between two consecutive requests for the verify slope (module doc)."""

    def __init__(
        self,
        *,
        window: int = 512,
        trim: float = 0.25,
        verify_slope_ratio: float = 0.05,
        slope_prior_weight: int = 4,
        draft_prior_weight: int = 4,
        default_draft_cost_ratio: float = 0.1,
        draft_cost_ratio: Mapping[str, float] | None = None,
        cost_shape: Mapping[str, str] | None = None,
    ) -> None:
        self.window = window
        self.trim = trim
        self.verify_slope_ratio = verify_slope_ratio
        self.default_draft_cost_ratio = default_draft_cost_ratio
        self.draft_cost_ratio = dict(draft_cost_ratio or {})
        self.draft_prior_weight = draft_prior_weight
        # drafter (or its cost shape) -> draft time per token / unit (per further token
        # where the first forward is timed apart: ``lead_``, the first forward / unit)
        self.draft_: dict[str, RobustWindow] = {}
        self.lead_: dict[str, RobustWindow] = {}
        self.cost_shape: dict[str, str] = {}
        self.set_cost_shapes(cost_shape or {})
        self.plain_ = RobustWindow(window, trim=trim)  # t_ar: plain time per token / unit
        # A step that drafted nothing, timed within a request, over that request's unit.
        self.empty_ = RobustWindow(window, trim=trim)
        # The prior slope as pseudo-samples: measured slopes outvote it, then push it out.
        # A median: clipping the slopes of two requests under different loads keeps it.
        self.slope_prior_weight = slope_prior_weight
        self.slope_ = self._prior_slopes()
        # Per context, the last request's (kbar, seconds per step).
        self.last_step_: dict[Context | None, tuple[float, float]] = {}

    def _prior_slopes(self) -> RobustWindow:
        return RobustWindow(
            self.window, [self.verify_slope_ratio] * self.slope_prior_weight, trim=0.5
        )

    def observe(
        self, drafter: str, outcome: Outcome, context: Context | None = None
    ) -> float | None:
        """Fold one request in; returns its unit u (its speculative step's intercept in
        seconds; a plain request's own step time), or
        None when it measured no target step. The slope pairs it with the previous
        request of the same ``context``: prompts of one context have like lengths, and
        so like step times at equal k, where another context's longer prompts would pass
        for a dearer verify step."""
        steps, target_time = target_steps_and_time(outcome)
        if steps <= 0 or target_time <= 0:
            return None
        if outcome.drafted_tokens == 0:
            # Plain decoding measures no speculative step: its unit is its own step (the
            # fixed times of the plain arm are kept in it, ``RequestOverheads``). A
            # one-position forward may cost less than the verify line's intercept, so
            # the slope's pairs take its step over t_e (measured apart within other
            # requests; 1 until then) for the intercept.
            plain_step = target_time / steps
            self._pair((0.0, plain_step / self.empty_step()), context)
            return plain_step
        spec_steps, spec_time = speculative_steps(outcome, steps, target_time)
        step = (outcome.drafted_tokens / spec_steps, spec_time / spec_steps)
        self._pair(step, context)
        unit = step[1] / (1.0 + self.slope() * step[0])
        if outcome.draft_time_s > 0:
            self._observe_draft(self._cost_key(drafter), outcome, unit)
        if spec_steps < steps:  # steps without drafts timed apart, in this request
            empty = (target_time - spec_time) / (steps - spec_steps) / unit
            self.empty_.add(empty)
            if not outcome.plain_token_time_s:
                self.plain_.add(empty)  # the same engine's plain step
        if outcome.plain_token_time_s:
            self.plain_.add(outcome.plain_token_time_s / unit)
        return unit

    def _observe_draft(self, key: str, outcome: Outcome, unit: float) -> None:
        """Fold a request's draft time into ``key``'s windows: the lead of its timed
        steps and their time per further forward where it timed them apart (module doc),
        else one price per drafted token, unless ``key`` is priced by timed figures (a
        whole draft per token would count the lead twice). The first request that times
        them starts the per-token window afresh: its figures were whole drafts per token."""
        per_token = self.draft_.setdefault(key, RobustWindow(self.window, trim=self.trim))
        lead_steps = outcome.draft_lead_steps
        if not lead_steps:
            if key not in self.lead_:
                per_token.add(outcome.draft_time_s / outcome.drafted_tokens / unit)
            return
        lead = self.lead_.get(key)
        if lead is None:
            lead = self.lead_[key] = RobustWindow(self.window, trim=self.trim)
            per_token = self.draft_[key] = RobustWindow(self.window, trim=self.trim)
        lead.add(outcome.draft_lead_time_s / lead_steps / unit)
        if outcome.draft_further_forwards > 0:
            per_token.add(outcome.draft_further_time_s / outcome.draft_further_forwards / unit)

    def _pair(self, step: tuple[float, float], context: Context | None) -> None:
        """Measure the slope between ``step`` (kbar, seconds per step at the intercept)
        and the context's last request's, and keep it as the context's last."""
        last = self.last_step_.get(context)
        if last is not None:
            slope = slope_between(last, step)
            if slope is not None:
                self.slope_.add(slope)
        self.last_step_[context] = step

    def plain_token_time(self) -> float:
        """t_ar in units: the measured plain time per token over the unit, else 1."""
        return self.plain_.value if self.plain_.value is not None else 1.0

    def empty_step(self) -> float:
        """A step that drafts nothing (a copy drafter's unmatched lookup), in units: as
        measured within requests, else 1 (the verify line's intercept)."""
        return self.empty_.value if self.empty_.value is not None else 1.0

    def slope(self) -> float:
        """s: the verify step's added cost per drafted position, in units."""
        return self.slope_.value if self.slope_.value is not None else self.verify_slope_ratio

    def step_costs(self, drafters: Sequence[str], k_max: int) -> StepCosts:
        """t_ar, t_draft and t_lead per drafter and t_verify(k) for k = 0..k_max, in
        units."""
        t_ar = self.plain_token_time()
        t_draft = [self._draft_cost(name, t_ar) for name in drafters]
        t_lead = [self._lead_cost(name, c) for name, c in zip(drafters, t_draft, strict=True)]
        return StepCosts(
            t_ar,
            np.array(t_draft, dtype=np.float64),
            1.0 + self.slope() * np.arange(k_max + 1),
            np.array(t_lead, dtype=np.float64),
        )

    def _lead_cost(self, drafter: str, per_token: float) -> float:
        """What a draft's first forward costs above a further token's ``per_token``, in
        units: 0 where it is not timed apart; copies of ``per_token`` (no lead) stand in
        for the samples it lacks (``_with_prior``)."""
        window = self.lead_.get(self._cost_key(drafter))
        return self._with_prior(window, per_token) - per_token

    def _draft_cost(self, drafter: str, t_ar: float) -> float:
        """``drafter``'s draft cost per token in units: its window's robust location once
        it holds ``draft_prior_weight`` samples; before, the median of its samples and
        as many copies of its hint (else the default) as make up the weight. The first
        measurement alone decided the cost, so one stalled first request (a GPU's lazy
        start) priced a drafter out for good: never chosen again, never measured again."""
        hint = self.draft_cost_ratio.get(drafter, self.default_draft_cost_ratio) * t_ar
        return self._with_prior(self.draft_.get(self._cost_key(drafter)), hint)

    def _with_prior(self, window: RobustWindow | None, prior: float) -> float:
        """``window``'s robust location once it holds ``draft_prior_weight`` samples;
        before, the median of its samples and as many copies of ``prior`` as make up the
        weight; ``prior`` without samples."""
        if window is None or window.value is None:
            return prior
        missing = self.draft_prior_weight - len(window)
        if missing <= 0:
            return window.value
        return statistics.median([*window.samples, *[prior] * missing])

    def _cost_key(self, drafter: str) -> str:
        """Where ``drafter``'s draft cost is kept: its cost shape's window, else its own."""
        return self.cost_shape.get(drafter, drafter)

    def set_cost_shapes(self, cost_shape: Mapping[str, str]) -> None:
        """Replace the drafters' cost shapes (module doc). A drafter's own figures, kept
        under its name before it had a shape, seed its shape's window when that has none;
        a shape that no drafter has any more is kept for one registered again."""
        self.cost_shape = {str(d): str(key) for d, key in cost_shape.items()}
        for drafter, key in self.cost_shape.items():
            own_draft = self.draft_.pop(drafter, None)
            own_lead = self.lead_.pop(drafter, None)
            if own_lead is not None and key not in self.lead_:
                # Timed figures go as a pair: the shape's per-token figures, if any, were
                # whole drafts per token, the drafter's are further forwards'.
                self.lead_[key] = own_lead
                self.draft_[key] = own_draft or RobustWindow(self.window, trim=self.trim)
            elif own_draft is not None and key not in self.draft_ and own_lead is None:
                self.draft_[key] = own_draft

    def forget_drafter(self, drafter: str) -> None:
        """Forget a removed drafter's own figures; its shape's stay (the others' too)."""
        if drafter not in self.cost_shape:
            self.draft_.pop(drafter, None)
            self.lead_.pop(drafter, None)

    def state_dict(self) -> dict[str, Any]:
        return {
            "draft_ratios": {name: list(w.samples) for name, w in self.draft_.items()},
            "lead_ratios": {name: list(w.samples) for name, w in self.lead_.items()},
            "plain_ratios": list(self.plain_.samples),
            "empty_ratios": list(self.empty_.samples),
            "slopes": list(self.slope_.samples),
            "last_steps": [
                [c.saved_cluster() if c else None, c.length_bucket if c else None, *step]
                for c, step in self.last_step_.items()
            ],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore; a state saved by the seconds-based model before (no ratio windows)
        starts the ratios afresh, and figures saved under a drafter's name before it had a
        cost shape seed that shape's window (``set_cost_shapes``). A state saved before
        steps without drafts were timed apart (no ``empty_ratios``) measures its verify
        slope afresh: its slopes paired plain requests with speculative ones, so the
        one-position forward's cheaper step passed for a dearer verify position."""
        self.draft_ = {
            str(name): RobustWindow(self.window, samples, trim=self.trim)
            for name, samples in state.get("draft_ratios", {}).items()
        }
        # A state saved before first forwards were timed apart has none: its per-token
        # windows start afresh at the first request that times them (``_observe_draft``).
        self.lead_ = {
            str(name): RobustWindow(self.window, samples, trim=self.trim)
            for name, samples in state.get("lead_ratios", {}).items()
        }
        self.set_cost_shapes(self.cost_shape)
        self.plain_ = RobustWindow(self.window, state.get("plain_ratios", []), trim=self.trim)
        self.empty_ = RobustWindow(self.window, state.get("empty_ratios", []), trim=self.trim)
        if "empty_ratios" not in state:
            self.slope_ = self._prior_slopes()
            self.last_step_ = {}
            return
        self.slope_ = (
            RobustWindow(self.window, state["slopes"], trim=0.5)
            if "slopes" in state
            else self._prior_slopes()
        )
        self.last_step_ = {
            (Context.from_saved(cluster, bucket) if cluster is not None else None): (
                float(kbar),
                float(seconds),
            )
            for cluster, bucket, kbar, seconds in state.get("last_steps", [])
        }


#: Slopes measured between two requests are clipped to [0, MAX_SLOPE] (a verify position
#: costing more than a whole step means the two requests' loads differed).
MAX_SLOPE = 1.0
#: Two requests measure the slope when their mean k differ by at least this much (closer
#: ones divide their timing noise by too small a difference).
MIN_K_SPREAD = 1.0
#: A drafter's pooled excess over plain decoding's fixed time (``RequestOverheads``) keeps
#: this many times a context's window: it gathers the requests of every context of a bucket.
POOLED_WINDOWS = 4
#: Pseudo-samples at F_0 plus the pooled excess beside a context's first own figures.
PRIOR_SAMPLES = 2


def slope_between(first: tuple[float, float], second: tuple[float, float]) -> float | None:
    """s from two consecutive requests' (kbar, seconds per step), None unless their kbar
    differ by at least MIN_K_SPREAD. With the same load on both, y = u (1 + s kbar) gives, for the
    one of larger kbar (hi) over the other (lo), r = y_hi / y_lo and

        s = (r - 1) / (kbar_hi - r kbar_lo),

    increasing in r, so clipping to [0, MAX_SLOPE] keeps the median of many such s."""
    (k_lo, y_lo), (k_hi, y_hi) = sorted((first, second))
    if k_hi - k_lo < MIN_K_SPREAD or y_lo <= 0:
        return None
    r = y_hi / y_lo
    denominator = k_hi - r * k_lo
    if denominator <= 0:
        return MAX_SLOPE
    return min(MAX_SLOPE, max(0.0, (r - 1.0) / denominator))


class CostModel:
    """``ucb``'s cost model: t_draft per drafter, t_verify(k) and t_ar in seconds, as
    running means turning into EWMAs (module doc)."""

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
        self.default_draft_cost_ratio = default_draft_cost_ratio
        self.draft_cost_ratio = dict(draft_cost_ratio or {})
        self.draft_token_time_: dict[str, float] = {}
        self.draft_observations_: dict[str, int] = {}
        self.plain_token_time_: float | None = None
        self.plain_observations_ = 0
        self.verify_ = VerifyLine(
            ewma=ewma, slope_ratio=verify_slope_ratio, slope_prior_weight=slope_prior_weight
        )

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
        steps, target_time = target_steps_and_time(outcome)
        if steps > 0 and target_time > 0:
            self.verify_.observe(drafted / steps, target_time / steps)

    def verify_line(self) -> tuple[float, float] | None:
        """(t0, t1) of t_verify(k) = t0 + k * t1, or None before any measurement."""
        return self.verify_.line()

    def plain_token_time(self) -> float:
        """t_ar: measured plain time per token, else the verify intercept, else 1 (units)."""
        if self.plain_token_time_ is not None:
            return self.plain_token_time_
        line = self.verify_.line()
        return line[0] if line is not None else 1.0

    def verify_times(self, k_max: int) -> np.ndarray:
        """t_verify(k) = t0 + t1 k for k = 0..k_max; before any measurement t0 = t_ar and
        t1 = rho * t0."""
        line = self.verify_.line()
        t_ar = self.plain_token_time()
        t0, t1 = line if line is not None else (t_ar, self.verify_slope_ratio * t_ar)
        return t0 + t1 * np.arange(k_max + 1)

    def draft_times(self, drafters: Iterable[str]) -> np.ndarray:
        """t_draft per drafted token for each drafter (measured, else ratio * t_ar)."""
        t_ar = self.plain_token_time()
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

    def forget_drafter(self, drafter: str) -> None:
        self.draft_token_time_.pop(drafter, None)
        self.draft_observations_.pop(drafter, None)

    def state_dict(self) -> dict[str, Any]:
        return {
            "draft_token_time": dict(self.draft_token_time_),
            "draft_observations": dict(self.draft_observations_),
            "plain_token_time": self.plain_token_time_,
            "plain_observations": self.plain_observations_,
            **self.verify_.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.draft_token_time_ = {str(k): float(v) for k, v in state["draft_token_time"].items()}
        self.draft_observations_ = {str(k): int(v) for k, v in state["draft_observations"].items()}
        self.plain_observations_ = int(state["plain_observations"])
        plain = state["plain_token_time"]
        self.plain_token_time_ = None if plain is None else float(plain)
        self.verify_.load_state_dict(state)


@dataclass(frozen=True, slots=True)
class StepCosts:
    """The cost model's per-step costs for D drafters and k = 0..K."""

    t_ar: float  # plain decoding time per token
    t_draft: np.ndarray  # [D]: time per drafted token
    t_verify: np.ndarray  # [K + 1]: time of a verify step scoring k drafted tokens
    t_lead: np.ndarray | None = None  # [D]: a draft's first forward above t_draft


class RequestOverheads:
    """Per context: each arm's fixed time per request and the mean output length.

    A request's fixed time is what its wall time leaves after its measured steps,
    ``wall - draft_time - verify_time``: the target's prefill, the drafter's start-up and
    the engine's bookkeeping, which a short output cannot amortise. It is kept in the
    request's own unit (``StepRatios.observe``), so a request slowed by other work gives
    the same figure as an unhurried one, and priced as the interquartile mean of the
    arm's last ``window`` requests in the context. The output length is a running mean
    turning into an EWMA (weight ``max(1/n, ewma)``). Both enter
    ``speedup.request_speedup``.

    What a drafter's fixed time adds to plain decoding's, F_d - F_0, is its start-up (its
    prefill, its cache), which follows the prompt's length and not its task: each request
    of a drafter in a context whose F_0 is measured adds F_d - F_0 to that drafter's
    pooled excess in the length bucket. Until the context has ``own_min`` requests of the
    drafter, F_d is the median of its own figures and ``PRIOR_SAMPLES`` (2) of a prior:
    F_0 plus that pooled excess once it has ``own_min`` figures (one alone can be a stall,
    and it priced every drafter of the shape out of the bucket's contexts where drafting
    gains least), or, where F_0 or the excess is not measured yet, the median of the
    drafter's figures in the bucket's other contexts (the excess needs F_0 measured
    before a drafter's request in the same context, which early on, and in contexts where
    drafting wins from the start, is rare). One outlying first figure (a
    stall, a request whose prefill met a busy spell) is outvoted, where alone it priced
    the drafter out of the context for good, since a drafter not chosen is not measured
    again; from the third request on, own figures that agree with each other outvote the
    prior.

    Drafters of one cost shape (``set_cost_shapes``: one architecture, as the sidecar's
    model drafters fine-tuned from one base) have one start-up: their figures are kept
    under the shape, so such drafters are compared on their acceptance alone, which
    counterfactual scores measure for all of them on every greedy request. Kept apart,
    each drafter's figure in a context came from the few requests it served there, and
    on short answers (rag: 8-34 tokens, where the fixed time is a third of a request)
    their noise decided between drafters that cost the same.
    """

    def __init__(
        self, *, window: int = 16, trim: float = 0.25, ewma: float = 0.05, own_min: int = 4
    ) -> None:
        self.window = window
        self.trim = trim
        self.ewma = ewma
        # 4 at trim 0.25: the fewest samples whose trimmed mean leaves one stall out.
        self.own_min = own_min
        self.fixed_: dict[Context, dict[str, RobustWindow]] = {}  # context -> arm -> units
        # (length bucket, drafter) -> F_d - F_0 of its requests in that bucket, in units.
        self.excess_: dict[tuple[int, str], RobustWindow] = {}
        self.length_: dict[Context, tuple[float, int]] = {}
        # drafter -> the key its figures are kept under (``set_cost_shapes``).
        self.cost_shape: dict[str, str] = {}

    def _arm(self, drafter: str) -> str:
        """Where ``drafter``'s fixed times are kept: its cost shape's, else its own."""
        return self.cost_shape.get(drafter, drafter)

    def set_cost_shapes(self, cost_shape: Mapping[str, str]) -> None:
        """Replace the drafters' cost shapes: drafters of one architecture share one
        figure per context (and one pooled excess per length bucket), as they share one
        draft cost (``StepRatios``). A drafter's figures kept under its own name seed its
        shape's where that has none yet, else are dropped."""
        self.cost_shape = {str(d): str(key) for d, key in cost_shape.items()}
        for drafter, key in self.cost_shape.items():
            for arms in self.fixed_.values():
                own = arms.pop(drafter, None)
                if own is not None and key not in arms:
                    arms[key] = own
            for bucket, name in [k for k in self.excess_ if k[1] == drafter]:
                own = self.excess_.pop((bucket, name))
                self.excess_.setdefault((bucket, key), own)

    def observe(
        self,
        context: Context,
        drafter: str,
        outcome: Outcome,
        unit: float | None,
        plain_step: float = 1.0,
    ) -> None:
        """Fold one request in; ``unit`` is its own unit (``StepRatios.observe``: a plain
        request's is its plain step, in which the plain arm's figures are kept), and
        ``plain_step`` q, a plain step in the speculative unit (``fixed_times``)."""
        tokens = outcome.generated_tokens
        if tokens <= 0 or outcome.wall_time_s <= 0 or unit is None:
            return
        arm = self._arm(drafter) if outcome.drafted_tokens > 0 else NONE_DRAFTER
        _, target_time = target_steps_and_time(outcome)
        fixed = max(0.0, outcome.wall_time_s - outcome.draft_time_s - target_time) / unit
        arms = self.fixed_.setdefault(context, {})
        plain = arms.get(NONE_DRAFTER)
        if arm != NONE_DRAFTER and plain is not None and plain.value is not None:
            pooled = self.excess_.get((context.length_bucket, arm))
            if pooled is None:
                pooled = RobustWindow(POOLED_WINDOWS * self.window, trim=self.trim)
                self.excess_[(context.length_bucket, arm)] = pooled
            pooled.add(fixed - plain.value * plain_step)
        arms.setdefault(arm, RobustWindow(self.window, trim=self.trim)).add(fixed)
        length = self.length_.get(context)
        if length is None:
            self.length_[context] = (float(tokens), 1)
        else:
            weight = max(1.0 / (length[1] + 1), self.ewma)
            self.length_[context] = ((1.0 - weight) * length[0] + weight * tokens, length[1] + 1)

    def output_tokens(self, context: Context) -> float | None:
        """Mean generated tokens of the context's requests, None before any."""
        entry = self.length_.get(context)
        return entry[0] if entry else None

    def fixed_times(
        self, context: Context, drafters: Sequence[str], plain_step: float = 1.0
    ) -> tuple[float, np.ndarray]:
        """(F_0, F_d per drafter) in units. The plain arm's figures are kept in its own
        step (a one-position forward) and converted at the current ``plain_step`` q, so
        that a q measured after them still applies.

        A drafter with ``own_min`` requests in the context costs its own figure; with
        fewer, the median of its own figures and of a prior (F_0 plus its pooled excess
        in the length bucket, ``_pooled_prior``; else, where it has a figure here, the
        median of its figures in the bucket's other contexts, ``_bucket_figures``); else
        its own figure. Unmeasured arms are priced so that drafting is
        never overrated: an unmeasured plain arm costs 0 (all fixed time counts against
        drafting, so where that makes drafting lose, plain decoding is tried once and
        measured); an unmeasured drafter costs the cheapest measured drafter here, else
        the plain arm.
        """
        arms = self.fixed_.get(context, {})
        plain = arms.get(NONE_DRAFTER)
        plain_value = plain.value if plain is not None else None
        plain_measured = plain_value is not None
        fixed_none = plain_value * plain_step if plain_value is not None else 0.0
        measured: dict[str, float] = {}
        elsewhere: dict[str, list[float]] | None = None  # read once, when first needed
        for key in dict.fromkeys(map(self._arm, drafters)):
            own = arms.get(key)
            if own is not None and len(own) >= self.own_min and own.value is not None:
                measured[key] = own.value
                continue
            prior = self._pooled_prior(
                context.length_bucket, key, fixed_none if plain_measured else None
            )
            if prior is None and own is not None:
                if elsewhere is None:
                    elsewhere = self._bucket_figures(context)
                figures = elsewhere.get(key)
                prior = statistics.median(figures) if figures else None
            if prior is not None:
                samples = [*(own.samples if own else ()), *[prior] * PRIOR_SAMPLES]
                measured[key] = statistics.median(samples)
            elif own is not None and own.value is not None:
                measured[key] = own.value
        default = min(measured.values(), default=fixed_none)
        return fixed_none, np.array([measured.get(self._arm(d), default) for d in drafters])

    def _pooled_prior(self, bucket: int, key: str, fixed_none: float | None) -> float | None:
        """F_0 plus ``key``'s pooled excess in the length bucket, where F_0 (``fixed_none``)
        is measured and the excess has ``own_min`` figures (class doc); else None."""
        if fixed_none is None:
            return None
        pooled = self.excess_.get((bucket, key))
        # As a context's own figures, a pool of fewer than own_min can be one stall.
        if pooled is None or len(pooled) < self.own_min or pooled.value is None:
            return None
        return max(0.0, fixed_none + pooled.value)

    def _bucket_figures(self, context: Context) -> dict[str, list[float]]:
        """Each arm's figures in the bucket's other contexts, the prior of a drafter with a
        figure in ``context`` where no pooled excess prices it (class doc): one pass over
        the contexts for all arms, the asking one skipped by identity."""
        here = self.fixed_.get(context)
        figures: dict[str, list[float]] = {}
        for other, arms in self.fixed_.items():
            if arms is here or other.length_bucket != context.length_bucket:
                continue
            for key, window in arms.items():
                if window.value is not None:
                    figures.setdefault(key, []).append(window.value)
        return figures

    def forget_drafter(self, drafter: str) -> None:
        """Forget a removed drafter's own figures; its shape's stay (the others' too)."""
        if drafter in self.cost_shape:
            return
        for arms in self.fixed_.values():
            arms.pop(drafter, None)
        for key in [key for key in self.excess_ if key[1] == drafter]:
            del self.excess_[key]

    def state_dict(self) -> dict[str, Any]:
        return {
            "fixed_units": [
                [c.saved_cluster(), c.length_bucket, arm, list(w.samples)]
                for c, arms in self.fixed_.items()
                for arm, w in arms.items()
            ],
            "excess_units": [
                [bucket, arm, list(w.samples)] for (bucket, arm), w in self.excess_.items()
            ],
            "length": [
                [c.saved_cluster(), c.length_bucket, value, n]
                for c, (value, n) in self.length_.items()
            ],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore; fixed times saved in seconds by the model before (``fixed``) are not
        in units and are measured afresh."""
        self.fixed_ = {}
        for cluster, bucket, arm, samples in state.get("fixed_units", []):
            arms = self.fixed_.setdefault(Context.from_saved(cluster, bucket), {})
            arms[str(arm)] = RobustWindow(self.window, samples, trim=self.trim)
        # States saved before the pooled excess have none: it is measured afresh.
        self.excess_ = {
            (int(bucket), str(arm)): RobustWindow(
                POOLED_WINDOWS * self.window, samples, trim=self.trim
            )
            for bucket, arm, samples in state.get("excess_units", [])
        }
        self.length_ = {
            Context.from_saved(c, b): (float(v), int(n)) for c, b, v, n in state.get("length", [])
        }
