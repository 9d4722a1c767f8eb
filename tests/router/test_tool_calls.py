"""Qwen2.5's tool-call blocks read into OpenAI's tool_calls, whole and streamed."""

from __future__ import annotations

import json

import pytest

from router.tool_calls import ToolCallHoldback, parse_tool_calls, templated_messages

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
