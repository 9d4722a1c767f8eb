"""Qwen2.5's tool-call blocks read into OpenAI's tool_calls, whole and streamed."""

from __future__ import annotations

import json
from typing import Any

import pytest

from router.tool_calls import (
    ForcedToolChoice,
    ToolCallHoldback,
    parse_tool_calls,
    templated_messages,
)

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def test_blocks_become_tool_calls_and_the_text_before_them_the_content() -> None:
    content, calls = parse_tool_calls(f"Let me check.\n{CALL}\n{CALL.replace('Paris', 'Oslo')}")
    assert content == "Let me check."
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_weather"]
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [
        {"city": "Paris"},
        {"city": "Oslo"},
    ]
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
    assert len({c["id"] for c in calls}) == 2
    assert parse_tool_calls(CALL)[0] is None  # nothing before the call: no content


@pytest.mark.parametrize(
    "text",
    [
        "no call at all",
        "<tool_call>\nnot json\n</tool_call>",
        '<tool_call>\n{"arguments": {}}\n</tool_call>',  # no name
        '<tool_call>\n{"name": "f", "arguments": {}',  # cut before its end
    ],
)
def test_text_that_holds_no_valid_call_stays_content(text: str) -> None:
    assert parse_tool_calls(text) == (text, [])


def test_a_stream_sends_the_content_and_holds_the_calls() -> None:
    pieces = [
        "Let me ",
        "check. <tool",
        '_call>\n{"name": "get_weather", ',
        '"arguments": {}}\n',
        "</tool_call>",
    ]
    holdback = ToolCallHoldback()
    sent = "".join(holdback.feed(piece) for piece in pieces)
    assert sent == "Let me check. "  # "<tool" was held until it began a call
    held, calls = holdback.finish()
    assert held == "" and calls[0]["function"] == {"name": "get_weather", "arguments": "{}"}
    plain = ToolCallHoldback()
    assert plain.feed("a <tool") == "a " and plain.feed("box>") == "<toolbox>"
    assert plain.finish() == ("", [])
    broken = ToolCallHoldback()
    assert broken.feed("x <tool_call> oops") == "x "
    assert broken.finish() == ("<tool_call> oops", [])  # no valid call: the text, as content


def test_earlier_calls_are_rendered_with_their_arguments_as_objects() -> None:
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
            ],
        },
        {"role": "tool", "content": "sunny", "tool_call_id": "c1"},
    ]
    rendered = templated_messages(messages)
    assert rendered[1]["tool_calls"][0]["function"]["arguments"] == {"a": 1}
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == '{"a": 1}'  # not changed
    assert rendered[0] == messages[0] and rendered[2] == messages[2]


def _tool(name: str, parameters: dict[str, Any] | None = None) -> dict[str, Any]:
    function: dict[str, Any] = {"name": name}
    if parameters is not None:
        function["parameters"] = parameters
    return {"type": "function", "function": function}


def test_a_named_choice_holds_the_output_to_its_parameters_and_reads_one_call() -> None:
    city = {"type": "object", "properties": {"city": {"type": "string"}}}
    forced = ForcedToolChoice([_tool("weather", city), _tool("time")], "weather")
    assert forced.schema() == city
    assert ForcedToolChoice([_tool("time")], "time").schema() == {
        "type": "object",
        "properties": {},
    }  # no parameters: any object, as vLLM
    content, calls = forced.read('{"city": "Paris"}')
    assert content == "" and len(calls) == 1
    assert calls[0]["function"] == {"name": "weather", "arguments": '{"city": "Paris"}'}
    assert forced.finish_reason is None  # the generation's own ("stop"), as OpenAI's
    assert forced.read('{"city": "Pa') == ('{"city": "Pa', [])  # cut short: content
    with pytest.raises(ValueError, match="'rain' is not among the request's tools"):
        ForcedToolChoice([_tool("time")], "rain")
    with pytest.raises(ValueError, match="no function tools"):
        ForcedToolChoice(["time", {"type": "function"}, {"type": "retrieval"}], None)


def test_a_required_choice_is_a_list_of_calls_to_any_tool() -> None:
    shared = {"$defs": {"unit": {"enum": ["C", "F"]}}}
    weather = {"type": "object", "properties": {"u": {"$ref": "#/$defs/unit"}}, **shared}
    forced = ForcedToolChoice([_tool("weather", weather), _tool("time")], None, parallel=False)
    schema = forced.schema()
    assert schema["$defs"] == shared["$defs"] and schema["maxItems"] == 1
    assert schema["minItems"] == 1
    names = [c["properties"]["name"]["enum"] for c in schema["items"]["anyOf"]]
    assert names == [["weather"], ["time"]]
    assert "$defs" not in schema["items"]["anyOf"][0]["properties"]["parameters"]
    assert "maxItems" not in ForcedToolChoice([_tool("time")], None).schema()
    content, calls = forced.read('[{"name": "weather", "parameters": {"u": "C"}}]')
    assert content == "" and [c["function"]["name"] for c in calls] == ["weather"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"u": "C"}
    assert forced.finish_reason == "tool_calls"
    assert forced.read('[{"name": "weather"}]') == ('[{"name": "weather"}]', [])
    assert forced.read("{}") == ("{}", [])
    other = {"type": "object", "$defs": {"unit": {"enum": ["K"]}}}
    with pytest.raises(ValueError, match="'unit' in \\$defs differently"):
        ForcedToolChoice([_tool("weather", weather), _tool("kelvin", other)], None).schema()


def test_a_forced_stream_holds_everything_and_reads_the_calls_at_the_end() -> None:
    holdback = ForcedToolChoice([_tool("time")], "time").holdback()
    assert holdback.feed("{") == "" and holdback.feed("}") == ""
    content, calls = holdback.finish()
    assert content == "" and calls[0]["function"] == {"name": "time", "arguments": "{}"}
