"""Ready-made causal masks for transformers' SDPA attention.

transformers builds its mask per forward with ``torch.vmap`` over every (batch, head,
query, key) when it cannot skip it: when more than one new token meets a non-empty cache
(the engine's verification), and at every step of a left-padded batch's ``generate``
(the world build's target answers, the world evaluation). That costs about as much as a
tiny model's forward. A 4D mask passed in is used as is, so ``cached_causal_mask`` builds
the verification's with one ``tril``; ``padded_batch_masks`` has a padded batch's built
by broadcasting (``padded_causal_mask``), the same booleans. Both are plain causal masks,
only right for full attention: a model with windowed layers (Mistral's sliding window, a
Qwen2 config with ``use_sliding_window``) keeps transformers' own masks, or its
verification would attend where plain decoding does not (and lose losslessness).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

#: The attention implementation ``padded_batch_masks`` switches a model to: transformers'
#: SDPA attention, with ``padded_causal_mask`` for its masks.
PADDED_SDPA = "sdpa_padded"


def cached_causal_mask(
    model: Any, new_tokens: int, cached_tokens: int, device: torch.device
) -> torch.Tensor | None:
    """Boolean mask [1, 1, q, kv] (True = attend) for q new tokens after ``cached_tokens``,
    or None where transformers' own path is as fast (one token, empty cache) or the
    attention implementation wants another mask format."""
    if new_tokens < 2 or cached_tokens == 0:
        return None
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return None
    if not full_attention_only(model.config):
        return None
    total = cached_tokens + new_tokens
    # New token i sits at position cached + i and attends to keys 0..cached + i.
    mask = torch.ones(new_tokens, total, dtype=torch.bool, device=device)
    return mask.tril_(diagonal=cached_tokens)[None, None]


def full_attention_only(config: Any) -> bool:
    """Every layer attends to the whole context (no sliding window, no chunks)."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return all(kind == "full_attention" for kind in layer_types)
    if getattr(config, "attention_chunk_size", None):
        return False
    window = getattr(config, "sliding_window", None)
    return window is None or getattr(config, "use_sliding_window", True) is False


def padded_causal_mask(
    batch_size: int,
    cache_position: torch.Tensor,
    kv_length: int,
    kv_offset: int = 0,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor | None:
    """transformers' SDPA mask (``sdpa_mask``'s arguments; True = attend) for a batch
    whose 2D ``attention_mask`` holds padding: causal and not padding, [B, 1, q, kv],
    broadcast instead of vmapped. Without padding (or with a 2D mask not covering the
    keys), transformers' own, which skips the mask where SDPA's causal flag does."""
    from transformers.masking_utils import sdpa_mask

    if (
        attention_mask is None
        or attention_mask.shape[-1] != kv_offset + kv_length
        or bool(attention_mask.all())
    ):
        own: torch.Tensor | None = sdpa_mask(
            batch_size=batch_size,
            cache_position=cache_position,
            kv_length=kv_length,
            kv_offset=kv_offset,
            attention_mask=attention_mask,
            **kwargs,
        )
        return own
    keys = torch.arange(kv_offset, kv_offset + kv_length, device=cache_position.device)
    causal = keys[None, :] <= cache_position[:, None]  # [q, kv]
    return causal[None, None] & attention_mask[:, None, None, kv_offset:].bool()


@contextlib.contextmanager
def padded_batch_masks(model: Any) -> Iterator[None]:
    """While inside, ``model`` (SDPA, full attention only) builds its masks with
    ``padded_causal_mask``: the same outputs, a padded batch's ``generate`` faster
    (measured in benchmarks/world/HISTORY.md). Any other model is left as it is."""
    config = model.config
    if getattr(config, "_attn_implementation", None) != "sdpa" or not full_attention_only(config):
        yield
        return
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    AttentionInterface.register(PADDED_SDPA, sdpa_attention_forward)
    AttentionMaskInterface.register(PADDED_SDPA, padded_causal_mask)
    config._attn_implementation = PADDED_SDPA
    try:
        yield
    finally:
        config._attn_implementation = "sdpa"
