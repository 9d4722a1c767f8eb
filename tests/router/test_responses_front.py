"""OpenAI's Responses API (``/v1/responses``) through the official ``openai`` client: the
answer is the chat completion's for the same conversation, streamed as the API's typed
events (which the client's own stream helper assembles), and what is not served is a 400
naming its field while the sidecar serves on."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest

from router.pb import router_pb2 as pb
from tests.router.conftest import SidecarThread

INSTRUCTIONS = "You answer in one short sentence."
QUESTION = "Write a haiku about the sea."
SCHEMA = {
    "type": "object",
    "properties": {"answer": {"enum": ["yes", "no"]}},
    "required": ["answer"],
    "additionalProperties": False,
}


def client(sidecar: SidecarThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{sidecar.http_url}/v1", api_key="unused", max_retries=0)


def steer(sidecar: SidecarThread) -> dict[str, Any]:
    """The tiny target writes spaces: a presence penalty makes it write other tokens (each
    once), and a bias against its end of turn keeps it going to the budget, so that the
    texts compared differ from token to token."""
    end = sidecar.service.tokenizer.convert_tokens_to_ids("<|im_end|>")
    return {"presence_penalty": 2.0, "logit_bias": {str(end): -100}}


def steered(sidecar: SidecarThread) -> dict[str, Any]:
    """``steer`` for the Responses API, which has neither: vLLM's extensions, in the body."""
    return {"temperature": 0, "extra_body": steer(sidecar)}


def chat_answer(sidecar: SidecarThread, messages: Any, max_tokens: int, **extra: Any) -> Any:
    return client(sidecar).chat.completions.create(
        model="target", messages=messages, max_tokens=max_tokens, temperature=0, **extra
    )


def chat_tool_call(sidecar: SidecarThread, tool_choice: Any, **extra: Any) -> Any:
    """Chat's one tool call, greedy, for the weather question with the weather and time
    tools and ``tool_choice`` (the reference the other APIs' forced calls are held to)."""
    from tests.router.test_structured_output import TIME, TOOL_MESSAGES, WEATHER

    chat = chat_answer(
        sidecar, TOOL_MESSAGES, 48, tools=[WEATHER, TIME], tool_choice=tool_choice, **extra
    )
    (call,) = chat.choices[0].message.tool_calls or []
    return call


def test_a_response_is_the_chat_completions_answer(sidecar: SidecarThread) -> None:
    response = client(sidecar).responses.create(
        model="target",
        instructions=INSTRUCTIONS,
        input=QUESTION,
        max_output_tokens=12,
        **steered(sidecar),
        metadata={"team": "search"},
    )
    chat = chat_answer(
        sidecar,
        [{"role": "system", "content": INSTRUCTIONS}, {"role": "user", "content": QUESTION}],
        12,
        **steer(sidecar),
    )
    assert response.object == "response"
    assert response.id.startswith("resp_")
    assert response.output_text == chat.choices[0].message.content
    assert response.output[0].type == "message"
    assert response.output[0].role == "assistant"
    # The tiny target runs to its budget: incomplete, as OpenAI says it.
    assert chat.choices[0].finish_reason == "length"
    assert response.status == "incomplete"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.usage is not None
    assert response.usage.input_tokens == chat.usage.prompt_tokens  # type: ignore[union-attr]
    assert response.usage.output_tokens == chat.usage.completion_tokens == 12  # type: ignore[union-attr]
    assert response.metadata == {"team": "search"}
    assert response.store is False  # nothing is stored
    assert response.instructions == INSTRUCTIONS


def test_input_items_are_the_conversation(sidecar: SidecarThread) -> None:
    """Message items with text parts, a developer message (the template's system role) and
    an assistant's earlier answer, and the easy form (no ``type``, text content)."""
    items: Any = [
        {"type": "message", "role": "developer", "content": INSTRUCTIONS},
        {"role": "user", "content": [{"type": "input_text", "text": QUESTION}]},
        {"role": "assistant", "content": [{"type": "output_text", "text": "Waves."}]},
        {"role": "user", "content": "Another one."},
    ]
    response = client(sidecar).responses.create(
        model="target", input=items, max_output_tokens=8, **steered(sidecar)
    )
    chat = chat_answer(
        sidecar,
        [
            {"role": "system", "content": INSTRUCTIONS},
            {"role": "user", "content": QUESTION},
            {"role": "assistant", "content": "Waves."},
            {"role": "user", "content": "Another one."},
        ],
        8,
        **steer(sidecar),
    )
    assert response.output_text == chat.choices[0].message.content


def test_a_finished_answer_is_completed(ending_sidecar: SidecarThread) -> None:
    """A target that ends its turn: status completed, no incomplete details, and the same
    text as chat's."""
    response = client(ending_sidecar).responses.create(
        model="target", input=QUESTION, max_output_tokens=32, temperature=0
    )
    chat = chat_answer(ending_sidecar, [{"role": "user", "content": QUESTION}], 32)
    assert chat.choices[0].finish_reason == "stop"
    assert response.status == "completed"
    assert response.incomplete_details is None
    assert response.output[0].status == "completed"  # type: ignore[union-attr]
    assert response.output_text == chat.choices[0].message.content


def streamed(sidecar: SidecarThread, tokens: int) -> tuple[list[Any], Any]:
    """The events of a streamed response, through the client's stream helper, and the
    response its last event carries."""
    with client(sidecar).responses.stream(
        model="target", input=QUESTION, max_output_tokens=tokens, **steered(sidecar)
    ) as stream:
        events = list(stream)
    return events, events[-1].response


@pytest.mark.parametrize("tokens", [3, 12], ids=["few", "more"])
def test_the_stream_is_the_apis_events(sidecar: SidecarThread, tokens: int) -> None:
    whole = client(sidecar).responses.create(
        model="target", input=QUESTION, max_output_tokens=tokens, **steered(sidecar)
    )
    events, last = streamed(sidecar, tokens)
    kinds = [event.type for event in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",  # the tiny target runs to its budget
    ]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    deltas = [event.delta for event in events if event.type == "response.output_text.delta"]
    assert deltas and "".join(deltas) == whole.output_text
    assert events[-4].text == whole.output_text
    assert last.output_text == whole.output_text
    assert last.status == "incomplete"
    assert last.usage is not None and last.usage.output_tokens == tokens


def test_the_clients_helper_assembles_a_streamed_answer(ending_sidecar: SidecarThread) -> None:
    """``get_final_response`` (which reads ``response.completed`` only) of a target that
    ends its turn: the answer the whole response gives."""
    whole = client(ending_sidecar).responses.create(
        model="target", input=QUESTION, max_output_tokens=32, temperature=0
    )
    with client(ending_sidecar).responses.stream(
        model="target", input=QUESTION, max_output_tokens=32, temperature=0
    ) as stream:
        final = stream.get_final_response()
    assert whole.status == final.status == "completed"
    assert final.output_text == whole.output_text
    assert final.usage is not None and whole.usage is not None
    assert final.usage.output_tokens == whole.usage.output_tokens


def test_text_format_holds_the_answer_to_a_schema(sidecar: SidecarThread) -> None:
    """``text.format`` json_schema: the same text as chat's ``response_format``."""
    response = client(sidecar).responses.create(
        model="target",
        input="Is water wet? Answer in JSON.",
        max_output_tokens=24,
        temperature=0,
        text={"format": {"type": "json_schema", "name": "verdict", "schema": SCHEMA}},
    )
    chat = chat_answer(
        sidecar,
        [{"role": "user", "content": "Is water wet? Answer in JSON."}],
        24,
        response_format={"type": "json_schema", "json_schema": {"name": "v", "schema": SCHEMA}},
    )
    assert response.output_text == chat.choices[0].message.content
    assert response.output_text.startswith("{")
    assert response.text.format.type == "json_schema"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"background": True}, "background"),
        ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"tools": [{"type": "function"}]}, "tools[0].name"),  # taken without a name before
        ({"tool_choice": {"type": "function"}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),  # no tools to call
        ({"max_tool_calls": 2}, "max_tool_calls"),
        ({"include": ["reasoning.encrypted_content"]}, "include[0]"),
        ({"top_logprobs": 2}, "top_logprobs"),  # without include
        ({"include": ["message.output_text.logprobs"], "top_logprobs": 21}, "top_logprobs"),
        ({"reasoning": {"effort": "low"}}, "reasoning"),
        ({"truncation": "auto"}, "truncation"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"max_output_tokens": 10**6}, "max_output_tokens"),  # over the limit: param null
        ({"temperature": -1}, "temperature"),
        ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema"),
        ({"text": {"format": {"type": "grammar"}}}, "text.format.type"),
        ({"input": [{"type": "reasoning", "summary": []}]}, "input[0].type"),
        ({"input": [{"type": "function_call_output", "call_id": "c"}]}, "input[0].output"),
        (
            {"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]},
            "input[0].call_id",
        ),
        ({"input": [{"role": "tool", "content": "x"}]}, "input[0].role"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
            "input[0].content[0]",
        ),
        ({"input": []}, "input"),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_what_is_not_served_is_400_naming_it(
    sidecar: SidecarThread, extra: dict[str, Any], param: str
) -> None:
    body: dict[str, Any] = {"model": "target", "input": QUESTION, "max_output_tokens": 4}
    with pytest.raises(openai.BadRequestError) as refused:
        client(sidecar).responses.create(**{**body, **extra})
    assert refused.value.body["param"] == param  # type: ignore[index]
    assert sidecar.stub.Route(pb.RouteRequest(text="still serving"), timeout=10).drafter


def test_an_unknown_model_is_404_and_a_missing_one_is_the_served_one(
    sidecar: SidecarThread,
) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        client(sidecar).responses.create(model="gpt-nope", input=QUESTION)
    assert missing.value.body["code"] == "model_not_found"  # type: ignore[index]
    import urllib.request

    request = urllib.request.Request(
        f"{sidecar.http_url}/v1/responses",
        data=json.dumps({"input": QUESTION, "max_output_tokens": 2}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as answered:
        assert json.loads(answered.read())["model"] == client(sidecar).models.list().data[0].id


def responses_tool(chat_tool: dict[str, Any]) -> dict[str, Any]:
    """A chat function tool in the Responses API's form (the function's fields on top)."""
    return {"type": "function", **chat_tool["function"]}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_named_tool_choice_is_one_function_call(compact: SidecarThread, stream: bool) -> None:
    """The forced call's arguments (held to its parameters' schema), the chat's call, as a
    ``function_call`` item and no message; streamed, its arguments' events carry them."""
    from tests.router.test_structured_output import TIME, TOOL_MESSAGES, WEATHER

    expected = chat_tool_call(compact, {"type": "function", "function": {"name": "get_weather"}})
    asked: Any = {
        "model": "target",
        "input": TOOL_MESSAGES,
        "tools": [responses_tool(WEATHER), responses_tool(TIME)],
        "tool_choice": {"type": "function", "name": "get_weather"},
        "max_output_tokens": 48,
        "temperature": 0,
    }
    if stream:
        with client(compact).responses.stream(**asked) as events:
            seen = list(events)
            response = events.get_final_response()
        done = [e for e in seen if e.type == "response.function_call_arguments.done"]
        assert [e.arguments for e in done] == [expected.function.arguments]  # type: ignore[union-attr]
        assert not [e for e in seen if e.type == "response.output_text.delta"]
    else:
        response = client(compact).responses.create(**asked)
    assert response.status == "completed"
    (call,) = response.output
    assert call.type == "function_call"
    assert call.name == "get_weather"
    assert call.arguments == expected.function.arguments  # type: ignore[union-attr]
    assert json.loads(call.arguments)["city"] in ("Paris", "Rome")
    assert call.call_id.startswith("call_") and call.id.startswith("fc_")


def test_a_required_tool_choice_gives_calls(compact: SidecarThread) -> None:
    """``required`` with ``parallel_tool_calls`` false: the one call chat answers."""
    from tests.router.test_structured_output import TIME, TOOL_MESSAGES, WEATHER

    response = client(compact).responses.create(
        model="target",
        input=TOOL_MESSAGES,
        tools=[responses_tool(WEATHER), responses_tool(TIME)],  # type: ignore[list-item]
        tool_choice="required",
        parallel_tool_calls=False,
        max_output_tokens=48,
        temperature=0,
    )
    expected = chat_tool_call(compact, "required", parallel_tool_calls=False)
    (call,) = response.output
    assert call.type == "function_call"
    assert (call.name, call.arguments) == (
        expected.function.name,  # type: ignore[union-attr]
        expected.function.arguments,  # type: ignore[union-attr]
    )
    assert response.parallel_tool_calls is False


def test_function_calls_and_their_outputs_are_the_conversation(compact: SidecarThread) -> None:
    """A ``function_call`` item joins the assistant's turn, its ``function_call_output``
    is the tool's message: the chat with the same calls, tools offered, answers the same."""
    from tests.router.test_structured_output import TIME, WEATHER

    arguments = json.dumps({"city": "Paris", "unit": "C"})
    items: Any = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {
            "type": "function_call",
            "call_id": "call_1",
            "name": "get_weather",
            "arguments": arguments,
        },
        {"type": "function_call_output", "call_id": "call_1", "output": "18 degrees"},
    ]
    response = client(compact).responses.create(
        model="target",
        input=items,
        tools=[responses_tool(WEATHER), responses_tool(TIME)],  # type: ignore[list-item]
        max_output_tokens=10,
        **steered(compact),
    )
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": arguments},
    }
    chat = chat_answer(
        compact,
        [
            {"role": "user", "content": "What is the weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees"},
        ],
        10,
        tools=[WEATHER, TIME],
        **steer(compact),
    )
    assert response.output_text == chat.choices[0].message.content
    assert chat.usage is not None and response.usage is not None
    assert response.usage.input_tokens == chat.usage.prompt_tokens


def test_a_stored_response_asked_for_is_404_saying_none_is_kept(sidecar: SidecarThread) -> None:
    for ask in (
        lambda: client(sidecar).responses.retrieve("resp_1"),
        lambda: client(sidecar).responses.delete("resp_1"),
        lambda: client(sidecar).responses.cancel("resp_1"),
        lambda: client(sidecar).responses.input_items.list("resp_1"),
    ):
        with pytest.raises(openai.NotFoundError) as missing:
            ask()
        assert "not stored" in missing.value.message


def test_the_outputs_logprobs_are_chats(sidecar: SidecarThread) -> None:
    """``include`` message.output_text.logprobs with ``top_logprobs``: the text part's
    entries are chat's (one per output token, its alternatives), and a stream's deltas
    carry them in order."""
    asked: Any = {
        "model": "target",
        "input": QUESTION,
        "max_output_tokens": 8,
        "include": ["message.output_text.logprobs"],
        "top_logprobs": 2,
        **steered(sidecar),
    }
    response = client(sidecar).responses.create(**asked)
    chat = chat_answer(
        sidecar,
        [{"role": "user", "content": QUESTION}],
        8,
        logprobs=True,
        top_logprobs=2,
        **steer(sidecar),
    )
    expected = chat.choices[0].logprobs.content  # type: ignore[union-attr]
    part = response.output[0].content[0]  # type: ignore[union-attr]
    assert part.text == chat.choices[0].message.content
    assert len(part.logprobs) == len(expected) == 8
    for got, want in zip(part.logprobs, expected, strict=True):
        assert got.token == want.token
        assert got.logprob == pytest.approx(want.logprob, abs=1e-4)
        assert [a.token for a in got.top_logprobs] == [a.token for a in want.top_logprobs]
    with client(sidecar).responses.stream(**asked) as stream:
        events = list(stream)
    streamed = [
        entry
        for event in events
        if event.type == "response.output_text.delta"
        for entry in event.logprobs
    ]
    assert [e.token for e in streamed] == [e.token for e in part.logprobs]
    done = next(e for e in events if e.type == "response.output_text.done")
    assert [e.token for e in done.logprobs] == [e.token for e in part.logprobs]
    # Not asked for: none computed.
    plain = client(sidecar).responses.create(**{**asked, "include": [], "top_logprobs": 0})
    assert plain.output[0].content[0].logprobs == []  # type: ignore[union-attr]


def test_input_tokens_are_counted_as_a_response_reads_them(compact: SidecarThread) -> None:
    """``responses.input_tokens.count``: the prompt the same body would generate from,
    tools and instructions included."""
    from tests.router.test_structured_output import TIME, WEATHER

    asked: Any = {
        "model": "target",
        "instructions": INSTRUCTIONS,
        "input": [{"role": "user", "content": QUESTION}],
        "tools": [responses_tool(WEATHER), responses_tool(TIME)],
    }
    counted = client(compact).responses.input_tokens.count(**asked)
    response = client(compact).responses.create(**asked, max_output_tokens=2, temperature=0)
    assert counted.object == "response.input_tokens"
    assert response.usage is not None and counted.input_tokens == response.usage.input_tokens
    bare = client(compact).responses.input_tokens.count(model="target", input=QUESTION)
    assert bare.input_tokens < counted.input_tokens
    with pytest.raises(openai.NotFoundError):
        client(compact).responses.input_tokens.count(model="gpt-nope", input=QUESTION)
    with pytest.raises(openai.BadRequestError) as refused:
        client(compact).responses.input_tokens.count(
            model="target", input=QUESTION, personality="friendly"
        )
    assert refused.value.body["param"] == "personality"  # type: ignore[index]


@pytest.mark.parametrize(
    ("route", "body", "named"),
    [
        ("/v1/responses", {"instructions": "\ud800", "input": "Hi"}, "instructions"),
        (
            "/v1/responses",
            {"instructions": "Be brief.", "input": [{"role": "user", "content": "\ud800"}]},
            "input[0].content",
        ),
        (
            "/v1/messages",
            {"system": "\ud800", "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]},
            "system",
        ),
        (
            "/v1/messages",
            {
                "system": "Be brief.",
                "max_tokens": 4,
                "messages": [{"role": "user", "content": "\ud800"}],
            },
            "messages[0].content",
        ),
    ],
)
def test_text_that_is_not_unicode_is_named_as_the_client_sent_it(
    sidecar: SidecarThread, route: str, body: dict[str, Any], named: str
) -> None:
    """A lone surrogate (JSON's "\\ud800") in the system text or a message was named as
    the chat it stands for numbers it: messages[0].content for the instructions, and one
    message on for every other once a system text leads."""
    from tests.router.test_openai_front import post

    status, reply = post(f"{sidecar.http_url}{route}", {"model": "target", **body})
    message = reply["error"]["message"]
    assert status == 400 and message.startswith(f"{named}: the text is not valid Unicode"), reply
