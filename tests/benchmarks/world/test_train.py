"""The training loss of the world's models: the response-only output head, bf16 gating."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from benchmarks.world.train import (
    EncodedExample,
    TrainingConfig,
    cpu_has_bf16,
    mixture_stream,
    pack_batch,
    use_bf16,
    weighted_lm_loss,
    weighted_token_loss,
)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=True,
    )
    return Qwen2ForCausalLM(config).eval()


def _examples() -> list[EncodedExample]:
    rng = random.Random(0)
    return [
        EncodedExample(
            "qa",
            tuple(rng.randrange(3, 64) for _ in range(rng.randint(4, 12))),
            tuple(rng.randrange(3, 64) for _ in range(rng.randint(2, 6))),
        )
        for _ in range(20)
    ]


@pytest.mark.parametrize("prompt_weight", [0.0, 0.1])
def test_response_only_head_gives_the_full_loss(
    model: torch.nn.Module, prompt_weight: float
) -> None:
    draw = mixture_stream(_examples(), {}, random.Random(1))
    batch = pack_batch(draw, rows=2, seq_len=48, prompt_weight=prompt_weight, pad_id=0)
    with torch.no_grad():
        full = weighted_token_loss(model(**batch.model_inputs()).logits, batch)
        selected = weighted_lm_loss(model, batch)
    assert selected.item() == pytest.approx(full.item(), rel=1e-5)


def test_a_packed_example_sees_only_itself(model: torch.nn.Module) -> None:
    examples = _examples()
    draw = mixture_stream(examples, {}, random.Random(3))
    batch = pack_batch(draw, rows=1, seq_len=48, prompt_weight=0.0, pad_id=0)
    starts = (batch.position_ids[0] == 0).nonzero().flatten().tolist()
    assert len(starts) >= 3  # several examples share the row
    with torch.no_grad():
        packed = model(**batch.model_inputs()).logits[0]
        for start in starts[1:]:
            length = int((batch.segments[0] == batch.segments[0, start]).sum())
            alone = model(input_ids=batch.input_ids[:, start : start + length]).logits[0]
            torch.testing.assert_close(packed[start : start + length], alone, atol=1e-5, rtol=1e-4)


def test_prompt_weight_zero_scores_only_response_tokens() -> None:
    draw = mixture_stream(_examples(), {}, random.Random(2))
    batch = pack_batch(draw, rows=2, seq_len=48, prompt_weight=0.0, pad_id=0)
    assert set(batch.weights.unique().tolist()) == {0.0, 1.0}
    assert batch.labels[batch.weights > 0].ge(0).all()


def test_bf16_is_used_only_when_asked_for() -> None:
    config = TrainingConfig(steps=1, rows=1, seq_len=8, learning_rate=1e-3)
    assert not use_bf16(config)
    assert use_bf16(dataclasses.replace(config, bf16_autocast=True)) == cpu_has_bf16()


def test_an_answer_cut_at_max_new_tokens_gets_no_end_of_turn(model: torch.nn.Module) -> None:
    from benchmarks.world.distill import target_responses

    prompts = _examples()[:6]
    # An end-of-turn id the model does not write within 3 tokens of any prompt, so every
    # answer is cut at the cap.
    unused = set(range(3, 64))
    for example in prompts:
        row = torch.tensor([list(example.prompt_ids)])
        out = model.generate(row, max_new_tokens=3, do_sample=False, pad_token_id=0)  # type: ignore[operator]
        unused -= set(out[0, row.shape[1] :].tolist())
    assert unused
    eos_id = min(unused)
    answers = target_responses(
        model, prompts, max_new_tokens=3, pad_id=0, eos_id=eos_id, batch_size=4
    )
    assert sorted(a.prompt_ids for a in answers) == sorted(e.prompt_ids for e in prompts)
    assert all(len(a.response_ids) == 3 and eos_id not in a.response_ids for a in answers)


def test_an_example_that_does_not_fit_waits_for_the_next_row() -> None:
    from benchmarks.world.train import RowFiller

    lengths = iter([30, 30, 10, 40, 8])

    def draw() -> EncodedExample:
        n = next(lengths)
        return EncodedExample("qa", tuple(range(3, 3 + n - 2)), (5, 6))

    filler = RowFiller(draw)
    batch = pack_batch(filler, rows=2, seq_len=48, prompt_weight=0.0, pad_id=0)
    # Row 0: 30; the second 30 does not fit the 18 left (it waits) and 10 fills the gap
    # (8 left: closed). Row 1 starts with the waiting 30; 40 does not fit (waits), 8 does.
    used = [int((batch.segments[row] >= 0).sum()) for row in range(2)]
    examples = [int(batch.segments[row].max()) + 1 for row in range(2)]
    assert used == [40, 38] and examples == [2, 2]
    assert int((batch.segments[1] == 0).sum()) == 30
    waiting = filler.take(48)  # the 40 still waits: taken without a new draw
    assert waiting is not None and waiting.length == 40


def test_target_answers_of_a_padded_batch_skip_transformers_vmapped_mask(
    model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The build's target answers (left-padded batches) are the same as one prompt at a
    time, with masks broadcast (``drafters.attention.padded_batch_masks``): transformers'
    vmapped mask took most of the tiny world's answers (benchmarks/world/HISTORY.md)."""
    import transformers.masking_utils as masking

    from benchmarks.world.distill import target_responses

    prompts = _examples()[:8]
    assert len({len(e.prompt_ids) for e in prompts}) > 1  # so the batch is padded
    alone = {
        a.prompt_ids: a.response_ids
        for e in prompts
        for a in target_responses(model, [e], max_new_tokens=5, pad_id=0, eos_id=1)
    }

    def refused(*args: object, **kwargs: object) -> None:
        raise AssertionError("transformers' vmapped mask was built")

    monkeypatch.setattr(masking, "_vmap_for_bhqkv", refused)
    batched = target_responses(model, prompts, max_new_tokens=5, pad_id=0, eos_id=1)
    assert {a.prompt_ids: a.response_ids for a in batched} == alone
