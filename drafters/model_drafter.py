"""The model drafter: a small causal LM sharing the target's tokenizer, with its own KV cache."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from drafters.attention import cached_causal_mask
from drafters.base import Proposal
from drafters.counterfactual import score_model_counterfactual
from drafters.lean_decoder import LeanDecoder, lean_decoder_supports
from drafters.sampling import SamplingConfig, can_sample, sample_from, sampling_probs
from drafters.stopping import DraftStopRule


def exclude_padding(logits: torch.Tensor, vocabulary_size: int | None) -> torch.Tensor:
    """``logits`` [..., rows] with the rows from ``vocabulary_size`` on (the padding of a
    padded vocabulary, which no tokenizer id names) at -inf, in place; as given when None."""
    if vocabulary_size is not None and vocabulary_size < logits.shape[-1]:
        logits[..., vocabulary_size:] = float("-inf")
    return logits


class _TransformersForward:
    """Logits through transformers' forward and a ``DynamicCache`` cropped by position."""

    def __init__(self, model: Any, device: torch.device) -> None:
        self._model = model
        self._device = device
        self._cache = DynamicCache()

    def forward(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        self._cache.crop(start)
        mask = cached_causal_mask(self._model, ids.shape[0], start, self._device)
        return self._model(
            input_ids=ids.unsqueeze(0),
            attention_mask=mask,
            past_key_values=self._cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits[0, -1]  # [vocab]


class ModelDraftSession:
    """Drafts autoregressively from the small model; its cache is rolled back by position,
    never rebuilt.

    Invariant: the first ``_verified`` cache positions hold tokens of the verified history.
    After proposing d tokens from a history of length L the cache holds L + f positions,
    f the drafts fed back: d - 1 (the last draft is never fed back), or d when a stop rule
    ended the draft (the forward that gave the rejected q_{d+1} fed x_d); L + min(accepted,
    f) of them stay valid. A draft stops early (d < k) at a stop token (nothing after the
    end of the turn is used) or when the stop rule says so (``drafters/stopping.py``).
    Ids from ``vocabulary_size`` on (the padding past the tokenizer's vocabulary) are never
    drafted.
    """

    def __init__(
        self,
        model: Any,
        device: torch.device,
        prompt_length: int,
        stop_ids: frozenset[int] = frozenset(),
        vocabulary_size: int | None = None,
        layers: int | None = None,
    ) -> None:
        self._device = device
        self._stop_ids = stop_ids
        self._vocabulary_size = vocabulary_size
        if layers is not None and not lean_decoder_supports(model):
            raise ValueError("an early-exit draft (layers) needs a plain Qwen2 model")
        self._forward = (
            LeanDecoder(model, capacity=prompt_length + 256, layers=layers).forward
            if lean_decoder_supports(model)
            else _TransformersForward(model, device).forward
        )
        self._verified = 0
        self._last_history = 0
        self._last_fed = 0

    @torch.inference_mode()
    def prefill(self, prompt_ids: Sequence[int]) -> None:
        """Feed all prompt tokens but the last (the first ``propose`` feeds it and drafts)."""
        if self._verified or len(prompt_ids) < 2:
            return
        feed = torch.tensor(list(prompt_ids[:-1]), dtype=torch.long, device=self._device)
        self._forward(feed, 0)
        self._verified = feed.shape[0]

    @torch.inference_mode()
    def propose(
        self,
        history: Sequence[int],
        k: int,
        sampling: SamplingConfig,
        generator: torch.Generator | None,
        stop_rule: DraftStopRule | None = None,
    ) -> Proposal:
        # Catch up on every verified token the cache lacks (1 or 2 after a normal step).
        feed = torch.tensor(history[self._verified :], dtype=torch.long, device=self._device)
        position = self._verified
        tokens: list[torch.Tensor] = []
        probs: list[torch.Tensor] = []
        rule = stop_rule if stop_rule is not None and stop_rule.active else None
        stopped = False
        further_began: float | None = None  # the forwards after the first one
        for _ in range(k):
            if tokens and further_began is None:
                further_began = self._clock()
            logits = exclude_padding(self._forward(feed, position), self._vocabulary_size)
            position += feed.shape[0]
            if sampling.do_sample:
                q = sampling_probs(logits.unsqueeze(0), sampling)[0]  # [vocab]
                if not can_sample(q):
                    # A row no token can be drawn from (the forward overflowed): the
                    # draft ends, and the target verifies the drafts made before it.
                    stopped = True
                    break
            elif rule is not None and tokens:
                q = logits.float().softmax(dim=-1)  # greedy drafts: the drafter's own q
            if rule is not None and tokens and rule.stops(q):
                stopped = True  # the first draft is always made (drafters/stopping.py)
                break
            if sampling.do_sample:
                token = sample_from(q, generator)  # [1]
                probs.append(q)
            else:
                token = logits.argmax(dim=-1, keepdim=True)  # [1], stays on the device
            tokens.append(token)
            if self._stop_ids and int(token) in self._stop_ids:
                break  # the turn ends here if accepted: later drafts could never be used
            feed = token
        self._last_history = len(history)
        self._last_fed = position - len(history)  # drafts whose keys the cache now holds
        return Proposal(
            token_ids=self._drafted(tokens),  # [d], d <= k
            probs=torch.stack(probs) if probs else None,  # [d, vocab]
            stopped=stopped,
            further_time_s=self._clock() - further_began if further_began is not None else 0.0,
            # One forward per draft, and one more whose distribution stopped the draft.
            further_forwards=len(tokens) - 1 + stopped,
        )

    def _drafted(self, tokens: list[torch.Tensor]) -> torch.Tensor:
        """The draft's ids [d]; none where the first row could not be sampled from."""
        if not tokens:
            return torch.empty(0, dtype=torch.long, device=self._device)
        return torch.cat(tokens)

    def _clock(self) -> float:
        """perf_counter, once the device has run what was queued: on a GPU the forwards
        return before their kernels finish, so the split between the first forward and
        the further ones needs a synchronisation at each of its two ends."""
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)
        return time.perf_counter()

    def observe_accepted(self, accepted: int) -> None:
        self._verified = self._last_history + min(accepted, max(self._last_fed, 0))


@dataclass(frozen=True)
class ModelDrafter:
    """A loaded small causal LM used as a drafter."""

    name: str
    model: Any  # transformers.PreTrainedModel
    device: torch.device
    path: str = ""
    kind: str = "model"
    vocabulary_size: int | None = None  # the tokenizer's; model rows past it are padding

    def start(
        self, prompt_ids: Sequence[int], stop_ids: frozenset[int] = frozenset()
    ) -> ModelDraftSession:
        return ModelDraftSession(
            self.model, self.device, len(prompt_ids), stop_ids, self.vocabulary_size
        )

    def score_counterfactual(
        self, prompt_ids: Sequence[int], output_ids: Sequence[int], draft_length: int
    ) -> list[int]:
        return score_model_counterfactual(
            self.model, prompt_ids, output_ids, draft_length, self.vocabulary_size
        )
