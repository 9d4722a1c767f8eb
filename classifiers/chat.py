"""Qwen2.5's chat format (ChatML): its markers, a conversation rendered into one text, and
a text read back into its turns.

A turn is ``<|im_start|>{role}\\n{content}<|im_end|>\\n``. Rendering follows Qwen2.5's
chat template for conversations without tools: the default system prompt first when the
conversation has none, then each turn, then the generation prompt that opens the
assistant's reply. The serving side, the classifier and the built-in world's tokenizer all
use these definitions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
# Qwen2.5's end-of-text token: the pad token, and an end of generation besides IM_END.
ENDOFTEXT = "<|endoftext|>"
# The system prompt Qwen2.5's chat template adds to a conversation that has none.
QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
# What the template appends with ``add_generation_prompt=True``: the reply's open turn.
GENERATION_PROMPT = f"{IM_START}assistant\n"


def _turn(role: str, content: str) -> str:
    """One closed turn."""
    return f"{IM_START}{role}\n{content}{IM_END}\n"


def render_chat(
    messages: Sequence[Mapping[str, str]],
    response: str | None = None,
    *,
    generation_prompt: bool = True,
    continue_final: bool = False,
) -> str:
    """``messages`` as the chat template renders them with the generation prompt; with
    ``response``, the assistant's reply follows, closed (a training example's text).
    ``generation_prompt`` False leaves the assistant's opening out; ``continue_final``
    (without it) leaves the last message open, to be continued (vLLM's
    ``continue_final_message``).

    Equal to ``tokenizer.apply_chat_template(messages, tokenize=False,
    add_generation_prompt=..., continue_final_message=...)`` for a Qwen2.5 tokenizer (a
    missing content renders empty).
    """
    turns = [_turn(m["role"], m.get("content", "")) for m in messages]
    if not messages or messages[0].get("role") != "system":
        turns.insert(0, _turn("system", QWEN_DEFAULT_SYSTEM))
    if continue_final and messages:
        turns[-1] = turns[-1].removesuffix(f"{IM_END}\n")
    elif generation_prompt:
        turns.append(GENERATION_PROMPT)
    if response is not None:
        turns.append(f"{response}{IM_END}\n")
    return "".join(turns)


def parse_chat(text: str) -> list[dict[str, str]]:
    """The turns of a text in the chat format, in order, as ``{"role", "content"}``: the
    inverse of :func:`render_chat` (the default system prompt, when rendered, is one of
    them). A trailing generation prompt is not a turn; text before the first turn belongs
    to none; a last turn left open runs to the end. Empty when there are no turns."""
    messages = []
    for turn in text.removesuffix(GENERATION_PROMPT).split(IM_START)[1:]:
        role, _, content = turn.partition("\n")
        messages.append({"role": role.strip(), "content": content.split(IM_END, 1)[0]})
    return messages
