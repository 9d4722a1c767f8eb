"""Teacher-forced greedy acceptance, checked on hand-written matches and a tiny model."""

from __future__ import annotations

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from drafters.counterfactual import (
    accepted_per_step_from_matches,
    replay_greedy_steps,
    score_model_counterfactual,
    teacher_forced_matches,
    teacher_forced_predictions,
)
from router.policy.acceptance import counts_from_steps


def test_replays_steps_over_matches() -> None:
    t, f = True, False
    # Index 0 is the prefill's token: no step drafts it. k=4: step 1 starts at index 1 and
    # accepts 2 (mismatch at index 3, which the target emits); step 2 starts at index 4
    # and accepts all 4; step 3 starts at index 9, one token left, which it matches: the
    # output ends before the step shows a rejection or a full draft, so it is left out
    # (counted, it was a rejection the engine never records).
    matches = [f, t, t, f, t, t, t, t, t, t]
    assert accepted_per_step_from_matches(matches, 4) == [2, 4]
    assert accepted_per_step_from_matches([*matches, f], 4) == [2, 4, 1]  # one seen
    assert accepted_per_step_from_matches(matches, 1) == [1, 0, 1, 1, 1]
    assert accepted_per_step_from_matches([f, f, f], 3) == [0, 0]
    assert accepted_per_step_from_matches([t], 3) == []  # the prefill's token alone
    assert accepted_per_step_from_matches([], 3) == []
    # k = 0 is plain decoding: one step per token after the first, nothing accepted.
    assert accepted_per_step_from_matches([t, t, t, t], 0) == [0, 0, 0]


def test_replays_steps_over_drafts_of_any_length() -> None:
    output = [9, 10, 11, 12, 13, 14, 15, 16]
    asked: list[tuple[int, int]] = []

    def drafts_at(position: int, k: int) -> list[int]:
        asked.append((position, k))
        # From 1: two right, then wrong. From 4: one right only (a short draft, as an
        # n-gram lookup may give). From 6: longer than k and past the output's end.
        return {1: [10, 11, 99], 4: [13], 6: [15, 16, 17, 18, 19]}.get(position, [])

    # The step from 6 matches to the output's end: censored, left out.
    assert replay_greedy_steps(output, 3, drafts_at) == [2, 1]
    assert asked == [(1, 3), (4, 3), (6, 3)]
    # k = 0 never asks for drafts: plain decoding.
    asked.clear()
    assert replay_greedy_steps(output, 0, drafts_at) == [0] * 7 and asked == []
    # Drafts longer than k are cut at k.
    assert replay_greedy_steps(output, 1, lambda position, k: output[position:]) == [1] * 4


def _tiny_model() -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return Qwen2ForCausalLM(config).eval()


def test_a_model_scores_itself_as_always_accepted() -> None:
    model = _tiny_model()
    prompt = [1, 2, 3, 4]
    output = model.generate(
        torch.tensor([prompt]),
        max_new_tokens=12,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
    )[0, len(prompt) :].tolist()
    assert teacher_forced_matches(model, prompt, output) == [True] * 12
    assert teacher_forced_predictions(model, prompt, output) == output
    # 12 tokens, the prefill's then k = 3: every step accepts 3 and adds a bonus token.
    assert score_model_counterfactual(model, prompt, output, 3) == [3, 3, 3]
    # Where the output ends inside a step, that step shows no rejection: the target
    # scoring itself has none at any k (its last step counted as one for every k + 1
    # that does not divide the output's length).
    for k in range(1, 9):
        assert counts_from_steps(score_model_counterfactual(model, prompt, output, k), k)[1] == 0
    wrong = [(tok + 1) % 50 for tok in output]
    # Every step rejected: one per token after the prefill's.
    assert score_model_counterfactual(model, prompt, wrong, 3) == [0] * 11


def test_a_model_that_returns_every_position_scores_the_same() -> None:
    """Some models (GPT-Neo, OPT, ... in transformers 4.57) take ``logits_to_keep`` in
    their kwargs and return every position: the rows were then read from the prompt's."""
    model = _tiny_model()

    class EveryPosition(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, input_ids: torch.Tensor, **ignored: object) -> object:
            return self.inner(input_ids=input_ids)

    prompt, output = [1, 2, 3, 4, 5, 6], [7, 8, 9, 10]
    expected = teacher_forced_predictions(model, prompt, output)
    assert teacher_forced_predictions(EveryPosition(), prompt, output) == expected
