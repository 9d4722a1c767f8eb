"""Structured output through every front, on the in-process engine: OpenAI's
``response_format``, vLLM's ``structured_outputs`` and ``guided_*`` (the official
``openai`` client), TGI's ``grammar`` (the ``text-generation`` client) and gRPC's
``SamplingParams.structured_output``. The text is the target's own greedy text under the
grammar (the engine without speculation, ``reference``), and matches it."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from typing import Any

import grpc
import openai
import pytest
from text_generation import Client
from text_generation.errors import ValidationError
from text_generation.types import Grammar, GrammarType

from drafters.grammar import OutputGrammar
from router.domain import Prompt
from router.pb import router_pb2 as pb
from tests.router.conftest import COMPLETION_PROMPT, SidecarThread

SCHEMA = {
    "type": "object",
    "properties": {"answer": {"enum": ["yes", "no"]}, "score": {"enum": [1, 2, 3]}},
    "required": ["answer", "score"],
    "additionalProperties": False,
}
REGEX = r"(red|green|blue) [0-9]{2}"
CHOICES = ["Paris", "London", "Rome"]


def client(sidecar: SidecarThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{sidecar.http_url}/v1", api_key="unused", max_retries=0)


def reference(
    sidecar: SidecarThread, prompt: Prompt, grammar: OutputGrammar, complete: bool = True
) -> str:
    """The engine's greedy text for ``prompt`` under ``grammar``, without speculation;
    ``complete``: the grammar's output ended within the budget."""
    service = sidecar.service
    run = service.components.engine.generate(
        service.prompt_ids(prompt),
        service.drafters.get("none").drafter,
        0,
        max_new_tokens=48,
        grammar=grammar,
    )
    run.collect()
    if complete:
        assert run.stats.finish_reason == "eos_token", run.text
    return run.text


def chat_json(
    sidecar: SidecarThread, messages: Any, response_format: dict[str, Any], stream: bool
) -> str:
    """The greedy chat answer under ``response_format`` through the ``openai`` client."""
    reply = client(sidecar).chat.completions.create(
        model="target",
        messages=messages,
        max_tokens=48,
        temperature=0,
        response_format=response_format,  # type: ignore[arg-type]
        stream=stream,
    )
    if stream:
        chunks = list(reply)  # type: ignore[arg-type]
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return reply.choices[0].message.content or ""  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "response_format",
    [
        {"type": "json_schema", "json_schema": {"name": "verdict", "schema": SCHEMA}},
        {"type": "json_object"},
    ],
    ids=["json_schema", "json_object"],
)
def test_chat_response_format(sidecar: SidecarThread, response_format: dict[str, Any]) -> None:
    """OpenAI's JSON modes (whitespace between JSON's tokens is the model's to choose, as
    in vLLM: the barely trained tiny target spends its budget on it, so the text is
    checked against the engine's, not parsed)."""
    messages: Any = [{"role": "user", "content": "Is water wet? Answer in JSON."}]
    schema = response_format.get("json_schema", {}).get("schema")
    grammar = OutputGrammar("json", json.dumps(schema)) if schema else OutputGrammar("json_object")
    expected = reference(sidecar, Prompt(messages=tuple(messages)), grammar, complete=False)
    assert expected.startswith("{")  # held to an object from its first character
    for stream in (False, True):
        assert chat_json(sidecar, messages, response_format, stream) == expected


@pytest.mark.parametrize(
    ("extra", "grammar"),
    [
        ({"structured_outputs": {"regex": REGEX}}, OutputGrammar("regex", REGEX)),
        ({"structured_outputs": {"choice": CHOICES}}, OutputGrammar("choice", json.dumps(CHOICES))),
        ({"guided_regex": REGEX}, OutputGrammar("regex", REGEX)),
        ({"guided_choice": CHOICES}, OutputGrammar("choice", json.dumps(CHOICES))),
        (
            {"structured_outputs": {"json": SCHEMA, "disable_any_whitespace": True}},
            OutputGrammar("json", json.dumps(SCHEMA), any_whitespace=False),
        ),
        (
            {"guided_grammar": 'root ::= "x" [0-9]+ "y"'},
            OutputGrammar("grammar", 'root ::= "x" [0-9]+ "y"'),
        ),
    ],
    ids=[
        "regex",
        "choice",
        "guided_regex",
        "guided_choice",
        "json-compact",
        "gbnf",
    ],
)
def test_completions_structured_outputs(
    sidecar: SidecarThread, extra: dict[str, Any], grammar: OutputGrammar
) -> None:
    expected = reference(sidecar, Prompt(text=COMPLETION_PROMPT), grammar)
    for stream in (False, True):
        reply = client(sidecar).completions.create(
            model="target",
            prompt=COMPLETION_PROMPT,
            max_tokens=48,
            temperature=0,
            extra_body=extra,
            stream=stream,
        )
        chunks = list(reply) if stream else [reply]  # type: ignore[call-overload]
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        assert text == expected
    if grammar.kind == "regex":
        assert re.fullmatch(REGEX, expected)
    if grammar.kind == "choice":
        assert expected in CHOICES
    if grammar.kind == "grammar":
        assert re.fullmatch("x[0-9]+y", expected)
    if grammar.kind == "json":
        assert set(json.loads(expected)) == {"answer", "score"}


def test_sampled_output_is_held_to_the_grammar(sidecar: SidecarThread) -> None:
    for seed in range(4):
        reply = client(sidecar).completions.create(
            model="target",
            prompt=COMPLETION_PROMPT,
            max_tokens=48,
            temperature=1.0,
            seed=seed,
            extra_body={"structured_outputs": {"regex": REGEX}},
        )
        assert re.fullmatch(REGEX, reply.choices[0].text), reply.choices[0].text


def test_tgi_grammar(sidecar: SidecarThread) -> None:
    tgi = Client(sidecar.http_url, timeout=60)
    for kind, value, grammar in (
        (GrammarType.Regex, REGEX, OutputGrammar("regex", REGEX)),
        (GrammarType.Json, SCHEMA, OutputGrammar("json", json.dumps(SCHEMA))),
    ):
        expected = reference(sidecar, Prompt(text=COMPLETION_PROMPT), grammar, complete=False)
        response = tgi.generate(
            COMPLETION_PROMPT, max_new_tokens=48, grammar=Grammar(type=kind, value=value)
        )
        assert response.generated_text == expected
        streamed = "".join(
            r.token.text
            for r in tgi.generate_stream(
                COMPLETION_PROMPT, max_new_tokens=48, grammar=Grammar(type=kind, value=value)
            )
            if not r.token.special
        )
        assert streamed == expected
    with pytest.raises(ValidationError, match="unclosed group"):
        tgi.generate(
            COMPLETION_PROMPT,
            max_new_tokens=8,
            grammar=Grammar(type=GrammarType.Regex, value="(red"),
        )


COMPACT_SCHEMA = OutputGrammar(
    "json", json.dumps(SCHEMA), any_whitespace=False, additional_properties=False
)


def post(url: str, body: dict[str, Any]) -> Any:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


@pytest.mark.parametrize(
    "grammar",
    [
        {"type": "json_schema", "value": {"name": "verdict", "schema": SCHEMA}},
        {"type": "json_object", "value": SCHEMA},
    ],
    ids=["json_schema", "json_object"],
)
def test_tgi_3s_other_json_grammars(compact: SidecarThread, grammar: dict[str, Any]) -> None:
    """TGI 3's ``json_schema`` grammar and its ``json_object`` alias of ``json``, in the
    body huggingface_hub's ``InferenceClient.text_generation`` sends (that client refuses
    to reach any URL under HF_HUB_OFFLINE, so the body goes by hand): held to the schema.
    On the compact sidecar the tiny target's JSON ends within the budget."""
    expected = reference(compact, Prompt(text=COMPLETION_PROMPT), COMPACT_SCHEMA)
    assert set(json.loads(expected)) == {"answer", "score"}
    body = {"inputs": COMPLETION_PROMPT, "parameters": {"max_new_tokens": 48, "grammar": grammar}}
    assert post(f"{compact.http_url}/generate", body)["generated_text"] == expected


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_response_format_in_tgis_form_is_held_to_its_schema(
    compact: SidecarThread, stream: bool
) -> None:
    """TGI's Messages API takes its grammar object as ``response_format``, which clients
    written for TGI send through the ``openai`` package: ``{"type": "json_object",
    "value": schema}`` is held to the schema, not read as OpenAI's any-object mode
    (whose text differs here, so dropping the schema would fail this test)."""
    messages: Any = [{"role": "user", "content": "Is water wet? Answer in JSON."}]
    prompt = Prompt(messages=tuple(messages))
    expected = reference(compact, prompt, COMPACT_SCHEMA)
    any_object = OutputGrammar("json_object", any_whitespace=False, additional_properties=False)
    assert expected != reference(compact, prompt, any_object, complete=False)
    tgi_form = {"type": "json_object", "value": SCHEMA}
    assert chat_json(compact, messages, tgi_form, stream) == expected


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        (
            "/generate",
            {"inputs": "x", "parameters": {"grammar": {"type": "json_schema", "value": {}}}},
            "grammar.value.schema",
        ),
        (
            "/generate",
            {"inputs": "x", "parameters": {"grammar": {"type": "choice", "value": ["a"]}}},
            "grammar.type",
        ),
        (  # an object for the type: unhashable, it failed the lookup (a 500; a fuzzer found it)
            "/generate",
            {"inputs": "x", "parameters": {"grammar": {"type": {"a": 1}, "value": {}}}},
            "grammar.type",
        ),
        (
            "/v1/chat/completions",
            {
                "model": "target",
                "messages": [{"role": "user", "content": "x"}],
                "response_format": {"type": "regex", "value": "(red"},
            },
            "response_format.value",
        ),
    ],
    ids=[
        "json_schema-without-schema",
        "unknown-type",
        "object-for-type",
        "response_format-bad-regex",
    ],
)
def test_a_bad_tgi_grammar_names_its_field(
    sidecar: SidecarThread, path: str, body: dict[str, Any], field: str
) -> None:
    with pytest.raises(urllib.error.HTTPError) as refused:
        post(f"{sidecar.http_url}{path}", body)
    assert refused.value.code in (400, 422)
    assert field in refused.value.read().decode()
    assert sidecar.stub.Route(pb.RouteRequest(text="still serving"), timeout=10).drafter


def grpc_text(sidecar: SidecarThread, structured: pb.StructuredOutput, drafter: str = "") -> str:
    request = pb.GenerateRequest(
        text=COMPLETION_PROMPT,
        max_new_tokens=48,
        no_update=True,
        force_drafter=drafter,
        sampling=pb.SamplingParams(structured_output=structured),
    )
    chunks = list(sidecar.stub.Generate(request, timeout=60))
    assert chunks[-1].stats.finish_reason == "eos_token"
    return str(chunks[-1].stats.generated_text)


def test_grpc_structured_output_is_the_same_under_every_drafter(sidecar: SidecarThread) -> None:
    structured = pb.StructuredOutput(kind="regex", spec=REGEX)
    expected = reference(sidecar, Prompt(text=COMPLETION_PROMPT), OutputGrammar("regex", REGEX))
    drafters = [
        d.name for d in sidecar.stub.ListDrafters(pb.ListDraftersRequest(), timeout=10).drafters
    ]
    assert {"none", "ngram"} <= set(drafters)
    for drafter in drafters:
        assert grpc_text(sidecar, structured, drafter) == expected, drafter


@pytest.mark.parametrize(
    ("structured", "reason"),
    [
        (pb.StructuredOutput(kind="yaml", spec="a: 1"), "sampling.structured_output.kind"),
        (pb.StructuredOutput(kind="regex", spec="(ab"), "unclosed group"),
        (pb.StructuredOutput(kind="json", spec="[1]"), "must be an object"),
        (pb.StructuredOutput(kind="choice", spec="Paris"), "not valid JSON"),
        (pb.StructuredOutput(kind="grammar", spec="x" * 100_001), "at most 100000 characters"),
    ],
    ids=["kind", "regex", "json", "choice", "size"],
)
def test_grpc_bad_structured_output_is_invalid_argument_and_the_server_serves_on(
    sidecar: SidecarThread, structured: pb.StructuredOutput, reason: str
) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        grpc_text(sidecar, structured)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason in str(refused.value.details())
    assert (
        grpc_text(sidecar, pb.StructuredOutput(kind="choice", spec=json.dumps(CHOICES))) in CHOICES
    )


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"enum": ["Paris", "Rome"]}, "unit": {"enum": ["C", "F"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The time now.",
        # None: the tiny target would write one key's name for ever (any key is allowed
        # in a function without parameters, as in vLLM).
        "parameters": {"type": "object", "properties": {}, "additionalProperties": False},
    },
}
TOOL_MESSAGES: Any = [{"role": "user", "content": "What is the weather in Paris?"}]


def tool_reference(sidecar: SidecarThread, forced: Any) -> str:
    """The engine's greedy text under a forced call's schema (compact), the tools rendered."""
    prompt = Prompt(messages=tuple(TOOL_MESSAGES), tools=(WEATHER, TIME))
    grammar = OutputGrammar("json", json.dumps(forced.schema()), any_whitespace=False)
    return reference(sidecar, prompt, grammar)


def test_the_settings_make_every_requests_json_compact_and_closed(
    sidecar: SidecarThread, compact: SidecarThread
) -> None:
    """``structured_output.disable_any_whitespace`` and ``disable_additional_properties``:
    a response_format request's JSON has no optional whitespace and no key its schema does
    not name (so it ends, where the free one ran to its budget)."""
    messages: Any = [{"role": "user", "content": "Is water wet? Answer in JSON."}]
    schema = {k: v for k, v in SCHEMA.items() if k != "additionalProperties"}  # open
    grammar = OutputGrammar(
        "json", json.dumps(schema), any_whitespace=False, additional_properties=False
    )
    expected = reference(sidecar, Prompt(messages=tuple(messages)), grammar)
    assert set(json.loads(expected)) == {"answer", "score"}
    reply = client(compact).chat.completions.create(
        model="target",
        messages=messages,
        max_tokens=48,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "v", "schema": schema}},
    )
    assert reply.choices[0].message.content == expected
    assert reply.choices[0].finish_reason == "stop"
    # The same per request, on a sidecar without the settings (vLLM's fields).
    asked = client(sidecar).chat.completions.create(
        model="target",
        messages=messages,
        max_tokens=48,
        temperature=0,
        extra_body={
            "structured_outputs": {
                "json": schema,
                "disable_any_whitespace": True,
                "disable_additional_properties": True,
            }
        },
    )
    assert asked.choices[0].message.content == expected


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_named_tool_choice_answers_one_call_to_it(compact: SidecarThread, stream: bool) -> None:
    """vLLM's reading: the output is the function's arguments (held to its parameters'
    schema), answered as one call with empty content and the generation's finish."""
    from router.tool_calls import ForcedToolChoice

    expected = tool_reference(compact, ForcedToolChoice([WEATHER, TIME], "get_weather"))
    arguments = json.loads(expected)
    assert arguments["city"] in ("Paris", "Rome") and arguments["unit"] in ("C", "F")
    reply = client(compact).chat.completions.create(
        model="target",
        messages=TOOL_MESSAGES,
        tools=[WEATHER, TIME],  # type: ignore[list-item]
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=48,
        temperature=0,
        stream=stream,
    )
    message, finish = _message(reply, stream)
    assert finish == "stop"
    assert not message["content"]
    (call,) = message["tool_calls"]
    assert call["function"] == {"name": "get_weather", "arguments": expected}
    assert call["type"] == "function" and call["id"].startswith("call_")


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_required_tool_choice_answers_calls(compact: SidecarThread, stream: bool) -> None:
    """The output is a JSON list of {"name", "parameters"} over the tools (exactly one with
    parallel_tool_calls false), each a call; finish reason "tool_calls"."""
    from router.tool_calls import ForcedToolChoice

    forced = ForcedToolChoice([WEATHER, TIME], None, parallel=False)
    expected = json.loads(tool_reference(compact, forced))
    assert len(expected) == 1 and expected[0]["name"] in ("get_weather", "get_time")
    reply = client(compact).chat.completions.create(
        model="target",
        messages=TOOL_MESSAGES,
        tools=[WEATHER, TIME],  # type: ignore[list-item]
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=48,
        temperature=0,
        stream=stream,
    )
    message, finish = _message(reply, stream)
    assert finish == "tool_calls"
    (call,) = message["tool_calls"]
    assert call["function"]["name"] == expected[0]["name"]
    assert json.loads(call["function"]["arguments"]) == expected[0]["parameters"]


def _message(reply: Any, stream: bool) -> tuple[dict[str, Any], str]:
    """A chat reply's message (a stream's deltas joined) and finish reason."""
    if not stream:
        choice = reply.choices[0]
        return choice.message.model_dump(), choice.finish_reason
    content, calls, finish = "", [], ""
    for chunk in reply:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            calls.extend(c.model_dump() for c in choice.delta.tool_calls or ())
            finish = choice.finish_reason or finish
    for call in calls:
        call.pop("index", None)
    return {"content": content, "tool_calls": calls}, finish


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"tool_choice": "required"}, "tool_choice"),  # no tools
        (
            {"tools": [TIME], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
        ),
        ({"tools": [TIME], "tool_choice": {"type": "function"}}, "tool_choice"),
        (
            {
                "tools": [TIME],
                "tool_choice": "required",
                "response_format": {"type": "json_object"},
            },
            "tool_choice",
        ),
    ],
    ids=["no-tools", "unknown-function", "no-name", "with-response-format"],
)
def test_a_forced_tool_choice_that_cannot_be_honoured_is_400(
    sidecar: SidecarThread, body: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client(sidecar).chat.completions.create(
            model="target", messages=TOOL_MESSAGES, max_tokens=8, **body
        )
    assert refused.value.body["param"] == param, refused.value.body  # type: ignore[index]


def test_the_policy_learns_structured_requests_in_a_context_of_their_own(
    sidecar: SidecarThread,
) -> None:
    """The decision says its context is structured; the policy's state shows the
    cluster's structured context learning from the request; a Route says so too."""
    structured = pb.SamplingParams(structured_output=pb.StructuredOutput(kind="regex", spec=REGEX))
    request = pb.GenerateRequest(text=COMPLETION_PROMPT, max_new_tokens=16, sampling=structured)
    chunks = list(sidecar.stub.Generate(request, timeout=60))
    decision = chunks[0].decision
    assert decision.structured
    plain = pb.GenerateRequest(text=COMPLETION_PROMPT, max_new_tokens=4, no_update=True)
    plain_chunks = list(sidecar.stub.Generate(plain, timeout=60))
    assert not plain_chunks[0].decision.structured
    state = sidecar.stub.GetPolicyState(pb.GetPolicyStateRequest(), timeout=10)
    learnt = [
        c
        for c in state.contexts
        if c.task_cluster == decision.task_cluster
        and c.length_bucket == decision.length_bucket
        and c.structured
    ]
    assert len(learnt) == 1 and learnt[0].requests >= 1
    routed = sidecar.stub.Route(pb.RouteRequest(text=COMPLETION_PROMPT, sampling=structured))
    assert routed.structured
    assert not sidecar.stub.Route(pb.RouteRequest(text=COMPLETION_PROMPT)).structured
