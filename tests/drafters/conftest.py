"""Tiny random Qwen2 targets and drafters saved as model directories, built once."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from drafters.engine import SpeculativeEngine
from drafters.loader import LoadedModel, load_model

# Tiny models run fastest on one thread, and far more predictably on a shared machine.
torch.set_num_threads(1)

VOCAB = 64
EOS_ID = 1  # <|im_end|>


def tiny_tokenizer(extra_token: str | None = None) -> PreTrainedTokenizerFast:
    """Word-level tokenizer: specials 0-2, then words w0..w60 (ids 3..63)."""
    vocab = {"<|endoftext|>": 0, "<|im_end|>": 1, "<|im_start|>": 2}
    vocab.update({f"w{i}": i + 3 for i in range(VOCAB - 3)})
    if extra_token is not None:
        vocab[extra_token] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>")


def tiny_config(layers: int = 2) -> Qwen2Config:
    # A wide init spreads the logits, so greedy decoding rarely meets float near-ties.
    return Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.25,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=EOS_ID,
    )


def save_model(model: Qwen2ForCausalLM, directory: Path, extra_token: str | None = None) -> Path:
    model.save_pretrained(directory, safe_serialization=True)
    tiny_tokenizer(extra_token).save_pretrained(directory)
    return directory


@dataclass(frozen=True)
class TinyModels:
    """Directories of a target and drafters that agree with it to different degrees."""

    target_dir: Path
    close_dir: Path  # the target with small weight noise: accepts often
    far_dir: Path  # an unrelated random model: rarely accepted
    mismatched_dir: Path  # like close_dir, but its tokenizer has one more token


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    root = tmp_path_factory.mktemp("tiny-models")
    torch.manual_seed(0)
    target = Qwen2ForCausalLM(tiny_config()).eval()
    with torch.no_grad():
        # Damp the special tokens' (tied) embeddings: EOS ends some outputs, not most.
        target.get_input_embeddings().weight[:3].mul_(0.2)
    close = Qwen2ForCausalLM(tiny_config()).eval()
    close.load_state_dict(target.state_dict())
    with torch.no_grad():
        for parameter in close.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    torch.manual_seed(1)
    far = Qwen2ForCausalLM(tiny_config(layers=1)).eval()
    return TinyModels(
        target_dir=save_model(target, root / "target"),
        close_dir=save_model(close, root / "close"),
        far_dir=save_model(far, root / "far"),
        mismatched_dir=save_model(close, root / "mismatched", extra_token="zz"),
    )


@pytest.fixture(scope="session")
def target(tiny_models: TinyModels) -> LoadedModel:
    return load_model(tiny_models.target_dir)


@pytest.fixture(scope="module")
def engine(target: LoadedModel) -> SpeculativeEngine:
    return SpeculativeEngine(target)


def make_prompts(count: int, seed: int = 0) -> list[list[int]]:
    """Random prompts of words, some with a repeated stretch so n-gram drafts can match."""
    generator = torch.Generator().manual_seed(seed)
    prompts: list[list[int]] = []
    for index in range(count):
        length = int(torch.randint(3, 24, (1,), generator=generator))
        prompt = torch.randint(3, VOCAB, (length,), generator=generator).tolist()
        if index % 2:
            prompt = prompt + prompt[: length // 2]
        prompts.append(prompt)
    return prompts


def reference_greedy(
    target: LoadedModel, engine: SpeculativeEngine, prompt: Sequence[int], max_new: int
) -> list[int]:
    """The target's own greedy output (transformers' generate), stopping at our stop ids."""
    with torch.inference_mode():
        out = target.model.generate(
            torch.tensor([list(prompt)]),
            max_new_tokens=max_new,
            do_sample=False,
            eos_token_id=sorted(engine.stop_token_ids),
            pad_token_id=0,
        )
    return [int(t) for t in out[0, len(prompt) :]]


def assert_same_or_near_tie(
    target: LoadedModel, prompt: list[int], ours: list[int], reference: list[int]
) -> None:
    """Token-for-token equality; a difference is tolerated only at a float near-tie
    (the target's top-two logits within 1e-4 at the first differing position)."""
    if ours == reference:
        return
    first = next(
        (i for i, (a, b) in enumerate(zip(ours, reference, strict=False)) if a != b),
        min(len(ours), len(reference)),
    )
    with torch.inference_mode():
        logits = target.model(torch.tensor([prompt + reference[:first]])).logits[0, -1]
    top_two = logits.topk(2).values
    gap = float(top_two[0] - top_two[1])
    assert gap < 1e-4, (
        f"outputs differ at {first} without a near-tie (gap {gap}): {ours} vs {reference}"
    )


def steps_scored_as_run(
    engine: SpeculativeEngine, drafter: Any, prompt: list[int], k: int, max_new: int
) -> int:
    """Run ``drafter`` at ``k`` and check its counterfactual score on the output step by
    step; returns how many steps were compared. Steps with room for k + 1 tokens before
    the end are the same steps (near the end the engine asks for fewer drafts so as not to
    pass ``max_new``; the replay does not)."""
    run = engine.generate(prompt, drafter, k, max_new_tokens=max_new)
    output = run.collect()
    scored = drafter.score_counterfactual(prompt, output, k)
    position = 1  # the prefill's token comes before the first step
    compared = 0
    for ran, replayed in zip(run.stats.accepted_per_step, scored, strict=False):
        if position + k + 1 > len(output):
            break
        assert ran == replayed, (position, run.stats.accepted_per_step, scored)
        position += ran + 1
        compared += 1
    return compared
