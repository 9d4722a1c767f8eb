"""The policy's domain types: context, decision, outcome, summaries and the ``Policy`` protocol.

A policy maps a context (task cluster, prompt-length bucket) to a decision (drafter,
draft length k) and learns from the outcome of each routed request. Everything here is
pure Python (no NumPy, no torch) so the sidecar can import it cheaply.
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, runtime_checkable

#: The drafter name of the no-speculation arm (k = 0).
NONE_DRAFTER = "none"

#: The largest draft length k any policy models (its ``k_max`` or fixed ``k``), and so
#: the largest a request may force.
MAX_DRAFT_LENGTH = 32

#: Format version of every policy's ``state_dict()``; bumped on incompatible changes.
#: 2: thompson's copy-drafter statistics (``"copy"``).
STATE_VERSION = 2

#: Format versions ``load_state_dict`` reads: a version 1 state loads, and what it
#: lacks starts empty (thompson's copy statistics from their priors).
READABLE_STATE_VERSIONS: tuple[int, ...] = (1, 2)

#: Prompt-token edges of the length buckets: bucket i holds prompts with
#: ``LENGTH_BUCKET_EDGES[i-1] <= tokens < LENGTH_BUCKET_EDGES[i]``.
LENGTH_BUCKET_EDGES: tuple[int, ...] = (64, 256, 1024)


class IncompatibleStateError(ValueError):
    """A saved policy state cannot be loaded by this policy (wrong version or policy)."""


@dataclass(frozen=True, slots=True)
class Context:
    """What the policy conditions on: the task cluster, the prompt-length bucket, and
    whether the output is held to a grammar (structured output: JSON, a regex, a tool
    call), under which the drafts that pay differ (a fine-tuned drafter's free text is
    often not allowed, while an n-gram lookup copies the keys)."""

    cluster: str
    length_bucket: int = 0
    structured: bool = False

    def sort_key(self) -> tuple[str, int, bool]:
        return (self.cluster, self.length_bucket, self.structured)

    def as_dict(self) -> dict[str, Any]:
        """The context's fields in a saved state's rows ("structured" only where set, so
        free-text rows read as before)."""
        row: dict[str, Any] = {"cluster": self.cluster, "length_bucket": self.length_bucket}
        if self.structured:
            row["structured"] = True
        return row

    @classmethod
    def from_dict(cls, row: Mapping[str, Any]) -> Context:
        return cls(str(row["cluster"]), int(row["length_bucket"]), bool(row.get("structured")))

    def saved_cluster(self) -> Any:
        """The cluster slot of a saved positional row ([cluster, bucket, ...]): the name,
        or ``{"cluster": name, "structured": true}`` for a structured context."""
        return {"cluster": self.cluster, "structured": True} if self.structured else self.cluster

    @classmethod
    def from_saved(cls, cluster: Any, bucket: Any) -> Context:
        """The context of a positional row's cluster slot and bucket (``saved_cluster``)."""
        if isinstance(cluster, Mapping):
            return cls(str(cluster["cluster"]), int(bucket), bool(cluster.get("structured")))
        return cls(str(cluster), int(bucket))


def length_bucket(prompt_tokens: int) -> int:
    """Bucket index of a prompt length: 0 (< 64), 1 (< 256), 2 (< 1024), 3 (>= 1024)."""
    return bisect.bisect_right(LENGTH_BUCKET_EDGES, max(0, int(prompt_tokens)))


@dataclass(frozen=True, slots=True)
class Decision:
    """The arm chosen for one request: drafter ``"none"`` exactly when ``k == 0``.

    ``stop_threshold`` in [0, 1): a model drafter's draft may end before k when its
    confidence in the next token is below it (``drafters/stopping.py``); 0 never stops.
    """

    drafter: str
    k: int
    expected_speedup: float = 1.0
    explored: bool = False
    stop_threshold: float = 0.0

    def __post_init__(self) -> None:
        if self.k < 0:
            raise ValueError(f"draft length must be >= 0, got {self.k}")
        if not 0.0 <= self.stop_threshold < 1.0:  # also refuses NaN
            raise ValueError(f"stop threshold must be in [0, 1), got {self.stop_threshold}")
        if (self.drafter == NONE_DRAFTER) != (self.k == 0):
            raise ValueError(
                f"drafter {NONE_DRAFTER!r} goes with k = 0 and only with it "
                f"(got drafter={self.drafter!r}, k={self.k})"
            )


def _fitted_split(split: dict[str, Any], drafted: Sequence[int]) -> dict[str, Any]:
    """A reported lead/further split over the drafting steps totals were read into: where
    the reading has fewer drafting steps than the report timed leads (short drafts read
    as full ones), the leads are as many as those steps, at the same time per lead."""
    drafting = sum(1 for d in drafted if d)
    leads = split["draft_lead_steps"]
    if leads <= drafting:
        return split
    return {
        **split,
        "draft_lead_steps": drafting,
        "draft_lead_time_s": split["draft_lead_time_s"] * drafting / leads,
    }


def _drafted_steps(steps: int, drafted_tokens: int, k: int) -> list[int]:
    """Per-step drafted counts: k each while the total lasts, then the remainder, then 0."""
    if k <= 0:
        return [0] * steps
    full, remainder = divmod(min(drafted_tokens, k * steps), k)
    drafted = [k] * full + ([remainder] if remainder else [])
    return drafted + [0] * (steps - len(drafted))


def _spread(total: int, steps: int) -> list[int]:
    """``total`` over ``steps`` as evenly as it goes, the larger shares first."""
    if steps <= 0:
        return []
    share, extra = divmod(total, steps)
    return [share + 1] * extra + [share] * (steps - extra)


def _drafted_around(accepted: Sequence[int], total: int) -> list[int]:
    """Per-step drafted counts for per-step ``accepted`` counts and a drafted ``total``,
    as even as the accepts allow: each step drafted at least what it accepted, and the
    rest of the total goes one token at a time to the step that has drafted least (of
    those, the one accepting least: a step accepting nothing drafted something, or it was
    an empty lookup). Steps that all asked for one k come out at that k."""
    drafted = list(accepted)
    queue = [(d, d, i) for i, d in enumerate(drafted)]  # (drafted, accepted, step)
    heapq.heapify(queue)
    for _ in range(max(0, total - sum(accepted))):
        if not queue:
            break
        _, taken, i = heapq.heappop(queue)
        drafted[i] += 1
        heapq.heappush(queue, (drafted[i], taken, i))
    return drafted


def _steps_from_positions(
    steps: int, draft_length: int, accepted_per_position: Sequence[int]
) -> list[int]:
    """Per-step accepted counts from per-position counts at a constant draft length.

    ``accepted_per_position[i]`` counts the steps whose draft token i was accepted, so
    the number of steps accepting exactly n tokens is ``app[n-1] - app[n]`` (n >= 1)
    and ``steps - app[0]`` for n = 0.
    """
    app = [int(x) for x in accepted_per_position[:draft_length]]
    app += [0] * (draft_length - len(app))
    accepted: list[int] = []
    previous = steps
    for n in range(draft_length + 1):
        reaching = app[n] if n < draft_length else 0
        count = max(0, min(previous, steps) - reaching)
        accepted.extend([n] * count)
        previous = reaching
    # Pad (inconsistent inputs) so the list has one entry per step.
    accepted.extend([0] * (steps - len(accepted)))
    return accepted[:steps]


def _check_per_step(
    lower_name: str, lower: Sequence[int], upper_name: str, upper: Sequence[int]
) -> None:
    """ValueError unless the two per-step lists pair up and 0 <= lower[i] <= upper[i]."""
    if len(upper) != len(lower):
        raise ValueError(
            f"{upper_name}_per_step has {len(upper)} entries but "
            f"{lower_name}_per_step has {len(lower)}"
        )
    for i, (low, high) in enumerate(zip(lower, upper, strict=True)):
        if not 0 <= low <= high:
            raise ValueError(f"step {i}: {lower_name} {low} outside 0..{upper_name} ({high})")


@dataclass(frozen=True, slots=True)
class Outcome:
    """What happened on one routed request, as measured by whoever ran it.

    ``drafted_per_step[i]`` is the number of tokens drafted at step i (at most the
    decision's k: an n-gram drafter may find fewer, a stop threshold may end a model
    drafter's draft sooner), ``accepted_per_step[i]`` the draft tokens accepted there
    (bonus token excluded). Times are totals in seconds; for a
    k = 0 request the target's decoding time counts as verify time.
    ``plain_token_time_s`` is the target's time per token without speculation when the
    caller measured it (a plain replica's, a client's); otherwise the cost model
    estimates it (see ``costs.py``). ``plain_steps_time_s`` is the verify time of this
    request's own steps that drafted nothing (one-position forwards: a lookup without a
    match, a step capped to no draft), when whoever ran it timed them apart (the
    sidecar's engine); 0: not measured.
    ``stopped_steps`` counts the steps whose draft a stop threshold ended before k (the
    continuation evidence of a threshold arm; 0 when unknown or no threshold).
    ``requested_per_step[i]`` is the draft length step i asked for, when the caller knows
    it (the sidecar's engine: the loss guard may ask for fewer than k, or for none, and
    the last step is capped by ``max_new_tokens``); empty: every step asked for the
    decision's k.
    ``draft_lead_steps`` drafting steps timed their drafter's forwards after the first
    apart (the sidecar's engine, for a model drafter): ``draft_lead_time_s`` is their lead
    (the first forward, with the catch-up on the verified tokens), and
    ``draft_further_time_s`` their ``draft_further_forwards`` further forwards; a draft
    costs that lead plus a cheaper forward per further token. 0: not measured.
    """

    drafted_per_step: tuple[int, ...]
    accepted_per_step: tuple[int, ...]
    draft_time_s: float
    verify_time_s: float
    wall_time_s: float
    generated_tokens: int
    plain_token_time_s: float | None = None
    stopped_steps: int = 0
    requested_per_step: tuple[int, ...] = ()
    plain_steps_time_s: float = 0.0
    draft_lead_steps: int = 0
    draft_lead_time_s: float = 0.0
    draft_further_forwards: int = 0
    draft_further_time_s: float = 0.0

    def __post_init__(self) -> None:
        _check_per_step("accepted", self.accepted_per_step, "drafted", self.drafted_per_step)
        if min(self.draft_time_s, self.verify_time_s, self.wall_time_s) < 0:
            raise ValueError("times must be >= 0")
        if self.plain_token_time_s is not None and self.plain_token_time_s <= 0:
            raise ValueError("plain_token_time_s must be > 0 when given")
        # (a subset of the verify time's sum: equal to it, not past it, up to rounding)
        if not 0 <= self.plain_steps_time_s <= self.verify_time_s * (1 + 1e-9):
            raise ValueError("plain_steps_time_s must be within 0..verify_time_s")
        drafting_steps = len(self.drafted_per_step) - self.drafted_per_step.count(0)
        if not 0 <= self.draft_lead_steps <= drafting_steps:
            raise ValueError(
                f"draft_lead_steps {self.draft_lead_steps} outside 0..{drafting_steps}"
            )
        lead_times = (self.draft_lead_time_s, self.draft_further_time_s)
        if min(lead_times) < 0 or sum(lead_times) > self.draft_time_s * (1 + 1e-9):
            raise ValueError("draft_lead_time_s + draft_further_time_s must be within draft_time_s")
        if self.draft_further_forwards < 0:
            raise ValueError("draft_further_forwards must be >= 0")
        if not 0 <= self.stopped_steps <= len(self.drafted_per_step):
            raise ValueError(f"stopped_steps {self.stopped_steps} outside 0..steps")
        if self.requested_per_step:
            _check_per_step("drafted", self.drafted_per_step, "requested", self.requested_per_step)

    @classmethod
    def from_steps(
        cls,
        drafted_per_step: Sequence[int],
        accepted_per_step: Sequence[int],
        *,
        draft_time_s: float,
        verify_time_s: float,
        wall_time_s: float = 0.0,
        generated_tokens: int | None = None,
        plain_token_time_s: float | None = None,
        stopped_steps: int = 0,
        requested_per_step: Sequence[int] = (),
        plain_steps_time_s: float = 0.0,
        draft_lead_steps: int = 0,
        draft_lead_time_s: float = 0.0,
        draft_further_forwards: int = 0,
        draft_further_time_s: float = 0.0,
    ) -> Outcome:
        """Build from per-step lists; ``generated_tokens`` defaults to sum(accepted + 1)."""
        drafted = tuple(int(x) for x in drafted_per_step)
        accepted = tuple(int(x) for x in accepted_per_step)
        tokens = sum(accepted) + len(accepted) if generated_tokens is None else generated_tokens
        return cls(
            drafted,
            accepted,
            float(draft_time_s),
            float(verify_time_s),
            float(wall_time_s) or float(draft_time_s) + float(verify_time_s),
            int(tokens),
            plain_token_time_s or None,
            int(stopped_steps),
            tuple(int(x) for x in requested_per_step),
            float(plain_steps_time_s),
            int(draft_lead_steps),
            float(draft_lead_time_s),
            int(draft_further_forwards),
            float(draft_further_time_s),
        )

    @classmethod
    def from_totals(
        cls,
        *,
        steps: int,
        drafted_tokens: int,
        accepted_tokens: int,
        accepted_per_position: Sequence[int] = (),
        draft_time_s: float,
        verify_time_s: float,
        wall_time_s: float = 0.0,
        generated_tokens: int = 0,
        plain_token_time_s: float | None = None,
        draft_length: int = 0,
        draft_lead_steps: int = 0,
        draft_lead_time_s: float = 0.0,
        draft_further_forwards: int = 0,
        draft_further_time_s: float = 0.0,
    ) -> Outcome:
        """Build from totals and per-position accepts (the Report RPC's compact form).

        ``draft_length``: the k each step asked for (the decision's). With per-position
        counts that allow it, steps draft k each until the drafted total is spent, the
        last drafting step the remainder, and the others nothing (a lookup that found no
        match): k taken as the drafted mean instead lost the accepts past it and read
        empty lookups as short drafts. Otherwise (no k, no positions, or more steps
        accepting a token than that reading has drafting steps: short drafts, not empty
        ones) the drafted total is spread as evenly as it goes (149 over 100 steps: 49
        steps of 2, 51 of 1; a k of the rounded mean kept 100 of the 149, and the draft
        time over them overpriced the drafter 1.5x). With per-position counts the
        per-step accepts are reconstructed exactly for the drafting steps; without them
        the accepted total is spread as evenly as possible over them, which may
        undercount failures (a documented approximation).
        """
        if steps < 0 or drafted_tokens < 0 or accepted_tokens < 0:
            raise ValueError("steps and token counts must be >= 0")
        split: dict[str, Any] = {
            "draft_lead_steps": draft_lead_steps,
            "draft_lead_time_s": draft_lead_time_s,
            "draft_further_forwards": draft_further_forwards,
            "draft_further_time_s": draft_further_time_s,
        }
        k = draft_length
        drafting_at_k = -(-drafted_tokens // k) if k > 0 else 0
        if (
            0 < drafted_tokens <= k * steps
            and accepted_per_position
            and accepted_per_position[0] <= drafting_at_k
        ):
            drafted = _drafted_steps(steps, drafted_tokens, k)
        elif accepted_per_position and steps:
            # Short drafts: each step's accepts from the positions, exactly, and the drafts
            # around them (a spread's k cut the accepts past it: 14 read as 10).
            accepted = _steps_from_positions(
                steps, len(accepted_per_position), accepted_per_position
            )
            accepted.sort(reverse=True)
            around = _drafted_around(accepted, drafted_tokens)
            return cls.from_steps(
                around,
                accepted,
                draft_time_s=draft_time_s,
                verify_time_s=verify_time_s,
                wall_time_s=wall_time_s,
                generated_tokens=generated_tokens or sum(accepted) + steps,
                plain_token_time_s=plain_token_time_s,
                **_fitted_split(split, around),
            )
        else:
            drafted = _spread(drafted_tokens, steps)
            k = max(drafted, default=0)
        drafting = sum(1 for d in drafted if d)
        if not drafting:  # the non-drafting steps are added below
            accepted = []
        elif accepted_per_position:
            accepted = _steps_from_positions(drafting, k, accepted_per_position)
        else:
            base, extra = divmod(min(accepted_tokens, sum(drafted)), drafting)
            accepted = [base + 1] * extra + [base] * (drafting - extra)
        # The most accepts to the full steps; a short last draft keeps what it can.
        accepted = sorted(accepted, reverse=True) + [0] * (steps - drafting)
        accepted = [min(a, d) for a, d in zip(accepted, drafted, strict=True)]
        tokens = generated_tokens or sum(accepted) + steps
        return cls.from_steps(
            drafted,
            accepted,
            draft_time_s=draft_time_s,
            verify_time_s=verify_time_s,
            wall_time_s=wall_time_s,
            generated_tokens=tokens,
            plain_token_time_s=plain_token_time_s,
            **_fitted_split(split, drafted),
        )

    @property
    def steps(self) -> int:
        """Number of speculative steps (target forwards)."""
        return len(self.drafted_per_step)

    @property
    def drafted_tokens(self) -> int:
        return sum(self.drafted_per_step)

    @property
    def accepted_tokens(self) -> int:
        return sum(self.accepted_per_step)

    def acceptance_counts(self, draft_length: int) -> tuple[int, int]:
        """(successes, failures) under the truncated-geometric likelihood, for a request
        decided with k = ``draft_length``.

        A step drafting d and accepting n adds n successes and, if n < d, one failure. A
        step that asked for a draft and got none (an n-gram drafter that found no match)
        adds one failure: it emits one token, as a rejected first draft does. Left out,
        such steps would price a drafter by its acceptance when it proposes something
        only, and an n-gram drafter that rarely finds a match would look as good as one
        that always does (docs/policy.md, "Steps without a draft"). A step that asked for
        nothing (``requested_per_step`` 0: the loss guard's, or the last step's cap) adds
        nothing.
        """
        requested = self.requested_per_step or (draft_length,) * self.steps
        successes = 0
        failures = 0
        for drafted, accepted, asked in zip(
            self.drafted_per_step, self.accepted_per_step, requested, strict=True
        ):
            successes += accepted
            failures += accepted < drafted or drafted == 0 < asked
        return successes, failures


@dataclass(frozen=True, slots=True)
class ArmSummary:
    """One drafter in one context, for GetPolicyState (mirrors the proto's ArmState)."""

    drafter: str
    acceptance_mean: float
    alpha: float
    beta: float
    best_k: int
    expected_speedup: float
    decisions: int


@dataclass(frozen=True, slots=True)
class ContextSummary:
    """One context's state, for GetPolicyState (mirrors the proto's ContextState)."""

    cluster: str
    length_bucket: int
    arms: tuple[ArmSummary, ...]
    chosen_drafter: str
    chosen_k: int
    requests: int
    structured: bool = False

    def chosen_among(self, servable: Collection[str]) -> ContextSummary:
        """This summary with its choice made among the ``servable`` drafters (a fleet
        serves only its configurations): as it is when its choice is one of them or plain
        decoding; else the servable arm of highest expected speed-up at its best k, or
        plain decoding when none is above 1."""
        if self.chosen_drafter == NONE_DRAFTER or self.chosen_drafter in servable:
            return self
        candidates = [
            arm
            for arm in self.arms
            if arm.drafter in servable and arm.best_k > 0 and arm.expected_speedup > 1.0
        ]
        best = max(candidates, key=lambda arm: arm.expected_speedup, default=None)
        if best is None:
            return replace(self, chosen_drafter=NONE_DRAFTER, chosen_k=0)
        return replace(self, chosen_drafter=best.drafter, chosen_k=best.best_k)


@runtime_checkable
class Policy(Protocol):
    """An online routing policy: pick (drafter, k) per context and learn from outcomes.

    ``version`` increases with every update (the RouteDecision's ``policy_version``);
    the state format version is ``STATE_VERSION`` inside ``state_dict()``.
    ``select`` never changes learned state (only the injected random generator).
    """

    name: str

    @property
    def version(self) -> int: ...

    def select(self, context: Context, eligible: Sequence[str]) -> Decision: ...

    def select_many(self, contexts: Sequence[Context], eligible: Sequence[str]) -> list[Decision]:
        """``select`` for each context of a batch (one decision per context, in order)."""
        ...

    def update(self, context: Context, decision: Decision, outcome: Outcome) -> None: ...

    def update_counterfactual(
        self,
        context: Context,
        drafter: str,
        accepted_per_step: Sequence[int],
        draft_length: int,
        drafted_per_step: Sequence[int] | None = None,
    ) -> None:
        """Full information: ``drafter`` would have had ``accepted_per_step`` at
        ``draft_length``; ``drafted_per_step``, where the scorer counts them
        (``drafters.base.DraftCounter``), how many it would have drafted."""
        ...

    def add_drafter(self, name: str, similarity: Mapping[str, float] | None = None) -> None: ...

    def remove_drafter(self, name: str) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...

    def describe(self) -> list[ContextSummary]: ...


@runtime_checkable
class PricesPlainSteps(Protocol):
    """A policy that measures what a plain decoding step costs against a speculative
    step's intercept (``costs.StepRatios``): (q, s), q 1 until measured, s the verify
    slope its unit is defined with. The sidecar passes them to a greedy request's loss
    guard (``drafters.guard``): a request whose steps all draft has no plain step of its
    own to measure."""

    def plain_step_terms(self) -> tuple[float, float]: ...


def check_drafter_name(name: str) -> None:
    """Refuse to add ``"none"`` as a drafter: it names the k = 0 arm."""
    if name == NONE_DRAFTER:
        raise ValueError(f"{NONE_DRAFTER!r} is the k = 0 arm, not a drafter")


def check_state(state: Mapping[str, Any], policy_name: str) -> None:
    """Refuse a saved state of an unreadable format version or of another policy."""
    version = state.get("version")
    if isinstance(version, bool) or version not in READABLE_STATE_VERSIONS:
        readable = ", ".join(map(str, READABLE_STATE_VERSIONS))
        raise IncompatibleStateError(
            f"policy state has format version {version!r}, this build reads versions "
            f"{readable}; reset the policy state (SetPolicy reset_state=true)"
        )
    saved = state.get("policy")
    if saved != policy_name:
        raise IncompatibleStateError(
            f"policy state was saved by policy {saved!r}, cannot load it into {policy_name!r}"
        )


@dataclass(frozen=True)
class DrafterHints:
    """What the sidecar knows of its drafters from their kinds, before measuring them:
    ``draft_cost_ratio``, drafter -> cost of a drafted token in plain target steps (used
    until that drafter's cost is measured); ``copy_drafters``, the drafters that copy
    from the context (priced by the copy model); ``draft_length``, drafter -> the one
    draft length it is served at (a fleet replica's k), for drafters that have one;
    ``cost_shape``, drafter -> a key its drafting cost shares with the drafters of the
    same architecture (model drafters)."""

    draft_cost_ratio: Mapping[str, float] = field(default_factory=dict)
    copy_drafters: tuple[str, ...] = ()
    draft_length: Mapping[str, int] = field(default_factory=dict)
    cost_shape: Mapping[str, str] = field(default_factory=dict)
