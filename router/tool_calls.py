"""Tool calls in Qwen2.5's (Hermes) format, for the OpenAI front's chat completions.

Qwen2.5's chat template renders a request's ``tools`` into the system turn and asks the
model to answer a call as ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
blocks (vLLM's ``hermes`` tool parser reads the same). The text before the first block is
the message's content; each block that parses is one of its ``tool_calls``, with the
arguments as a JSON string, as OpenAI sends them. Text that merely looks like a call (a
block that is not JSON with a name) stays content, as vLLM leaves it.
"""

from __future__ import annotations

import contextlib
import json
import re
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

OPEN = "<tool_call>"
CLOSE = "</tool_call>"
_BLOCK = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*" + re.escape(CLOSE), re.DOTALL)


def parse_tool_calls(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, tool_calls) of a generated text: no calls, the whole text as content."""
    start = text.find(OPEN)
    if start < 0:
        return text, []
    calls = []
    for block in _BLOCK.findall(text[start:]):
        call = _call(block)
        if call is None:
            return text, []
        calls.append(call)
    if not calls:
        return text, []
    content = text[:start].strip()
    return content or None, calls


def _call(block: str) -> dict[str, Any] | None:
    try:
        parsed = json.loads(block)
    except json.JSONDecodeError:
        return None
    if not isinstance(parsed, dict) or not isinstance(parsed.get("name"), str):
        return None
    arguments = parsed.get("arguments", {})
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {
            "name": parsed["name"],
            "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments),
        },
    }


def templated_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``messages`` as the chat template reads them: an assistant's earlier tool calls carry
    their arguments as JSON text (OpenAI's form), which the template would quote again, so
    they are parsed back into objects (as vLLM does before templating)."""
    rendered = []
    for message in messages:
        calls = message.get("tool_calls")
        if not calls:
            rendered.append(dict(message))
            continue
        rendered.append({**message, "tool_calls": [_with_parsed_arguments(c) for c in calls]})
    return rendered


def _with_parsed_arguments(call: Mapping[str, Any]) -> dict[str, Any]:
    function = dict(call.get("function") or {})
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        with contextlib.suppress(json.JSONDecodeError):  # else rendered as the text it is
            function["arguments"] = json.loads(arguments)
    return {**call, "function": function}


class ToolCallHoldback:
    """A stream's content without its tool calls: text is released until ``<tool_call>``
    begins (the characters that could be its start are held until they are not), and
    everything from there is kept for :meth:`finish` to parse."""

    def __init__(self) -> None:
        self._pending = ""
        self._calling = False

    def feed(self, text: str) -> str:
        """The content that can be sent now."""
        self._pending += text
        if self._calling:
            return ""
        start = self._pending.find(OPEN)
        if start >= 0:
            self._calling = True
            released, self._pending = self._pending[:start], self._pending[start:]
            return released
        keep = _partial_open(self._pending)
        cut = len(self._pending) - keep
        released, self._pending = self._pending[:cut], self._pending[cut:]
        return released

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        """(content still held, tool calls) at the end of the text: the calls parsed from
        the held text, or none and that text as content when it holds no valid call."""
        held, self._pending = self._pending, ""
        if not self._calling:
            return held, []
        _, calls = parse_tool_calls(held)
        return ("", calls) if calls else (held, [])


def _partial_open(text: str) -> int:
    """How many characters at the end of ``text`` could begin ``<tool_call>``."""
    for size in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if OPEN.startswith(text[-size:]):
            return size
    return 0
