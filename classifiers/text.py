"""Prompt text: the tokenisation shared by training and ONNX, chat flattening (messages, or
a text in Qwen's chat format, :mod:`classifiers.chat`), labeled data."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from classifiers.chat import IM_START, QWEN_DEFAULT_SYSTEM, parse_chat

# One explicit pattern for scikit-learn and for the ONNX Tokenizer: with sklearn's default
# (?u)\b\w\w+\b the converted graph tokenises differently and probabilities drift.
# ASCII words plus single ASCII punctuation marks ("|", "?", "=", "(" carry task signal:
# toolbars, questions, equations, code). Nothing outside ASCII ever forms a token, so
# Python's Unicode lower() and ONNX's C-locale lower-casing cannot disagree on a token,
# except for the two characters Python lower-cases into ASCII letters (Turkish dotted
# capital I, the Kelvin sign), which ONNX leaves as they are: classifier_text spells them
# as the ASCII capitals first (_ASCII_LOWER), for training and serving alike.
TOKEN_PATTERN = r"[a-zA-Z0-9_]+|[!-/:-@\[-`{-~]"
_ASCII_LOWER = str.maketrans({"\u0130": "I", "\u212a": "K"})


@dataclass(frozen=True)
class LabeledPrompt:
    """A prompt text and its task (``None`` when unlabeled)."""

    text: str
    task: str | None


def prompt_from_messages(messages: Sequence[Mapping[str, str]]) -> str:
    """The text the classifier sees for a chat: the system prompt plus the last user turn.
    Qwen's default system prompt, which its template adds when there is none, is left out
    whether it comes as a message or in a rendered text, so both route alike."""
    system = [
        m.get("content", "")
        for m in messages
        if m.get("role") == "system" and m.get("content") != QWEN_DEFAULT_SYSTEM
    ]
    users = [m.get("content", "") for m in messages if m.get("role") == "user"]
    return "\n".join([*system[:1], *users[-1:]]).translate(_ASCII_LOWER)


def classifier_text(text: str) -> str:
    """What the classifier reads for a prompt given as one text. A conversation rendered
    in Qwen's chat format (how a serving stack sends a templated prompt) is read as its
    messages, like a chat given as messages (:func:`prompt_from_messages`; the default
    system prompt that the template adds is left out, as it is not one of the messages).
    Any other text, or one without a user turn, is read as it is."""
    if IM_START not in text:
        return text.translate(_ASCII_LOWER)
    messages = parse_chat(text)
    if not any(m["role"] == "user" for m in messages):
        return text.translate(_ASCII_LOWER)
    return prompt_from_messages(messages)


def labeled_prompt_from_record(record: Mapping[str, object]) -> LabeledPrompt:
    """Read one JSON record: ``{"text", "task"?}`` or a corpus Example ``{"messages", "task"}``
    (the text as the classifier reads it: :func:`classifier_text`)."""
    if not isinstance(record, Mapping):  # a list or a string: .get failed with a traceback
        raise ValueError("each line must be a JSON object: {text, task?} or {messages, task?}")
    task = record.get("task")
    if "text" in record:
        text = record["text"]
    elif "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, Mapping) for m in messages):
            raise ValueError("'messages' must be a list of {role, content} objects")
        text = prompt_from_messages(messages)
    else:
        raise ValueError("each record needs 'text' or 'messages'")
    if not isinstance(text, str):
        raise ValueError("'text' must be a string")
    text = classifier_text(text)  # as the classifier will read it when serving
    if task is not None and not isinstance(task, str):
        raise ValueError("'task' must be a string when present")
    return LabeledPrompt(text=text, task=task)


class DataFileError(ValueError):
    """A prompt file that cannot be read as JSON lines of prompts; the message names the
    file and, where there is one, the line."""


def read_labeled_jsonl(path: Path) -> list[LabeledPrompt]:
    """Load labeled (or unlabeled) prompts from a JSON-lines file (``DataFileError``)."""
    prompts: list[LabeledPrompt] = []
    try:
        with path.open(encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    prompts.append(labeled_prompt_from_record(json.loads(line)))
                except (ValueError, TypeError, KeyError) as error:  # JSON's errors included
                    raise DataFileError(f"{path}:{line_number}: {error}") from error
    except UnicodeDecodeError as error:
        raise DataFileError(f"{path}: not UTF-8 text ({error.reason})") from error
    return prompts


def training_data_hash(prompts: Iterable[LabeledPrompt], *extra: object) -> str:
    """SHA-256 over the prompts (text and task, in order) and any extra settings."""
    digest = hashlib.sha256()
    for prompt in prompts:
        digest.update(json.dumps([prompt.text, prompt.task], ensure_ascii=False).encode())
        digest.update(b"\n")
    digest.update(json.dumps([str(item) for item in extra]).encode())
    return digest.hexdigest()
