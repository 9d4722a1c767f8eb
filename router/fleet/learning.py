"""What the policy learns from a replica's answer: the same ``Outcome`` a ``Report`` gives.

vLLM's per-request ``speculative_decoding`` metrics are the draft and acceptance counts:
per step at the ``detailed`` level (``per_step_drafted``, ``per_step_accepted``), else as
totals and an acceptance histogram, of the steps that drafted; the steps that drafted
nothing (an n-gram lookup without a match) are counted back from the output's length.
Without them (the server runs without ``--per-request-spec-decode-metrics``) the
measured time per output token stands in: against plain decoding's time per token t_ar,
a replica drafting k tokens per step that takes t per token emits about L = t_ar / t
tokens per step (its steps cost about one plain step each), so it is read as
round(n / L) steps accepting n - steps draft tokens in all.

vLLM does not split a step's time into drafting and verifying, and what a configuration
costs is what decides whether it pays: a model drafter's forward passes can cost nearly
what the target's do (a small target, vLLM's per-step overhead on a CPU). With the step
counts from the metrics and t_ar measured on the plain replicas, a request's decode time
over steps x t_ar is its drafting cost (``split_decode_time``): the policy learns each
configuration's cost per drafted token from it, as it learns an in-process drafter's
from measured draft times, instead of the zero drafting cost it is hinted before. A
drafter whose kind states its cost (the n-gram lookup: none) is not split: what its
steps take beyond t_ar is the target's wider verify and the machine's noise (two
requests in flight on shared cores), which spread over the few tokens a lookup drafts
would price it far above what it costs (a `bench fleet` run with the split applied to
`ngram` chose it for no request, 0.90x against 1.19x in hindsight).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from router.policy.base import Outcome


@dataclass(frozen=True)
class Timing:
    """One replica's answer, timed by the router around its stream (the decode time by
    vLLM's clock where it reports it: ``engine_decode_time``)."""

    wall_time_s: float  # request sent to last token
    decode_time_s: float  # first token to last token
    generated_tokens: int
    # Scheduled to last token by vLLM's clock (``engine_request_time``), None unreported.
    engine_time_s: float | None = None

    @property
    def served_time_s(self) -> float:
        """What the policy learns a request's time from: the engine's, which leaves out
        the replica's queue and the HTTP round trip (load, not the configuration), else
        the router's wall time."""
        return self.engine_time_s if self.engine_time_s is not None else self.wall_time_s

    @property
    def token_time_s(self) -> float | None:
        """Time per output token after the first (None with fewer than two tokens)."""
        if self.generated_tokens < 2 or self.decode_time_s <= 0:
            return None
        return self.decode_time_s / (self.generated_tokens - 1)


def engine_decode_time(metrics: Mapping[str, Any] | None, streamed_s: float) -> float:
    """A replica's decode time: vLLM's own (``generation_time_ms``, its first to its last
    output token by the engine's clock) where its per-request metrics give it, else
    ``streamed_s``, between the first and the last token's arrival. Arrival times are
    the router's reading of the stream, and on a busy host chunks read together arrive
    together: a short answer read in one go measured a decode time near 0, so a request
    unit near 0, and a fixed time of 500-1400 plain steps (`bench fleet`, 2 in flight)."""
    value = (metrics or {}).get("generation_time_ms")
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
        return float(value) / 1000.0
    return streamed_s


def engine_request_time(metrics: Mapping[str, Any] | None, decode_time_s: float) -> float | None:
    """A request's time from its scheduling to its last token by vLLM's clock: its time to
    first token (``time_to_first_token_ms``: scheduled to first token, so the prefill,
    a drafter's included, and not the queue before it) plus ``decode_time_s``; None where
    the metrics do not give it. The fixed time per request the policy prices
    (``RequestOverheads``) is then the configuration's own, not the replica's queue nor the
    HTTP round trip, which vary with load and not with the configuration."""
    value = (metrics or {}).get("time_to_first_token_ms")
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
        return float(value) / 1000.0 + decode_time_s
    return None


def positions_from_histogram(histogram: Sequence[int]) -> list[int]:
    """accepted_per_position[i] (steps whose draft token i was accepted) from vLLM's
    acceptance histogram (index j: steps that accepted exactly j draft tokens)."""
    counts = [int(c) for c in histogram]
    return [sum(counts[j] for j in range(i + 1, len(counts))) for i in range(len(counts) - 1)]


#: The drafting time of a request whose steps took no longer than plain ones: measured as
#: next to nothing (a zero draft time reads as "not measured" to the cost model).
NEGLIGIBLE_DRAFT_S = 1e-9


def split_decode_time(
    decode_time_s: float, steps: int, plain_token_time_s: float | None
) -> tuple[float, float]:
    """(draft, verify) seconds of a speculative request's decode time: ``steps`` target
    steps at the plain replicas' time per token, the rest drafting (module doc); without
    t_ar, (0, all), as before anything plain is measured."""
    if not plain_token_time_s or steps <= 0 or decode_time_s <= 0:
        return 0.0, decode_time_s
    verify = min(decode_time_s, steps * plain_token_time_s)
    return max(decode_time_s - verify, NEGLIGIBLE_DRAFT_S), verify


def unreported_steps(generated_tokens: int, reported_steps: int, accepted_tokens: int) -> int:
    """Steps vLLM leaves out of its per-request metrics: it records a step only when it
    drafted, so an n-gram lookup that found no match is missing. The first token comes
    from the prefill, each reported step emits its accepted tokens and one more, and each
    unreported step one (a stop inside a step's accepted tokens can make it negative: 0)."""
    return max(0, generated_tokens - 1 - reported_steps - accepted_tokens)


def reported_steps(spec: Mapping[str, Any]) -> tuple[list[int], list[int]]:
    """(drafted, accepted) per step vLLM reported: as given at the ``detailed`` level, else
    rebuilt from the totals and the acceptance histogram (exact for a constant k)."""
    drafted = [int(d) for d in spec.get("per_step_drafted") or ()]
    accepted = [int(a) for a in spec.get("per_step_accepted") or ()]
    if drafted and len(drafted) == len(accepted):
        return drafted, accepted
    steps = int(spec.get("num_spec_steps") or 0)
    if steps <= 0:
        return [], []
    histogram = spec.get("acceptance_histogram") or ()
    rebuilt = Outcome.from_totals(
        steps=steps,
        drafted_tokens=int(spec.get("num_draft_tokens") or 0),
        accepted_tokens=int(spec.get("num_accepted_draft_tokens") or 0),
        accepted_per_position=positions_from_histogram(histogram) if histogram else (),
        draft_time_s=0.0,
        verify_time_s=0.0,
    )
    return list(rebuilt.drafted_per_step), list(rebuilt.accepted_per_step)


def request_steps(spec: Mapping[str, Any], generated_tokens: int) -> tuple[list[int], list[int]]:
    """(drafted, accepted) per step of a speculative request: the reported steps, after
    the steps that drafted nothing (``unreported_steps``; put first, as the unmatched
    lookups they were: where they fell is not reported)."""
    drafted, accepted = reported_steps(spec)
    empty = unreported_steps(generated_tokens, len(drafted), sum(accepted))
    return [0] * empty + drafted, [0] * empty + accepted


def spec_outcome(
    spec: Mapping[str, Any],
    timing: Timing,
    plain_token_time_s: float | None,
    split_cost: bool = True,
) -> Outcome | None:
    """The outcome from vLLM's ``speculative_decoding`` object (``request_steps``), None
    without any step; ``split_cost`` False leaves the whole decode time to verifying
    (a drafter whose cost its kind states, module doc)."""
    drafted, accepted = request_steps(spec, timing.generated_tokens)
    if not drafted:
        return None
    draft, verify = split_decode_time(
        timing.decode_time_s, len(drafted), plain_token_time_s if split_cost else None
    )
    return Outcome.from_steps(
        drafted,
        accepted,
        draft_time_s=draft,
        verify_time_s=verify,
        wall_time_s=timing.served_time_s,
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
            wall_time_s=timing.served_time_s,
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
        wall_time_s=timing.served_time_s,
        generated_tokens=n,
        plain_token_time_s=plain_token_time_s,
    )


def speculation_problem(k: int, metrics: Mapping[str, Any]) -> str | None:
    """How a replica's answer contradicts the fleet file's configuration for it (drafting at
    k; 0: none), from vLLM's own metrics; None where it does not. A replica started with
    another ``num_speculative_tokens``, or with speculation where the file says none, is
    priced by the policy as it is not; one without the per-request metrics is learnt
    from its time per token only (module doc)."""
    spec = metrics.get("speculative_decoding")
    drafted = reported_steps(spec)[0] if isinstance(spec, Mapping) else []
    most = max(drafted, default=0)
    if k == 0 and most > 0:
        return (
            f"it speculates (up to {most} tokens a step) while the fleet file says "
            "speculative = 'none'"
        )
    if k > 0 and most > k:
        return (
            f"it drafts up to {most} tokens a step while the fleet file says k = {k}: set k "
            "to its num_speculative_tokens"
        )
    if k > 0 and not isinstance(spec, Mapping):
        return (
            "its answers carry no speculation metrics (start it with "
            "--per-request-spec-decode-metrics detailed): learnt from its time per token only"
        )
    return None


def outcome_from_replica(
    k: int,
    metrics: Mapping[str, Any],
    timing: Timing,
    plain_token_time_s: float | None,
    split_cost: bool = True,
) -> Outcome | None:
    """What the policy learns from one replica's answer (module doc), or None."""
    spec = metrics.get("speculative_decoding")
    if k > 0 and isinstance(spec, Mapping):
        outcome = spec_outcome(spec, timing, plain_token_time_s, split_cost)
        if outcome is not None:
            return outcome
    return timed_outcome(k, timing, plain_token_time_s)
