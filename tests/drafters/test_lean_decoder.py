"""The lean drafting decoder gives transformers' logits, also after rolling back."""

from __future__ import annotations

import torch

from drafters.lean_decoder import LeanDecoder, lean_decoder_supports
from drafters.loader import load_model
from drafters.model_drafter import _TransformersForward

from .conftest import TinyModels


def test_matches_transformers_logits_through_prefill_steps_and_rollback(
    tiny_models: TinyModels,
) -> None:
    model = load_model(tiny_models.close_dir).model
    assert lean_decoder_supports(model)
    decoder = LeanDecoder(model, capacity=8)  # small, so the cache must grow
    sequence = [5, 9, 17, 33, 40, 41, 12, 7, 7, 30, 22, 18, 9]

    def reference(ids: list[int]) -> torch.Tensor:
        with torch.inference_mode():
            return model(torch.tensor([ids])).logits[0, -1]

    with torch.inference_mode():
        got = decoder.forward(torch.tensor(sequence[:6]), 0)
        torch.testing.assert_close(got, reference(sequence[:6]), rtol=1e-4, atol=1e-4)
        for end in range(7, 11):
            got = decoder.forward(torch.tensor(sequence[end - 1 : end]), end - 1)
            torch.testing.assert_close(got, reference(sequence[:end]), rtol=1e-4, atol=1e-4)
        # Roll back to 8 positions and feed three different tokens at once.
        other = [*sequence[:8], 3, 4, 5]
        got = decoder.forward(torch.tensor(other[8:]), 8)
        torch.testing.assert_close(got, reference(other), rtol=1e-4, atol=1e-4)
        got = decoder.forward(torch.tensor(sequence[6:]), 6)
        torch.testing.assert_close(got, reference(sequence), rtol=1e-4, atol=1e-4)


def test_the_transformers_fallback_rolls_back_like_the_lean_decoder(
    tiny_models: TinyModels,
) -> None:
    model = load_model(tiny_models.close_dir).model
    lean = LeanDecoder(model)
    fallback = _TransformersForward(model, torch.device("cpu"))
    feeds = [([5, 9, 17, 33], 0), ([40], 4), ([41, 12, 7], 5), ([3, 4], 6), ([8], 8)]
    with torch.inference_mode():
        for ids, start in feeds:
            tokens = torch.tensor(ids)
            torch.testing.assert_close(
                fallback.forward(tokens, start), lean.forward(tokens, start), rtol=1e-4, atol=1e-4
            )
