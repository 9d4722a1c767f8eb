"""Predicted outputs (drafters/prediction.py): drafts from the text a request expects back,
ahead of its routed drafter; greedy output is the target's whatever the prediction says
(sampling: test_sampling_lossless.py)."""

from __future__ import annotations

import pytest
import torch

from drafters.base import Drafter
from drafters.engine import SpeculativeEngine
from drafters.loader import LoadedModel
from drafters.prediction import MIN_WINDOW, PredictedDrafter, PredictionIndex
from drafters.registry import create_drafter
from drafters.sampling import SamplingConfig

from .conftest import TinyModels, assert_same_or_near_tie, make_prompts, reference_greedy

MAX_NEW = 40
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model_drafter(target: LoadedModel, tiny_models: TinyModels) -> Drafter:
    return create_drafter("model", name="close", target=target, path=tiny_models.close_dir)


@pytest.fixture(scope="module")
def plain(target: LoadedModel) -> Drafter:
    return create_drafter("none", name="none", target=target)


def test_the_answer_continues_where_its_last_tokens_occur_in_the_prediction() -> None:
    index = PredictionIndex([10, 11, 12, 13, 14, 10, 11, 12, 15], min_n=2, max_n=3)
    assert index.continuation([]) == 0  # the answer's start: the prediction's start
    assert index.continuation([10, 11]) == 2  # still the prediction's beginning
    assert index.continuation([7, 10, 11]) == 2  # an edit before it: found again
    assert index.continuation([7, 10, 11], cursor=3) == 7  # the occurrence after the last
    assert index.continuation([7, 10, 11, 12], cursor=3) == 3  # at the cursor: kept
    assert index.continuation([7, 10, 11, 12], cursor=4) == 8  # the longest suffix first
    assert index.continuation([7, 8, 9]) is None  # nothing of it in the prediction
    assert index.continuation([7, 12, 15]) is None  # the prediction's end: nothing follows
    assert index.continuation([7, 9, 11]) is None  # one token is below min_n
    with pytest.raises(ValueError, match="min_n <= max_n"):
        PredictionIndex([1, 2], min_n=3, max_n=2)


def test_a_step_drafts_the_prediction_where_it_matches_else_the_routed_drafter(
    model_drafter: Drafter, plain: Drafter
) -> None:
    prompt = [5, 6, 7]
    prediction = (20, 21, 22, 23, 24, 25, 26, 27)
    drafter = PredictedDrafter(model_drafter, prediction, base_k=2, device=CPU)
    session = drafter.start(prompt)
    session.prefill(prompt)
    greedy = SamplingConfig()
    first = session.propose([*prompt, 20], 4, greedy, None)
    assert first.token_ids.tolist() == [21, 22, 23, 24] and first.probs is None
    session.observe_accepted(4)  # all accepted: the whole k next time
    assert session.propose([*prompt, 20, 21, 22, 23, 24, 25], 4, greedy, None).length == 2
    session.observe_accepted(1)  # rejected after one: half the window
    assert (drafter.tally.accepted, drafter.tally.rejected, drafter.tally.steps) == (5, 1, 2)
    # The answer left the prediction: the routed drafter's draft, at most base_k.
    off = [*prompt, 20, 21, 22, 23, 24, 25, 9, 8]
    drafted = session.propose(off, 4, greedy, None)
    alone = model_drafter.start(off)
    alone.prefill(off)
    assert drafted.length == 2
    assert drafted.token_ids.tolist() == alone.propose(off, 2, greedy, None).token_ids.tolist()
    session.observe_accepted(0)
    assert drafter.tally.steps == 2  # the routed drafter's steps are not the prediction's
    # Without a routed drafter (k 0) a step the prediction cannot draft drafts nothing.
    bare = PredictedDrafter(plain, prediction, base_k=0, device=CPU).start(prompt)
    assert bare.propose(off, 4, greedy, None).length == 0


def test_rejected_drafts_shorten_the_next_ones_until_they_are_accepted_again(
    plain: Drafter,
) -> None:
    prompt = [5]
    prediction = tuple(range(20, 60))
    drafter = PredictedDrafter(plain, prediction, base_k=0, device=CPU)
    session = drafter.start(prompt)
    output = [20]
    lengths = []
    for accepted in (0, 0, 0, None, None):  # None: all accepted
        proposal = session.propose([*prompt, *output], 16, SamplingConfig(), None)
        lengths.append(proposal.length)
        kept = proposal.length if accepted is None else accepted
        session.observe_accepted(kept)
        output.extend(proposal.token_ids.tolist()[:kept])
        output.append(output[-1] + 1)  # the target's own next token: the prediction's
    assert lengths == [16, 8, 4, MIN_WINDOW, 2 * MIN_WINDOW]


def test_stop_tokens_end_a_predicted_draft(plain: Drafter) -> None:
    drafter = PredictedDrafter(plain, (20, 21, 2, 22), base_k=0, device=CPU)
    session = drafter.start([5], stop_ids=frozenset({2}))
    assert session.propose([5, 20], 8, SamplingConfig(), None).token_ids.tolist() == [21, 2]


def test_greedy_output_is_the_targets_whatever_the_prediction(
    engine: SpeculativeEngine,
    target: LoadedModel,
    tiny_models: TinyModels,
    model_drafter: Drafter,
    plain: Drafter,
) -> None:
    """The answer itself, the answer with edits, and unrelated tokens: the output is the
    target's; the answer itself is accepted whole, in far fewer steps."""
    followed = 0  # runs whose prediction was the answer and that used it
    # Every kind of routed drafter catches up on the steps the prediction drafted.
    others = [
        (create_drafter("ngram", name="ngram", target=target), 4),
        (create_drafter("self", name="self", target=target, options={"exit_layer": "1"}), 3),
        (
            create_drafter(
                "copy-or-model", name="hybrid", target=target, path=tiny_models.close_dir
            ),
            4,
        ),
    ]
    for prompt in make_prompts(6, seed=31):
        reference = reference_greedy(target, engine, prompt, MAX_NEW)
        edited = [t if i % 5 != 2 else (t + 1) % 50 + 3 for i, t in enumerate(reference)]
        unrelated = [7, 8, 9, 10, 11, 12] * 5
        for prediction in (reference, edited, unrelated):
            for base, base_k in ((model_drafter, 3), (plain, 0), *others):
                drafter = PredictedDrafter(base, tuple(prediction), base_k, target.device)
                run = engine.generate(prompt, drafter, 8, max_new_tokens=MAX_NEW)
                output = run.collect()
                assert_same_or_near_tie(target, prompt, output, reference)
                if base_k:
                    continue
                # Every draft was the prediction's.
                assert drafter.tally.drafted == run.stats.drafted
                assert drafter.tally.accepted == run.stats.accepted
                if prediction is reference and output == reference:
                    assert drafter.tally.rejected == 0
                    assert run.stats.steps < len(reference) - 1 or len(reference) < 3
                    followed += drafter.tally.accepted > 0
    assert followed >= 3
