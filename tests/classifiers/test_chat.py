"""Qwen2.5's chat format: rendering equals the built-in tokenizer's chat template, and
parsing reads a rendered conversation back into its turns."""

from __future__ import annotations

from typing import Any

import pytest

from benchmarks.world.tokenizer import QWEN25_CHAT_TEMPLATE
from classifiers.chat import (
    ENDOFTEXT,
    GENERATION_PROMPT,
    IM_END,
    IM_START,
    QWEN_DEFAULT_SYSTEM,
    parse_chat,
    render_chat,
)

CHATS = [
    [{"role": "user", "content": "Translate to French: The library opens at nine."}],
    [
        {"role": "system", "content": "Answer from the document."},
        {"role": "user", "content": "Document: Returns within 30 days.\nQuestion: How long?"},
    ],
    [
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "an answer\n\nin two paragraphs"},
        {"role": "user", "content": "What is 17 * 23 + 4?\n\nThink step by step."},
    ],
    [
        {"role": "system", "content": ""},
        {"role": "user", "content": "an empty system prompt is still the conversation's"},
    ],
]


@pytest.fixture(scope="module")
def templated() -> Any:
    """A tokenizer carrying the built-in world's chat template (Qwen2.5's)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {ENDOFTEXT: 0, IM_START: 1, IM_END: 2}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=ENDOFTEXT))
    return PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token=IM_END, chat_template=QWEN25_CHAT_TEMPLATE
    )


@pytest.mark.parametrize("messages", CHATS)
def test_render_equals_the_chat_template(templated: Any, messages: list[dict[str, str]]) -> None:
    expected = templated.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert render_chat(messages) == expected
    assert render_chat(messages).endswith(GENERATION_PROMPT)


@pytest.mark.parametrize("messages", CHATS)
def test_a_response_renders_as_the_closed_assistant_turn(
    templated: Any, messages: list[dict[str, str]]
) -> None:
    with_reply = [*messages, {"role": "assistant", "content": "The reply.\nTwo lines."}]
    expected = templated.apply_chat_template(with_reply, tokenize=False)
    assert render_chat(messages, "The reply.\nTwo lines.") == expected


@pytest.mark.parametrize("messages", CHATS)
def test_parse_reads_a_rendered_conversation_back(messages: list[dict[str, str]]) -> None:
    default = [] if messages[0]["role"] == "system" else [QWEN_DEFAULT_SYSTEM]
    system = [{"role": "system", "content": content} for content in default]
    # The template's default system prompt is a turn of the text; the generation prompt is not.
    assert parse_chat(render_chat(messages)) == [*system, *messages]
    assert parse_chat(render_chat(messages, "ok")) == [
        *system,
        *messages,
        {"role": "assistant", "content": "ok"},
    ]


def test_parse_edges() -> None:
    assert parse_chat("plain text, no turns") == []
    assert parse_chat("") == []
    # Text before the first turn belongs to none; a last turn left open runs to the end.
    assert parse_chat(f"preamble{IM_START}user\nhello{IM_END}\n{IM_START}assistant\npart") == [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "part"},
    ]


@pytest.mark.parametrize(
    "messages", [*CHATS, [*CHATS[2], {"role": "assistant", "content": "Step 1: 17 * 23 is"}]]
)
def test_a_rendering_without_the_opening_or_continuing_equals_the_template(
    templated: Any, messages: list[dict[str, str]]
) -> None:
    """vLLM's add_generation_prompt false and continue_final_message, as transformers
    renders them with the same template."""
    plain = templated.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert render_chat(messages, generation_prompt=False) == plain
    continued = templated.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=False, continue_final_message=True
    )
    assert render_chat(messages, generation_prompt=False, continue_final=True) == continued
    assert continued.endswith(messages[-1]["content"])
