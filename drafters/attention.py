"""A ready-made causal mask for multi-token forwards over a KV cache.

transformers builds this mask per layer call with ``torch.vmap`` when more than one new
token meets a non-empty cache, which costs about as much as a tiny model's forward. A 4D
mask passed in is used as is, so we build it with one ``tril``: a plain causal mask, which
is only right for full attention. A model with windowed layers (Mistral's sliding window,
a Qwen2 config with ``use_sliding_window``) gets None and transformers' own masks, or its
verification would attend where plain decoding does not (and lose losslessness).
"""

from __future__ import annotations

from typing import Any

import torch


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
