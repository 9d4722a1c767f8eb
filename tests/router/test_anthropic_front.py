"""Anthropic's Messages API (``/v1/messages``) through the official ``anthropic`` client:
the answer is the chat completion's for the same conversation, streamed as the API's
events (which the client's stream helper assembles), tool use both ways, stop sequences,
token counting, Anthropic's error bodies and its ``x-api-key`` header."""

from __future__ import annotations

import json
from typing import Any

import anthropic
import pytest

from router.pb import router_pb2 as pb
from tests.router.conftest import DATA_TOKEN, SidecarThread
from tests.router.test_responses_front import chat_answer, chat_tool_call, steer

SYSTEM = "You answer in one short sentence."
QUESTION = "Write a haiku about the sea."


def client(sidecar: SidecarThread, key: str = "unused") -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=sidecar.http_url, api_key=key, max_retries=0)


# The client (2.x) no longer sends sampling parameters; the sidecar still reads them (as
# vLLM's Messages API does), from the body.
GREEDY: dict[str, Any] = {"extra_body": {"temperature": 0}}


def steered(sidecar: SidecarThread) -> dict[str, Any]:
    """Greedy and ``steer`` (a presence penalty and no end of turn, so that texts differ
    from token to token), which the Messages API does not have: in the body."""
    return {"extra_body": {"temperature": 0, **steer(sidecar)}}


def test_a_message_is_the_chat_completions_answer(sidecar: SidecarThread) -> None:
    message = client(sidecar).messages.create(
        model="target",
        system=SYSTEM,
        messages=[{"role": "user", "content": QUESTION}],
        max_tokens=12,
        **steered(sidecar),
    )
    chat = chat_answer(
        sidecar,
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}],
        12,
        **steer(sidecar),
    )
    assert message.type == "message" and message.role == "assistant"
    assert message.id.startswith("msg_")
    (block,) = message.content
    assert block.type == "text" and block.text == chat.choices[0].message.content
    assert message.stop_reason == "max_tokens" and message.stop_sequence is None
    assert chat.usage is not None
    assert message.usage.input_tokens == chat.usage.prompt_tokens
    assert message.usage.output_tokens == 12


def test_the_stream_is_the_apis_events(sidecar: SidecarThread) -> None:
    asked: Any = {
        "model": "target",
        "messages": [{"role": "user", "content": [{"type": "text", "text": QUESTION}]}],
        "max_tokens": 10,
        **steered(sidecar),
    }
    whole = client(sidecar).messages.create(**asked)
    with client(sidecar).messages.stream(**asked) as stream:
        texts = list(stream.text_stream)
        final = stream.get_final_message()
    assert "".join(texts) == whole.content[0].text  # type: ignore[union-attr]
    assert final.content[0].text == whole.content[0].text  # type: ignore[union-attr]
    assert final.stop_reason == "max_tokens"
    assert final.usage.output_tokens == 10
    assert final.usage.input_tokens == whole.usage.input_tokens
    kinds = []
    with client(sidecar).messages.create(**asked, stream=True) as events:
        kinds = [event.type for event in events]
    assert kinds[:2] == ["message_start", "content_block_start"]
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]


def test_a_stop_sequence_ends_the_answer_and_is_named(sidecar: SidecarThread) -> None:
    """The text ends before the stop sequence (streamed too: no part of it is sent), and
    ``stop_sequence`` names the one that ended it."""
    full = client(sidecar).messages.create(
        model="target",
        messages=[{"role": "user", "content": QUESTION}],
        max_tokens=12,
        **steered(sidecar),
    )
    text = full.content[0].text  # type: ignore[union-attr]
    stop = text[4:7]  # the run ends at its first occurrence, text.index(stop)
    assert len(stop) == 3
    asked: Any = {
        "model": "target",
        "messages": [{"role": "user", "content": QUESTION}],
        "max_tokens": 12,
        "stop_sequences": ["never there", stop],
        **steered(sidecar),
    }
    stopped = client(sidecar).messages.create(**asked)
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == stop
    assert stopped.content[0].text == text[: text.index(stop)]  # type: ignore[union-attr]
    with client(sidecar).messages.stream(**asked) as stream:
        assert "".join(stream.text_stream) == text[: text.index(stop)]
        assert stream.get_final_message().stop_sequence == stop


@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "stream"])
def test_a_forced_tool_is_one_tool_use(compact: SidecarThread, streamed: bool) -> None:
    """``tool_choice`` tool: chat's forced call, as a ``tool_use`` block with its input
    parsed; ``stop_reason`` tool_use."""
    from tests.router.test_structured_output import TIME, TOOL_MESSAGES, WEATHER

    expected = chat_tool_call(compact, {"type": "function", "function": {"name": "get_weather"}})
    tools: Any = [
        {
            "name": tool["function"]["name"],
            "description": tool["function"]["description"],
            "input_schema": tool["function"]["parameters"],
        }
        for tool in (WEATHER, TIME)
    ]
    asked: Any = {
        "model": "target",
        "messages": TOOL_MESSAGES,
        "tools": tools,
        "tool_choice": {"type": "tool", "name": "get_weather"},
        "max_tokens": 48,
        **GREEDY,
    }
    if streamed:
        with client(compact).messages.stream(**asked) as stream:
            message = stream.get_final_message()
    else:
        message = client(compact).messages.create(**asked)
    assert message.stop_reason == "tool_use"
    (use,) = message.content
    assert use.type == "tool_use" and use.name == "get_weather"
    assert use.input == json.loads(expected.function.arguments)  # type: ignore[union-attr]


def test_tool_uses_and_results_are_the_conversation(compact: SidecarThread) -> None:
    """An assistant's ``tool_use`` block is its tool call, a user's ``tool_result`` the
    tool's message: the prompt is the chat's with the same turns."""
    from tests.router.test_structured_output import TIME, WEATHER

    tools: Any = [
        {"name": t["function"]["name"], "input_schema": t["function"]["parameters"]}
        for t in (WEATHER, TIME)
    ]
    arguments = {"city": "Paris", "unit": "C"}
    messages: Any = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {
            "role": "assistant",
            "content": [
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": arguments}
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "18 degrees"},
                {"type": "text", "text": "And now?"},
            ],
        },
    ]
    message = client(compact).messages.create(
        model="target", messages=messages, tools=tools, max_tokens=8, **steered(compact)
    )
    call = {
        "id": "toolu_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": json.dumps(arguments)},
    }
    chat = chat_answer(
        compact,
        [
            {"role": "user", "content": "What is the weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "toolu_1", "content": "18 degrees"},
            {"role": "user", "content": "And now?"},
        ],
        8,
        tools=[
            {"type": "function", "function": {"name": t["name"], "parameters": t["input_schema"]}}
            for t in tools
        ],
        **steer(compact),
    )
    assert message.content[0].text == chat.choices[0].message.content  # type: ignore[union-attr]
    assert chat.usage is not None
    assert message.usage.input_tokens == chat.usage.prompt_tokens
    counted = client(compact).messages.count_tokens(model="target", messages=messages, tools=tools)
    assert counted.input_tokens == chat.usage.prompt_tokens


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 10_000}, "max_tokens"),  # over the limit: was named max_new_tokens
        ({"extra_body": {"temperature": -1}}, "temperature"),
        ({"output_config": {"effort": "high"}}, "output_config.effort"),
        ({"thinking": {"type": "enabled", "budget_tokens": 2048}}, "thinking"),
        ({"tool_choice": {"type": "tool"}}, "tool_choice"),
        # Said in chat's terms before ("'required' needs tools"; "blocks are text, got 'text'").
        ({"tool_choice": {"type": "any"}}, "tool_choice: calls a tool, but the request has no"),
        (
            {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
            "messages[0].content[0].text: must be a string",
        ),
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools[0]"),
        ({"tools": [{"name": "f"}]}, "tools[0].input_schema"),  # taken without before
        ({"tools": [{"name": "a b", "input_schema": {}}]}, "tools[0].name"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
            "messages[0].content[0].type",
        ),
        ({"messages": [{"role": "system", "content": "x"}]}, "messages[0].role"),
        ({"messages": []}, "messages"),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_what_is_not_served_is_an_invalid_request_error(
    sidecar: SidecarThread, extra: dict[str, Any], param: str
) -> None:
    body: dict[str, Any] = {
        "model": "target",
        "messages": [{"role": "user", "content": QUESTION}],
        "max_tokens": 4,
    }
    with pytest.raises(anthropic.BadRequestError) as refused:
        client(sidecar).messages.create(**{**body, **extra})
    error = refused.value.body["error"]  # type: ignore[index]
    assert error["type"] == "invalid_request_error"
    assert error["message"].startswith(param)
    assert sidecar.stub.Route(pb.RouteRequest(text="still serving"), timeout=10).drafter


def test_a_missing_max_tokens_and_an_unknown_model_are_refused(sidecar: SidecarThread) -> None:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(
        f"{sidecar.http_url}/v1/messages",
        data=json.dumps(
            {"model": "target", "messages": [{"role": "user", "content": "x"}]}
        ).encode(),
        headers={"Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 400
    assert json.loads(refused.value.read())["error"]["message"].startswith("max_tokens")
    with pytest.raises(anthropic.NotFoundError) as missing:
        client(sidecar).messages.create(
            model="claude-nope", messages=[{"role": "user", "content": "x"}], max_tokens=4
        )
    assert missing.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]


def test_the_data_token_comes_as_the_api_key(guarded: SidecarThread) -> None:
    asked: Any = {
        "model": "target",
        "messages": [{"role": "user", "content": "x"}],
        "max_tokens": 2,
        # Greedy, no end of turn: sampled at the API's default temperature, the reply
        # ended at its first token now and then (CI saw 1 output token of 2).
        **steered(guarded),
    }
    assert client(guarded, DATA_TOKEN).messages.create(**asked).usage.output_tokens == 2
    with pytest.raises(anthropic.AuthenticationError) as refused:
        client(guarded, "wrong").messages.create(**asked)
    assert refused.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
