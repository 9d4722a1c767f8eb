"""The verifier on hand-written tensors, and rejection sampling's output distribution."""

from __future__ import annotations

import pytest
import torch

from drafters.penalties import Penalties
from drafters.sampling import NonFiniteDistributionError, SamplingConfig, sampling_probs
from drafters.verify import Verification, rejection_sample, verify

GREEDY = SamplingConfig()
V = 6


def logits_with_argmax(*argmaxes: int) -> torch.Tensor:
    """Rows [len, V] whose argmax is the given token ids."""
    rows = torch.zeros(len(argmaxes), V)
    for row, token in enumerate(argmaxes):
        rows[row, token] = 5.0
    return rows


def test_greedy_accepts_all_and_adds_the_bonus_token() -> None:
    drafts = torch.tensor([2, 4, 1])
    assert verify(drafts, None, logits_with_argmax(2, 4, 1, 5), GREEDY, None) == Verification(3, 5)


def test_greedy_rejects_the_first_draft_and_corrects_it() -> None:
    drafts = torch.tensor([2, 4, 1])
    assert verify(drafts, None, logits_with_argmax(3, 4, 1, 5), GREEDY, None) == Verification(0, 3)


def test_greedy_rejects_in_the_middle_and_ignores_later_matches() -> None:
    drafts = torch.tensor([2, 4, 1, 0])
    # Position 2 mismatches; position 3 matches but comes after a rejection.
    target = logits_with_argmax(2, 4, 3, 0, 5)
    assert verify(drafts, None, target, GREEDY, None) == Verification(2, 3)


def test_no_drafts_is_plain_decoding() -> None:
    empty = torch.empty(0, dtype=torch.long)
    assert verify(empty, None, logits_with_argmax(4), GREEDY, None) == Verification(0, 4)


def test_sampled_point_mass_drafts_follow_the_target() -> None:
    generator = torch.Generator().manual_seed(0)
    sure = torch.full((3, V), 1e-9)
    sure[0, 2] = sure[1, 4] = sure[2, 5] = 1.0
    sure = sure / sure.sum(-1, keepdim=True)
    # p(x) = 1 for every draft: all accepted, bonus drawn from the last row.
    got = rejection_sample(torch.tensor([2, 4]), None, sure, generator)
    assert got == Verification(2, 5)
    # p(x) = 0 for the first draft: rejected, and never resampled (residual excludes x).
    never = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0, 0.0]] * 3)
    for _ in range(50):
        got = rejection_sample(torch.tensor([2, 4]), None, never, generator)
        assert got.accepted == 0 and got.next_token in (1, 3)


def _first_token_frequencies(
    target_probs: torch.Tensor, draft_probs: torch.Tensor | None, draft_token: int | None, n: int
) -> torch.Tensor:
    """How often each token is the first one emitted over n sampled steps with k = 2."""
    generator = torch.Generator().manual_seed(1234)
    counts = torch.zeros(target_probs.shape[-1])
    for _ in range(n):
        if draft_probs is None:
            drafts = torch.tensor([draft_token, draft_token])
        else:
            drafts = torch.multinomial(draft_probs, 1, generator=generator).view(-1)
        verdict = rejection_sample(drafts, draft_probs, target_probs, generator)
        first = int(drafts[0]) if verdict.accepted >= 1 else verdict.next_token
        counts[first] += 1
    return counts / n


def test_rejection_sampling_approximates_target_distribution() -> None:
    # As vLLM's test of the same name: the emitted token follows p, not the draft's q.
    torch.manual_seed(0)
    target_probs = torch.softmax(torch.randn(3, V) * 2, dim=-1)  # [k + 1, V]
    draft_probs = torch.softmax(torch.randn(2, V) * 2, dim=-1)  # [k, V]
    assert 0.5 * (target_probs[0] - draft_probs[0]).abs().sum() > 0.2
    empirical = _first_token_frequencies(target_probs, draft_probs, None, 20_000)
    assert 0.5 * (empirical - target_probs[0]).abs().sum() < 0.025
    assert 0.5 * (empirical - draft_probs[0]).abs().sum() > 0.15


def test_point_mass_rejection_sampling_approximates_target_distribution() -> None:
    torch.manual_seed(1)
    target_probs = torch.softmax(torch.randn(3, V), dim=-1)
    empirical = _first_token_frequencies(target_probs, None, 3, 20_000)
    assert 0.5 * (empirical - target_probs[0]).abs().sum() < 0.025


def test_a_seed_reproduces_the_sampled_outcomes() -> None:
    torch.manual_seed(2)
    target_probs = torch.softmax(torch.randn(4, V), dim=-1)
    draft_probs = torch.softmax(torch.randn(3, V), dim=-1)
    drafts = torch.tensor([0, 1, 2])

    def outcomes(seed: int) -> list[Verification]:
        generator = torch.Generator().manual_seed(seed)
        return [rejection_sample(drafts, draft_probs, target_probs, generator) for _ in range(30)]

    assert outcomes(7) == outcomes(7)
    assert outcomes(7) != outcomes(8)


def test_sampling_probs_applies_temperature_top_k_and_top_p() -> None:
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0]])
    top_k = sampling_probs(logits, SamplingConfig(do_sample=True, top_k=2))
    assert (top_k[0, 2:] == 0).all() and torch.isclose(top_k.sum(), torch.tensor(1.0))
    full = torch.softmax(logits, dim=-1)[0]
    # The smallest set reaching 0.8 of the mass: tokens 0 and 1 hold 0.63 + 0.23.
    top_p = sampling_probs(logits, SamplingConfig(do_sample=True, top_p=0.8))
    assert (top_p[0, :2] > 0).all() and (top_p[0, 2:] == 0).all()
    assert torch.isclose(top_p[0, 0] / top_p[0, 1], full[0] / full[1])
    hot = sampling_probs(logits, SamplingConfig(do_sample=True, temperature=0.5))
    assert torch.allclose(hot, torch.softmax(logits / 0.5, dim=-1))


def test_values_past_float32_keep_a_distribution_to_sample_from() -> None:
    """A top_p below float32's smallest number (1e-100, as JSON can send) was 0 in the
    comparison and dropped the top token too, and a repetition penalty of 1e-40 overflowed
    a seen token's logit to +inf: either row was NaN, a 500 "the logits overflowed"."""
    from drafters.penalties import PenaltyState

    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    tiny_p = sampling_probs(logits, SamplingConfig(do_sample=True, top_p=1e-100))
    assert tiny_p.tolist() == [[1.0, 0.0, 0.0, 0.0]]
    state = PenaltyState(Penalties(repetition=1e-40), prompt_ids=[2], stop_ids=())
    penalised = state.adjust(logits, torch.tensor([], dtype=torch.long))
    assert torch.isfinite(penalised[0, 2]) and int(penalised[0].argmax()) == 2
    probs = sampling_probs(penalised, SamplingConfig(do_sample=True))
    assert torch.isfinite(probs).all() and probs[0, 2] == 1.0


def test_sampling_probs_min_p_keeps_tokens_as_likely_as_a_share_of_the_top_one() -> None:
    """vLLM's min_p, after temperature: p(t) >= min_p * max p, the rest renormalised."""
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0]])
    full = torch.softmax(logits, dim=-1)[0]
    kept = sampling_probs(logits, SamplingConfig(do_sample=True, min_p=0.3))
    assert ((kept[0] > 0) == (full >= 0.3 * full[0])).all()  # tokens 0 and 1 (e^-1 = 0.37)
    assert torch.isclose(kept[0, 0] / kept[0, 1], full[0] / full[1])
    # At temperature 2 token 2 (e^-1 of the top, after it) is kept as well.
    hot = sampling_probs(logits, SamplingConfig(do_sample=True, temperature=2.0, min_p=0.3))
    assert (hot[0, :3] > 0).all() and (hot[0, 3:] == 0).all()
    only_top = sampling_probs(logits, SamplingConfig(do_sample=True, min_p=1.0))
    assert only_top[0].tolist() == [1.0, 0, 0, 0, 0, 0]


@pytest.mark.parametrize("mass", [0.2, 0.5, 0.9, 0.99])
def test_sampling_probs_typical_p_matches_transformers_warpers(mass: float) -> None:
    """typical_p (TGI's parameter) as transformers warps it, after temperature, top-k
    and top-p: the same tokens kept, the same probabilities."""
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
        TypicalLogitsWarper,
    )

    logits = torch.randn(16, 50, generator=torch.Generator().manual_seed(3)) * 3
    ours = sampling_probs(
        logits,
        SamplingConfig(do_sample=True, temperature=0.8, top_k=30, top_p=0.95, typical_p=mass),
    )
    scores = logits.clone()
    for warper in (
        TemperatureLogitsWarper(0.8),
        TopKLogitsWarper(30),
        TopPLogitsWarper(0.95),
        TypicalLogitsWarper(mass),
    ):
        scores = warper(torch.zeros(16, 1, dtype=torch.long), scores)
    theirs = scores.softmax(dim=-1)
    assert torch.equal(ours > 0, theirs > 0)
    assert torch.allclose(ours, theirs, atol=1e-6)
    narrowed = SamplingConfig(do_sample=True, temperature=0.8, top_k=30, top_p=0.95)
    kept_before = (sampling_probs(logits, narrowed) > 0).sum(dim=-1)
    if mass < 0.95:  # typical_p dropped tokens top-p had kept
        assert ((ours > 0).sum(dim=-1) < kept_before).any()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("where", ["plain step", "resample after a rejection", "bonus token"])
def test_a_target_row_holding_nan_or_infinity_is_refused_before_sampling(
    bad: float, where: str
) -> None:
    """torch.multinomial on such a row fails on a GPU with a device-side assert, after
    which the sidecar's CUDA context serves nothing; it is refused on the host first,
    saying what went wrong."""
    logits = torch.randn(2, 8)
    if where == "plain step":
        drafts, logits = torch.tensor([], dtype=torch.long), logits[:1]
        logits[0, 4] = bad
    elif where == "resample after a rejection":
        drafts = torch.tensor([3])
        logits[0, 4] = bad
    else:  # the draft is the target's certain token, so the bonus row is sampled
        drafts = torch.tensor([3])
        logits[0, 3] = 1e4
        logits[1, 4] = bad
    with pytest.raises(NonFiniteDistributionError, match="NaN or infinity"):
        verify(drafts, None, logits, SamplingConfig(do_sample=True), torch.Generator())
