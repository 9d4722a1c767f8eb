"""The one incremental detokenizer: per-token text, whole characters, no special tokens."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from drafters.detokenize import (
    IncrementalDetokenizer,
    find_stop,
    push_until_stop,
    special_token_ids,
)

IM_END = "<|im_end|>"


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """One token per byte (GPT-2's byte alphabet), so a non-ASCII character spans tokens,
    plus Qwen's end-of-turn token as a special token."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    core = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token=IM_END)


def test_each_token_releases_the_characters_it_completes() -> None:
    tokenizer = byte_tokenizer()
    ids = tokenizer("aé€b", add_special_tokens=False)["input_ids"]
    ids.append(tokenizer.convert_tokens_to_ids(IM_END))
    assert len(ids) == 1 + 2 + 3 + 1 + 1
    detokenizer = IncrementalDetokenizer(tokenizer)
    texts = [detokenizer.push(token) for token in ids]
    # A character is released by the token of its last byte; the special token adds nothing.
    assert texts == ["a", "", "é", "", "", "€", "b", ""]
    assert "".join(texts) == detokenizer.text == "aé€b"
    assert detokenizer.text == tokenizer.decode(ids, skip_special_tokens=True)
    assert [detokenizer.is_special(t) for t in ids] == [False] * 7 + [True]
    assert detokenizer.flush() == ""


def test_flush_releases_an_incomplete_character() -> None:
    tokenizer = byte_tokenizer()
    ids = tokenizer("x€", add_special_tokens=False)["input_ids"][:-1]  # € cut after 2 bytes
    detokenizer = IncrementalDetokenizer(tokenizer)
    assert [detokenizer.push(t) for t in ids] == ["x", "", ""]
    rest = detokenizer.flush()
    assert rest and "\ufffd" in rest
    assert detokenizer.text == tokenizer.decode(ids, skip_special_tokens=True)


def test_special_ids_include_added_tokens_marked_special() -> None:
    tokenizer = byte_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    tokenizer.add_tokens(["<plain>"])  # an added token that is not special
    ids = special_token_ids(tokenizer)
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") in ids
    assert tokenizer.convert_tokens_to_ids(IM_END) in ids
    assert tokenizer.convert_tokens_to_ids("<plain>") not in ids


def test_find_stop_finds_the_earliest_stop_ending_after_the_checked_text() -> None:
    text = "one two three"
    assert find_stop(text, ["two", "one"], 0) == 3
    assert find_stop(text, ["two", "three"], 4) == 7
    assert find_stop(text, ["one"], 8) is None
    assert find_stop(text, ["", "zzz"], 0) is None


def test_the_first_unchecked_tokens_stop_nothing() -> None:
    """``min_tokens`` as vLLM reads it: a stop sequence or stop token among the first
    tokens does not end the generation; one completed by a later token does, the text
    before it included in the search."""
    tokenizer = byte_tokenizer()
    ids = tokenizer("ab.cd.", add_special_tokens=False)["input_ids"]
    end = tokenizer.convert_tokens_to_ids(IM_END)
    texts, stopped = push_until_stop(IncrementalDetokenizer(tokenizer), ids, {end}, ["."])
    assert "".join(texts) == "ab." and stopped == "stop_sequence"
    texts, stopped = push_until_stop(
        IncrementalDetokenizer(tokenizer), ids, {end}, ["."], unchecked=3
    )
    assert "".join(texts) == "ab.cd." and stopped == "stop_sequence"
    texts, stopped = push_until_stop(
        IncrementalDetokenizer(tokenizer), [*ids[:2], end, *ids[2:]], {end}, ["b.c"], unchecked=3
    )
    assert "".join(texts) == "ab.c" and stopped == "stop_sequence"
