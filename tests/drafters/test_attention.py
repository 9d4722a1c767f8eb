"""The ready-made masks: the same booleans, and so the same outputs, as transformers' own."""

from __future__ import annotations

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM
from transformers.masking_utils import causal_mask_function, sdpa_mask

from drafters.attention import PADDED_SDPA, padded_batch_masks, padded_causal_mask
from tests.drafters.conftest import EOS_ID, tiny_config


def _left_padded(lengths: list[int], width: int) -> torch.Tensor:
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        mask[row, width - length :] = 1
    return mask


def test_a_padded_batch_mask_is_transformers_own() -> None:
    """At the prompt (q = kv) and at a later step (one query over the cache)."""
    for lengths, width, positions in (
        ([5, 3, 1], 5, torch.arange(5)),
        ([7, 2], 9, torch.tensor([8])),
    ):
        attention = _left_padded(lengths, width)
        arguments = {
            "batch_size": len(lengths),
            "cache_position": positions,
            "kv_length": width,
            "mask_function": causal_mask_function,
            "attention_mask": attention,
        }
        ours = padded_causal_mask(**arguments)
        theirs = sdpa_mask(**arguments)
        assert ours is not None and theirs is not None
        assert ours.shape == theirs.shape == (len(lengths), 1, len(positions), width)
        assert torch.equal(ours, theirs)
    # No padding: transformers' own answer, which lets SDPA's causal flag do it.
    whole = {"batch_size": 2, "cache_position": torch.arange(4), "kv_length": 4}
    ones = torch.ones(2, 4, dtype=torch.long)
    assert padded_causal_mask(**whole, attention_mask=ones) is None
    assert sdpa_mask(**whole, attention_mask=ones) is None


def test_a_padded_batch_generates_what_it_did_and_the_model_is_restored() -> None:
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(tiny_config()).eval()
    ids = torch.randint(3, 60, (3, 6))
    mask = _left_padded([6, 4, 2], 6)
    ids[mask == 0] = 0

    def generate() -> torch.Tensor:
        with torch.no_grad():
            return model.generate(  # type: ignore[no-any-return]
                ids,
                attention_mask=mask,
                max_new_tokens=12,
                do_sample=False,
                eos_token_id=EOS_ID,
                pad_token_id=0,
            )

    before = generate()
    with padded_batch_masks(model):
        assert model.config._attn_implementation == PADDED_SDPA
        inside = generate()
    assert model.config._attn_implementation == "sdpa"
    assert torch.equal(before, inside)


def test_a_model_with_windowed_attention_keeps_transformers_masks() -> None:
    windowed = {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 0}
    config = Qwen2Config.from_dict({**tiny_config().to_dict(), **windowed, "layer_types": None})
    assert set(config.layer_types) == {"sliding_attention"}
    model = Qwen2ForCausalLM(config)
    with padded_batch_masks(model):
        assert model.config._attn_implementation == "sdpa"
