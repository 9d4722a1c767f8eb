"""A lean Qwen2 decoder for drafting: the model's own weights, none of transformers' per-call
machinery, a preallocated KV cache rolled back by position (gpt-fast style).

A 2-layer drafter spends most of a transformers forward in Python bookkeeping (mask and
cache objects, output dataclasses, hooks); this loop issues only the tensor ops. Drafts
need not be bit-identical to transformers' (the verifier decides what is kept), but
they match to float tolerance (tests/drafters/test_lean_decoder.py).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from drafters.attention import full_attention_only


def lean_decoder_supports(model: Any) -> bool:
    """Plain Qwen2 causal LMs: full attention, default RoPE, SiLU MLP."""
    config = getattr(model, "config", None)
    return (
        config is not None
        and getattr(config, "model_type", None) == "qwen2"
        and full_attention_only(config)
        and getattr(config, "rope_scaling", None) is None
        and getattr(config, "hidden_act", None) == "silu"
    )


class LeanDecoder:
    """Forward passes over a growing sequence with a KV cache overwritten by position.

    ``forward(ids, start)`` writes keys/values for positions start..start+q-1 and returns
    the logits [vocab] of the last one; rolling back is calling it with a smaller start.
    ``layers`` runs only the model's first decoder layers, then its final norm and LM head
    (an early exit: the self-speculative drafter); the weights are the model's own
    tensors, never copies, and the cache holds those layers only.
    """

    def __init__(self, model: Any, capacity: int = 512, layers: int | None = None) -> None:
        config = model.config
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.eps = config.rms_norm_eps
        self.hidden = config.hidden_size
        weights = next(model.parameters())
        self.device, self.dtype = weights.device, weights.dtype
        self.embed = model.get_input_embeddings().weight
        self.lm_head = model.get_output_embeddings().weight
        self.final_norm = model.model.norm.weight
        self.layers = [
            (
                layer.input_layernorm.weight,
                layer.self_attn.q_proj.weight,
                layer.self_attn.q_proj.bias,
                layer.self_attn.k_proj.weight,
                layer.self_attn.k_proj.bias,
                layer.self_attn.v_proj.weight,
                layer.self_attn.v_proj.bias,
                layer.self_attn.o_proj.weight,
                layer.post_attention_layernorm.weight,
                layer.mlp.gate_proj.weight,
                layer.mlp.up_proj.weight,
                layer.mlp.down_proj.weight,
            )
            for layer in list(model.model.layers)[:layers]
        ]
        rotary = model.model.rotary_emb
        self._inv_freq = rotary.inv_freq.float()
        self._scaling = float(getattr(rotary, "attention_scaling", 1.0))
        self._capacity = 0
        self.keys = torch.empty(0)
        self.values = torch.empty(0)
        self._cos = torch.empty(0)
        self._sin = torch.empty(0)
        self._grow(capacity)

    def _grow(self, needed: int) -> None:
        """Double the cache and RoPE tables until ``needed`` positions fit."""
        capacity = max(self._capacity, 16)
        while capacity < needed:
            capacity *= 2
        if capacity == self._capacity:
            return
        shape = (len(self.layers), 1, self.kv_heads, capacity, self.head_dim)
        keys = torch.zeros(shape, device=self.device, dtype=self.dtype)
        values = torch.zeros(shape, device=self.device, dtype=self.dtype)
        if self._capacity:
            keys[:, :, :, : self._capacity] = self.keys
            values[:, :, :, : self._capacity] = self.values
        self.keys, self.values = keys, values
        positions = torch.arange(capacity, device=self.device, dtype=torch.float32)
        freqs = torch.outer(positions, self._inv_freq.to(self.device))  # [capacity, hd / 2]
        angles = torch.cat([freqs, freqs], dim=-1)  # [capacity, hd]
        self._cos = (angles.cos() * self._scaling).to(self.dtype)
        self._sin = (angles.sin() * self._scaling).to(self.dtype)
        self._capacity = capacity

    @staticmethod
    def _rotate_half(x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return torch.cat([-x[..., half:], x[..., :half]], dim=-1)

    def forward(
        self, ids: torch.Tensor, start: int, *, all_positions: bool = False
    ) -> torch.Tensor:
        """Logits [vocab] after feeding ``ids`` [q] at positions start..start+q-1 (with
        ``all_positions``, those of every fed position: [q, vocab])."""
        q_len = ids.shape[0]
        end = start + q_len
        if end > self._capacity:
            self._grow(end)
        cos = self._cos[start:end]  # [q, hd]
        sin = self._sin[start:end]
        mask = None
        if q_len > 1:
            # Query i (position start + i) sees keys 0..start + i.
            mask = torch.ones(q_len, end, dtype=torch.bool, device=self.device).tril_(start)
        x = F.embedding(ids, self.embed).unsqueeze(0)  # [1, q, hidden]
        for index, (ln1, wq, bq, wk, bk, wv, bv, wo, ln2, wg, wu, wd) in enumerate(self.layers):
            h = F.rms_norm(x, (self.hidden,), ln1, self.eps)
            q = F.linear(h, wq, bq).view(1, q_len, self.heads, self.head_dim).transpose(1, 2)
            k = F.linear(h, wk, bk).view(1, q_len, self.kv_heads, self.head_dim).transpose(1, 2)
            v = F.linear(h, wv, bv).view(1, q_len, self.kv_heads, self.head_dim).transpose(1, 2)
            q = q * cos + self._rotate_half(q) * sin
            k = k * cos + self._rotate_half(k) * sin
            self.keys[index, :, :, start:end] = k
            self.values[index, :, :, start:end] = v
            attention = F.scaled_dot_product_attention(
                q,
                self.keys[index, :, :, :end],
                self.values[index, :, :, :end],
                attn_mask=mask,
                enable_gqa=self.kv_heads != self.heads,
            )  # [1, heads, q, hd]
            x = x + F.linear(attention.transpose(1, 2).reshape(1, q_len, -1), wo)
            h = F.rms_norm(x, (self.hidden,), ln2, self.eps)
            x = x + F.linear(F.silu(F.linear(h, wg)) * F.linear(h, wu), wd)
        last = F.rms_norm(
            x[0] if all_positions else x[0, -1], (self.hidden,), self.final_norm, self.eps
        )
        return F.linear(last, self.lm_head)  # [vocab], or [q, vocab] for all positions
