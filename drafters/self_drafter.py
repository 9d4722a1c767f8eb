"""The self-speculative drafter: the target drafts for itself from its first layers.

LayerSkip-style early exit (Elhoushi et al. 2024, arXiv 2404.16710): a draft token is
the argmax (or a sample) of the target's final norm and LM head applied to the hidden
state after its first ``exit_layer`` decoder layers. It runs through the lean decoder
(``drafters/lean_decoder.py``) over the target's own weight tensors, so it has no weights
of its own: its only memory is the KV cache of those layers. That cache is its own; the
verification pass recomputes the first layers (reusing the draft's keys and values there
is not done: they were computed for the draft tokens, which the verifier may reject).

Verification is the engine's, unchanged, so the output is the target's (lossless) for
any exit layer; only the acceptance, and so the speed-up, depends on it. A target trained
without an early-exit loss drafts poorly from its middle layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from drafters.counterfactual import replay_greedy_steps
from drafters.lean_decoder import LeanDecoder, lean_decoder_supports
from drafters.model_drafter import ModelDraftSession, exclude_padding


def check_exit_layer(model: Any, exit_layer: int) -> int:
    """``exit_layer`` if the model can draft from it: a plain Qwen2 model (the lean
    decoder's) and 1 <= exit_layer < its number of layers."""
    if not lean_decoder_supports(model):
        raise ValueError("a self-speculative drafter needs a plain Qwen2 target")
    layers = int(model.config.num_hidden_layers)
    if not 1 <= exit_layer < layers:
        raise ValueError(f"exit_layer must be in 1..{layers - 1} for a {layers}-layer target")
    return exit_layer


@dataclass(frozen=True)
class SelfDrafter:
    """Drafts with the target's first ``exit_layer`` layers, final norm and LM head."""

    name: str
    model: Any  # the target's transformers model, shared, never copied
    device: torch.device
    exit_layer: int
    kind: str = "self"
    vocabulary_size: int | None = None

    def start(
        self, prompt_ids: Sequence[int], stop_ids: frozenset[int] = frozenset()
    ) -> ModelDraftSession:
        return ModelDraftSession(
            self.model,
            self.device,
            len(prompt_ids),
            stop_ids,
            self.vocabulary_size,
            layers=self.exit_layer,
        )

    @torch.inference_mode()
    def score_counterfactual(
        self, prompt_ids: Sequence[int], output_ids: Sequence[int], draft_length: int
    ) -> list[int]:
        """Greedy drafts are the early exit's teacher-forced argmax (one pass of the first
        layers over prompt + output), replayed as any model drafter's."""
        if not output_ids:
            return []
        ids = torch.tensor([*prompt_ids, *output_ids], dtype=torch.long, device=self.device)
        decoder = LeanDecoder(self.model, capacity=ids.shape[0], layers=self.exit_layer)
        logits = exclude_padding(decoder.forward(ids, 0, all_positions=True), self.vocabulary_size)
        start = len(prompt_ids) - 1  # position P - 1 + i predicts output token i
        predicted = logits[start : start + len(output_ids)].argmax(dim=-1).tolist()
        return replay_greedy_steps(
            output_ids, draft_length, lambda position, k: predicted[position : position + k]
        )
