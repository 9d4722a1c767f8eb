"""A drafter whose vocabulary is padded less than its target's (Qwen2.5 checkpoints pad
151,665 tokenizer ids to 151,936 or 152,064 rows) is resized to the target's rows, keeps its
logits on its own rows, and never drafts an id past the tokenizer's vocabulary."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import Qwen2ForCausalLM

from drafters.counterfactual import score_counterfactual
from drafters.engine import SpeculativeEngine
from drafters.loader import LoadedModel, load_model
from drafters.model_drafter import ModelDrafter
from drafters.registry import create_drafter
from drafters.sampling import SamplingConfig

from .conftest import VOCAB, make_prompts, save_model, tiny_config

TARGET_ROWS = 80  # the tokenizer has VOCAB = 64 ids; both models pad past it
DRAFTER_ROWS = 72


@dataclass(frozen=True)
class PaddedModels:
    target_dir: Path
    drafter_dir: Path


@pytest.fixture(scope="module")
def padded(tmp_path_factory: pytest.TempPathFactory) -> PaddedModels:
    root = tmp_path_factory.mktemp("padded")
    torch.manual_seed(3)
    target_config = tiny_config()
    target_config.vocab_size = TARGET_ROWS
    target = Qwen2ForCausalLM(target_config).eval()
    drafter_config = tiny_config()
    drafter_config.vocab_size = DRAFTER_ROWS
    drafter = Qwen2ForCausalLM(drafter_config).eval()
    with torch.no_grad():
        # The drafter: the target's weights on its 72 rows, plus a little noise.
        for name, weight in target.state_dict().items():
            own = drafter.state_dict()[name]
            own.copy_(weight[: own.shape[0]] + 0.01 * torch.randn_like(own))
        # The target's padding is untrained (zero); the drafter's rows 64..71 keep their
        # random values, which a drafter must never propose.
        target.get_input_embeddings().weight[VOCAB:].zero_()
    return PaddedModels(save_model(target, root / "target"), save_model(drafter, root / "drafter"))


@pytest.fixture(scope="module")
def target(padded: PaddedModels) -> LoadedModel:
    return load_model(padded.target_dir)


def resized(target: LoadedModel, padded: PaddedModels) -> ModelDrafter:
    drafter = create_drafter("model", name="padded", target=target, path=padded.drafter_dir)
    assert isinstance(drafter, ModelDrafter)
    return drafter


def test_the_drafter_is_resized_to_the_targets_rows_and_keeps_its_logits(
    target: LoadedModel, padded: PaddedModels
) -> None:
    assert len(target.tokenizer) == VOCAB
    drafter = resized(target, padded)
    model = drafter.model
    assert model.get_input_embeddings().weight.shape[0] == TARGET_ROWS
    assert model.get_output_embeddings().weight.shape[0] == TARGET_ROWS
    original = load_model(padded.drafter_dir).model
    ids = torch.tensor([make_prompts(1, seed=4)[0]])
    with torch.inference_mode():
        logits = model(ids).logits[0]  # [n, 80]
        torch.testing.assert_close(logits[:, :DRAFTER_ROWS], original(ids).logits[0])
        # The rows it gained are zero, so two loads give the same drafter.
        assert not logits[:, DRAFTER_ROWS:].any()
        again = resized(target, padded).model(ids).logits[0]
    assert torch.equal(again, logits)


def test_drafting_with_the_resized_drafter_is_lossless_and_in_the_tokenizers_vocabulary(
    target: LoadedModel, padded: PaddedModels
) -> None:
    drafter = resized(target, padded)
    engine = SpeculativeEngine(target)
    greedy, sampled = SamplingConfig(), SamplingConfig(do_sample=True, temperature=1.5)
    accepted = 0
    for prompt in make_prompts(6, seed=2):
        with torch.inference_mode():
            reference = target.model.generate(
                torch.tensor([prompt]), max_new_tokens=24, do_sample=False, pad_token_id=0
            )[0, len(prompt) :].tolist()
        run = engine.generate(prompt, drafter, 4, max_new_tokens=24)
        assert run.collect() == reference
        accepted += run.stats.accepted
        # Scored like it drafts (the engine shortens k only in its last steps).
        requested = run.stats.requested_per_step
        full = next((i for i, k in enumerate(requested) if k < 4), len(requested))
        predicted = score_counterfactual(drafter, prompt, reference, 4)
        assert predicted[:full] == run.stats.accepted_per_step[:full]
        for sampling, generator in ((greedy, None), (sampled, torch.Generator().manual_seed(5))):
            session = drafter.start(prompt)
            proposal = session.propose([*prompt, *reference], 8, sampling, generator)
            assert max(proposal.token_ids.tolist()) < VOCAB
            if proposal.probs is not None:
                assert proposal.probs.shape[-1] == TARGET_ROWS
                assert not proposal.probs[:, VOCAB:].any()
        seeded = SamplingConfig(do_sample=True, temperature=1.5, seed=7)
        run = engine.generate(prompt, drafter, 4, max_new_tokens=12, sampling=seeded)
        output = run.collect()
        assert run.stats.finish_reason in ("length", "eos_token"), run.stats.finish_reason
        assert len(output) == 12 or output[-1] in engine.stop_token_ids, output
    assert accepted > 0
