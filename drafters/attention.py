"""A ready-made causal mask for multi-token forwards over a KV cache.

transformers builds this mask per layer call with ``torch.vmap`` when more than one new
token meets a non-empty cache, which costs about as much as a tiny model's forward. A 4D
mask passed in is used as is, so we build it with one ``tril``.
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
    total = cached_tokens + new_tokens
    # New token i sits at position cached + i and attends to keys 0..cached + i.
    mask = torch.ones(new_tokens, total, dtype=torch.bool, device=device)
    return mask.tril_(diagonal=cached_tokens)[None, None]
