"""The drafter interface: a drafter starts one session per request; a session proposes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from drafters.sampling import SamplingConfig
from drafters.stopping import DraftStopRule


@dataclass(frozen=True)
class Proposal:
    """Draft tokens for one step.

    ``token_ids`` [d] on the target's device, d <= the requested k (an n-gram drafter may
    find fewer, or none); ``probs`` [d, vocab] the distributions they were drawn from, or
    None for point masses (q = 1 on the proposed token; always so for greedy drafts).
    ``stopped``: a stop rule (:class:`DraftStopRule`) ended the draft before k.
    ``further_time_s``: the time of the drafter's ``further_forwards`` forwards after its
    first one (one per further token, and the one whose distribution a stop rule read
    before it ended the draft), when the drafter times them apart (a model drafter; None
    otherwise). The rest of the draft's time is its lead: the first forward, which
    catches the drafter's cache up on the verified tokens, and the step's fixed work. A
    draft costs that lead plus a cheaper forward per further token, not one price per
    token.
    """

    token_ids: torch.Tensor
    probs: torch.Tensor | None = None
    stopped: bool = False
    further_time_s: float | None = None
    further_forwards: int = 0

    @property
    def length(self) -> int:
        return int(self.token_ids.shape[0])


class DraftSession(Protocol):
    """A drafter's per-request state (e.g. its KV cache)."""

    def prefill(self, prompt_ids: Sequence[int]) -> None:
        """Take in the prompt before the first ``propose`` (the engine runs this beside
        the target's own prefill); ``propose`` must give the same drafts either way."""
        ...

    def propose(
        self,
        history: Sequence[int],
        k: int,
        sampling: SamplingConfig,
        generator: torch.Generator | None,
        stop_rule: DraftStopRule | None = None,
    ) -> Proposal:
        """Up to ``k`` draft tokens continuing ``history`` (prompt + verified output);
        ``stop_rule`` may end the draft sooner (a drafter without a distribution ignores
        it)."""
        ...

    def observe_accepted(self, accepted: int) -> None:
        """The verifier kept the first ``accepted`` tokens of the last proposal."""
        ...


@runtime_checkable
class Drafter(Protocol):
    """A named source of draft tokens; ``kind`` is its key in ``DRAFTER_KINDS``."""

    @property
    def name(self) -> str:
        """The drafter's registered name (e.g. ``"generic"``, ``"code"``, ``"ngram"``)."""
        ...

    @property
    def kind(self) -> str:
        """Its key in ``DRAFTER_KINDS``."""
        ...

    def start(
        self, prompt_ids: Sequence[int], stop_ids: frozenset[int] = frozenset()
    ) -> DraftSession:
        """A fresh session for one request. A draft may end at a token of ``stop_ids``
        (the target's end-of-turn tokens): nothing after it can be emitted."""
        ...

    def score_counterfactual(
        self, prompt_ids: Sequence[int], output_ids: Sequence[int], draft_length: int
    ) -> list[int]:
        """Accepted drafts per step this drafter would have had on a verified greedy output."""
        ...


@runtime_checkable
class DraftCounter(Protocol):
    """A drafter whose steps may draft nothing (a prompt lookup that finds no match) and
    whose counterfactual score says so: per step, how many tokens it would have drafted
    beside how many were accepted. A policy that prices such a drafter by how often it
    drafts at all (``router.policy.copying``) learns that from the score too, where an
    accept count of 0 alone cannot tell "no match" from "a match rejected at once"."""

    def score_counterfactual_drafts(
        self, prompt_ids: Sequence[int], output_ids: Sequence[int], draft_length: int
    ) -> tuple[list[int], list[int]]:
        """(drafted, accepted) per step on a verified greedy output: the steps of
        ``score_counterfactual``, and a last step whose draft is kept to the output's end
        (which that leaves out) as one that drafted what it kept, as the engine records it."""
        ...


def first_stop(tokens: Sequence[int], stop_ids: frozenset[int]) -> int | None:
    """Index of the first token of ``tokens`` in ``stop_ids``, or None."""
    for index, token in enumerate(tokens):
        if token in stop_ids:
            return index
    return None


def empty_proposal(device: torch.device) -> Proposal:
    """No drafts: the step is a plain decoding step."""
    return Proposal(token_ids=torch.empty(0, dtype=torch.long, device=device))
