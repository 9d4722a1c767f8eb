"""Drafter kinds by name, and the one way to create a drafter for a target."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from drafters.base import Drafter, DraftSession, Proposal, empty_proposal
from drafters.counterfactual import replay_greedy_steps
from drafters.loader import LoadedModel, ModelLoadError, load_model
from drafters.model_drafter import ModelDrafter
from drafters.ngram import NgramDrafter
from drafters.sampling import SamplingConfig

logger = logging.getLogger(__name__)


class TokenizerMismatchError(ModelLoadError):
    """A model drafter's tokenizer differs from its target's."""


class _NoDraftSession:
    def __init__(self, device: torch.device) -> None:
        self._device = device

    def propose(
        self,
        history: Sequence[int],
        k: int,
        sampling: SamplingConfig,
        generator: torch.Generator | None,
    ) -> Proposal:
        return empty_proposal(self._device)

    def prefill(self, prompt_ids: Sequence[int]) -> None:
        """Nothing to take in."""

    def observe_accepted(self, accepted: int) -> None:
        """Nothing drafted, nothing to roll back."""


@dataclass(frozen=True)
class NoDrafter:
    """Plain decoding (k = 0): proposes nothing."""

    name: str
    device: torch.device
    kind: str = "none"

    def start(
        self, prompt_ids: Sequence[int], stop_ids: frozenset[int] = frozenset()
    ) -> DraftSession:
        return _NoDraftSession(self.device)

    def score_counterfactual(
        self, prompt_ids: Sequence[int], output_ids: Sequence[int], draft_length: int
    ) -> list[int]:
        return replay_greedy_steps(output_ids, 0, lambda _position, _k: ())


def tokenizer_difference(target: Any, drafter: Any) -> str | None:
    """A sentence naming how two tokenizers differ, or None when they encode alike."""
    target_vocab, drafter_vocab = target.get_vocab(), drafter.get_vocab()
    if len(target_vocab) != len(drafter_vocab):
        return f"vocabulary sizes differ: target {len(target_vocab)}, drafter {len(drafter_vocab)}"
    for token, index in target_vocab.items():
        other = drafter_vocab.get(token)
        if other != index:
            return f"token {token!r} has id {index} in the target, {other} in the drafter"
    for attribute in ("eos_token", "bos_token", "pad_token"):
        mine, theirs = getattr(target, attribute, None), getattr(drafter, attribute, None)
        if mine != theirs:
            return f"{attribute} differs: target {mine!r}, drafter {theirs!r}"
    return None


def _create_model_drafter(
    name: str, target: LoadedModel, path: Path | None, options: Mapping[str, Any]
) -> Drafter:
    if path is None:
        raise ModelLoadError(f"model drafter {name!r} needs a path")
    loaded = load_model(path, placement=target.placement, roots=options.get("roots"))
    difference = tokenizer_difference(target.tokenizer, loaded.tokenizer)
    if difference is not None:
        raise TokenizerMismatchError(
            f"drafter {name!r} at {loaded.path} cannot draft for {target.path}: {difference}"
        )
    target_rows = target.model.get_output_embeddings().weight.shape[0]
    if loaded.model.get_output_embeddings().weight.shape[0] != target_rows:
        # Same tokenizer, differently padded vocabulary (Qwen2.5 sizes differ): align rows
        # so draft distributions and token ids index the target's vocabulary.
        resize_vocabulary_rows(loaded.model, target_rows)
    return ModelDrafter(
        name=name,
        model=loaded.model,
        device=target.device,
        path=str(loaded.path),
        vocabulary_size=len(loaded.tokenizer),
    )


def resize_vocabulary_rows(model: Any, rows: int) -> None:
    """Give ``model`` ``rows`` embedding and output rows, keeping its existing ones: the rows
    it gains are zero (not random, so loading twice gives the same model), the rows it loses
    are padding. Ids past the tokenizer's vocabulary are never drafted either way."""
    embeddings = (model.get_input_embeddings(), model.get_output_embeddings())
    kept = [layer.weight.shape[0] for layer in embeddings]
    model.resize_token_embeddings(rows, mean_resizing=False)
    with torch.no_grad():
        for layer, before in zip(
            (model.get_input_embeddings(), model.get_output_embeddings()), kept, strict=True
        ):
            layer.weight[before:].zero_()


def _create_ngram_drafter(
    name: str, target: LoadedModel, path: Path | None, options: Mapping[str, Any]
) -> Drafter:
    return NgramDrafter(
        name=name,
        device=target.device,
        min_n=int(options.get("min_n", 2)),
        max_n=int(options.get("max_n", 3)),
    )


def _create_no_drafter(
    name: str, target: LoadedModel, path: Path | None, options: Mapping[str, Any]
) -> Drafter:
    return NoDrafter(name=name, device=target.device)


DrafterFactory = Callable[[str, LoadedModel, Path | None, Mapping[str, Any]], Drafter]

DRAFTER_KINDS: dict[str, DrafterFactory] = {
    "model": _create_model_drafter,
    "ngram": _create_ngram_drafter,
    "none": _create_no_drafter,
}


def create_drafter(
    kind: str,
    *,
    name: str,
    target: LoadedModel,
    path: str | Path | None = None,
    options: Mapping[str, Any] | None = None,
) -> Drafter:
    """Build a drafter of a registered ``kind`` for ``target`` (same device and dtype)."""
    factory = DRAFTER_KINDS.get(kind)
    if factory is None:
        raise ValueError(f"unknown drafter kind {kind!r}; known: {', '.join(DRAFTER_KINDS)}")
    return factory(name, target, Path(path) if path is not None else None, options or {})
