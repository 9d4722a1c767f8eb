"""Drafter kinds by name, tokenizer checks, and counterfactual scores against real runs."""

from __future__ import annotations

import pytest

from drafters.base import Drafter
from drafters.counterfactual import score_counterfactual, score_counterfactual_drafts
from drafters.engine import SpeculativeEngine
from drafters.loader import LoadedModel, ModelLoadError
from drafters.registry import (
    DRAFTER_KINDS,
    PATH_KINDS,
    TokenizerMismatchError,
    copies_context,
    cost_shape,
    create_drafter,
    draft_cost_hint,
)

from .conftest import TinyModels, make_prompts


def test_every_kind_is_registered_by_name(target: LoadedModel, tiny_models: TinyModels) -> None:
    assert set(DRAFTER_KINDS) >= {"model", "ngram", "none"}
    for kind in DRAFTER_KINDS:
        path = tiny_models.close_dir if kind in PATH_KINDS else None
        drafter = create_drafter(kind, name=f"my-{kind}", target=target, path=path)
        assert isinstance(drafter, Drafter)
        assert drafter.kind == kind and drafter.name == f"my-{kind}"
    with pytest.raises(ValueError, match="unknown drafter kind 'eagle'"):
        create_drafter("eagle", name="x", target=target)
    for kind in PATH_KINDS:
        with pytest.raises(ModelLoadError, match="needs a path"):
            create_drafter(kind, name="x", target=target)


def test_each_kind_hints_its_drafting_cost(target: LoadedModel, tiny_models: TinyModels) -> None:
    """A lookup costs no forward; a kind that runs a model gets no hint (its cost depends
    on its size and the hardware); only the prompt lookup copies from the context."""
    made = {
        kind: create_drafter(
            kind,
            name=kind,
            target=target,
            path=tiny_models.close_dir if kind in PATH_KINDS else None,
            options={"exit_layer": 1} if kind == "self" else None,
        )
        for kind in ("model", "ngram", "none", "self", "copy-or-model")
    }
    assert draft_cost_hint(made["ngram"]) == 0.0
    assert draft_cost_hint(made["none"]) == 0.0
    assert draft_cost_hint(made["self"]) is None
    assert draft_cost_hint(made["model"]) is None
    assert draft_cost_hint(made["copy-or-model"]) is None  # copies are free, drafts are not
    assert [kind for kind, drafter in made.items() if copies_context(drafter)] == ["ngram"]


def test_model_drafters_of_one_architecture_share_a_cost_shape(
    target: LoadedModel, tiny_models: TinyModels
) -> None:
    """Two model drafters of one architecture (the target's shape, fine-tuned apart: the
    close model) share a cost shape, one of another depth does not; other kinds have none."""
    shapes = [
        cost_shape(create_drafter("model", name=name, target=target, path=path))
        for name, path in (
            ("a", tiny_models.close_dir),
            ("b", tiny_models.target_dir),
            ("c", tiny_models.far_dir),
        )
    ]
    assert shapes[0] is not None and shapes[0] == shapes[1] != shapes[2]
    assert "num_hidden_layers=2" in shapes[0] and "num_hidden_layers=1" in str(shapes[2])
    for kind, options in (("ngram", None), ("none", None), ("self", {"exit_layer": 1})):
        assert cost_shape(create_drafter(kind, name=kind, target=target, options=options)) is None
    # Its copies cost nothing, so a copy-or-model drafter's cost is its own, not its model's.
    hybrid = create_drafter("copy-or-model", name="h", target=target, path=tiny_models.close_dir)
    assert cost_shape(hybrid) is None


def test_a_different_tokenizer_is_refused_with_the_difference(
    target: LoadedModel, tiny_models: TinyModels, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Refused before its weights load (they loaded onto the device first: minutes, and
    memory, for a large drafter of another vocabulary)."""
    import drafters.registry as registry

    def no_weights(*args: object, **kwargs: object) -> None:
        raise AssertionError("the weights were loaded before the tokenizer was compared")

    monkeypatch.setattr(registry, "load_model", no_weights)
    with pytest.raises(
        TokenizerMismatchError, match="vocabulary sizes differ: target 64, drafter 65"
    ):
        create_drafter("model", name="odd", target=target, path=tiny_models.mismatched_dir)


def test_model_drafter_loads_on_the_targets_placement(
    target: LoadedModel, tiny_models: TinyModels
) -> None:
    drafter = create_drafter("model", name="close", target=target, path=tiny_models.close_dir)
    parameter = next(drafter.model.parameters())  # type: ignore[attr-defined]
    assert parameter.device == target.device and parameter.dtype == target.dtype


@pytest.mark.parametrize("kind", ["model", "ngram", "none"])
def test_counterfactual_matches_what_the_engine_accepted(
    kind: str, target: LoadedModel, tiny_models: TinyModels
) -> None:
    engine = SpeculativeEngine(target)
    path = tiny_models.close_dir if kind == "model" else None
    drafter = create_drafter(kind, name=kind, target=target, path=path)
    k = 4
    for prompt in make_prompts(6, seed=9):
        run = engine.generate(prompt, drafter, k, max_new_tokens=40)
        output = run.collect()
        predicted = score_counterfactual(drafter, prompt, output, k)
        drafted, accepted = score_counterfactual_drafts(drafter, prompt, output, k)
        # Only the lookup counts its drafts (a model drafts k at every step); its last
        # step, whose copy reaches the output's end, is kept as the engine records it.
        assert (drafted is not None) == (kind == "ngram")
        assert accepted[: len(predicted)] == predicted
        assert len(accepted) - len(predicted) in ((0, 1) if drafted is not None else (0,))
        # The engine shortens k only in its last steps, to stay within max_new_tokens.
        full = [r == k or kind == "none" for r in run.stats.requested_per_step]
        steps = full.index(False) if False in full else len(full)
        assert predicted[:steps] == run.stats.accepted_per_step[:steps]
        if drafted is not None:
            assert drafted[:steps] == run.stats.drafted_per_step[:steps]
        if run.stats.finish_reason == "eos_token" and steps == len(full):
            assert predicted == run.stats.accepted_per_step
            if drafted is not None:
                assert (drafted, accepted) == (
                    run.stats.drafted_per_step,
                    run.stats.accepted_per_step,
                )
