"""Policies by name (a dict, RouteLLM-style) and ``make_policy`` to build one from JSON config."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from pydantic import ValidationError

from router.errors import validation_lines
from router.policy.base import NONE_DRAFTER, DrafterHints, Policy
from router.policy.fixed import FixedPolicy
from router.policy.none import NonePolicy
from router.policy.oracle import OraclePolicy
from router.policy.static import StaticPolicy
from router.policy.thompson import ThompsonPolicy
from router.policy.ucb import UcbPolicy

#: Builds a policy from the known drafter names and a JSON-able configuration.
PolicyFactory = Callable[[Sequence[str], Mapping[str, Any] | None], Policy]

POLICIES: dict[str, PolicyFactory] = {
    "thompson": ThompsonPolicy.from_config,
    "ucb": UcbPolicy.from_config,
    "fixed": FixedPolicy.from_config,
    "static": StaticPolicy.from_config,
    "oracle": OraclePolicy.from_config,
    "none": NonePolicy.from_config,
}


#: Policies that read the sidecar's drafter hints (``DrafterHints``), and the config keys
#: they read them into: ``ucb`` measures its rewards and needs only the served lengths.
DRAFTER_HINT_KEYS: dict[str, frozenset[str]] = {
    "thompson": frozenset({"draft_cost_ratio", "copy_drafters", "draft_length", "cost_shape"}),
    "ucb": frozenset({"draft_length"}),
}
READS_DRAFTER_HINTS = frozenset(DRAFTER_HINT_KEYS)


def with_drafter_hints(
    name: str, config: Mapping[str, Any] | None, hints: DrafterHints
) -> dict[str, Any]:
    """``config`` with ``hints`` filling what it leaves out, for a policy that reads them:
    the hinted costs under its ``draft_cost_ratio``, the served lengths under its
    ``draft_length``, the cost shapes under its ``cost_shape`` (its own entries win), and
    ``copy_drafters`` unless it names them
    itself; only the keys the policy reads (``DRAFTER_HINT_KEYS``). Other policies get
    ``config`` as is."""
    merged = dict(config or {})
    keys = DRAFTER_HINT_KEYS.get(name, frozenset())
    # A malformed value is left for the policy's own validation to refuse.
    given = merged.get("draft_cost_ratio")
    if "draft_cost_ratio" in keys and hints.draft_cost_ratio and _mapping_or_none(given):
        merged["draft_cost_ratio"] = {**hints.draft_cost_ratio, **(given or {})}
    for key, hinted in (("draft_length", hints.draft_length), ("cost_shape", hints.cost_shape)):
        given = merged.get(key)
        if key in keys and hinted and _mapping_or_none(given):
            merged[key] = {**hinted, **(given or {})}
    if "copy_drafters" in keys:
        merged.setdefault("copy_drafters", list(hints.copy_drafters))
    return merged


def _mapping_or_none(value: Any) -> bool:
    return value is None or isinstance(value, Mapping)


class UnknownPolicyError(KeyError):
    """No policy is registered under the requested name."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown policy"


def make_policy(
    name: str, drafters: Sequence[str], config: Mapping[str, Any] | None = None
) -> Policy:
    """Build the policy ``name`` over ``drafters``; bad config raises ``ValueError``.

    ``drafters`` are the selectable drafter names ("none", the k = 0 arm, is implicit
    and ignored if listed); ``config`` is the policy's JSON object (see each module).
    """
    factory = POLICIES.get(name)
    if factory is None:
        raise UnknownPolicyError(
            f"unknown policy {name!r}; registered: {', '.join(sorted(POLICIES))}"
        )
    return factory([d for d in drafters if d != NONE_DRAFTER], config)


def policy_config_problem(name: str, config: Mapping[str, Any] | None) -> str | None:
    """Why policy ``name`` cannot be built from ``config`` (None: it can), in a line per
    problem: what the settings and ``SetPolicy`` refuse before a policy is made."""
    try:
        make_policy(name, [], config or None)
    except (TypeError, ValueError, KeyError) as error:
        return config_problem(error)
    return None


def config_problem(error: Exception) -> str:
    """A configuration error as the sidecar says it: pydantic's without its type codes
    and links (``validation_lines``), any other as its message."""
    return validation_lines(error) if isinstance(error, ValidationError) else str(error)
