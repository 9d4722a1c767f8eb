"""The n-gram (prompt-lookup) drafter: copy what followed the last match of the suffix."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from drafters.base import Proposal, first_stop
from drafters.counterfactual import replay_greedy_drafts
from drafters.sampling import SamplingConfig
from drafters.stopping import DraftStopRule

#: The longest n-gram an index keys: each token appended costs max_n - min_n + 1 writes
#: of keys up to max_n long, so an unbounded max_n (a million was accepted) made every
#: step's lookup cost more than the draft saved (a 200-token answer from 0.9 to 3.9 s).
MAX_NGRAM = 64


class NgramIndex:
    """Where each n-gram of a growing token sequence last occurred, for min_n <= n <= max_n.

    Maps an n-gram to the position right after its latest occurrence that is followed by
    at least one token, so the sequence's own suffix never matches itself. Indexing is
    incremental: each appended token costs (max_n - min_n + 1) dictionary writes.
    """

    def __init__(self, min_n: int = 1, max_n: int = 3) -> None:
        if not 1 <= min_n <= max_n <= MAX_NGRAM:
            raise ValueError(f"need 1 <= min_n <= max_n <= {MAX_NGRAM}, got {min_n}, {max_n}")
        self.min_n = min_n
        self.max_n = max_n
        self._continuations: dict[tuple[int, ...], int] = {}
        self._next_start = 1  # the next continuation position to index

    def extend(self, history: Sequence[int]) -> None:
        """Index the n-grams ending before each new position of ``history`` but the last."""
        for start in range(self._next_start, len(history)):
            for n in range(self.min_n, min(self.max_n, start) + 1):
                self._continuations[tuple(history[start - n : start])] = start
        self._next_start = max(self._next_start, len(history))

    def propose(self, history: Sequence[int], k: int) -> list[int]:
        """Up to ``k`` tokens: the continuation of the longest suffix n-gram seen before.

        Past the end of ``history`` the copy continues into its own proposal, so a
        repeating cycle of any period yields a full draft.
        """
        self.extend(history)
        length = len(history)
        for n in range(min(self.max_n, length), self.min_n - 1, -1):
            start = self._continuations.get(tuple(history[length - n :]))
            if start is None:
                continue
            draft: list[int] = []
            for i in range(k):
                source = start + i
                draft.append(history[source] if source < length else draft[source - length])
            return draft
        return []


class NgramDraftSession:
    """One request's n-gram index over prompt + verified output."""

    def __init__(
        self, index: NgramIndex, device: torch.device, stop_ids: frozenset[int] = frozenset()
    ) -> None:
        self._index = index
        self._device = device
        self._stop_ids = stop_ids

    def propose(
        self,
        history: Sequence[int],
        k: int,
        sampling: SamplingConfig,
        generator: torch.Generator | None,
        stop_rule: DraftStopRule | None = None,
    ) -> Proposal:
        """The lookup's continuation; point masses carry no confidence, so ``stop_rule``
        does not apply."""
        draft = self._index.propose(history, k)
        stop = first_stop(draft, self._stop_ids)
        if stop is not None:
            draft = draft[: stop + 1]  # nothing after the end of the turn can be used
        return Proposal(token_ids=torch.tensor(draft, dtype=torch.long, device=self._device))

    def prefill(self, prompt_ids: Sequence[int]) -> None:
        """Index the prompt's n-grams ahead of the first proposal."""
        self._index.extend(prompt_ids)

    def observe_accepted(self, accepted: int) -> None:
        """Nothing to roll back: the index only ever holds verified tokens."""


@dataclass(frozen=True)
class NgramDrafter:
    """Prompt lookup with point-mass drafts (no model, no KV cache)."""

    name: str
    device: torch.device
    min_n: int = 2
    max_n: int = 3
    kind: str = "ngram"

    def __post_init__(self) -> None:
        # At construction, as the other kinds check theirs: a registration with min_n
        # above max_n was refused as a failed probe (FAILED_PRECONDITION), not as the
        # invalid option it is.
        NgramIndex(self.min_n, self.max_n)

    def start(
        self, prompt_ids: Sequence[int], stop_ids: frozenset[int] = frozenset()
    ) -> NgramDraftSession:
        return NgramDraftSession(NgramIndex(self.min_n, self.max_n), self.device, stop_ids)

    def score_counterfactual(
        self, prompt_ids: Sequence[int], output_ids: Sequence[int], draft_length: int
    ) -> list[int]:
        """Replay greedy steps (:func:`replay_greedy_drafts`) with the drafts this drafter's
        lookups give on the verified prefix of each step."""
        return self._replay(prompt_ids, output_ids, draft_length, keep_tail=False)[1]

    def score_counterfactual_drafts(
        self, prompt_ids: Sequence[int], output_ids: Sequence[int], draft_length: int
    ) -> tuple[list[int], list[int]]:
        """(drafted, accepted) per step of :meth:`score_counterfactual`: a step whose lookup
        found no match drafted 0, which an accept count of 0 alone does not tell from a
        match rejected at once (``drafters.base.DraftCounter``); a last step whose copy
        runs to the output's end is kept as drafting only what it kept, as the engine
        records it (``replay_greedy_drafts``' ``keep_tail``)."""
        return self._replay(prompt_ids, output_ids, draft_length, keep_tail=True)

    def _replay(
        self,
        prompt_ids: Sequence[int],
        output_ids: Sequence[int],
        draft_length: int,
        *,
        keep_tail: bool,
    ) -> tuple[list[int], list[int]]:
        index = NgramIndex(self.min_n, self.max_n)
        history = list(prompt_ids)

        def drafts_at(position: int, k: int) -> list[int]:
            history.extend(output_ids[len(history) - len(prompt_ids) : position])
            return index.propose(history, k)

        return replay_greedy_drafts(output_ids, draft_length, drafts_at, keep_tail=keep_tail)
