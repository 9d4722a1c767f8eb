"""Prompt text as the classifier reads it: a conversation that a serving stack rendered in
Qwen2.5's chat format reads as its messages; any other text as it is."""

from __future__ import annotations

import jinja2
import pytest

from benchmarks.world.tokenizer import QWEN25_CHAT_TEMPLATE
from classifiers.chat import QWEN_DEFAULT_SYSTEM
from classifiers.text import classifier_text, labeled_prompt_from_record, prompt_from_messages

CHATS = [
    [{"role": "user", "content": "Translate to French: The library opens at nine."}],
    # Qwen's default system prompt given as a message: read as when the template adds it.
    [
        {"role": "system", "content": QWEN_DEFAULT_SYSTEM},
        {"role": "user", "content": "Solve 2 + 2."},
    ],
    [
        {"role": "system", "content": "Answer from the document."},
        {"role": "user", "content": "Document: Returns within 30 days.\nQuestion: How long?"},
    ],
    [
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "an answer"},
        {"role": "user", "content": "What is 17 * 23 + 4?\n\nThink step by step."},
    ],
]


def rendered(messages: list[dict[str, str]]) -> str:
    """The text a serving stack sends: Qwen2.5's template with the generation prompt."""
    return jinja2.Template(QWEN25_CHAT_TEMPLATE).render(
        messages=messages, add_generation_prompt=True
    )


@pytest.mark.parametrize("messages", CHATS)
def test_a_rendered_conversation_reads_as_its_messages(messages: list[dict[str, str]]) -> None:
    assert classifier_text(rendered(messages)) == prompt_from_messages(messages)


@pytest.mark.parametrize(
    "text",
    [
        "Translate to French: The library opens at nine.",
        "",
        "<|im_start|>assistant\nno user turn here<|im_end|>\n",
        "a text about the <|im_end|> marker",
    ],
)
def test_other_texts_are_read_as_they_are(text: str) -> None:
    assert classifier_text(text) == text


def test_the_default_system_prompt_given_as_a_message_is_left_out() -> None:
    """Messages [default system, user] were read with the system prompt, their rendered
    text without it: one chat routed two ways."""
    chat = [{"role": "system", "content": QWEN_DEFAULT_SYSTEM}, {"role": "user", "content": "Hi"}]
    assert prompt_from_messages(chat) == "Hi" == classifier_text(rendered(chat))


def test_the_two_characters_python_lower_cases_into_ascii_are_spelt_in_ascii() -> None:
    """Python lower-cases U+0130 (Turkish dotted capital I) and U+212A (Kelvin sign) into
    ASCII letters, which form tokens for scikit-learn; ONNX's C-locale lower-casing leaves
    them, so the graph dropped those tokens ("İ think" scored as "think")."""
    assert classifier_text("\u0130 think \u212aey") == "I think Key"
    chat = [{"role": "user", "content": "\u0130stanbul"}]
    assert classifier_text(rendered(chat)) == prompt_from_messages(chat) == "Istanbul"


def test_a_labeled_text_record_is_read_as_served_prompts_are() -> None:
    record = {"text": rendered(CHATS[1]), "task": "rag"}
    assert labeled_prompt_from_record(record).text == prompt_from_messages(CHATS[1])
