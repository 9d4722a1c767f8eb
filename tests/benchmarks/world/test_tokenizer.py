"""The world's tokenizer: byte-level BPE with Qwen2.5's special tokens and chat template."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from benchmarks.world.corpus import build_corpus
from benchmarks.world.tokenizer import SPECIAL_TOKENS, save_tokenizer, train_tokenizer
from classifiers.chat import IM_END, IM_START, render_chat


@pytest.fixture(scope="module")
def saved_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from transformers import AutoTokenizer

    corpus = build_corpus(seed=0, scale="tiny")
    trained = train_tokenizer((render_chat(e.messages, e.response) for e in corpus.train), 600)
    directory: Path = tmp_path_factory.mktemp("tokenizer")
    save_tokenizer(trained, directory)
    return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)


@pytest.mark.parametrize(
    "text",
    [
        "Hello, how are you doing today?",
        "def add(a, b):\n    return a + b\n",
        "Népalais | Erreur du serveur | dim",
        "17 - 7 = 10. The answer is 10.",
        "emoji 🙂 and ünïcödé  double  spaces\ttab",
    ],
)
def test_round_trips_text(saved_tokenizer: Any, text: str) -> None:
    ids = saved_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert saved_tokenizer.decode(ids) == text


def test_special_tokens_are_single_ids(saved_tokenizer: Any) -> None:
    ids = [saved_tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    assert len(set(ids)) == 3
    assert saved_tokenizer.eos_token == IM_END
    encoded = saved_tokenizer(f"{IM_START}user\nhi{IM_END}", add_special_tokens=False)
    assert encoded["input_ids"][0] == saved_tokenizer.convert_tokens_to_ids(IM_START)
    assert encoded["input_ids"][-1] == saved_tokenizer.convert_tokens_to_ids(IM_END)


def test_digits_are_split_like_qwen(saved_tokenizer: Any) -> None:
    assert saved_tokenizer.tokenize("12345") == ["1", "2", "3", "4", "5"]


def test_applies_the_qwen25_chat_template(saved_tokenizer: Any) -> None:
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    text = saved_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
        "assistant.<|im_end|>\n<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    with_system = [{"role": "system", "content": "Be brief."}, *messages]
    text = saved_tokenizer.apply_chat_template(with_system, tokenize=False)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    assert text == render_chat(with_system)[: -len("<|im_start|>assistant\n")]
