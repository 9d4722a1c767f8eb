"""The self-speculative drafter (drafters/self_drafter.py): the target's first layers draft,
losslessly (greedy here; sampling in test_stopping_sampling.py), with no weights of its
own, and its counterfactual score is what it accepts when it runs."""

from __future__ import annotations

import pytest
import torch

from drafters.base import Drafter
from drafters.engine import SpeculativeEngine
from drafters.lean_decoder import LeanDecoder
from drafters.loader import LoadedModel
from drafters.registry import create_drafter
from drafters.stopping import DraftStopRule

from .conftest import (
    assert_same_or_near_tie,
    make_prompts,
    reference_greedy,
    steps_scored_as_run,
)

MAX_NEW = 32


@pytest.fixture(scope="module")
def drafter(target: LoadedModel) -> Drafter:
    return create_drafter("self", name="self", target=target, options={"exit_layer": 1})


def test_greedy_is_the_targets_own_output(
    engine: SpeculativeEngine, drafter: Drafter, target: LoadedModel
) -> None:
    prompts = make_prompts(6, seed=11)
    accepted = 0
    for prompt in prompts:
        reference = reference_greedy(target, engine, prompt, MAX_NEW)
        for k, rule in ((1, None), (4, None), (16, None), (16, DraftStopRule(0.5, "max_prob"))):
            run = engine.generate(prompt, drafter, k, max_new_tokens=MAX_NEW, stop_rule=rule)
            assert_same_or_near_tie(target, prompt, run.collect(), reference)
            accepted += run.stats.accepted
    assert accepted > 0  # the early exit's drafts are accepted, so the check means something


def test_it_has_no_weights_of_its_own(drafter: Drafter, target: LoadedModel) -> None:
    """Every weight the early exit reads is one of the target's tensors (same storage), and
    its cache covers the exit layers only."""
    decoder = LeanDecoder(target.model, capacity=64, layers=1)
    target_storage = {p.untyped_storage().data_ptr() for p in target.model.parameters()}
    weights = [decoder.embed, decoder.lm_head, decoder.final_norm]
    weights += [w for layer in decoder.layers for w in layer if w is not None]
    assert all(w.untyped_storage().data_ptr() in target_storage for w in weights)
    assert len(decoder.layers) == 1 and decoder.keys.shape[0] == 1
    assert sum(p.numel() for p in target.model.parameters()) > 0
    assert getattr(drafter, "model", None) is target.model


def test_its_counterfactual_score_is_what_it_accepts_when_it_runs(
    engine: SpeculativeEngine, drafter: Drafter
) -> None:
    for prompt in make_prompts(4, seed=12):
        assert steps_scored_as_run(engine, drafter, prompt, 4, MAX_NEW) >= 5


@pytest.mark.parametrize("exit_layer", [0, 2, 7])
def test_an_exit_layer_outside_the_target_is_refused(target: LoadedModel, exit_layer: int) -> None:
    with pytest.raises(ValueError, match="exit_layer"):
        create_drafter("self", name="self", target=target, options={"exit_layer": exit_layer})
    # The same early exit, built twice, drafts the same (no state shared between sessions).
    one = create_drafter("self", name="a", target=target, options={"exit_layer": 1})
    prompt = make_prompts(1, seed=13)[0]
    from drafters.sampling import SamplingConfig

    first = one.start(prompt).propose(prompt, 5, SamplingConfig(), None).token_ids.tolist()
    again = one.start(prompt).propose(prompt, 5, SamplingConfig(), None).token_ids.tolist()
    assert first == again and torch.tensor(first).numel() == 5
