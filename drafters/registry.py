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
from drafters.hybrid import DEFAULT_MIN_MATCH, DEFAULT_MODEL_K, CopyOrModelDrafter
from drafters.loader import LoadedModel, ModelLoadError, TargetInfo, load_model, load_tokenizer
from drafters.model_drafter import ModelDrafter
from drafters.ngram import NgramDrafter
from drafters.sampling import SamplingConfig
from drafters.self_drafter import SelfDrafter, check_exit_layer
from drafters.stopping import DraftStopRule

logger = logging.getLogger(__name__)


class TokenizerMismatchError(ModelLoadError):
    """A model drafter's tokenizer differs from its target's."""


class TargetWeightsRequiredError(ValueError):
    """A drafter kind that drafts with the target's own weights, for a target whose
    weights are not loaded (a :class:`~drafters.loader.TargetDescription`)."""


class _NoDraftSession:
    def __init__(self, device: torch.device) -> None:
        self._device = device

    def propose(
        self,
        history: Sequence[int],
        k: int,
        sampling: SamplingConfig,
        generator: torch.Generator | None,
        stop_rule: DraftStopRule | None = None,
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


def _tokens_by_id(tokenizer: Any) -> dict[int, str]:
    return {int(index): str(token) for token, index in tokenizer.get_vocab().items()}


def special_token_ids(tokenizer: Any) -> dict[int, str]:
    """The tokens a tokenizer treats as special, by id: its added special tokens and the
    named ones (eos, pad, ..., additional). Which of them is the EOS is a role, not part of
    the vocabulary: a Qwen2.5 base model ends on <|endoftext|>, its Instruct model on
    <|im_end|>, with the same ids and the same special tokens."""
    special = {
        int(index): str(token.content)
        for index, token in getattr(tokenizer, "added_tokens_decoder", {}).items()
        if getattr(token, "special", False)
    }
    for index in tokenizer.all_special_ids:
        special.setdefault(int(index), str(tokenizer.convert_ids_to_tokens(int(index))))
    return special


def _first_different_id(target: dict[int, str], drafter: dict[int, str]) -> int | None:
    return next(
        (i for i in sorted(target.keys() | drafter.keys()) if target.get(i) != drafter.get(i)), None
    )


def _describe(token: str | None) -> str:
    return repr(token) if token is not None else "absent"


def tokenizer_difference(target: Any, drafter: Any) -> str | None:
    """How two tokenizers differ, in one line naming the first difference, or None when a
    drafter with ``drafter``'s tokenizer may draft for ``target``: the same token at every
    id, and the same ids special. EOS names are not compared (see :func:`special_token_ids`)."""
    target_tokens, drafter_tokens = _tokens_by_id(target), _tokens_by_id(drafter)
    index = _first_different_id(target_tokens, drafter_tokens)
    if index is not None:
        first = (
            f"first difference at id {index}: target {_describe(target_tokens.get(index))},"
            f" drafter {_describe(drafter_tokens.get(index))}"
        )
        if len(target_tokens) != len(drafter_tokens):
            sizes = f"target {len(target_tokens)}, drafter {len(drafter_tokens)}"
            return f"vocabulary sizes differ: {sizes}; {first}"
        return first
    target_special, drafter_special = special_token_ids(target), special_token_ids(drafter)
    index = _first_different_id(target_special, drafter_special)
    if index is not None:
        token = target_tokens.get(index)
        special_in = "the target" if index in target_special else "the drafter"
        plain_in = "the drafter" if index in target_special else "the target"
        return (
            f"special tokens differ: id {index} ({token!r}) is special in {special_in},"
            f" not in {plain_in}"
        )
    return None


def mismatch_message(
    name: str, drafter_dir: Path | str, target_dir: Path | str, difference: str
) -> str:
    """The one-line refusal of drafter ``name`` whose tokenizer differs from its target's."""
    target = f"the target at {target_dir}"
    return f"drafter {name!r} at {drafter_dir} cannot draft for {target}: {difference}"


def drafter_tokenizer_difference(target_tokenizer: Any, drafter_dir: Path | str) -> str | None:
    """:func:`tokenizer_difference` against the tokenizer saved in ``drafter_dir``, without
    loading its weights (a check before anything large is loaded)."""
    return tokenizer_difference(target_tokenizer, load_tokenizer(drafter_dir))


def _create_model_drafter(
    name: str, target: TargetInfo, path: Path | None, options: Mapping[str, Any]
) -> Drafter:
    if path is None:
        raise ModelLoadError(f"model drafter {name!r} needs a path")
    # The tokenizer first: a drafter for another vocabulary was refused only after all
    # its weights had loaded onto the device (minutes, and memory, for a large one).
    difference = drafter_tokenizer_difference(target.tokenizer, path)
    if difference is not None:
        raise TokenizerMismatchError(mismatch_message(name, path, target.path, difference))
    loaded = load_model(path, placement=target.placement, digest_cache=target.digest_cache)
    target_rows = target.vocabulary_rows
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


def _create_copy_or_model_drafter(
    name: str, target: TargetInfo, path: Path | None, options: Mapping[str, Any]
) -> Drafter:
    """A model drafter (``path``) that copies where the context repeats
    (``drafters/hybrid.py``); options ``min_match`` (3) and ``model_k`` (3)."""
    min_match = int_option(options, "min_match", DEFAULT_MIN_MATCH)
    model_k = int_option(options, "model_k", DEFAULT_MODEL_K)
    base = _create_model_drafter(name, target, path, {})
    assert isinstance(base, ModelDrafter)
    return CopyOrModelDrafter(name=name, base=base, min_match=min_match, model_k=model_k)


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
    name: str, target: TargetInfo, path: Path | None, options: Mapping[str, Any]
) -> Drafter:
    return NgramDrafter(
        name=name,
        device=target.device,
        min_n=int_option(options, "min_n", 2),
        max_n=int_option(options, "max_n", 3),
    )


def _create_self_drafter(
    name: str, target: TargetInfo, path: Path | None, options: Mapping[str, Any]
) -> Drafter:
    """The target's own first layers (``drafters/self_drafter.py``); option ``exit_layer``
    (default: half the target's layers). Needs the target's weights loaded."""
    if not isinstance(target, LoadedModel):
        raise TargetWeightsRequiredError(
            f"a self-speculative drafter ({name!r}) drafts with the target's own layers, and "
            f"the target's weights are not loaded here (only its tokenizer, from {target.path})"
        )
    model = target.model
    exit_layer = int_option(options, "exit_layer", model.config.num_hidden_layers // 2)
    return SelfDrafter(
        name=name,
        model=model,
        device=target.device,
        exit_layer=check_exit_layer(model, exit_layer),
        vocabulary_size=len(target.tokenizer),
    )


def _create_no_drafter(
    name: str, target: TargetInfo, path: Path | None, options: Mapping[str, Any]
) -> Drafter:
    return NoDrafter(name=name, device=target.device)


DrafterFactory = Callable[[str, TargetInfo, Path | None, Mapping[str, Any]], Drafter]

DRAFTER_KINDS: dict[str, DrafterFactory] = {
    "model": _create_model_drafter,
    "copy-or-model": _create_copy_or_model_drafter,
    "ngram": _create_ngram_drafter,
    "self": _create_self_drafter,
    "none": _create_no_drafter,
}


#: The options each kind reads (``RegisterDrafterRequest.options``, string values).
KIND_OPTIONS: dict[str, frozenset[str]] = {
    "model": frozenset(),
    "copy-or-model": frozenset({"min_match", "model_k"}),
    "ngram": frozenset({"min_n", "max_n"}),
    "self": frozenset({"exit_layer"}),
    "none": frozenset(),
}


def check_options(kind: str, options: Mapping[str, Any]) -> None:
    """ValueError naming the first option ``kind`` does not read (a misspelt option
    would otherwise be ignored without a word)."""
    known = KIND_OPTIONS.get(kind, frozenset())
    unknown = sorted(set(options) - known)
    if unknown:
        reads = ", ".join(sorted(known)) or "no options"
        raise ValueError(f"drafter kind {kind!r} has no option {unknown[0]!r} (it reads: {reads})")


def int_option(options: Mapping[str, Any], key: str, default: int) -> int:
    """Option ``key`` as an integer (``default`` when absent); ValueError naming it."""
    value = options.get(key, default)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"option {key!r} must be an integer, got {value!r}") from None


#: Drafter kinds loaded from a model directory (``path``): the same root, tokenizer and
#: weight checks apply to all of them.
PATH_KINDS = frozenset({"model", "copy-or-model"})
#: Drafter kinds that run no model: drafting costs a lookup, not a forward.
MODEL_FREE_KINDS = frozenset({"ngram", "none"})
#: Drafter kinds whose drafts are copies of the context (prompt lookup): a lookup finds a
#: match or drafts nothing, and a match goes on for a run of tokens.
COPY_KINDS = frozenset({"ngram"})


def draft_cost_hint(drafter: Drafter) -> float | None:
    """What one drafted token costs, in plain target steps, before anything is measured:
    0 for a kind that runs no model, None (no hint: the policy's default) for a kind that
    runs one, whose cost depends on its size and the hardware."""
    return 0.0 if drafter.kind in MODEL_FREE_KINDS else None


#: The configuration fields that decide what a model drafter's forward pass computes.
SHAPE_FIELDS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "vocab_size",
)


def cost_shape(drafter: Drafter) -> str | None:
    """A key that two drafters share when a drafted token costs them the same on one
    machine: a model drafter's architecture (``SHAPE_FIELDS`` of its config), dtype and
    device, so that drafters fine-tuned from one base share what their drafting costs;
    None for the other kinds (their cost is their own: a lookup's is none, a self
    drafter's is the target's first layers)."""
    if not isinstance(drafter, ModelDrafter):
        return None
    config = getattr(drafter.model, "config", None)
    if config is None:
        return None
    fields = ",".join(f"{field}={getattr(config, field, None)}" for field in SHAPE_FIELDS)
    dtype = getattr(drafter.model, "dtype", None)
    return f"model:{fields},dtype={dtype},device={drafter.device}"


def copies_context(drafter: Drafter) -> bool:
    """Whether ``drafter`` drafts by copying from the context (``COPY_KINDS``)."""
    return drafter.kind in COPY_KINDS


def create_drafter(
    kind: str,
    *,
    name: str,
    target: TargetInfo,
    path: str | Path | None = None,
    options: Mapping[str, Any] | None = None,
) -> Drafter:
    """Build a drafter of a registered ``kind`` for ``target`` (same device and dtype).
    Raises :class:`TargetWeightsRequiredError` for a kind that runs on the target's own
    weights (``self``) when ``target`` has none loaded."""
    factory = DRAFTER_KINDS.get(kind)
    if factory is None:
        raise ValueError(f"unknown drafter kind {kind!r}; known: {', '.join(DRAFTER_KINDS)}")
    return factory(name, target, Path(path) if path is not None else None, options or {})
