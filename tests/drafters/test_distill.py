"""Run-time distillation: batches, held-out split, acceptance before and after, saving."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from drafters.distill import (
    DistillConfig,
    TrainingPair,
    acceptance_of,
    distill,
    model_scorer,
    pad_batch,
    rejected_steps,
    save_drafter,
    split_held_out,
)
from drafters.engine import SpeculativeEngine
from drafters.loader import LoadedModel, load_model
from tests.drafters.conftest import TinyModels, make_prompts, reference_greedy

DRAFT_LENGTH = 4


@pytest.fixture(scope="module")
def verified_pairs(target: LoadedModel) -> list[TrainingPair]:
    """The target's greedy outputs on 40 prompts (what the sidecar would capture)."""
    engine = SpeculativeEngine(target)
    pairs = []
    for prompt in make_prompts(40, seed=3):
        output = reference_greedy(target, engine, prompt, 24)
        if output:
            pairs.append(TrainingPair(tuple(prompt), tuple(output)))
    return pairs


def test_pad_batch_weighs_output_predictions_one_and_prompt_ones_less() -> None:
    pairs = [TrainingPair((3, 4, 5), (6, 7)), TrainingPair((8,), (9,))]
    batch = pad_batch(pairs, max_length=16, prompt_weight=0.1, pad_id=0)
    assert batch.input_ids.tolist() == [[3, 4, 5, 6, 7], [8, 9, 0, 0, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert batch.labels.tolist() == [[4, 5, 6, 7, -100], [9, -100, -100, -100, -100]]
    weights = [[round(w, 3) for w in row] for row in batch.weights.tolist()]
    assert weights == [[0.1, 0.1, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0, 0.0]]
    long = pad_batch([TrainingPair((1, 2, 3, 4, 5), (6, 7))], 4, 0.1, 0)
    assert long.input_ids.tolist() == [[4, 5, 6, 7]]  # the oldest prompt tokens go


def test_the_end_of_an_output_is_not_a_rejection() -> None:
    # 5 tokens, k = 2: [2 accepted + bonus] [1 accepted, then a rejection] [0 at the end]
    assert rejected_steps([2, 1, 0], 2, 5) == 1
    assert rejected_steps([2, 1, 0], 2, 6) == 2
    # A drafter that predicts everything still ends on a short last step.
    score = acceptance_of(
        lambda _p, o, k: [2, 2, 1] if len(o) == 7 else [], [TrainingPair((1,), tuple(range(7)))], 2
    )
    assert (score.accepted, score.rejections, score.rate) == (5, 0, 1.0)


def test_split_held_out_is_seeded_and_disjoint(verified_pairs: list[TrainingPair]) -> None:
    train, held = split_held_out(verified_pairs, 0.25, seed=1)
    assert len(held) == round(0.25 * len(verified_pairs))
    assert sorted(map(id, train + held)) == sorted(map(id, verified_pairs))
    assert split_held_out(verified_pairs, 0.25, seed=1) == (train, held)
    with pytest.raises(ValueError):
        split_held_out(verified_pairs[:1], 0.25)


def test_every_pair_of_a_prompt_is_on_one_side_of_the_split(
    verified_pairs: list[TrainingPair],
) -> None:
    """One prompt served with two token budgets gives two pairs, the shorter output a
    prefix of the longer: split apart, the held-out one measured recall of training text."""
    shorter = [
        TrainingPair(p.prompt_ids, p.output_ids[: len(p.output_ids) // 2]) for p in verified_pairs
    ]
    pairs = verified_pairs + shorter
    for seed in range(5):
        train, held = split_held_out(pairs, 0.25, seed=seed)
        assert not {p.prompt_ids for p in train} & {p.prompt_ids for p in held}
        assert len(train) + len(held) == len(pairs)
    with pytest.raises(ValueError, match="2 distinct prompts"):
        split_held_out(shorter[:1] + verified_pairs[:1], 0.25)


@pytest.mark.parametrize("soft", [True, False], ids=["soft-labels", "hard-labels"])
def test_distillation_raises_acceptance_on_what_it_learns_from(
    soft: bool, tiny_models: TinyModels, target: LoadedModel, verified_pairs: list[TrainingPair]
) -> None:
    """On the pairs it trains on: a random target has nothing a held-out prompt could
    generalise from (held-out gains are measured on the tiny world, tests/router)."""
    train, _ = split_held_out(verified_pairs, 0.25)
    drafter = load_model(tiny_models.far_dir)
    before = acceptance_of(model_scorer(drafter.model), train, DRAFT_LENGTH)
    losses = distill(
        drafter.model,
        train,
        DistillConfig(steps=60, batch_rows=8, learning_rate=3e-3, warmup_steps=5),
        pad_id=0,
        target=target.model if soft else None,
    )
    after = acceptance_of(model_scorer(drafter.model), train, DRAFT_LENGTH)
    assert len(losses) == 60 and losses[-1] < losses[0]
    assert after.samples == before.samples == len(train)
    assert after.rate > before.rate + 0.1, (before, after)
    assert not drafter.model.training


def test_saved_drafter_loads_with_its_sample(
    tiny_models: TinyModels, tmp_path: Path, verified_pairs: list[TrainingPair]
) -> None:
    drafter = load_model(tiny_models.far_dir)
    out = save_drafter(
        drafter.model,
        drafter.tokenizer,
        tmp_path / "distilled",
        ["w3 w4", "w5"],
        "math",
        report={"steps": 0},
    )
    loaded = load_model(out)
    assert list(out.glob("*.safetensors"))
    for name, value in drafter.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], value)
    lines = (out / "finetune_sample.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"task": "math", "text": "w3 w4"},
        {"task": "math", "text": "w5"},
    ]
    assert json.loads((out / "distill.json").read_text()) == {"steps": 0}


def test_right_padded_batches_are_trained_and_scored_without_a_padding_mask(
    tiny_models: TinyModels,
    target: LoadedModel,
    verified_pairs: list[TrainingPair],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Rows of different lengths: the soft labels at each row's positions are the target's
    on that row alone, the padding after it weighs nothing, and neither the labels nor the
    training forwards have transformers build a vmapped padding mask (right padding needs
    none under causal attention; it cost ~10% of a distillation step)."""
    import transformers.masking_utils as masking

    from drafters.distill import target_soft_labels

    pairs = sorted(verified_pairs, key=lambda p: len(p.prompt_ids) + len(p.output_ids))
    batch = pad_batch([pairs[0], pairs[-1]], max_length=512, prompt_weight=0.1, pad_id=0)
    lengths = batch.attention_mask.sum(dim=1).tolist()
    assert lengths[0] < lengths[1]  # so the first row is padded

    def refused(*args: object, **kwargs: object) -> None:
        raise AssertionError("transformers' vmapped mask was built")

    monkeypatch.setattr(masking, "_vmap_for_bhqkv", refused)
    soft = target_soft_labels(target.model, batch, top_k=4, drafter_rows=10**6)
    for row, length in enumerate(lengths):
        with torch.no_grad():
            alone = target.model(input_ids=batch.input_ids[row : row + 1, :length]).logits[0]
        expected = torch.softmax(torch.log_softmax(alone, dim=-1).topk(4, dim=-1).values, -1)
        torch.testing.assert_close(soft.top_probs[row, :length], expected)
        assert soft.top_probs[row, length:].sum() == 0
    assert (batch.weights[0, lengths[0] :] == 0).all()
    drafter = load_model(tiny_models.far_dir)
    with torch.no_grad():  # the padded row's logits without a mask are its own
        padded = drafter.model(input_ids=batch.input_ids).logits[0, : lengths[0]]
        alone = drafter.model(input_ids=batch.input_ids[:1, : lengths[0]]).logits[0]
    torch.testing.assert_close(padded, alone)
    losses = distill(
        drafter.model, pairs, DistillConfig(steps=2, batch_rows=8), pad_id=0, target=target.model
    )
    assert len(losses) == 2
