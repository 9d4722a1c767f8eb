"""Predicted outputs: draft from text the caller expects the answer to repeat.

A client that rewrites a document or a file mostly gets back what it sent, with a few
changes, and can say so: OpenAI's ``prediction`` parameter. That text is the best draft
there is where the answer follows it, and costs no model forward. A predicted request's
session drafts from the prediction: at the answer's start its first tokens, and after
each step the tokens that followed the answer's last ``min_n`` to ``max_n`` tokens in
the prediction (the occurrence at or after the previous step's, so a repeated phrase
does not send the draft back), up to k. Where the answer left the prediction (an edit)
the lookup finds its way back as soon as the answer's last few tokens occur in it
again; until then, and for an answer the prediction does not match at all, the step is
drafted by the request's routed drafter as usual. Drafts are verified as any other
(point masses, as the n-gram drafter's), so the output is the target's: a wrong
prediction costs time, never text.

``PredictionTally`` counts what the prediction's drafts gave (OpenAI's
``accepted_prediction_tokens`` / ``rejected_prediction_tokens``: here the drafted
prediction tokens the target accepted, and those it rejected).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from drafters.base import Drafter, DraftSession, Proposal, empty_proposal, first_stop
from drafters.sampling import SamplingConfig
from drafters.stopping import DraftStopRule

#: The shortest and longest suffix of the answer looked up in the prediction.
DEFAULT_MIN_N = 3
DEFAULT_MAX_N = 4
#: The fewest tokens the prediction drafts after its drafts were rejected.
MIN_WINDOW = 2


class PredictionIndex:
    """Where each n-gram of a fixed prediction occurs (min_n <= n <= max_n), as the
    sorted positions right after each occurrence that something follows."""

    def __init__(
        self, prediction: Sequence[int], min_n: int = DEFAULT_MIN_N, max_n: int = DEFAULT_MAX_N
    ) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError(f"need 1 <= min_n <= max_n, got {min_n}, {max_n}")
        self.prediction = tuple(int(t) for t in prediction)
        self.min_n = min_n
        self.max_n = max_n
        self._positions: dict[tuple[int, ...], list[int]] = {}
        for end in range(1, len(self.prediction)):  # followed by prediction[end]
            for n in range(min_n, min(max_n, end) + 1):
                self._positions.setdefault(self.prediction[end - n : end], []).append(end)

    def continuation(self, output: Sequence[int], cursor: int = 0) -> int | None:
        """Where in the prediction the answer ``output`` goes on, or None: right after
        ``output`` itself while it is the prediction's beginning (up to max_n tokens),
        else after the longest suffix of it (min_n to max_n tokens) found in the
        prediction, its first occurrence at or after ``cursor`` (else its last before)."""
        length = len(output)
        if length <= self.max_n and tuple(output) == self.prediction[:length]:
            return length if length < len(self.prediction) else None
        for n in range(min(self.max_n, length), self.min_n - 1, -1):
            positions = self._positions.get(tuple(output[length - n :]))
            if positions:
                at = bisect.bisect_left(positions, cursor)
                return positions[at] if at < len(positions) else positions[-1]
        return None


@dataclass
class PredictionTally:
    """What one request's prediction drafted (module doc); written by its session."""

    accepted: int = 0
    rejected: int = 0
    steps: int = 0  # steps drafted from the prediction

    @property
    def drafted(self) -> int:
        return self.accepted + self.rejected


class PredictionSession:
    """One request: the prediction's continuation where it has one, else ``base``'s draft
    (at most ``base_k`` tokens; none when ``base_k`` is 0)."""

    def __init__(
        self,
        base: DraftSession,
        index: PredictionIndex,
        *,
        prompt_length: int,
        base_k: int,
        tally: PredictionTally,
        device: torch.device,
        stop_ids: frozenset[int] = frozenset(),
    ) -> None:
        self._base = base
        self._index = index
        self._prompt_length = prompt_length
        self._base_k = base_k
        self._tally = tally
        self._device = device
        self._stop_ids = stop_ids
        self._cursor = 0
        self._window: int | None = None  # the most the prediction drafts; None: k
        self._last: int | None = None  # the prediction's last draft length; None: base's

    def prefill(self, prompt_ids: Sequence[int]) -> None:
        self._base.prefill(prompt_ids)

    def propose(
        self,
        history: Sequence[int],
        k: int,
        sampling: SamplingConfig,
        generator: torch.Generator | None,
        stop_rule: DraftStopRule | None = None,
    ) -> Proposal:
        draft = self._predicted(history[self._prompt_length :], k)
        if draft:
            self._last = len(draft)
            self._tally.steps += 1
            return Proposal(token_ids=torch.tensor(draft, dtype=torch.long, device=self._device))
        self._last = None
        base_k = min(k, self._base_k)
        if base_k <= 0:
            return empty_proposal(self._device)
        return self._base.propose(history, base_k, sampling, generator, stop_rule)

    def _predicted(self, output: Sequence[int], k: int) -> list[int]:
        start = self._index.continuation(output, self._cursor)
        if start is None:
            return []
        self._cursor = start
        window = k if self._window is None else min(k, self._window)
        draft = list(self._index.prediction[start : start + window])
        stop = first_stop(draft, self._stop_ids)
        return draft if stop is None else draft[: stop + 1]

    def observe_accepted(self, accepted: int) -> None:
        if self._last is None:
            self._base.observe_accepted(accepted)
            return
        self._tally.accepted += accepted
        self._tally.rejected += self._last - accepted
        if accepted == self._last:
            self._window = None if self._window is None else 2 * self._window
        else:
            self._window = max(MIN_WINDOW, (self._window or self._last) // 2)


@dataclass(frozen=True)
class PredictedDrafter:
    """One request's drafter: ``base`` (its routed drafter, drafting at most ``base_k``)
    with ``prediction`` drafted first (module doc). Made per request, never registered."""

    base: Drafter
    prediction: tuple[int, ...]
    base_k: int
    device: torch.device  # the target's: where drafts go
    tally: PredictionTally = field(default_factory=PredictionTally)
    kind: str = "prediction"

    @property
    def name(self) -> str:
        return self.base.name

    def start(
        self, prompt_ids: Sequence[int], stop_ids: frozenset[int] = frozenset()
    ) -> PredictionSession:
        return PredictionSession(
            self.base.start(prompt_ids, stop_ids),
            PredictionIndex(self.prediction),
            prompt_length=len(prompt_ids),
            base_k=self.base_k,
            tally=self.tally,
            device=self.device,
            stop_ids=stop_ids,
        )

    def score_counterfactual(
        self, prompt_ids: Sequence[int], output_ids: Sequence[int], draft_length: int
    ) -> list[int]:
        """The base drafter's: a prediction belongs to one request, not to its cluster."""
        return self.base.score_counterfactual(prompt_ids, output_ids, draft_length)
