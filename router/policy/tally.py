"""Shared machinery of the non-learning baselines: an observed-acceptance tally and a base class.

The baselines (``fixed``, ``static``, ``oracle``, ``none``) do not learn, but the sidecar
still shows what they observe: per context and drafter, the accepted tokens and failed
steps (an undiscounted Beta(1 + accepted, 1 + failures)) and the decision counts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

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


class AcceptanceTally:
    """Undiscounted acceptance counts and decisions per (context, drafter)."""

    def __init__(self) -> None:
        # context -> drafter -> [accepted, failures, decisions]
        self.counts_: dict[Context, dict[str, list[int]]] = {}
        self.requests_: dict[Context, int] = {}

    def observe(self, context: Context, decision: Decision, outcome: Outcome) -> None:
        self.requests_[context] = self.requests_.get(context, 0) + 1
        row = self.counts_.setdefault(context, {}).setdefault(decision.drafter, [0, 0, 0])
        successes, failures = outcome.acceptance_counts(decision.k)
        row[0] += successes
        row[1] += failures
        row[2] += 1

    def summaries(self, chosen: Mapping[Context, Decision]) -> list[ContextSummary]:
        result = []
        for context in sorted(self.requests_, key=Context.sort_key):
            arms = tuple(
                ArmSummary(
                    drafter,
                    (1 + accepted) / (2 + accepted + failures),
                    float(1 + accepted),
                    float(1 + failures),
                    chosen[context].k if chosen[context].drafter == drafter else 0,
                    chosen[context].expected_speedup if chosen[context].drafter == drafter else 1.0,
                    decisions,
                )
                for drafter, (accepted, failures, decisions) in sorted(
                    self.counts_.get(context, {}).items()
                )
                if drafter != NONE_DRAFTER
            )
            decision = chosen[context]
            result.append(
                ContextSummary(
                    context.cluster,
                    context.length_bucket,
                    arms,
                    decision.drafter,
                    decision.k,
                    self.requests_[context],
                    context.structured,
                )
            )
        return result

    def state_dict(self) -> list[dict[str, Any]]:
        return [
            {
                **c.as_dict(),
                "requests": self.requests_.get(c, 0),
                "arms": {d: list(v) for d, v in self.counts_.get(c, {}).items()},
            }
            for c in self.requests_
        ]

    def load_state_dict(self, rows: Sequence[Mapping[str, Any]]) -> None:
        self.counts_ = {}
        self.requests_ = {}
        for row in rows:
            context = Context.from_dict(row)
            self.requests_[context] = int(row["requests"])
            self.counts_[context] = {str(d): [int(x) for x in v] for d, v in row["arms"].items()}


class TablePolicy:
    """A policy whose arm per context is fixed in advance; subclasses define ``arm``."""

    name = "table"

    def __init__(self, drafters: Sequence[str] = ()) -> None:
        self.drafters_: list[str] = [d for d in drafters if d != NONE_DRAFTER]
        self.tally_ = AcceptanceTally()
        self.updates_ = 0

    @property
    def version(self) -> int:
        return self.updates_

    def arm(self, context: Context) -> tuple[str, int]:
        """The (drafter, k) this policy plays in ``context`` (before eligibility)."""
        return NONE_DRAFTER, 0

    def named_drafters(self) -> set[str]:
        """The drafters the configuration plays at some k > 0 (none by default)."""
        return set()

    def select(self, context: Context, eligible: Sequence[str]) -> Decision:
        """The table's arm when its drafter is known and eligible, else no speculation."""
        drafter, k = self.arm(context)
        if k == 0 or drafter not in self.drafters_ or drafter not in eligible:
            return Decision(NONE_DRAFTER, 0, 1.0, False)
        return Decision(drafter, k, 1.0, False)

    def select_many(self, contexts: Sequence[Context], eligible: Sequence[str]) -> list[Decision]:
        return [self.select(context, eligible) for context in contexts]

    def update(self, context: Context, decision: Decision, outcome: Outcome) -> None:
        self.tally_.observe(context, decision, outcome)
        self.updates_ += 1

    def update_counterfactual(
        self,
        context: Context,
        drafter: str,
        accepted_per_step: Sequence[int],
        draft_length: int,
        drafted_per_step: Sequence[int] | None = None,
    ) -> None:
        """Baselines do not learn; counterfactual scores are ignored."""

    def add_drafter(self, name: str, similarity: Mapping[str, float] | None = None) -> None:
        check_drafter_name(name)
        if name not in self.drafters_:
            self.drafters_.append(name)

    def remove_drafter(self, name: str) -> None:
        if name in self.drafters_:
            self.drafters_.remove(name)

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "policy": self.name,
            "updates": self.updates_,
            "drafters": list(self.drafters_),
            "contexts": self.tally_.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        check_state(state, self.name)
        self.drafters_ = [str(d) for d in state["drafters"]]
        self.tally_.load_state_dict(state["contexts"])
        self.updates_ = int(state["updates"])

    def describe(self) -> list[ContextSummary]:
        chosen = {c: self.select(c, self.drafters_) for c in self.tally_.requests_}
        return self.tally_.summaries(chosen)
