"""A model shaped like Qwen2.5-0.5B where it matters to our code paths, tiny elsewhere:
14 query heads and 2 KV heads of 64 dimensions (hidden 896), q/k/v biases, untied input and
output embeddings, RoPE base 1e6, and a vocabulary padded past the tokenizer's. Through the
engine (speculative, greedy) and the lean decoder, its output is transformers' greedy one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from drafters.engine import SpeculativeEngine
from drafters.lean_decoder import LeanDecoder, lean_decoder_supports
from drafters.loader import LoadedModel, load_model
from drafters.registry import create_drafter

from .conftest import (
    EOS_ID,
    VOCAB,
    assert_same_or_near_tie,
    make_prompts,
    reference_greedy,
    save_model,
)

PADDED_ROWS = 96  # > VOCAB = 64 tokenizer ids, as Qwen2.5 pads 151,665 ids to 151,936 rows
MAX_NEW = 24


def qwen25_shaped_config() -> Qwen2Config:
    return Qwen2Config(
        vocab_size=PADDED_ROWS,
        hidden_size=896,  # 14 heads x 64
        intermediate_size=128,  # 4864 in Qwen2.5-0.5B; small here, the MLP's shape is plain
        num_hidden_layers=2,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        initializer_range=0.08,  # spread logits: varied outputs, no float near-ties
        tie_word_embeddings=False,
        use_sliding_window=False,
        bos_token_id=0,
        eos_token_id=EOS_ID,
    )


def qwen25_shaped_model(seed: int) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(qwen25_shaped_config()).eval()
    with torch.no_grad():
        for layer in model.model.layers:  # Qwen2.5 has trained q/k/v biases, not zeros
            for projection in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                projection.bias.normal_(0.0, 0.5)
            layer.self_attn.v_proj.bias.normal_(0.0, 0.05)
        # Untrained padding rows, as in a checkpoint: never the argmax of a real logit row.
        model.get_output_embeddings().weight[VOCAB:].zero_()
    return model


@pytest.fixture(scope="module")
def qwen_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("qwen25-shape")
    target = qwen25_shaped_model(seed=0)
    drafter = qwen25_shaped_model(seed=0)
    with torch.no_grad():
        for parameter in drafter.parameters():
            parameter.add_(0.002 * torch.randn_like(parameter))
    return save_model(target, root / "target"), save_model(drafter, root / "drafter")


@pytest.fixture(scope="module")
def qwen_target(qwen_dirs: tuple[Path, Path]) -> LoadedModel:
    return load_model(qwen_dirs[0])


def test_the_model_has_qwen25s_shape(qwen_target: LoadedModel) -> None:
    config = qwen_target.model.config
    attention = qwen_target.model.model.layers[0].self_attn
    assert (config.num_attention_heads, config.num_key_value_heads) == (14, 2)
    assert attention.head_dim == 64 and attention.q_proj.bias is not None
    assert not config.tie_word_embeddings
    embeddings = qwen_target.model.get_input_embeddings().weight
    assert embeddings.data_ptr() != qwen_target.model.get_output_embeddings().weight.data_ptr()
    assert config.vocab_size == PADDED_ROWS > len(qwen_target.tokenizer) == VOCAB
    assert lean_decoder_supports(qwen_target.model)


@pytest.mark.parametrize("kind", ["model", "ngram"])
def test_the_engine_gives_transformers_greedy_output(
    qwen_target: LoadedModel, qwen_dirs: tuple[Path, Path], kind: str
) -> None:
    engine = SpeculativeEngine(qwen_target)
    path = qwen_dirs[1] if kind == "model" else None
    drafter = create_drafter(kind, name=kind, target=qwen_target, path=path)
    accepted = 0
    for prompt in make_prompts(4, seed=6):
        reference = reference_greedy(qwen_target, engine, prompt, MAX_NEW)
        assert max(reference) < VOCAB
        for k in (2, 5):
            run = engine.generate(prompt, drafter, k, max_new_tokens=MAX_NEW)
            assert_same_or_near_tie(qwen_target, prompt, run.collect(), reference)
            accepted += run.stats.accepted
    assert accepted > 0 or kind == "ngram"  # its lookups rarely find these outputs' text


def test_the_lean_decoder_gives_transformers_greedy_output(qwen_target: LoadedModel) -> None:
    model = qwen_target.model
    for prompt in make_prompts(3, seed=8):
        with torch.inference_mode():
            reference = model.generate(
                torch.tensor([prompt]),
                max_new_tokens=MAX_NEW,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )[0, len(prompt) :].tolist()
            decoder = LeanDecoder(model, capacity=16)  # grows while decoding
            logits = decoder.forward(torch.tensor(prompt), 0)
            tokens: list[int] = []
            while len(tokens) < MAX_NEW:
                tokens.append(int(logits.argmax()))
                logits = decoder.forward(torch.tensor(tokens[-1:]), len(prompt) + len(tokens) - 1)
        assert_same_or_near_tie(qwen_target, prompt, tokens, reference)
        with torch.inference_mode():  # and its logits are transformers' at the end
            expected = model(torch.tensor([[*prompt, *tokens]])).logits[0, -1]
        torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
