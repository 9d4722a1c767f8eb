"""Tool calls in Qwen2.5's (Hermes) format, for the OpenAI front's chat completions.

Qwen2.5's chat template renders a request's ``tools`` into the system turn and asks the
model to answer a call as ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
blocks (vLLM's ``hermes`` tool parser reads the same). The text before the first block is
the message's content; each block that parses is one of its ``tool_calls``, with the
arguments as a JSON string, as OpenAI sends them. Text that merely looks like a call (a
block that is not JSON with a name) stays content, as vLLM leaves it.

``tool_choice`` "required" or a named function forces calls (:class:`ForcedToolChoice`):
the output is held to a JSON schema built from the tools, as vLLM builds it, and read
back as calls.
"""

from __future__ import annotations

import contextlib
import json
import re
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from router.errors import InvalidFieldError

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
    text = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return _function_call(parsed["name"], text)


def _function_call(name: str, arguments: str) -> dict[str, Any]:
    """One of OpenAI's ``tool_calls``: the arguments as JSON text."""
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }


# OpenAI's rule for a function's name (a-z, A-Z, 0-9, underscores and dashes, at most 64).
FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def check_function(function: Any, where: str) -> None:
    """A function tool as OpenAI and vLLM take it (INVALID_ARGUMENT naming the field):
    an object with a ``name`` of up to 64 letters, digits, underscores and dashes, a
    string ``description`` and an object ``parameters`` (a JSON schema) where given. A
    tool without them was rendered into the prompt as it was, a schema of ``5`` too."""
    if not isinstance(function, Mapping):
        raise InvalidFieldError(where, "must be an object with the function's name")
    name = function.get("name")
    if not isinstance(name, str) or not FUNCTION_NAME.fullmatch(name):
        raise InvalidFieldError(
            f"{where}.name", f"must be 1 to 64 letters, digits, _ or -, got {name!r}"
        )
    if "description" in function and not isinstance(function["description"], str | None):
        raise InvalidFieldError(f"{where}.description", "must be a string")
    if "parameters" in function and not isinstance(function["parameters"], Mapping | None):
        raise InvalidFieldError(f"{where}.parameters", "must be a JSON schema object")


def check_chat_tools(tools: Sequence[Any] | None) -> None:
    """Chat's ``tools``: function tools only (as vLLM serves them), each checked."""
    for index, tool in enumerate(tools or ()):
        if not isinstance(tool, Mapping) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, Mapping) else type(tool).__name__
            raise InvalidFieldError(
                f"tools[{index}].type", f"only function tools are served, got {kind!r}"
            )
        check_function(tool.get("function"), f"tools[{index}].function")


class ForcedToolChoice:
    """``tool_choice`` "required" (``name`` None) or a named function, as vLLM reads them:
    the output is held to :meth:`schema` and read back as calls (:meth:`read`). Named: the
    function's arguments, the whole output one call (finish reason the generation's,
    "stop", as OpenAI answers). Required: a JSON list of ``{"name", "parameters"}``, at
    least one (exactly one when ``parallel`` is off), a call each (finish "tool_calls")."""

    def __init__(self, tools: Sequence[Any], name: str | None, parallel: bool = True) -> None:
        self.name = name
        self._parallel = parallel
        self._parameters: dict[str, dict[str, Any]] = {}
        for tool in tools:
            if not isinstance(tool, Mapping) or tool.get("type", "function") != "function":
                continue
            function = tool.get("function")
            if not isinstance(function, Mapping):
                continue
            parameters = function.get("parameters")
            self._parameters[str(function.get("name"))] = (
                dict(parameters)
                if isinstance(parameters, Mapping) and parameters
                else {"type": "object", "properties": {}}  # a function without parameters
            )
        if name is not None and name not in self._parameters:
            raise ValueError(f"the function {name!r} is not among the request's tools")
        if not self._parameters:
            raise ValueError("there are no function tools to call")

    @property
    def finish_reason(self) -> str | None:
        """What a reply with calls finishes with; None: the generation's own."""
        return None if self.name is not None else "tool_calls"

    def schema(self) -> dict[str, Any]:
        """The JSON schema the output is held to (vLLM's): the named function's parameters,
        or a list of calls to any of the tools, their ``$defs`` gathered at the top (a
        function without parameters takes any object, as in vLLM)."""
        if self.name is not None:
            return self._parameters[self.name]
        definitions: dict[str, Any] = {}
        choices = []
        for name, parameters in self._parameters.items():
            own = dict(parameters)
            for key, definition in dict(own.pop("$defs", {})).items():
                if definitions.setdefault(key, definition) != definition:
                    raise ValueError(f"the tools define {key!r} in $defs differently")
            choices.append(
                {
                    "properties": {"name": {"type": "string", "enum": [name]}, "parameters": own},
                    "required": ["name", "parameters"],
                    # No other key (vLLM's schema allows any): nothing else is read, and a
                    # weak model could write keys for ever.
                    "additionalProperties": False,
                }
            )
        schema: dict[str, Any] = {
            "type": "array",
            "minItems": 1,
            "items": {"type": "object", "anyOf": choices},
        }
        if not self._parallel:
            schema["maxItems"] = 1
        if definitions:
            schema["$defs"] = definitions
        return schema

    def read(self, text: str) -> tuple[str | None, list[dict[str, Any]]]:
        """(content, calls) of an output; no calls and the text as content where it is not
        what the schema asks (cut short by ``max_tokens``)."""
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError:
            return text, []
        if self.name is not None:
            return "", [_function_call(self.name, text)]
        calls = [
            _function_call(str(c["name"]), json.dumps(c["parameters"], ensure_ascii=False))
            for c in (parsed if isinstance(parsed, list) else [])
            if isinstance(c, dict) and "name" in c and "parameters" in c
        ]
        if not calls or len(calls) != len(parsed):
            return text, []
        return "", calls

    def holdback(self) -> ForcedToolCallHoldback:
        return ForcedToolCallHoldback(self)


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


class ForcedToolCallHoldback:
    """A forced call's stream: the whole output is held (it is the calls' JSON) and read at
    :meth:`finish`, as :class:`ToolCallHoldback` reads what it holds."""

    def __init__(self, forced: ForcedToolChoice) -> None:
        self._forced = forced
        self._pending = ""

    def feed(self, text: str) -> str:
        self._pending += text
        return ""

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        content, calls = self._forced.read(self._pending)
        return content or "", calls


def _partial_open(text: str) -> int:
    """How many characters at the end of ``text`` could begin ``<tool_call>``."""
    for size in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if OPEN.startswith(text[-size:]):
            return size
    return 0
