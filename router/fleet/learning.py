"""What the policy learns from a replica's answer: the same ``Outcome`` a ``Report`` gives.

vLLM's per-request ``speculative_decoding`` metrics are the draft and acceptance counts:
per step at the ``detailed`` level (``per_step_drafted``, ``per_step_accepted``), else as
totals and an acceptance histogram. Without them (the server runs without
``--per-request-spec-decode-metrics``) the measured time per output token stands in:
against plain decoding's time per token t_ar, a replica drafting k tokens per step that
takes t per token emits about L = t_ar / t tokens per step (its steps cost about one
plain step each: drafting is cheap next to the target's forward), so it is read as
round(n / L) steps accepting n - steps draft tokens in all.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from router.policy.base import Outcome


@dataclass(frozen=True)
class Timing:
    """Measured by the router around one replica's stream."""

    wall_time_s: float  # request sent to last token
    decode_time_s: float  # first token to last token
    generated_tokens: int

    @property
    def token_time_s(self) -> float | None:
        """Time per output token after the first (None with fewer than two tokens)."""
        if self.generated_tokens < 2 or self.decode_time_s <= 0:
            return None
        return self.decode_time_s / (self.generated_tokens - 1)


def positions_from_histogram(histogram: Sequence[int]) -> list[int]:
    """accepted_per_position[i] (steps whose draft token i was accepted) from vLLM's
    acceptance histogram (index j: steps that accepted exactly j draft tokens)."""
    counts = [int(c) for c in histogram]
    return [sum(counts[j] for j in range(i + 1, len(counts))) for i in range(len(counts) - 1)]


def spec_outcome(
    spec: Mapping[str, Any], timing: Timing, plain_token_time_s: float | None
) -> Outcome | None:
    """The outcome from vLLM's ``speculative_decoding`` object, per step when detailed."""
    drafted = spec.get("per_step_drafted")
    accepted = spec.get("per_step_accepted")
    if drafted and accepted and len(drafted) == len(accepted):
        return Outcome.from_steps(
            drafted,
            accepted,
            draft_time_s=0.0,  # vLLM does not split drafting from verifying
            verify_time_s=timing.decode_time_s,
            wall_time_s=timing.wall_time_s,
            generated_tokens=timing.generated_tokens,
            plain_token_time_s=plain_token_time_s,
        )
    steps = int(spec.get("num_spec_steps") or 0)
    if steps <= 0:
        return None
    histogram = spec.get("acceptance_histogram") or ()
    return Outcome.from_totals(
        steps=steps,
        drafted_tokens=int(spec.get("num_draft_tokens") or 0),
        accepted_tokens=int(spec.get("num_accepted_draft_tokens") or 0),
        accepted_per_position=positions_from_histogram(histogram) if histogram else (),
        draft_time_s=0.0,
        verify_time_s=timing.decode_time_s,
        wall_time_s=timing.wall_time_s,
        generated_tokens=timing.generated_tokens,
        plain_token_time_s=plain_token_time_s,
    )


def timed_outcome(k: int, timing: Timing, plain_token_time_s: float | None) -> Outcome | None:
    """The outcome read from the time per output token (module doc); None when it cannot
    be (no plain time per token measured yet, or too few tokens)."""
    n = timing.generated_tokens
    token_time = timing.token_time_s
    if k == 0:
        return Outcome.from_steps(
            [],
            [],
            draft_time_s=0.0,
            verify_time_s=timing.decode_time_s,
            wall_time_s=timing.wall_time_s,
            generated_tokens=n,
        )
    if token_time is None or plain_token_time_s is None:
        return None
    per_step = min(max(plain_token_time_s / token_time, 1.0), k + 1.0)
    steps = max(1, round(n / per_step))
    return Outcome.from_totals(
        steps=steps,
        drafted_tokens=k * steps,
        accepted_tokens=min(max(n - steps, 0), k * steps),
        draft_time_s=0.0,
        verify_time_s=timing.decode_time_s,
        wall_time_s=timing.wall_time_s,
        generated_tokens=n,
        plain_token_time_s=plain_token_time_s,
    )


def outcome_from_replica(
    k: int,
    metrics: Mapping[str, Any],
    timing: Timing,
    plain_token_time_s: float | None,
) -> Outcome | None:
    """What the policy learns from one replica's answer (module doc), or None."""
    spec = metrics.get("speculative_decoding")
    if k > 0 and isinstance(spec, Mapping):
        outcome = spec_outcome(spec, timing, plain_token_time_s)
        if outcome is not None:
            return outcome
    return timed_outcome(k, timing, plain_token_time_s)
