"""The copy-or-model drafter: copy from the context where it repeats, else draft with a model.

A fixed (drafter, k) drafts the same way on every step of a request, while within one
answer some stretches repeat the context (a name, a quoted clause, a line of code, a
repeated phrase) and others do not. This drafter decides per step: when the last
``min_match`` or more tokens of prompt + verified output occurred before, it proposes what
followed them (the n-gram lookup, ``drafters/ngram.py``), up to k tokens and at no model
cost; otherwise its model drafts, at most ``model_k`` tokens (a model's drafts are
accepted less the further they go, a copy's often run long). Both kinds of proposal are
verified as usual, so the output is the target's (lossless under greedy decoding and
sampling alike: a copy is a point-mass draft).

The model's KV cache catches up on the tokens of the steps it did not draft at its next
proposal (``ModelDraftSession`` feeds whatever verified history its cache lacks).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from drafters.base import DraftSession, Proposal
from drafters.counterfactual import replay_greedy_steps, teacher_forced_predictions
from drafters.model_drafter import ModelDrafter
from drafters.ngram import NgramDraftSession, NgramIndex
from drafters.sampling import SamplingConfig
from drafters.stopping import DraftStopRule

#: The shortest suffix match that makes a step copy (shorter ones match almost anywhere).
DEFAULT_MIN_MATCH = 3
#: The most tokens the model drafts in one step.
DEFAULT_MODEL_K = 3


def copy_index(min_match: int) -> NgramIndex:
    """The lookup that decides whether a step copies: suffixes of ``min_match`` tokens and
    one longer (the longer match wins where both occur)."""
    return NgramIndex(min_match, min_match + 1)


class CopyOrModelSession:
    """One request: the lookup's proposal when it has one, else the model's."""

    def __init__(self, model: DraftSession, copy: NgramDraftSession, model_k: int) -> None:
        self._model = model
        self._copy = copy
        self._model_k = model_k
        self._last: DraftSession | None = None
        self.copied_steps = 0
        self.model_steps = 0

    def prefill(self, prompt_ids: Sequence[int]) -> None:
        self._copy.prefill(prompt_ids)
        self._model.prefill(prompt_ids)

    def propose(
        self,
        history: Sequence[int],
        k: int,
        sampling: SamplingConfig,
        generator: torch.Generator | None,
        stop_rule: DraftStopRule | None = None,
    ) -> Proposal:
        copied = self._copy.propose(history, k, sampling, generator)
        if copied.length > 0:
            self._last = self._copy
            self.copied_steps += 1
            return copied
        self._last = self._model
        self.model_steps += 1
        return self._model.propose(history, min(k, self._model_k), sampling, generator, stop_rule)

    def observe_accepted(self, accepted: int) -> None:
        if self._last is not None:
            self._last.observe_accepted(accepted)


@dataclass(frozen=True)
class CopyOrModelDrafter:
    """A model drafter that copies from the context where the context repeats (module doc)."""

    name: str
    base: ModelDrafter
    min_match: int = DEFAULT_MIN_MATCH
    model_k: int = DEFAULT_MODEL_K
    kind: str = "copy-or-model"

    def __post_init__(self) -> None:
        if self.min_match < 1:
            raise ValueError(f"min_match must be >= 1, got {self.min_match}")
        if self.model_k < 1:
            raise ValueError(f"model_k must be >= 1, got {self.model_k}")

    @property
    def model(self) -> Any:
        """The model's weights (``transformers.PreTrainedModel``), as a model drafter's."""
        return self.base.model

    @property
    def device(self) -> torch.device:
        return self.base.device

    @property
    def path(self) -> str:
        return self.base.path

    @property
    def vocabulary_size(self) -> int | None:
        return self.base.vocabulary_size

    def start(
        self, prompt_ids: Sequence[int], stop_ids: frozenset[int] = frozenset()
    ) -> CopyOrModelSession:
        return CopyOrModelSession(
            self.base.start(prompt_ids, stop_ids),
            NgramDraftSession(copy_index(self.min_match), self.device, stop_ids),
            self.model_k,
        )

    def score_counterfactual(
        self, prompt_ids: Sequence[int], output_ids: Sequence[int], draft_length: int
    ) -> list[int]:
        """Replay greedy steps (:func:`replay_greedy_steps`): at each step the lookup's
        drafts on the verified prefix when it matches, else the model's teacher-forced
        predictions (its greedy drafts), at most ``model_k`` of them."""
        predicted = teacher_forced_predictions(
            self.model, prompt_ids, output_ids, self.vocabulary_size
        )
        index = copy_index(self.min_match)
        history = list(prompt_ids)

        def drafts_at(position: int, k: int) -> list[int]:
            history.extend(output_ids[len(history) - len(prompt_ids) : position])
            copied = index.propose(history, k)
            return copied or predicted[position : position + min(k, self.model_k)]

        return replay_greedy_steps(output_ids, draft_length, drafts_at)
