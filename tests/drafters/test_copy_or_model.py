"""The copy-or-model drafter (drafters/hybrid.py): each step copies from the context where
its suffix repeats, else the model drafts; greedy output is the target's (sampling:
test_sampling_lossless.py), and its counterfactual score is what it accepts when it runs."""

from __future__ import annotations

import pytest
import torch

from drafters.base import Drafter
from drafters.engine import SpeculativeEngine
from drafters.hybrid import CopyOrModelDrafter
from drafters.loader import LoadedModel
from drafters.registry import KIND_OPTIONS, create_drafter
from drafters.sampling import SamplingConfig
from drafters.stopping import DraftStopRule

from .conftest import (
    TinyModels,
    assert_same_or_near_tie,
    make_prompts,
    reference_greedy,
    steps_scored_as_run,
)

MAX_NEW = 32


@pytest.fixture(scope="module")
def drafter(target: LoadedModel, tiny_models: TinyModels) -> Drafter:
    return create_drafter(
        "copy-or-model",
        name="hybrid",
        target=target,
        path=tiny_models.close_dir,
        options={"min_match": "2", "model_k": "2"},
    )


def test_a_step_copies_where_the_context_repeats_and_the_model_drafts_elsewhere(
    drafter: Drafter,
) -> None:
    assert isinstance(drafter, CopyOrModelDrafter)
    assert (drafter.min_match, drafter.model_k) == (2, 2)
    repeating = [5, 6, 7, 8, 9, 10, 5, 6]  # (5, 6) occurred before: copy what followed
    session = drafter.start(repeating)
    session.prefill(repeating)
    copied = session.propose(repeating, 4, SamplingConfig(), None)
    assert copied.token_ids.tolist() == [7, 8, 9, 10] and copied.probs is None
    fresh = [11, 12, 13, 14, 15]  # no suffix of two tokens occurred before
    session = drafter.start(fresh)
    session.prefill(fresh)
    drafted = session.propose(fresh, 4, SamplingConfig(), None)
    assert drafted.length == 2  # the model drafts at most model_k
    model_session = drafter.base.start(fresh)
    model_session.prefill(fresh)
    assert (
        drafted.token_ids.tolist()
        == model_session.propose(fresh, 2, SamplingConfig(), None).token_ids.tolist()
    )


def test_greedy_is_the_targets_own_output(
    engine: SpeculativeEngine, drafter: Drafter, target: LoadedModel
) -> None:
    """Copies and the model's drafts alternate in one request, and the model's cache
    catches up on the steps it did not draft."""
    accepted = 0
    for prompt in make_prompts(8, seed=21):
        reference = reference_greedy(target, engine, prompt, MAX_NEW)
        for k, rule in ((1, None), (4, None), (8, None), (8, DraftStopRule(0.5, "max_prob"))):
            run = engine.generate(prompt, drafter, k, max_new_tokens=MAX_NEW, stop_rule=rule)
            assert_same_or_near_tie(target, prompt, run.collect(), reference)
            accepted += run.stats.accepted
    assert accepted > 0


def test_both_sources_draft_within_one_request(
    engine: SpeculativeEngine, drafter: Drafter, target: LoadedModel
) -> None:
    """On a prompt that repeats itself the output copies some steps and drafts others."""
    sessions = []
    original_start = CopyOrModelDrafter.start

    def recording_start(self: CopyOrModelDrafter, *args: object, **kwargs: object) -> object:
        session = original_start(self, *args, **kwargs)  # type: ignore[arg-type]
        sessions.append(session)
        return session

    prompt = [3, 4, 5, 6, 7, 8, 9, 10, 3, 4, 5, 6, 11, 12]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(CopyOrModelDrafter, "start", recording_start)
        engine.generate(prompt, drafter, 4, max_new_tokens=MAX_NEW).collect()
    (session,) = sessions
    assert session.copied_steps > 0 and session.model_steps > 0


def test_its_counterfactual_score_is_what_it_accepts_when_it_runs(
    engine: SpeculativeEngine, drafter: Drafter
) -> None:
    compared = sum(
        steps_scored_as_run(engine, drafter, prompt, 4, MAX_NEW)
        for prompt in make_prompts(6, seed=22)
    )
    assert compared >= 10


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"min_match": "0"}, "min_match must be >= 1"),
        ({"model_k": "0"}, "model_k must be >= 1"),
        ({"model_k": "two"}, "option 'model_k' must be an integer"),
    ],
)
def test_bad_options_are_refused(
    target: LoadedModel, tiny_models: TinyModels, options: dict[str, str], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        create_drafter(
            "copy-or-model", name="h", target=target, path=tiny_models.close_dir, options=options
        )
    assert KIND_OPTIONS["copy-or-model"] == {"min_match", "model_k"}


def test_it_has_the_weights_of_its_model_only(drafter: Drafter) -> None:
    assert isinstance(drafter, CopyOrModelDrafter)
    assert drafter.model is drafter.base.model
    assert isinstance(drafter.model, torch.nn.Module)
