"""Stopping a draft early (drafters/stopping.py): the rule, greedy losslessness for several
thresholds and k up to 16, truthful per-step accounting, and a consistent drafter cache.

The tiny random models are unsure of everything (their max probability is mostly
0.1-0.3 over 64 tokens), so each test takes its thresholds from quantiles of the
drafter's own confidences on the prompts: some drafts stop early, some run to k.
"""

from __future__ import annotations

import math

import pytest
import torch

from drafters.base import Drafter
from drafters.engine import SpeculativeEngine
from drafters.loader import LoadedModel
from drafters.registry import create_drafter
from drafters.sampling import SamplingConfig
from drafters.stopping import DraftStopRule, stop_rule

from .conftest import TinyModels, assert_same_or_near_tie, make_prompts, reference_greedy

MAX_NEW = 32
ENTROPY_SCALE = 0.1  # the tiny drafters' entropies are ~3 nats: gamma 1 bounds all below 0
KINDS = ("max_prob", "entropy")


@pytest.fixture(scope="module")
def drafters(target: LoadedModel, tiny_models: TinyModels) -> dict[str, Drafter]:
    return {
        "close": create_drafter("model", name="close", target=target, path=tiny_models.close_dir),
        "far": create_drafter("model", name="far", target=target, path=tiny_models.far_dir),
        "ngram": create_drafter("ngram", name="ngram", target=target),
    }


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    return make_prompts(6, seed=3)


@pytest.fixture(scope="module")
def references(
    target: LoadedModel, engine: SpeculativeEngine, prompts: list[list[int]]
) -> list[list[int]]:
    return [reference_greedy(target, engine, p, MAX_NEW) for p in prompts]


def rules_at_quantiles(
    drafter: Drafter, prompts: list[list[int]], quantiles: tuple[float, ...]
) -> list[DraftStopRule]:
    """Rules of each kind whose thresholds are quantiles of the drafter's greedy
    confidences (temperature 1) at every prompt position."""
    model = drafter.model  # type: ignore[attr-defined]
    rows = []
    with torch.inference_mode():
        for prompt in prompts:
            rows.append(model(torch.tensor([prompt])).logits[0].float().softmax(dim=-1))
    probs = torch.cat(rows)
    rules = []
    for kind in KINDS:
        probe = DraftStopRule(0.0, kind, ENTROPY_SCALE)
        confidences = torch.tensor([probe.confidence(row) for row in probs])
        for q in quantiles:
            threshold = float(confidences.quantile(q))
            assert 0.0 < threshold < 1.0, (kind, q, threshold)
            rules.append(DraftStopRule(threshold, kind, ENTROPY_SCALE))
    return rules


def test_confidences_of_known_distributions() -> None:
    uniform = torch.full((4,), 0.25)
    certain = torch.tensor([0.0, 1.0, 0.0, 0.0])
    max_prob = DraftStopRule(0.5, "max_prob")
    entropy = DraftStopRule(0.5, "entropy", entropy_scale=0.2)
    assert max_prob.confidence(uniform) == pytest.approx(0.25)
    assert max_prob.confidence(certain) == pytest.approx(1.0)
    # AdaEDL's bound 1 - sqrt(gamma H), H(uniform over 4) = ln 4 nats; 0 log 0 = 0.
    assert entropy.confidence(uniform) == pytest.approx(1 - math.sqrt(0.2 * math.log(4)))
    assert entropy.confidence(certain) == pytest.approx(1.0)
    assert max_prob.stops(uniform) and not max_prob.stops(certain)
    assert entropy.stops(uniform) and not entropy.stops(certain)
    assert not DraftStopRule(0.0, "max_prob").stops(uniform)  # 0: off


@pytest.mark.parametrize(
    "threshold", [float("nan"), float("inf"), -0.1, 1.0, 2.0], ids=["nan", "inf", "neg", "1", "2"]
)
def test_a_threshold_outside_0_1_is_refused(threshold: float) -> None:
    with pytest.raises(ValueError, match="stop threshold"):
        DraftStopRule(threshold)


def test_an_unknown_kind_or_scale_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown stop rule"):
        DraftStopRule(0.5, "coin")
    with pytest.raises(ValueError, match="entropy_scale"):
        DraftStopRule(0.5, "entropy", entropy_scale=float("nan"))
    assert stop_rule(0.0) is None
    assert stop_rule(0.4) == DraftStopRule(0.4)


@pytest.mark.parametrize("kind", ["close", "far"])
def test_greedy_with_stopping_is_the_targets_own_output_for_k_up_to_16(
    kind: str,
    engine: SpeculativeEngine,
    drafters: dict[str, Drafter],
    target: LoadedModel,
    prompts: list[list[int]],
    references: list[list[int]],
) -> None:
    drafter = drafters[kind]
    rules = rules_at_quantiles(drafter, prompts, (0.25, 0.5, 0.75))
    stopped = full = 0
    for k in (1, 3, 8, 16):
        for rule in rules:
            for prompt, reference in zip(prompts, references, strict=True):
                run = engine.generate(prompt, drafter, k, max_new_tokens=MAX_NEW, stop_rule=rule)
                assert_same_or_near_tie(target, prompt, run.collect(), reference)
                stats = run.stats
                for requested, drafted, accepted in zip(
                    stats.requested_per_step,
                    stats.drafted_per_step,
                    stats.accepted_per_step,
                    strict=True,
                ):
                    assert 0 <= accepted <= drafted <= requested
                    assert drafted >= min(requested, 1)  # the first draft is always made
                full += sum(
                    d == r > 1
                    for d, r in zip(stats.drafted_per_step, stats.requested_per_step, strict=True)
                )
                stopped += stats.stopped_steps
    # Both outcomes happen often, so the equality above covers shortened drafts.
    assert stopped > 100 and full > 100, (stopped, full)


def test_drafted_per_step_counts_exactly_what_the_drafter_proposed(
    engine: SpeculativeEngine, drafters: dict[str, Drafter], prompts: list[list[int]]
) -> None:
    """A fresh session driven through a run's steps, with the same rule, proposes
    exactly ``drafted_per_step`` tokens, stopped exactly on the ``stopped_steps``; after
    those steps its next draft (and q) is a fresh session's, so a draft ended by the rule,
    which fed its last token, rolls back correctly whatever was accepted."""
    drafter = drafters["close"]
    rule = rules_at_quantiles(drafter, prompts, (0.5,))[0]
    sampled = SamplingConfig(do_sample=True)
    all_accepted_after_stop = 0
    for prompt in prompts:
        run = engine.generate(prompt, drafter, 6, max_new_tokens=MAX_NEW, stop_rule=rule)
        run.collect()
        stats = run.stats
        history = prompt + run.output_ids
        session = drafter.start(prompt)
        session.prefill(prompt)  # as the engine does
        position = len(prompt) + 1  # after the prefill's token
        stopped = 0
        for requested, drafted, accepted in zip(
            stats.requested_per_step, stats.drafted_per_step, stats.accepted_per_step, strict=True
        ):
            if requested == 0:  # the engine's plain step (k capped at max_new_tokens)
                assert drafted == 0
                position += 1
                continue
            proposal = session.propose(history[:position], requested, SamplingConfig(), None, rule)
            assert proposal.length == drafted
            assert proposal.token_ids.tolist()[:accepted] == history[position : position + accepted]
            stopped += proposal.stopped
            all_accepted_after_stop += proposal.stopped and accepted == drafted
            session.observe_accepted(accepted)
            position += accepted + 1
        assert stopped == stats.stopped_steps
        assert position >= len(history)  # the last step may be cut at an EOS
        fresh = drafter.start(history)
        again = session.propose(history, 6, sampled, torch.Generator().manual_seed(2), rule)
        expected = fresh.propose(history, 6, sampled, torch.Generator().manual_seed(2), rule)
        assert again.token_ids.tolist() == expected.token_ids.tolist()
        assert again.probs is not None and expected.probs is not None
        torch.testing.assert_close(again.probs, expected.probs, rtol=1e-4, atol=1e-6)
    assert all_accepted_after_stop > 0


def test_the_ngram_drafter_ignores_the_rule(
    engine: SpeculativeEngine, drafters: dict[str, Drafter], prompts: list[list[int]]
) -> None:
    """Point-mass drafts carry no confidence: the same drafts with any threshold."""
    strict = DraftStopRule(0.99, "max_prob")
    for prompt in prompts:
        plain = engine.generate(prompt, drafters["ngram"], 8, max_new_tokens=MAX_NEW)
        ruled = engine.generate(
            prompt, drafters["ngram"], 8, max_new_tokens=MAX_NEW, stop_rule=strict
        )
        assert ruled.collect() == plain.collect()
        assert ruled.stats.drafted_per_step == plain.stats.drafted_per_step
        assert ruled.stats.stopped_steps == 0
