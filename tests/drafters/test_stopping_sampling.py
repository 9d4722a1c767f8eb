"""Sampled speculative decoding with a draft stop rule is lossless beyond the first token.

The harness of ``test_sampling_lossless.py`` (the first four tokens sampled 2000 times,
compared with the exact joint of plain sampling by a chi-square test that a correct
engine fails with probability 1e-4), with the model drafter's drafts ended early by each
kind of rule. The threshold is the median of the drafter's confidence before its second
draft, so about half the first steps (after the prefill's t1) draft one token and verify
it with the bonus token drawn right after it (t3 from p_3), the others draft two and
reach the resample after a partial accept (t3) and the bonus after both (t4). The first
step's context spreads over the prefill's 8 tokens, so twice the harness's samples keep
each path as frequent as 1000 did when the first step began at the prompt.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import pytest
import torch

from drafters.base import Drafter
from drafters.engine import SpeculativeEngine
from drafters.sampling import SamplingConfig, sampling_probs
from drafters.stopping import DraftStopRule

from .test_sampling_lossless import (  # noqa: F401 (setup is a fixture used below)
    FALSE_FAILURE,
    LENGTH,
    PROMPT,
    SAMPLES,
    TOP_K,
    TOP_P,
    VOCAB,
    Setup,
    chi_square_p_value,
    exact_joint,
    setup,
)

K = 3
RUNS = 2 * SAMPLES


@torch.inference_mode()
def median_second_draft_rule(
    drafter: Drafter, sampling: SamplingConfig, kind: str, entropy_scale: float
) -> DraftStopRule:
    """The rule whose threshold is the median, over the prefill's 8 tokens t1 and the 8
    first drafts x1, of the confidence of q(. | PROMPT, t1, x1), the distribution the
    second draft is drawn from."""
    model = drafter.model  # type: ignore[attr-defined]
    prompts = torch.tensor([[*PROMPT, t1, x1] for t1 in range(VOCAB) for x1 in range(VOCAB)])
    q = sampling_probs(model(prompts).logits[:, -1], sampling)  # [VOCAB, VOCAB]
    probe = DraftStopRule(0.0, kind, entropy_scale)
    confidences = torch.tensor([probe.confidence(row) for row in q])
    return DraftStopRule(float(confidences.median()), kind, entropy_scale)


def sample_with_rule(
    engine: SpeculativeEngine,
    prompt: Sequence[int],
    drafter: Drafter,
    sampling: SamplingConfig,
    rule: DraftStopRule,
) -> tuple[Counter[tuple[int, ...]], Counter[str]]:
    """RUNS outputs (seeds 0..RUNS-1) and how often each kind of step happened."""
    outputs: Counter[tuple[int, ...]] = Counter()
    steps: Counter[str] = Counter()
    for seed in range(RUNS):
        config = SamplingConfig(
            do_sample=True,
            temperature=sampling.temperature,
            top_k=sampling.top_k,
            top_p=sampling.top_p,
            seed=seed,
        )
        run = engine.generate(
            prompt, drafter, K, max_new_tokens=LENGTH, sampling=config, stop_rule=rule
        )
        outputs[tuple(run.collect())] += 1
        stats = run.stats
        first_stopped = (
            stats.stopped_steps > 0 and stats.drafted_per_step[0] < stats.requested_per_step[0]
        )
        drafted, accepted = stats.drafted_per_step[0], stats.accepted_per_step[0]
        if first_stopped:
            steps["stopped, bonus" if accepted == drafted else "stopped, resample"] += 1
        elif drafted == 2:
            steps[
                "full, bonus" if accepted == 2 else "full, partial" if accepted else "full, none"
            ] += 1
    return outputs, steps


@pytest.mark.parametrize(
    ("kind", "entropy_scale", "sampling"),
    [("max_prob", 1.0, TOP_K), ("entropy", 0.3, TOP_P)],
    ids=["max_prob-top_k", "entropy-top_p"],
)
def test_speculative_samples_with_a_stop_rule_follow_plain_sampling(
    setup: Setup,  # noqa: F811
    kind: str,
    entropy_scale: float,
    sampling: SamplingConfig,
) -> None:
    drafter = setup.drafters["model"]
    rule = median_second_draft_rule(drafter, sampling, kind, entropy_scale)
    assert 0.0 < rule.threshold < 1.0
    expected = exact_joint(setup.target.model, PROMPT, sampling)
    observed, steps = sample_with_rule(setup.engine, PROMPT, drafter, sampling, rule)
    # Each way of reaching t3 and t4 happens often: the bonus right after a draft the rule
    # shortened, the resample after a partial accept and the bonus after a full draft.
    for path in ("stopped, bonus", "full, partial", "full, bonus"):
        assert steps[path] >= SAMPLES // 20, steps
    assert chi_square_p_value(observed, expected) > FALSE_FAILURE
