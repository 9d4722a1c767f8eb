"""Sampled speculative decoding with the self-speculative drafter is lossless beyond the
first token: the harness of ``test_sampling_lossless.py`` (the first four tokens, chi-square
against the exact joint of plain sampling, false failure 1e-4) on a 2-layer target
drafting from its first layer, k = 2 after the prefill's token, with and without a stop
rule; 2000 samples, as the first step's context spreads over the prefill's 8 tokens."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from drafters.base import Drafter
from drafters.engine import SpeculativeEngine
from drafters.loader import LoadedModel, load_model
from drafters.registry import create_drafter
from drafters.sampling import SamplingConfig
from drafters.stopping import DraftStopRule

from .test_sampling_lossless import (
    FALSE_FAILURE,
    LENGTH,
    PROMPT,
    SAMPLES,
    TOP_K,
    TOP_P,
    VOCAB,
    chi_square_p_value,
    exact_joint,
    save,
)

RUNS = 2 * SAMPLES


def sample(
    engine: SpeculativeEngine,
    drafter: Drafter,
    sampling: SamplingConfig,
    rule: DraftStopRule | None,
) -> tuple[Counter[tuple[int, ...]], Counter[int]]:
    """RUNS outputs of LENGTH tokens (seeds 0..RUNS-1) at k = 2, and how many steps
    accepted 0, 1, 2 drafts."""
    outputs: Counter[tuple[int, ...]] = Counter()
    accepted: Counter[int] = Counter()
    for seed in range(RUNS):
        config = replace(sampling, seed=seed)
        run = engine.generate(
            PROMPT, drafter, 2, max_new_tokens=LENGTH, sampling=config, stop_rule=rule
        )
        outputs[tuple(run.collect())] += 1
        accepted.update(run.stats.accepted_per_step)
    return outputs, accepted


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    torch.manual_seed(3)
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        initializer_range=0.3,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
    )
    model = Qwen2ForCausalLM(config).eval()
    model.generation_config.eos_token_id = None
    with torch.no_grad():  # a second layer that adds less, as after an early-exit loss
        last = model.model.layers[1]
        last.self_attn.o_proj.weight.mul_(0.3)
        last.mlp.down_proj.weight.mul_(0.3)
    return load_model(save(model, Path(tmp_path_factory.mktemp("self-sampling")) / "target"))


@pytest.mark.parametrize(
    ("sampling", "rule"),
    [(TOP_P, None), (TOP_K, DraftStopRule(0.35, "max_prob"))],
    ids=["top_p", "top_k-stop_rule"],
)
def test_self_speculative_samples_follow_plain_sampling(
    target: LoadedModel, sampling: SamplingConfig, rule: DraftStopRule | None
) -> None:
    engine = SpeculativeEngine(target)
    drafter = create_drafter("self", name="self", target=target, options={"exit_layer": 1})
    expected = exact_joint(target.model, PROMPT, sampling)
    observed, accepted = sample(engine, drafter, sampling, rule)
    # The resample after one accepted draft (t3) and the bonus after two (t4) happen often.
    assert accepted[1] >= SAMPLES // 20 and accepted[2] >= SAMPLES // 20, accepted
    assert chi_square_p_value(observed, expected) > FALSE_FAILURE
