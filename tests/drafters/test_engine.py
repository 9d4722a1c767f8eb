"""The speculative decoding loop on tiny random Qwen2 models: lossless, stoppable, adaptive."""

from __future__ import annotations

import itertools

import pytest
import torch
from transformers import DynamicCache

from drafters.base import Drafter
from drafters.engine import SpeculativeEngine, prefill
from drafters.loader import LoadedModel, load_model
from drafters.model_drafter import ModelDrafter
from drafters.penalties import Penalties, bad_word_ids
from drafters.registry import create_drafter
from drafters.sampling import SamplingConfig
from drafters.stats import GenerationStats

from .conftest import (
    EOS_ID,
    TinyModels,
    assert_same_or_near_tie,
    make_prompts,
    reference_greedy,
)

MAX_NEW = 32


@pytest.fixture(scope="module")
def drafters(target: LoadedModel, tiny_models: TinyModels) -> dict[str, Drafter]:
    return {
        "none": create_drafter("none", name="none", target=target),
        "ngram": create_drafter("ngram", name="ngram", target=target),
        "close": create_drafter("model", name="close", target=target, path=tiny_models.close_dir),
        "far": create_drafter("model", name="far", target=target, path=tiny_models.far_dir),
    }


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    return make_prompts(12)


@pytest.fixture(scope="module")
def references(
    target: LoadedModel, engine: SpeculativeEngine, prompts: list[list[int]]
) -> list[list[int]]:
    return [reference_greedy(target, engine, p, MAX_NEW) for p in prompts]


@pytest.mark.parametrize("kind", ["none", "ngram", "close", "far"])
def test_greedy_is_the_targets_own_output_for_every_k(
    kind: str,
    engine: SpeculativeEngine,
    drafters: dict[str, Drafter],
    target: LoadedModel,
    prompts: list[list[int]],
    references: list[list[int]],
) -> None:
    accepted = 0
    for k in range(1, 9):
        for prompt, reference in zip(prompts, references, strict=True):
            run = engine.generate(prompt, drafters[kind], k, max_new_tokens=MAX_NEW)
            assert_same_or_near_tie(target, prompt, run.collect(), reference)
            assert run.stats.generated_tokens == len(run.output_ids)
            assert run.stats.steps == len(run.stats.accepted_per_step)
            # The prefill's token, then each step's accepted drafts and its own token.
            assert 1 + sum(run.stats.accepted_per_step) + run.stats.steps >= len(run.output_ids)
            accepted += run.stats.accepted
    # The comparison is only meaningful if drafts were actually accepted.
    assert (accepted > 0) == (kind != "none")


def test_streamed_events_are_the_output(
    engine: SpeculativeEngine, drafters: dict[str, Drafter], prompts: list[list[int]]
) -> None:
    run = engine.generate(prompts[1], drafters["close"], 4, max_new_tokens=MAX_NEW)
    first = next(run)  # streamed before any draft is made
    assert len(first.token_ids) == 1 and run.stats.steps == 0
    events = [first, *run]
    assert [t for e in events for t in e.token_ids] == run.output_ids
    # The prefill's token, then one event per step.
    assert len(events) == run.stats.steps + 1
    assert all(len(e.token_texts) == len(e.special) == len(e.token_ids) for e in events)
    text = "".join(t for e in events for t in e.token_texts)
    assert text == engine.target.tokenizer.decode(run.output_ids, skip_special_tokens=True)
    assert text == run.text == "".join(e.text for e in events)
    stepped = len(run.output_ids) - 1
    assert run.stats.mean_accepted_length == pytest.approx(stepped / run.stats.steps)


def test_an_end_of_turn_token_is_marked_special_and_never_emitted_as_text(
    tiny_models: TinyModels, drafters: dict[str, Drafter], prompts: list[list[int]]
) -> None:
    # The tiny target's damped special tokens never win greedily; a larger (tied) <|im_end|>
    # row makes it end most of these prompts within a few tokens.
    target = load_model(tiny_models.target_dir)
    with torch.no_grad():
        target.model.get_input_embeddings().weight[EOS_ID].mul_(15.0)
    engine = SpeculativeEngine(target)
    ended = 0
    for prompt in prompts[:6]:
        run = engine.generate(prompt, drafters["close"], 4, max_new_tokens=MAX_NEW)
        tokens = [
            (token, text, special)
            for event in run
            for token, text, special in zip(
                event.token_ids, event.token_texts, event.special, strict=True
            )
        ]
        assert [t for t, _, _ in tokens] == reference_greedy(target, engine, prompt, MAX_NEW)
        assert "<|im_end|>" not in run.text
        assert run.text == target.tokenizer.decode(run.output_ids, skip_special_tokens=True)
        assert [special for t, _, special in tokens] == [t == EOS_ID for t, _, _ in tokens]
        if run.stats.finish_reason == "eos_token":
            ended += 1
            assert tokens[-1] == (EOS_ID, "", True)
    assert ended >= 3


def test_target_cache_after_a_rejection_equals_a_fresh_prefill(
    engine: SpeculativeEngine, drafters: dict[str, Drafter], target: LoadedModel
) -> None:
    history = make_prompts(3, seed=5)[2]
    cache = DynamicCache()
    history.append(int(prefill(target.model, target.device, cache, history).argmax()))
    session = drafters["far"].start(history)
    stats = GenerationStats()
    rejected = False
    for _ in range(6):
        history += engine._speculative_step(
            cache, session, history, 5, SamplingConfig(), None, stats
        )[0]
        rejected = rejected or stats.accepted_per_step[-1] < 5
    assert rejected and cache.get_seq_length() == len(history) - 1
    with torch.inference_mode():
        stepped = target.model(
            torch.tensor([history[-1:]]), past_key_values=cache, use_cache=True
        ).logits[0, -1]
        fresh = target.model(torch.tensor([history])).logits[0, -1]
    torch.testing.assert_close(stepped, fresh, rtol=1e-4, atol=1e-5)


def test_model_drafter_cache_after_rollback_drafts_like_a_fresh_session(
    engine: SpeculativeEngine, drafters: dict[str, Drafter], prompts: list[list[int]]
) -> None:
    run = engine.generate(prompts[0], drafters["close"], 5, max_new_tokens=20)
    run.collect()
    assert any(n < 5 for n in run.stats.accepted_per_step)  # some step was rolled back
    history = prompts[0] + run.output_ids
    rolled = drafters["close"].start(prompts[0])
    greedy = SamplingConfig()
    # Drive a session through the same steps, then compare with a fresh one.
    position = len(prompts[0]) + 1  # after the prefill's token
    for accepted in run.stats.accepted_per_step:
        rolled.propose(history[:position], 5, greedy, None)
        rolled.observe_accepted(accepted)
        position += accepted + 1
    fresh = drafters["close"].start(history)
    again = rolled.propose(history, 5, greedy, None).token_ids.tolist()
    assert again == fresh.propose(history, 5, greedy, None).token_ids.tolist()


@pytest.mark.parametrize("kind", ["close", "ngram"])
def test_a_draft_ends_at_a_stop_token_and_the_session_stays_consistent(
    drafters: dict[str, Drafter], kind: str
) -> None:
    greedy = SamplingConfig()
    # A history that repeats itself, so the n-gram drafter has a full draft too.
    history = [5, 9, 13, 17, 21, 25, 5, 9, 13, 17, 21, 25, 5, 9]
    full = drafters[kind].start(history).propose(history, 5, greedy, None).token_ids.tolist()
    assert len(full) == 5
    stop = full[2]
    cut = full[: full.index(stop) + 1]  # up to and including the first occurrence
    session = drafters[kind].start(history, frozenset({stop}))
    assert session.propose(history, 5, greedy, None).token_ids.tolist() == cut
    # The verifier keeps the whole short draft and emits one more token: the next draft
    # must be what a fresh session drafts from the same verified history.
    session.observe_accepted(len(cut))
    verified = [*history, *cut, 7]
    sampled = SamplingConfig(do_sample=True)
    again = session.propose(verified, 5, sampled, torch.Generator().manual_seed(3))
    fresh = drafters[kind].start(verified, frozenset({stop}))
    expected = fresh.propose(verified, 5, sampled, torch.Generator().manual_seed(3))
    assert again.token_ids.tolist() == expected.token_ids.tolist()
    if expected.probs is not None:  # the model drafter: its cache is exactly the fresh one
        assert again.probs is not None
        torch.testing.assert_close(again.probs, expected.probs, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["close", "ngram", "none"])
def test_a_prefilled_session_drafts_exactly_like_one_that_was_not(
    drafters: dict[str, Drafter], prompts: list[list[int]], kind: str
) -> None:
    sampled = SamplingConfig(do_sample=True)
    prompt = prompts[3]
    cold = drafters[kind].start(prompt)
    warm = drafters[kind].start(prompt)
    warm.prefill(prompt)
    for history in (prompt, [*prompt, 11, 12]):  # the first step, then after 1 accepted + 1
        expected = cold.propose(history, 4, sampled, torch.Generator().manual_seed(1))
        got = warm.propose(history, 4, sampled, torch.Generator().manual_seed(1))
        assert got.token_ids.tolist() == expected.token_ids.tolist()
        if expected.probs is not None:
            assert got.probs is not None
            torch.testing.assert_close(got.probs, expected.probs, rtol=1e-4, atol=1e-6)
        cold.observe_accepted(1)
        warm.observe_accepted(1)


def test_max_new_tokens_is_exact_and_never_overdrafted(
    engine: SpeculativeEngine,
    drafters: dict[str, Drafter],
    prompts: list[list[int]],
    references: list[list[int]],
) -> None:
    index = next(i for i, r in enumerate(references) if len(r) == MAX_NEW and EOS_ID not in r)
    run = engine.generate(prompts[index], drafters["close"], 8, max_new_tokens=7)
    assert run.collect() == references[index][:7]
    assert run.stats.finish_reason == "length"
    assert all(r <= 7 - 1 for r in run.stats.requested_per_step)
    assert engine.generate(prompts[index], drafters["close"], 8, max_new_tokens=0).collect() == []


def test_the_context_length_ends_a_run_where_plain_decoding_ends_it(
    engine: SpeculativeEngine,
    drafters: dict[str, Drafter],
    prompts: list[list[int]],
    references: list[list[int]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A step emits up to k + 1 tokens: one token short of the model's context, k = 1
    took the sequence one past it (and past plain decoding's output)."""
    index = next(i for i, r in enumerate(references) if len(r) == MAX_NEW and EOS_ID not in r)
    context = len(prompts[index]) + 5
    monkeypatch.setattr(engine, "max_positions", context)
    for k in (0, 1, 4):
        run = engine.generate(prompts[index], drafters["close"], k, max_new_tokens=MAX_NEW)
        assert run.collect() == references[index][:5], k
        assert run.stats.finish_reason == "length"


def test_stops_at_eos(
    tiny_models: TinyModels,
    drafters: dict[str, Drafter],
    prompts: list[list[int]],
    references: list[list[int]],
) -> None:
    # A target whose generation config adds an EOS id that its greedy output reaches.
    target = load_model(tiny_models.target_dir)
    index = next(i for i, r in enumerate(references) if EOS_ID not in r[:12])
    extra_eos = references[index][9]
    target.model.generation_config.eos_token_id = [EOS_ID, extra_eos]
    engine = SpeculativeEngine(target)
    assert engine.stop_token_ids == {EOS_ID, extra_eos}
    reference = reference_greedy(target, engine, prompts[index], MAX_NEW)
    assert reference[-1] == extra_eos and len(reference) <= 10
    for kind in ("ngram", "close"):
        for k in (1, 6):
            run = engine.generate(prompts[index], drafters[kind], k, max_new_tokens=MAX_NEW)
            assert run.collect() == reference
            assert run.stats.finish_reason == "eos_token"


def test_ignore_eos_runs_past_the_eos_and_stop_token_ids_end_a_run(
    tiny_models: TinyModels,
    drafters: dict[str, Drafter],
    prompts: list[list[int]],
    references: list[list[int]],
) -> None:
    """vLLM's ``ignore_eos``: a run the model's EOS ended goes on, token for token the
    target's greedy output with no stop at all, to max_new_tokens; ``stop_token_ids``: a
    run ends at the first of those tokens (EOS ignored or not), whatever the drafter."""
    target = load_model(tiny_models.target_dir)
    index = next(i for i, r in enumerate(references) if EOS_ID not in r[:12])
    extra_eos = references[index][9]
    target.model.generation_config.eos_token_id = [EOS_ID, extra_eos]
    engine = SpeculativeEngine(target)
    target.model.generation_config.eos_token_id = None  # the engine has read its stop ids
    with torch.inference_mode():
        unstopped = target.model.generate(
            torch.tensor([prompts[index]]), max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=0
        )[0, len(prompts[index]) :].tolist()
    assert extra_eos in unstopped[:10] and len(unstopped) == MAX_NEW
    later = next(t for t in unstopped[10:] if t not in engine.stop_token_ids)
    cut = unstopped.index(later) + 1
    for kind in ("none", "ngram", "close"):
        for k in (0, 1, 6) if kind != "none" else (0,):
            run = engine.generate(
                prompts[index], drafters[kind], k, max_new_tokens=MAX_NEW, ignore_eos=True
            )
            assert run.collect() == unstopped, (kind, k)
            assert run.stats.finish_reason == "length"
            run = engine.generate(
                prompts[index],
                drafters[kind],
                k,
                max_new_tokens=MAX_NEW,
                ignore_eos=True,
                stop_token_ids=[later],
            )
            assert run.collect() == unstopped[:cut], (kind, k)
            assert run.stats.finish_reason == "eos_token"
    # Without ignore_eos a stop token id adds to the model's EOS ids.
    run = engine.generate(
        prompts[index], drafters["close"], 4, max_new_tokens=MAX_NEW, stop_token_ids=[later]
    )
    assert run.collect() == unstopped[: unstopped.index(extra_eos) + 1]


def test_special_tokens_text_is_output_when_not_skipped(
    engine: SpeculativeEngine,
    drafters: dict[str, Drafter],
    target: LoadedModel,
    prompts: list[list[int]],
) -> None:
    """vLLM's ``skip_special_tokens`` off: a special token's text is part of the output's
    (EOS tokens a run goes past with ``ignore_eos``, forced by a logit bias), as the
    tokenizer decodes the ids keeping them; the EOS that ends a run (after ``min_tokens``
    others) adds none. The ids are the same either way."""
    assert EOS_ID in target.tokenizer.all_special_ids
    decode = target.tokenizer.decode
    forced = Penalties(min_tokens=4, bias=((EOS_ID, 100.0),))
    for kind, k in (("none", 0), ("close", 4), ("ngram", 3)):
        runs = {
            skip: engine.generate(
                prompts[2],
                drafters[kind],
                k,
                max_new_tokens=8,
                ignore_eos=True,
                penalties=forced,
                skip_special_tokens=skip,
            )
            for skip in (True, False)
        }
        ids = runs[False].collect()
        assert ids == runs[True].collect() == [EOS_ID] * 8  # not a stop with ignore_eos
        assert runs[False].text == decode(ids, skip_special_tokens=False)
        assert runs[True].text == "" != runs[False].text
        ended = engine.generate(
            prompts[2],
            drafters[kind],
            k,
            max_new_tokens=8,
            penalties=forced,
            skip_special_tokens=False,
        )
        output = ended.collect()
        assert len(output) == 5 and output[-1] == EOS_ID and EOS_ID not in output[:4]
        assert ended.stats.finish_reason == "eos_token"
        assert ended.text == decode(output[:4], skip_special_tokens=False)


def test_allowed_tokens_and_bad_words_hold_whatever_the_drafter(
    engine: SpeculativeEngine,
    target: LoadedModel,
    drafters: dict[str, Drafter],
    prompts: list[list[int]],
    references: list[list[int]],
) -> None:
    """vLLM's ``allowed_token_ids`` (greedy output: transformers' own under
    ``prefix_allowed_tokens_fn``) and ``bad_words`` (never completed in the output; the
    same output as plain decoding under them), whatever the drafter."""
    index = 1  # a prompt with a repeated stretch: the n-gram drafter drafts
    reference = references[index]
    allowed = tuple(sorted(set(reference[1:6]) | {5, 9, 11}))
    with torch.inference_mode():
        expected = target.model.generate(
            torch.tensor([prompts[index]]),
            max_new_tokens=MAX_NEW,
            do_sample=False,
            prefix_allowed_tokens_fn=lambda batch, ids: list(allowed),
            eos_token_id=sorted(engine.stop_token_ids),
            pad_token_id=0,
        )[0, len(prompts[index]) :].tolist()
    assert expected != reference and set(expected) <= set(allowed)
    only = Penalties(allowed=allowed)
    for kind, k in (("none", 0), ("ngram", 4), ("close", 1), ("close", 4)):
        run = engine.generate(
            prompts[index], drafters[kind], k, max_new_tokens=MAX_NEW, penalties=only
        )
        assert run.collect() == expected, (kind, k)
    pair, single = (reference[2], reference[3]), reference[6]
    barred = Penalties(bad_words=(pair, (single,)))
    plain = engine.generate(
        prompts[index], drafters["none"], 0, max_new_tokens=MAX_NEW, penalties=barred
    ).collect()
    assert plain != reference and single not in plain
    assert pair not in set(itertools.pairwise(plain))
    for kind, k in (("ngram", 4), ("close", 1), ("close", 4)):
        run = engine.generate(
            prompts[index], drafters[kind], k, max_new_tokens=MAX_NEW, penalties=barred
        )
        assert run.collect() == plain, (kind, k)


def test_bad_words_and_min_tokens_give_way_where_they_leave_no_allowed_token(
    engine: SpeculativeEngine,
    drafters: dict[str, Drafter],
    prompts: list[list[int]],
) -> None:
    """A row with every logit -inf has nothing to sample (sampling failed with a NaN
    error, greedy wrote token 0, outside the allowed ones): there the allowed tokens are
    scored as they are."""
    allowed = (5, 9)
    only = engine.generate(
        prompts[0], drafters["none"], 0, max_new_tokens=8, penalties=Penalties(allowed=allowed)
    ).collect()
    contradicting = Penalties(allowed=allowed, bad_words=((5,), (9,)))
    for kind, k in (("none", 0), ("close", 4)):
        greedy = engine.generate(
            prompts[0], drafters[kind], k, max_new_tokens=8, penalties=contradicting
        )
        assert greedy.collect() == only, kind
        sampled = engine.generate(
            prompts[0],
            drafters[kind],
            k,
            max_new_tokens=8,
            penalties=contradicting,
            sampling=SamplingConfig(do_sample=True, temperature=0.9, seed=3),
        )
        assert set(sampled.collect()) <= set(allowed), kind
    ended = engine.generate(
        prompts[0],
        drafters["close"],
        4,
        max_new_tokens=8,
        penalties=Penalties(allowed=(EOS_ID,), min_tokens=4),
    )
    # The end of turn is the only token left; nothing stops before min_tokens still.
    assert ended.collect() == [EOS_ID] * 5 and ended.stats.finish_reason == "eos_token"


def test_bad_words_are_tokenized_as_vllm_tokenizes_them() -> None:
    """Each word without its leading spaces, and with a space before it where that makes
    a new first token of as many tokens."""
    vocabulary = {"hat": [1], " hat": [2], "red hat": [3, 1], " red hat": [4, 1], "x": [5]}
    sequences = bad_word_ids(["hat", "  red hat", "x", "hat"], lambda t: vocabulary.get(t, [6, 7]))
    assert sequences == ((1,), (2,), (3, 1), (4, 1), (5,))
    with pytest.raises(ValueError, match="no token"):
        bad_word_ids(["y"], lambda t: [])


def test_penalties_and_min_tokens_keep_greedy_output_the_penalised_targets(
    tiny_models: TinyModels,
    engine: SpeculativeEngine,
    target: LoadedModel,
    drafters: dict[str, Drafter],
    prompts: list[list[int]],
    references: list[list[int]],
) -> None:
    """vLLM's penalties and min_tokens on the in-process engine, greedy: the output is
    transformers' own under its repetition_penalty and min_new_tokens (the same rules),
    and under frequency and presence penalties plain decoding's, whatever the drafter."""
    index = 1  # a prompt with a repeated stretch: the n-gram drafter drafts
    with torch.inference_mode():
        repeated = target.model.generate(
            torch.tensor([prompts[index]]),
            max_new_tokens=MAX_NEW,
            do_sample=False,
            repetition_penalty=1.3,
            eos_token_id=sorted(engine.stop_token_ids),
            pad_token_id=0,
        )[0, len(prompts[index]) :].tolist()
    assert repeated != references[index]
    for kind, k in (("ngram", 4), ("close", 1), ("close", 4)):
        run = engine.generate(
            prompts[index], drafters[kind], k, max_new_tokens=MAX_NEW, penalties=Penalties(1.3)
        )
        assert run.collect() == repeated, (kind, k)
    frequent = Penalties(presence=0.5, frequency=0.7)
    plain = engine.generate(
        prompts[index], drafters["none"], 0, max_new_tokens=MAX_NEW, penalties=frequent
    ).collect()
    assert plain != references[index]
    for kind, k in (("ngram", 4), ("close", 1), ("close", 4)):
        run = engine.generate(
            prompts[index], drafters[kind], k, max_new_tokens=MAX_NEW, penalties=frequent
        )
        assert run.collect() == plain, (kind, k)
    # logit_bias: a token biased by 100 is every token, one biased by -100 never comes.
    forced = Penalties(bias=((7, 100.0),))
    for kind, k in (("none", 0), ("ngram", 4), ("close", 4)):
        run = engine.generate(
            prompts[index], drafters[kind], k, max_new_tokens=MAX_NEW, penalties=forced
        )
        assert run.collect() == [7] * MAX_NEW, (kind, k)
    first = references[index][0]
    barred = engine.generate(
        prompts[index],
        drafters["close"],
        4,
        max_new_tokens=MAX_NEW,
        penalties=Penalties(bias=((first, -100.0),)),
    ).collect()
    assert first not in barred
    # min_tokens: a target that ends its answer at token 10 writes on to 16 at least.
    ending = load_model(tiny_models.target_dir)
    index = next(i for i, r in enumerate(references) if EOS_ID not in r[:12])
    ending.model.generation_config.eos_token_id = [EOS_ID, references[index][9]]
    ending_engine = SpeculativeEngine(ending)
    with torch.inference_mode():
        longer = ending.model.generate(
            torch.tensor([prompts[index]]),
            max_new_tokens=MAX_NEW,
            min_new_tokens=16,
            do_sample=False,
            eos_token_id=sorted(ending_engine.stop_token_ids),
            pad_token_id=0,
        )[0, len(prompts[index]) :].tolist()
    assert len(longer) >= 16  # without min_tokens it ends after 10 (test_stops_at_eos)
    for kind, k in (("none", 0), ("ngram", 4), ("close", 4)):
        run = ending_engine.generate(
            prompts[index],
            drafters[kind],
            k,
            max_new_tokens=MAX_NEW,
            penalties=Penalties(min_tokens=16),
        )
        assert run.collect() == longer, (kind, k)


def test_stop_ids_are_the_eos_ids_the_model_declares(tiny_models: TinyModels) -> None:
    # The engine knows no chat format: "<|im_end|>" (id 1) is in the vocabulary, but a
    # model that declares only "<|endoftext|>" (id 0) stops only there...
    target = load_model(tiny_models.target_dir)
    target.tokenizer.eos_token = "<|endoftext|>"
    target.model.generation_config.eos_token_id = 0
    assert SpeculativeEngine(target).stop_token_ids == {0}
    # ...and one declared as a Qwen2.5 instruct checkpoint is (end of turn, end of text).
    target.tokenizer.eos_token = "<|im_end|>"
    target.model.generation_config.eos_token_id = [EOS_ID, 0]
    assert SpeculativeEngine(target).stop_token_ids == {EOS_ID, 0}


def test_stops_after_a_stop_sequence(
    engine: SpeculativeEngine,
    drafters: dict[str, Drafter],
    target: LoadedModel,
    prompts: list[list[int]],
    references: list[list[int]],
) -> None:
    tokenizer = target.tokenizer
    reference = references[3]
    stop = tokenizer.decode(reference[5:7])  # two words, e.g. "w12 w40"
    end = next(j for j in range(len(reference)) if stop in tokenizer.decode(reference[: j + 1]))
    run = engine.generate(
        prompts[3], drafters["close"], 6, max_new_tokens=MAX_NEW, stop_sequences=["zzz", stop]
    )
    text = "".join(event.text for event in run)
    assert run.output_ids == reference[: end + 1]
    assert run.stats.finish_reason == "stop_sequence"
    assert text.endswith(stop) and text.count(stop) == 1


def test_draft_length_may_change_between_steps(
    engine: SpeculativeEngine,
    drafters: dict[str, Drafter],
    target: LoadedModel,
    prompts: list[list[int]],
    references: list[list[int]],
) -> None:
    plan = [3, 0, 8, 1, 0, 5, 2]
    seen: list[int] = []

    def schedule(step: int, stats: GenerationStats) -> int:
        assert stats.steps == step
        seen.append(step)
        return plan[step % len(plan)]

    for kind in ("close", "ngram"):
        for prompt, reference in zip(prompts[:6], references[:6], strict=True):
            seen.clear()
            run = engine.generate(prompt, drafters[kind], schedule, max_new_tokens=MAX_NEW)
            assert_same_or_near_tie(target, prompt, run.collect(), reference)
            requested = run.stats.requested_per_step
            assert seen == list(range(run.stats.steps))
            assert all(r <= plan[i % len(plan)] for i, r in enumerate(requested))
            assert all(
                d == 0 for r, d in zip(requested, run.stats.drafted_per_step, strict=True) if r == 0
            )


def test_cancellation_stops_between_steps(
    engine: SpeculativeEngine,
    drafters: dict[str, Drafter],
    prompts: list[list[int]],
    references: list[list[int]],
) -> None:
    calls = 0

    def should_stop() -> bool:
        nonlocal calls
        calls += 1
        return calls > 3

    run = engine.generate(
        prompts[2], drafters["close"], 3, max_new_tokens=MAX_NEW, should_stop=should_stop
    )
    output = run.collect()
    # Asked before the prefill's token and before each step: the prefill's token, 2 steps.
    assert run.stats.steps == 2 and run.stats.finish_reason == "cancelled"
    assert output == references[2][: len(output)]

    early = engine.generate(prompts[2], drafters["close"], 3, max_new_tokens=MAX_NEW)
    assert len(next(early).token_ids) == 1  # the prefill's token
    next(early)
    early.close()
    assert early.stats.finish_reason == "cancelled" and early.stats.steps == 1
    # Closed before its first event (its generator never started): cancelled too, not "".
    never = engine.generate(prompts[2], drafters["close"], 3, max_new_tokens=MAX_NEW)
    never.close()
    assert never.stats.finish_reason == "cancelled" and never.stats.steps == 0
    # Closed on its last event, as a consumer that stops at the end does: it had ended
    # ("cancelled" before, and "" while the consumer held that event).
    whole = engine.generate(prompts[2], drafters["close"], 3, max_new_tokens=4)
    emitted = 0
    for event in whole:
        emitted += len(event.token_ids)
        if emitted >= 4:
            break  # holding the last event; the run not exhausted
    assert emitted == 4
    assert (whole.stats.finish_reason, whole.stats.generated_tokens) == ("length", 4)
    whole.close()
    assert whole.stats.finish_reason == "length"


def test_a_seed_reproduces_a_sampled_generation(
    engine: SpeculativeEngine, drafters: dict[str, Drafter], prompts: list[list[int]]
) -> None:
    def sampled(seed: int, kind: str) -> list[int]:
        config = SamplingConfig(do_sample=True, temperature=1.5, top_p=0.95, seed=seed)
        run = engine.generate(prompts[4], drafters[kind], 4, max_new_tokens=24, sampling=config)
        return run.collect()

    for kind in ("close", "ngram"):
        assert sampled(11, kind) == sampled(11, kind)
        assert sampled(11, kind) != sampled(12, kind)


def test_sampled_first_tokens_follow_the_target_distribution(
    engine: SpeculativeEngine, drafters: dict[str, Drafter], target: LoadedModel
) -> None:
    prompt = [5, 9, 17, 33]
    config = SamplingConfig(do_sample=True, temperature=2.0)
    with torch.inference_mode():
        logits = target.model(torch.tensor([prompt])).logits[0, -1]
    expected = torch.softmax(logits / 2.0, dim=-1)
    counts = torch.zeros_like(expected)
    runs = 800
    for seed in range(runs):
        sampling = SamplingConfig(do_sample=True, temperature=2.0, seed=seed)
        run = engine.generate(prompt, drafters["far"], 3, max_new_tokens=4, sampling=sampling)
        counts[next(run).token_ids[0]] += 1
    assert config.temperature == 2.0
    empirical = counts / runs
    assert 0.5 * float((empirical - expected).abs().sum()) < 0.12


@pytest.mark.parametrize("kind", ["none", "ngram", "close", "far"])
@pytest.mark.parametrize("sampled", [False, True])
def test_logprobs_are_the_targets_own_whatever_the_drafter(
    kind: str,
    sampled: bool,
    engine: SpeculativeEngine,
    drafters: dict[str, Drafter],
    target: LoadedModel,
    prompts: list[list[int]],
) -> None:
    """Each emitted token's logprob (and its top alternatives) is the target's raw
    log-softmax at that position, as one forward pass over prompt + output gives it:
    the same whether a token was an accepted draft, a correction, a bonus token or a
    resample, and for every k."""
    prompt = prompts[3]
    sampling = (
        SamplingConfig(do_sample=True, temperature=0.7, top_k=20, seed=11)
        if sampled
        else SamplingConfig()
    )
    run = engine.generate(
        prompt, drafters[kind], 4, max_new_tokens=20, sampling=sampling, logprobs=3
    )
    events = list(run)
    scored = [lp for event in events for lp in event.logprobs or []]
    assert len(scored) == len(run.output_ids) == 20
    with torch.inference_mode():
        logits = target.model(torch.tensor([prompt + run.output_ids])).logits[0].float()
    expected = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)  # row i scores output i
    got = torch.tensor([lp.logprob for lp in scored])
    want = expected.gather(1, torch.tensor(run.output_ids).unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    top = expected.topk(3, dim=-1).values
    for i, lp in enumerate(scored):  # the 3 most likely, each with its own logprob
        ids, values = [t for t, _ in lp.top], torch.tensor([v for _, v in lp.top])
        torch.testing.assert_close(values, top[i], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(values, expected[i, ids], rtol=1e-4, atol=1e-4)
    if not sampled:  # greedy: the emitted token is the most likely one
        assert all(lp.top[0][0] == t for lp, t in zip(scored, run.output_ids, strict=True))


def test_logprobs_are_off_by_default(
    engine: SpeculativeEngine, drafters: dict[str, Drafter], prompts: list[list[int]]
) -> None:
    run = engine.generate(prompts[0], drafters["close"], 4, max_new_tokens=6)
    assert all(event.logprobs is None for event in run)
    only = engine.generate(prompts[0], drafters["close"], 4, max_new_tokens=6, logprobs=0)
    scored = [event.logprobs for event in only]
    assert all(lp is not None for lp in scored)  # each event scored, with no alternatives
    assert all(lp.top == () for event in scored for lp in event or ())
    with pytest.raises(ValueError, match="logprobs"):
        engine.generate(prompts[0], drafters["close"], 4, max_new_tokens=6, logprobs=-1)


@pytest.mark.parametrize("rows", [256, 3])
def test_prompt_logprobs_are_the_targets_own_and_change_nothing_else(
    rows: int,
    engine: SpeculativeEngine,
    drafters: dict[str, Drafter],
    target: LoadedModel,
    prompts: list[list[int]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The prefill scores prompt tokens 1.. as one forward over the prompt does (several
    LM-head calls of ``PROMPT_SCORE_ROWS`` positions give the same), the output is the
    same as without, and a run of no new tokens still scores its prompt."""
    import drafters.engine as engine_module

    monkeypatch.setattr(engine_module, "PROMPT_SCORE_ROWS", rows)
    prompt = prompts[5]
    assert len(prompt) > 2 * 3
    plain = engine.generate(prompt, drafters["close"], 4, max_new_tokens=12)
    scoring = engine.generate(prompt, drafters["close"], 4, max_new_tokens=12, prompt_logprobs=2)
    assert scoring.prompt_logprobs == []  # filled in by the prefill, on the first event
    assert scoring.collect() == plain.collect()
    scored = scoring.prompt_logprobs
    assert scored is not None and len(scored) == len(prompt) - 1
    with torch.inference_mode():
        logits = target.model(torch.tensor([prompt])).logits[0].float()
    expected = torch.log_softmax(logits[:-1], dim=-1)  # row i scores prompt token i + 1
    want = expected.gather(1, torch.tensor(prompt[1:]).unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(torch.tensor([lp.logprob for lp in scored]), want)
    top = expected.topk(2, dim=-1)
    assert [[t for t, _ in lp.top] for lp in scored] == top.indices.tolist()
    ranks = (expected > want.unsqueeze(1)).sum(dim=-1) + 1  # 1: the most likely token
    assert [lp.rank for lp in scored] == ranks.tolist()
    nothing = engine.generate(prompt, drafters["none"], 0, max_new_tokens=0, prompt_logprobs=0)
    assert list(nothing) == [] and nothing.output_ids == []
    assert [lp.logprob for lp in nothing.prompt_logprobs or []] == pytest.approx(
        want.tolist(), abs=1e-4
    )
    assert all(lp.top == () for lp in nothing.prompt_logprobs or [])
    with pytest.raises(ValueError, match="prompt_logprobs"):
        engine.generate(prompt, drafters["none"], 0, max_new_tokens=1, prompt_logprobs=-1)


def test_a_sliding_window_target_stays_lossless(tmp_path_factory: pytest.TempPathFactory) -> None:
    """A multi-token verify step over a cache got a plain causal mask built here, which
    attends past a sliding window: a windowed target's speculative output left its own
    greedy output once the context outgrew the window."""
    from transformers import Qwen2ForCausalLM

    from .conftest import save_model, tiny_config

    config = tiny_config()
    config.use_sliding_window, config.sliding_window, config.max_window_layers = True, 4, 0
    config.layer_types = ["sliding_attention"] * config.num_hidden_layers
    torch.manual_seed(3)
    model = Qwen2ForCausalLM(config).eval()
    windowed = load_model(save_model(model, tmp_path_factory.mktemp("windowed")))
    engine = SpeculativeEngine(windowed)
    drafter = create_drafter("ngram", name="ngram", target=windowed)
    accepted = 0
    for prompt in make_prompts(6, seed=5):
        reference = reference_greedy(windowed, engine, prompt, MAX_NEW)
        run = engine.generate(prompt, drafter, 4, max_new_tokens=MAX_NEW)
        assert_same_or_near_tie(windowed, prompt, run.collect(), reference)
        accepted += run.stats.accepted
    assert accepted > 0  # multi-token steps were verified


def test_steps_that_drafted_nothing_are_timed_apart() -> None:
    """A step without drafts (a lookup that found nothing, a last step capped to no draft)
    is a one-position target forward: its verify time is kept apart, so the policy can
    price plain decoding by it (``plain_verify_time_s``, ``plain_steps``)."""
    stats = GenerationStats()
    stats.observe_step(requested=4, drafted=4, accepted=2, draft_time_s=0.002, verify_time_s=0.009)
    assert (stats.plain_steps, stats.plain_verify_time_s) == (0, 0.0)
    stats.observe_step(requested=4, drafted=0, accepted=0, draft_time_s=0.0001, verify_time_s=0.006)
    stats.observe_step(requested=0, drafted=0, accepted=0, draft_time_s=0.0, verify_time_s=0.004)
    assert stats.plain_steps == 2 and stats.plain_verify_time_s == pytest.approx(0.01)
    assert stats.verify_time_s == pytest.approx(0.019)


def test_a_model_drafters_first_forward_is_timed_apart_from_its_further_tokens(
    engine: SpeculativeEngine, drafters: dict[str, Drafter], prompts: list[list[int]]
) -> None:
    """A model drafter's step pays its first forward (the catch-up on the verified
    tokens) once and a cheaper forward per further token: every drafting step's lead is
    timed (``lead_steps``, ``lead_time_s``) so the policy can price a draft of k tokens
    as lead + (k - 1) further ones. A lookup (the n-gram drafter) times no lead."""
    run = engine.generate(prompts[0], drafters["close"], 4, max_new_tokens=MAX_NEW)
    run.collect()
    stats = run.stats
    drafting = sum(1 for d in stats.drafted_per_step if d > 0)
    assert drafting > 0 and stats.lead_steps == drafting
    assert stats.further_forwards == stats.drafted - drafting  # one per further token
    assert stats.lead_time_s > 0 and stats.further_time_s > 0
    # All of the draft time but that of a last step capped to no draft (microseconds).
    assert stats.lead_time_s + stats.further_time_s <= stats.draft_time_s
    assert stats.lead_time_s + stats.further_time_s == pytest.approx(stats.draft_time_s, rel=0.02)
    lookup = engine.generate(prompts[0], drafters["ngram"], 4, max_new_tokens=MAX_NEW)
    lookup.collect()
    assert (lookup.stats.lead_steps, lookup.stats.further_forwards) == (0, 0)
    assert lookup.stats.lead_time_s == lookup.stats.further_time_s == 0.0


def test_a_drafter_whose_forward_overflows_ends_its_draft_instead_of_failing_the_request(
    engine: SpeculativeEngine, target: LoadedModel, tiny_models: TinyModels
) -> None:
    """Finite weights whose forward overflows (its final norm at 3e38): every sampled
    draft row was NaN and ``torch.multinomial`` failed the request (INTERNAL over gRPC).
    Now the draft ends before such a row, the target verifies nothing, and the output
    is plain sampled decoding's with the same seed."""
    overflowing = create_drafter("model", name="over", target=target, path=tiny_models.close_dir)
    assert isinstance(overflowing, ModelDrafter)
    with torch.no_grad():
        overflowing.model.model.norm.weight.fill_(3e38)
    plain = create_drafter("none", name="none", target=target)
    for seed in range(3):
        sampling = SamplingConfig(do_sample=True, temperature=1.2, seed=seed)
        run = engine.generate([5, 9, 17, 33], overflowing, 3, max_new_tokens=12, sampling=sampling)
        tokens = run.collect()
        assert run.stats.drafted == 0 and run.stats.generated_tokens == len(tokens)
        alone = engine.generate([5, 9, 17, 33], plain, 0, max_new_tokens=12, sampling=sampling)
        assert tokens == alone.collect()


def test_a_checkpoints_sampling_defaults_are_named_as_not_applied() -> None:
    """A Qwen2.5 Instruct generation_config.json (repetition_penalty 1.1, sampling at
    0.7) made transformers' generate differ from the sidecar's greedy output, which
    applies its EOS ids only; the start now names what it does not apply."""
    from types import SimpleNamespace

    from transformers import GenerationConfig

    from drafters.engine import unapplied_generation_defaults

    instruct = GenerationConfig(
        do_sample=True,
        temperature=0.7,
        top_p=0.8,
        top_k=20,
        repetition_penalty=1.05,
        eos_token_id=[151645, 151643],
    )
    target = SimpleNamespace(model=SimpleNamespace(generation_config=instruct))
    assert unapplied_generation_defaults(target) == {  # type: ignore[arg-type]
        "do_sample": True,
        "temperature": 0.7,
        "top_p": 0.8,
        "top_k": 20,
        "repetition_penalty": 1.05,
    }
    plain = SimpleNamespace(model=SimpleNamespace(generation_config=GenerationConfig()))
    assert unapplied_generation_defaults(plain) == {}  # type: ignore[arg-type]
