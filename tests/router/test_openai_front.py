"""The OpenAI-compatible front on the in-process engine, driven by the official client."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import openai
import pytest
from pydantic import ValidationError

from router.components import Components
from router.domain import Prompt
from router.pb import router_pb2 as pb
from tests.router.conftest import (
    COMPLETION_PROMPT,
    ServingWorld,
    SidecarThread,
    greedy_reference,
    target_logprobs,
)

PROMPT = COMPLETION_PROMPT


def client(sidecar: SidecarThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{sidecar.http_url}/v1", api_key="unused", max_retries=0)


def model_name(sidecar: SidecarThread) -> str:
    return client(sidecar).models.list().data[0].id


def post(url: str, body: dict[str, Any] | bytes) -> tuple[int, dict[str, Any]]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def grpc_greedy_text(sidecar: SidecarThread, text: str, max_new_tokens: int) -> str:
    request = pb.GenerateRequest(text=text, max_new_tokens=max_new_tokens, no_update=True)
    chunks = list(sidecar.stub.Generate(request, timeout=60))
    return chunks[-1].stats.generated_text


def test_models_lists_the_target(sidecar: SidecarThread) -> None:
    models = client(sidecar).models.list().data
    assert [m.id for m in models] == ["target"]
    assert models[0].object == "model"
    # models.retrieve (GET /v1/models/{id}) was a 404 for the served model too.
    assert client(sidecar).models.retrieve("target").id == "target"
    with pytest.raises(openai.NotFoundError) as missing:
        client(sidecar).models.retrieve("other")
    assert missing.value.code == "model_not_found"


def test_served_model_names_are_the_ids_clients_use(
    serving_world: ServingWorld, components: Components, tmp_path: Path
) -> None:
    """As vLLM's --served-model-name: a client configured for the checkpoint's hub id
    keeps it; the directory's name is then not one of the ids."""
    names = ["Qwen/Qwen2.5-7B-Instruct", "qwen"]
    settings = serving_world.settings(tmp_path / "state", served_model_names=names)
    named = SidecarThread(settings, components)
    try:
        assert [m.id for m in client(named).models.list().data] == names
        reply = client(named).completions.create(
            model="qwen", prompt=PROMPT, max_tokens=4, temperature=0
        )
        assert reply.model == "qwen"
        assert reply.usage is not None and reply.usage.completion_tokens == 4
        with pytest.raises(openai.NotFoundError) as missing:
            client(named).completions.create(model="target", prompt=PROMPT, max_tokens=4)
        assert missing.value.code == "model_not_found"
        with urllib.request.urlopen(f"{named.http_url}/info", timeout=30) as response:
            assert json.loads(response.read())["model_id"] == names[0]
    finally:
        named.stop()


def test_a_target_in_a_hugging_face_cache_is_served_as_its_repository() -> None:
    """`huggingface-cli download` leaves models--Org--Name/snapshots/<revision>: the
    revision's hash was the model id /v1/models and /info gave, and clients had to send."""
    from router.openai_front import model_id_of

    cache = Path("/hub/models--Own--Qwen2.5-0.5B-Instruct/snapshots/8f1f1a3c6e0c")
    assert model_id_of(cache) == "Own/Qwen2.5-0.5B-Instruct"
    assert model_id_of(Path("/models/qwen2.5-7b")) == "qwen2.5-7b"
    assert model_id_of(Path("/data/snapshots/v1")) == "v1"  # not a cache


def test_an_empty_served_model_name_is_refused(serving_world: ServingWorld, tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="served_model_names"):
        serving_world.settings(tmp_path / "state", served_model_names=[""])


def test_completion_greedy_equals_grpc_generate(sidecar: SidecarThread) -> None:
    expected_ids, expected_text = greedy_reference(sidecar, PROMPT, 24)
    assert len(expected_ids) == 24
    reply = client(sidecar).completions.create(
        model=model_name(sidecar), prompt=PROMPT, max_tokens=24, temperature=0
    )
    assert reply.object == "text_completion"
    assert reply.choices[0].text == expected_text == grpc_greedy_text(sidecar, PROMPT, 24)
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None
    assert reply.usage.completion_tokens == 24
    assert reply.usage.prompt_tokens == len(sidecar.service.prompt_ids(Prompt(text=PROMPT)))


def test_completion_stream_concatenates_to_the_greedy_text(sidecar: SidecarThread) -> None:
    _, expected_text = greedy_reference(sidecar, PROMPT, 24)
    chunks = list(
        client(sidecar).completions.create(
            model=model_name(sidecar),
            prompt=PROMPT,
            max_tokens=24,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(chunk.object == "text_completion" for chunk in chunks)
    text = "".join(chunk.choices[0].text for chunk in chunks if chunk.choices)
    assert text == expected_text
    finishes = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices]
    assert finishes[-1] == "length" and set(finishes[:-1]) == {None}
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 24


def test_the_stop_sequence_is_left_out_as_openai_does(sidecar: SidecarThread) -> None:
    """OpenAI's text ends before the stop sequence (TGI's, the engine's, after it), in a
    stream too. (The tiny target's greedy answer is blank: a stop of five spaces.)"""
    _, expected_text = greedy_reference(sidecar, PROMPT, 24)
    stop = " " * 5
    assert expected_text.startswith(stop)
    asked: dict[str, Any] = {"model": model_name(sidecar), "prompt": PROMPT, "max_tokens": 24}
    reply = client(sidecar).completions.create(**asked, temperature=0, stop=stop)
    assert reply.choices[0].text == ""
    assert reply.choices[0].finish_reason == "stop"
    chunks = list(
        client(sidecar).completions.create(**asked, temperature=0, stop=[stop], stream=True)
    )
    assert "".join(chunk.choices[0].text for chunk in chunks if chunk.choices) == ""
    # vLLM's include_stop_str_in_output keeps it (was refused by name).
    kept = {"stop": [stop], "extra_body": {"include_stop_str_in_output": True}}
    reply = client(sidecar).completions.create(**asked, temperature=0, **kept)
    assert reply.choices[0].text == stop and reply.choices[0].finish_reason == "stop"
    chunks = list(client(sidecar).completions.create(**asked, temperature=0, stream=True, **kept))
    assert "".join(chunk.choices[0].text for chunk in chunks if chunk.choices) == stop
    # The TGI front keeps TGI's text, stop included.
    tgi = {"inputs": PROMPT, "parameters": {"max_new_tokens": 24, "stop": [stop]}}
    status, body = post(f"{sidecar.http_url}/generate", tgi)
    assert status == 200 and body["generated_text"] == stop


@pytest.mark.parametrize(
    ("chunks", "stops", "stopped", "sent"),
    [
        # A stop that spans three chunks, after text: nothing of it is ever sent.
        (["Thought: search", "\nObs", "ervation:"], ["\nObservation:"], True, "Thought: search"),
        # Two stops, one the other's end: the one that starts first is cut.
        (["a b", "c"], ["bc", " bc"], True, "a"),
        # Text that only looked like a stop's start is sent in full at the end.
        (["x \nObs", "erve"], ["\nObservation:"], False, "x \nObserve"),
        ([" the end"], [], False, " the end"),
    ],
)
def test_the_stop_holdback_never_sends_part_of_a_stop(
    chunks: list[str], stops: list[str], stopped: bool, sent: str
) -> None:
    from router.openai_front import StopHoldback

    holdback = StopHoldback(stops)
    released = [holdback.feed(chunk) for chunk in chunks]
    for text in released:
        assert not any(stop in text for stop in stops)
    assert "".join(released) + holdback.finish(stopped) == sent


def test_a_streams_logprobs_go_with_the_text_they_belong_to() -> None:
    """Each token's entry is sent once all of its text is (the stop holdback may keep
    text back), with its offset in the text; what is left goes with the last chunk."""
    from router.openai_front import LogprobsHoldback
    from router.service import TokenChunk, TokenLogprobs

    def chunk(*texts: str) -> TokenChunk:
        scored = tuple(TokenLogprobs(text, -float(len(text))) for text in texts)
        ids = tuple(range(len(texts)))
        return TokenChunk(ids, texts, (False,) * len(texts), "".join(texts), scored)

    holdback = LogprobsHoldback()
    holdback.feed(chunk("Thought", ":", ""))  # "": a special token, or a split character
    entries, texts, offset = holdback.release(len("Thou"))  # "ght" held back
    assert (entries, texts, offset) == ([], [], 0)
    entries, texts, offset = holdback.release(len("ght:"))
    assert texts == ["Thought", ":", ""] and offset == 0
    holdback.feed(chunk(" stop", "!"))
    assert holdback.release(0) == ([], [], 8)
    entries, texts, offset = holdback.release(None)  # the end: " stop" was cut, sent anyway
    assert texts == [" stop", "!"] and offset == 8 and [e.logprob for e in entries] == [-5, -1]


def test_stream_ends_with_done(sidecar: SidecarThread) -> None:
    body = {"model": "target", "prompt": PROMPT, "max_tokens": 4, "temperature": 0, "stream": True}
    request = urllib.request.Request(
        f"{sidecar.http_url}/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        # No proxy or cache holds the tokens back (nginx buffers a stream without it).
        assert response.headers["X-Accel-Buffering"] == "no"
        assert response.headers["Cache-Control"] == "no-cache"
        events = [e for e in response.read().decode().split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)


def test_chat_completion_and_stream(sidecar: SidecarThread) -> None:
    messages: Any = [{"role": "user", "content": "Write a haiku about the sea."}]
    model = model_name(sidecar)
    reply = client(sidecar).chat.completions.create(
        model=model, messages=messages, max_tokens=12, temperature=0
    )
    assert reply.object == "chat.completion"
    message = reply.choices[0].message
    assert message.role == "assistant"
    # The same conversation through gRPC Generate: the same greedy text.
    conversation = pb.Conversation(
        messages=[pb.ChatMessage(role="user", content=messages[0]["content"])]
    )
    chunks = list(
        sidecar.stub.Generate(
            pb.GenerateRequest(conversation=conversation, max_new_tokens=12, no_update=True),
            timeout=60,
        )
    )
    assert message.content == chunks[-1].stats.generated_text
    stream = list(
        client(sidecar).chat.completions.create(
            model=model, messages=messages, max_tokens=12, temperature=0, stream=True
        )
    )
    assert all(chunk.object == "chat.completion.chunk" for chunk in stream)
    assert stream[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert streamed == message.content
    assert stream[-1].choices[0].finish_reason in {"stop", "length"}


def _chat_stream_deltas(sidecar: SidecarThread, model: str) -> list[dict[str, Any]]:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Write a haiku about the sea."}],
        "max_tokens": 6,
        "temperature": 0,
        "stream": True,
    }
    request = urllib.request.Request(
        f"{sidecar.http_url}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        events = [line[6:] for line in response.read().decode().splitlines() if line]
    return [json.loads(e)["choices"][0]["delta"] for e in events[:-1] if json.loads(e)["choices"]]


def test_a_chat_streams_role_is_in_its_first_delta_as_openais_clients_accumulate_it(
    sidecar: SidecarThread,
) -> None:
    """The role in every delta: the openai package's stream helper joins each delta's
    strings, so its final message had the role "assistantassistant...", which the
    sidecar itself refused when a chat app sent the history back. TGI's own client
    (model "tgi") requires the role in every delta, as TGI sends it."""
    from openai.lib.streaming.chat import ChatCompletionStreamState

    messages: Any = [{"role": "user", "content": "Write a haiku about the sea."}]
    state = ChatCompletionStreamState()  # what the client's chat.completions.stream() runs
    for chunk in client(sidecar).chat.completions.create(
        model="target", messages=messages, max_tokens=6, temperature=0, stream=True
    ):
        state.handle_chunk(chunk)
    assert state.current_completion_snapshot.choices[0].message.role == "assistant"
    deltas = _chat_stream_deltas(sidecar, "target")
    assert len(deltas) > 2 and deltas[0]["role"] == "assistant"
    assert not any("role" in delta for delta in deltas[1:])
    assert all(delta["role"] == "assistant" for delta in _chat_stream_deltas(sidecar, "tgi"))


def test_what_openais_clients_send_for_none_is_served(sidecar: SidecarThread) -> None:
    """``stream=None`` and ``echo=None`` go on the wire as null: refused before as "not a
    valid boolean"."""
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "stream": None}
    status, reply = post(f"{sidecar.http_url}/v1/chat/completions", {"model": "target", **chat})
    assert status == 200 and reply["object"] == "chat.completion", reply
    completion = {"model": "target", "prompt": PROMPT, "max_tokens": 2, "echo": None}
    status, reply = post(f"{sidecar.http_url}/v1/completions", completion)
    assert status == 200 and reply["object"] == "text_completion", reply


def test_chat_fields_are_read_as_vllm_reads_them(sidecar: SidecarThread) -> None:
    """max_completion_tokens 0 was taken as unset (the whole context's worth generated)
    and a negative one was refused naming max_tokens; text parts were joined without the
    newline vLLM puts between them."""
    asked: dict[str, Any] = {
        "model": "target",
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 2,
    }
    for value in (0, -1):
        status, reply = post(
            f"{sidecar.http_url}/v1/chat/completions", {**asked, "max_completion_tokens": value}
        )
        assert status == 400 and reply["error"]["param"] == "max_completion_tokens", reply
    parts = [{"type": "text", "text": "Write a haiku"}, {"type": "text", "text": "about the sea."}]
    joined = "Write a haiku\nabout the sea."
    usages = [
        post(
            f"{sidecar.http_url}/v1/chat/completions",
            {**asked, "messages": [{"role": "user", "content": content}]},
        )[1]["usage"]["prompt_tokens"]
        for content in (parts, joined)
    ]
    assert usages[0] == usages[1], usages
    # A part whose text is not a string was rendered as "None" or "{'a': 1}" into the prompt.
    for odd in (None, {"a": 1}, 5):
        content = [{"type": "text", "text": odd}, {"type": "text", "text": "hi"}]
        status, reply = post(
            f"{sidecar.http_url}/v1/chat/completions",
            {**asked, "messages": [{"role": "user", "content": content}]},
        )
        assert status == 400 and reply["error"]["param"] == "messages[0].content[0].text", reply


def test_the_fingerprint_names_the_decision_a_seed_repeats_under(sidecar: SidecarThread) -> None:
    """A seed repeats a sampled output at the same drafter and k only; the fingerprint,
    the field OpenAI gives for this, named the build alone."""
    reply = client(sidecar).completions.create(
        model="target", prompt=PROMPT, max_tokens=4, temperature=0.8, seed=11
    )
    assert reply.model_extra is not None
    decided = reply.model_extra["specroute"]
    assert reply.system_fingerprint is not None
    assert reply.system_fingerprint.startswith("specroute-")
    assert reply.system_fingerprint.endswith(f"-{decided['drafter']}-k{decided['draft_length']}")


def test_the_text_generation_clients_chat_works(sidecar: SidecarThread) -> None:
    """TGI's own client's ``chat()`` sends the model "tgi" (a 404 before) and reads the
    replies with its own types, which need ``system_fingerprint`` and the role in every
    streamed delta: the same greedy text as the openai client gets. (Its stream reader
    fails on the ``data: [DONE]`` that ends an OpenAI stream, after the last chunk: the
    chunks are read here with its type.)"""
    from text_generation import Client
    from text_generation.types import ChatCompletionChunk, Message

    messages: Any = [{"role": "user", "content": "Write a haiku about the sea."}]
    expected = client(sidecar).chat.completions.create(
        model=model_name(sidecar), messages=messages, max_tokens=12, temperature=0
    )
    tgi = Client(sidecar.http_url, timeout=60)
    asked = [Message(role="user", content=messages[0]["content"])]
    reply = tgi.chat(messages=asked, max_tokens=12, temperature=0)
    assert reply.choices[0].message.content == expected.choices[0].message.content
    assert reply.system_fingerprint.startswith("specroute-")
    body = {"model": "tgi", "messages": messages, "max_tokens": 12, "temperature": 0}
    request = urllib.request.Request(
        f"{sidecar.http_url}/v1/chat/completions",
        data=json.dumps({**body, "stream": True}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        events = [line[6:] for line in response.read().decode().splitlines() if line]
    assert events[-1] == "[DONE]"
    stream = [ChatCompletionChunk(**json.loads(event)) for event in events[:-1]]
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert streamed == expected.choices[0].message.content


def test_a_developer_message_is_a_system_message(sidecar: SidecarThread) -> None:
    """OpenAI's clients send "developer" where older models took "system": the same
    prompt (and greedy reply) as with "system"."""
    replies = [
        client(sidecar).chat.completions.create(
            model="target",
            messages=[
                {"role": role, "content": "Answer briefly."},  # type: ignore[misc, list-item]
                {"role": "user", "content": "Write a haiku about the sea."},
            ],
            max_tokens=8,
            temperature=0,
        )
        for role in ("developer", "system")
    ]
    developer, system = replies
    assert developer.usage is not None and system.usage is not None
    assert developer.usage.prompt_tokens == system.usage.prompt_tokens
    assert developer.choices[0].message.content == system.choices[0].message.content


def test_sampling_runs_with_a_seed(sidecar: SidecarThread) -> None:
    # Reproducible only for one drafter (the draws differ with the drafts), and the policy
    # may choose another between calls: this checks that sampling is served.
    reply = client(sidecar).completions.create(
        model="target", prompt=PROMPT, max_tokens=8, temperature=0.8, top_p=0.9, seed=11
    )
    assert reply.usage is not None and 0 < reply.usage.completion_tokens <= 8
    assert reply.choices[0].finish_reason in {"stop", "length"}


def test_truncate_prompt_tokens_keeps_the_prompts_last_tokens(
    sidecar: SidecarThread, serving_world: ServingWorld
) -> None:
    """vLLM's truncate_prompt_tokens was ignored: a prompt over the limit was refused
    (context_length_exceeded) however it was sent. -1 keeps as many as the limit allows;
    truncation_side "right" (the first tokens) is refused by name."""
    long_prompt = "word " * 600 + serving_world.prompts["math"]  # over the limit
    _, expected = greedy_reference(sidecar, long_prompt, 6, last_tokens=24)
    # As text, and as token ids (those were refused by their count, uncut).
    for prompt in (long_prompt, sidecar.service.prompt_ids(Prompt(text=long_prompt))):
        reply = client(sidecar).completions.create(
            model="target",
            prompt=prompt,
            max_tokens=6,
            temperature=0,
            extra_body={"truncate_prompt_tokens": 24},
        )
        assert reply.usage is not None and reply.usage.prompt_tokens == 24
        assert reply.choices[0].text == expected
    limit = sidecar.service.limits.max_prompt_tokens
    whole = client(sidecar).completions.create(
        model="target",
        prompt=long_prompt,
        max_tokens=2,
        temperature=0,
        extra_body={"truncate_prompt_tokens": -1},
    )
    assert whole.usage is not None and whole.usage.prompt_tokens == limit
    chat = client(sidecar).chat.completions.create(
        model="target",
        messages=[{"role": "user", "content": long_prompt}],
        max_tokens=2,
        temperature=0,
        extra_body={"truncate_prompt_tokens": 16},
    )
    assert chat.usage is not None and chat.usage.prompt_tokens == 16
    for extra, param in (
        ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
        ({"truncate_prompt_tokens": -2}, "truncate_prompt_tokens"),
        ({"truncate_prompt_tokens": limit + 1}, "truncate_prompt_tokens"),
        ({"truncate_prompt_tokens": 16, "truncation_side": "right"}, "truncation_side"),
    ):
        with pytest.raises(openai.BadRequestError) as refused:
            client(sidecar).completions.create(
                model="target", prompt=PROMPT, max_tokens=2, extra_body=extra
            )
        assert refused.value.param == param, refused.value


def test_typical_p_is_served_as_on_the_tgi_front(sidecar: SidecarThread) -> None:
    """typical_p (an extra field, as vLLM's extensions are sent) was dropped silently; at a
    mass so small that only the most typical token of each step is kept, two seeds give one
    text."""

    def text(seed: int) -> str:
        reply = client(sidecar).completions.create(
            model="target",
            prompt=PROMPT,
            max_tokens=10,
            temperature=1.5,
            seed=seed,
            extra_body={"typical_p": 1e-6},
        )
        return reply.choices[0].text

    assert text(1) == text(2)


def test_completion_logprobs_are_the_targets_streamed_or_not(sidecar: SidecarThread) -> None:
    """logprobs was refused (400). Each token's logprob is the target's, the top ones
    include the chosen token (as OpenAI and vLLM list them), text_offset places each token
    in the text; a stream sends the same entries with the text they belong to."""
    expected_ids, expected_text = greedy_reference(sidecar, PROMPT, 16)
    reference = target_logprobs(sidecar, PROMPT, expected_ids)
    asked: dict[str, Any] = {
        "model": model_name(sidecar),
        "prompt": PROMPT,
        "max_tokens": 16,
        "temperature": 0,
        "logprobs": 2,
    }
    logprobs = client(sidecar).completions.create(**asked).choices[0].logprobs
    assert logprobs is not None and logprobs.token_logprobs is not None
    assert logprobs.token_logprobs == pytest.approx(reference, abs=1e-4)
    assert logprobs.tokens == sidecar.service.tokenizer.batch_decode([[i] for i in expected_ids])
    assert logprobs.top_logprobs is not None
    for token, top in zip(logprobs.tokens, logprobs.top_logprobs, strict=True):
        assert token in top and max(top.values()) == top[token]  # greedy: the likeliest
    assert logprobs.text_offset is not None and logprobs.text_offset[0] == 0
    ends = [*logprobs.text_offset[1:], len(expected_text)]
    assert all(a <= b for a, b in zip(logprobs.text_offset, ends, strict=True))

    chunks = list(client(sidecar).completions.create(**asked, stream=True))
    streamed = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    # (The policy may pick another arm for the second request: equal up to float error.)
    joined = [lp for p in streamed for lp in p.token_logprobs or []]
    assert joined == pytest.approx(logprobs.token_logprobs, abs=1e-5)
    assert [o for p in streamed for o in p.text_offset or []] == logprobs.text_offset
    plain = client(sidecar).completions.create(**{**asked, "logprobs": None})
    assert plain.choices[0].logprobs is None


def test_each_tokens_bytes_join_into_the_text_of_a_split_character(
    sidecar: SidecarThread,
) -> None:
    """Chat logprobs' ``bytes`` were the UTF-8 of the token decoded alone: a piece of a
    character split across byte-level tokens (CJK, emoji, accents) decodes alone to
    U+FFFD, whose bytes say nothing. Each piece now has its own bytes."""
    texts, tokenizer = sidecar.service.token_texts, sidecar.service.tokenizer
    word = "海é 🙂"
    ids = tokenizer.encode(word, add_special_tokens=False)
    assert any("\ufffd" in texts.text(i) for i in ids)  # pieces that are no text alone
    assert b"".join(texts.raw(i) for i in ids) == word.encode()
    assert texts.raw(tokenizer.encode(" the", add_special_tokens=False)[0]).startswith(b" ")


def test_chat_logprobs_and_top_logprobs(sidecar: SidecarThread) -> None:
    messages: Any = [{"role": "user", "content": "Write a haiku about the sea."}]
    asked: dict[str, Any] = {
        "model": model_name(sidecar),
        "messages": messages,
        "max_tokens": 10,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 3,
    }
    reply = client(sidecar).chat.completions.create(**asked)
    content = reply.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and reply.usage is not None
    assert len(content) == reply.usage.completion_tokens
    assert all(len(entry.top_logprobs) == 3 for entry in content)
    assert all(entry.top_logprobs[0].logprob == pytest.approx(entry.logprob) for entry in content)
    assert all(entry.bytes == list(entry.token.encode()) for entry in content)
    chunks = list(client(sidecar).chat.completions.create(**asked, stream=True))
    streamed = [
        entry.logprob
        for chunk in chunks
        if chunk.choices and chunk.choices[0].logprobs
        for entry in chunk.choices[0].logprobs.content or []
    ]
    assert streamed == pytest.approx([entry.logprob for entry in content], abs=1e-5)
    for bad, param in (
        ({"logprobs": False}, "top_logprobs"),
        ({"top_logprobs": 21}, "top_logprobs"),
        ({"logprobs": 1}, "logprobs"),  # chat's is a boolean (1 == True in Python)
    ):
        with pytest.raises(openai.BadRequestError) as refused:
            client(sidecar).chat.completions.create(**{**asked, **bad})
        assert refused.value.param == param


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"temperature": float("nan")}, "temperature"),
        ({"typical_p": 0.0}, "typical_p"),
        ({"temperature": 3.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"n": 0}, "n"),
        ({"n": 17}, "n"),  # over MAX_CHOICES
        ({"logprobs": 21}, "logprobs"),  # over vLLM's default max_logprobs, 20
        ({"logprobs": True}, "logprobs"),  # chat's boolean; completions take the count
        ({"top_logprobs": 2}, "top_logprobs"),  # chat's
        ({"presence_penalty": 2.5}, "presence_penalty"),  # OpenAI's range is [-2, 2]
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"best_of": 2}, "best_of"),
        ({"prompt_logprobs": 21}, "prompt_logprobs"),  # over vLLM's default max_logprobs
        ({"prompt_logprobs": -1}, "prompt_logprobs"),  # vLLM's whole vocabulary
        ({"stop": [""]}, "stop"),
        ({"stop": [f"stop {i}" for i in range(17)]}, "stop"),  # more than 16
        ({"prompt": [1, 2, 10**9]}, "prompt"),  # a token id outside the vocabulary
        ({"prompt": [1, -2]}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [[]]}, "prompt"),
        ({"prompt": [True]}, "prompt"),  # JSON's true is no token id
        ({"prompt": [PROMPT, 3]}, "prompt"),  # neither texts nor token-id lists
        ({"prompt": [PROMPT] * 65}, "prompt"),  # over 64 prompts
        ({"seed": -(2**63) - 1, "temperature": 0.8}, "seed"),  # was a 500 from the engine
        # vLLM's extensions a client of a vLLM-style endpoint sends: were silently ignored.
        ({"min_tokens": 8}, "min_tokens"),  # over max_tokens (4)
        ({"min_tokens": -1}, "min_tokens"),
        ({"logit_bias": {"five": 10}}, "logit_bias"),
        ({"min_p": 1.5}, "min_p"),
        ({"tool_choice": "required"}, "tool_choice"),  # chat's
        ({"tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),  # OpenAI's range is [-100, 100]
        ({"logit_bias": {str(10**9): 1}}, "logit_bias"),  # outside the vocabulary
        ({"repetition_penalty": 0}, "repetition_penalty"),
        # Structured output that cannot be honoured: named where the request put it.
        ({"guided_json": "{not json"}, "guided_json"),
        ({"guided_regex": "(ab"}, "guided_regex"),
        ({"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
        (
            {"structured_outputs": {"grammar": "start: undefined_rule"}},
            "structured_outputs.grammar",
        ),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
        ({"structured_outputs": {"structural_tag": "{}"}}, "structured_outputs.structural_tag"),
        (
            {"structured_outputs": {"json": {}, "whitespace_pattern": " "}},
            "structured_outputs.whitespace_pattern",
        ),
        ({"structured_outputs": {"jsonschema": {}}}, "structured_outputs.jsonschema"),
        (
            {"structured_outputs": {"json": {}, "disable_additional_properties": "yes"}},
            "structured_outputs.disable_additional_properties",
        ),
        ({"structured_outputs": {"regex": "a"}, "guided_choice": ["a"]}, "structured_outputs"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format.json_schema.schema",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": [1]}}},
            "response_format.json_schema.schema",
        ),
        ({"response_format": {"type": "structural_tag"}}, "response_format.type"),
        ({"guided_whitespace_pattern": " "}, "guided_whitespace_pattern"),
        # More of vLLM's extensions, served with 200 and ignored before.
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"stop_token_ids": list(range(257))}, "stop_token_ids"),  # over 256
        ({"use_beam_search": True}, "use_beam_search"),
        ({"allowed_token_ids": []}, "allowed_token_ids"),
        ({"allowed_token_ids": [-1]}, "allowed_token_ids"),
        ({"allowed_token_ids": [10**9]}, "allowed_token_ids"),  # outside the vocabulary
        ({"bad_words": [" "]}, "bad_words"),
        ({"bad_words": [f"w{i}" for i in range(129)]}, "bad_words"),  # over vLLM's 128
    ],
)
def test_bad_parameters_are_400_with_an_openai_error(
    sidecar: SidecarThread, body: dict[str, Any], param: str
) -> None:
    request = {"model": "target", "prompt": PROMPT, "max_tokens": 4, **body}
    # json.dumps writes NaN as the bare literal, which Python's parser (the sidecar's) takes.
    status, reply = post(f"{sidecar.http_url}/v1/completions", request)
    assert status == 400, reply
    error = reply["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param, error


def test_n_choices_are_each_a_generation(sidecar: SidecarThread) -> None:
    """``n`` was refused: several choices, each a generation of its own (greedy: the same
    text), the prompt counted once in the usage, each choice with its own decision."""
    asked = {"model": "target", "max_tokens": 6, "temperature": 0}
    single = client(sidecar).completions.create(prompt=PROMPT, **asked)
    several = client(sidecar).completions.create(prompt=PROMPT, n=3, **asked)
    assert [c.index for c in several.choices] == [0, 1, 2]
    assert {c.text for c in several.choices} == {single.choices[0].text}
    assert single.usage is not None and several.usage is not None
    assert several.usage.prompt_tokens == single.usage.prompt_tokens
    assert several.usage.completion_tokens == 3 * single.usage.completion_tokens
    ids = {c.model_extra["specroute"]["request_id"] for c in several.choices if c.model_extra}
    assert len(ids) == 3
    chat = client(sidecar).chat.completions.create(
        messages=[{"role": "user", "content": PROMPT}], n=2, **asked
    )
    assert [c.index for c in chat.choices] == [0, 1]
    assert chat.choices[0].message.content == chat.choices[1].message.content


def test_several_prompts_are_each_a_generation_n_times(sidecar: SidecarThread) -> None:
    """Several prompts (texts or token-id lists; were refused): n choices per prompt,
    numbered prompt by prompt (index = prompt * n + i, as vLLM numbers them), each prompt's
    tokens counted once in the usage, streamed too."""
    other = "Once upon a time"
    asked = {"model": "target", "max_tokens": 5, "temperature": 0}
    completions = client(sidecar).completions
    alone = [completions.create(prompt=p, **asked) for p in (PROMPT, other)]
    ids = sidecar.service.prompt_ids(Prompt(text=other))
    for prompt in ([PROMPT, other], [sidecar.service.prompt_ids(Prompt(text=PROMPT)), ids]):
        reply = completions.create(prompt=prompt, n=2, **asked)
        assert [c.index for c in reply.choices] == [0, 1, 2, 3]
        texts = [c.text for c in reply.choices]
        assert texts == [alone[0].choices[0].text] * 2 + [alone[1].choices[0].text] * 2
        assert reply.usage is not None
        assert reply.usage.prompt_tokens == sum(
            a.usage.prompt_tokens for a in alone if a.usage is not None
        )
        assert reply.usage.completion_tokens == sum(
            2 * a.usage.completion_tokens for a in alone if a.usage is not None
        )
    chunks = list(completions.create(prompt=[PROMPT, other], stream=True, **asked))
    streamed = {0: "", 1: ""}
    for chunk in chunks:
        for choice in chunk.choices:
            streamed[choice.index] += choice.text
    assert streamed == {0: alone[0].choices[0].text, 1: alone[1].choices[0].text}


def test_n_choices_stream_one_after_another(sidecar: SidecarThread) -> None:
    """Each choice's chunks carry its index, its first delta the role and its last the
    finish reason and its own decision; the usage chunk counts the prompt once."""
    asked = {"model": "target", "max_tokens": 6, "temperature": 0}
    messages: Any = [{"role": "user", "content": PROMPT}]
    single = client(sidecar).chat.completions.create(messages=messages, **asked)
    stream = client(sidecar).chat.completions.create(
        messages=messages, n=2, stream=True, stream_options={"include_usage": True}, **asked
    )
    chunks = list(stream)
    indices = [c.choices[0].index for c in chunks if c.choices]
    assert indices == sorted(indices) and set(indices) == {0, 1}
    for index in (0, 1):
        deltas = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == index]
        assert deltas[0].delta.role == "assistant"
        assert all(d.delta.role is None for d in deltas[1:])
        text = "".join(d.delta.content or "" for d in deltas)
        assert text == single.choices[0].message.content
        assert deltas[-1].finish_reason == single.choices[0].finish_reason
        assert deltas[-1].model_extra is not None and "specroute" in deltas[-1].model_extra
    usage = chunks[-1].usage
    assert usage is not None and single.usage is not None
    assert usage.prompt_tokens == single.usage.prompt_tokens
    assert usage.completion_tokens == 2 * single.usage.completion_tokens


def test_continuous_usage_stats_put_each_choices_usage_so_far_on_every_chunk(
    sidecar: SidecarThread,
) -> None:
    """vLLM's ``stream_options.continuous_usage_stats`` (refused before): with
    ``include_usage``, every chunk carries its choice's prompt tokens and the tokens it has
    generated so far, the last chunk of each choice its total; alone it asks for nothing."""
    asked: Any = {"model": "target", "max_tokens": 6, "temperature": 0, "stream": True}
    messages: Any = [{"role": "user", "content": PROMPT}]
    single = client(sidecar).chat.completions.create(
        messages=messages, **{**asked, "stream": False}
    )
    assert single.usage is not None
    options: Any = {"include_usage": True, "continuous_usage_stats": True}
    for endpoint, body in (
        ("chat", {"messages": messages}),
        ("completions", {"prompt": [PROMPT]}),
    ):
        openai_client = client(sidecar)
        chat = endpoint == "chat"
        create = openai_client.chat.completions.create if chat else openai_client.completions.create
        chunks = list(create(**body, n=2, stream_options=options, **asked))
        total = chunks[-1].usage
        assert not chunks[-1].choices and total is not None
        for index in (0, 1):
            mine = [c for c in chunks if c.choices and c.choices[0].index == index]
            usages = [c.usage for c in mine]
            assert all(u is not None for u in usages), endpoint
            counts = [u.completion_tokens for u in usages]
            assert counts == sorted(counts) and counts[-1] == total.completion_tokens // 2
            assert {u.prompt_tokens for u in usages} == {total.prompt_tokens}
            assert all(u.total_tokens == u.prompt_tokens + u.completion_tokens for u in usages)
        if chat:
            assert total.completion_tokens == 2 * single.usage.completion_tokens
            assert chunks[0].usage is not None and chunks[0].usage.completion_tokens == 0
    alone = list(
        client(sidecar).chat.completions.create(
            messages=messages, stream_options={"continuous_usage_stats": True}, **asked
        )
    )
    assert alone and all(c.usage is None for c in alone)


def test_echo_leads_with_the_prompt_and_its_logprobs_as_vllm_echoes(
    sidecar: SidecarThread,
) -> None:
    """Completions' ``echo`` (refused before): the text starts with the prompt's, and with
    ``logprobs`` the prompt's tokens lead the logprobs, the first with none and each other
    with the target's log-probability after the tokens before it, as one forward pass over
    the prompt gives it. This is what lm-evaluation-harness' loglikelihood requests send
    (token ids, ``max_tokens`` 1, ``logprobs`` 1, ``echo``); streamed, the prompt's chunk
    comes first and the rest is the same."""
    import torch

    ids = sidecar.service.prompt_ids(Prompt(text=PROMPT))
    asked: Any = {"model": "target", "max_tokens": 3, "temperature": 0}
    plain = client(sidecar).completions.create(prompt=PROMPT, logprobs=1, **asked)
    for prompt in (PROMPT, ids):
        reply = client(sidecar).completions.create(prompt=prompt, echo=True, logprobs=1, **asked)
        choice = reply.choices[0]
        assert choice.text == PROMPT + plain.choices[0].text
        scored, alone = choice.logprobs, plain.choices[0].logprobs
        assert scored is not None and alone is not None
        assert scored.token_logprobs is not None and scored.top_logprobs is not None
        assert scored.tokens is not None and scored.text_offset is not None
        assert len(scored.tokens) == len(ids) + 3
        assert scored.token_logprobs[0] is None and scored.top_logprobs[0] is None
        assert scored.tokens[len(ids) :] == alone.tokens
        assert scored.token_logprobs[len(ids) :] == pytest.approx(alone.token_logprobs)
        assert scored.text_offset[len(ids)] == len(PROMPT)
        assert reply.usage is not None and reply.usage.completion_tokens == 3
        with torch.inference_mode():
            logits = sidecar.service.components.target.model(torch.tensor([ids])).logits
        rows = torch.log_softmax(logits[0, :-1].float(), dim=-1)
        want = rows.gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1).tolist()
        assert scored.token_logprobs[1 : len(ids)] == pytest.approx(want, abs=1e-4)
        for token, logprob, top in zip(
            scored.tokens[1:], scored.token_logprobs[1:], scored.top_logprobs[1:], strict=True
        ):
            assert top is not None and top[token] == logprob  # the token among its top
    chunks = list(
        client(sidecar).completions.create(
            prompt=ids, echo=True, logprobs=1, stream=True, n=2, **asked
        )
    )
    for index in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == index]
        assert mine[0].text == PROMPT  # the prompt's chunk first
        assert "".join(c.text for c in mine) == choice.text
        streamed = [lp for c in mine if c.logprobs for lp in c.logprobs.token_logprobs or []]
        assert streamed == pytest.approx(scored.token_logprobs)
        offsets = [o for c in mine if c.logprobs for o in c.logprobs.text_offset or []]
        assert offsets == scored.text_offset
    unscored = client(sidecar).completions.create(prompt=PROMPT, echo=True, **asked)
    assert unscored.choices[0].text == choice.text and unscored.choices[0].logprobs is None
    streamed_text = client(sidecar).completions.create(
        prompt=PROMPT, echo=True, stream=True, **asked
    )
    assert "".join(c.choices[0].text for c in streamed_text if c.choices) == choice.text
    # max_tokens 0 with echo: the prompt alone, the scoring call (as vLLM: one token is
    # generated and not returned); without echo it is still a 400.
    scoring: Any = {**asked, "max_tokens": 0, "echo": True, "logprobs": 0}
    alone_prompt = client(sidecar).completions.create(prompt=ids, **scoring)
    assert alone_prompt.choices[0].text == PROMPT
    prompt_scores = alone_prompt.choices[0].logprobs
    assert prompt_scores is not None and prompt_scores.token_logprobs is not None
    assert prompt_scores.token_logprobs == pytest.approx(scored.token_logprobs[: len(ids)])
    chunks = list(client(sidecar).completions.create(prompt=ids, stream=True, **scoring))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == PROMPT
    streamed = [
        lp
        for c in chunks
        if c.choices and c.choices[0].logprobs
        for lp in c.choices[0].logprobs.token_logprobs or []
    ]
    assert streamed == prompt_scores.token_logprobs
    with pytest.raises(openai.BadRequestError) as no_echo:
        client(sidecar).completions.create(prompt=ids, **{**scoring, "echo": False})
    assert no_echo.value.body["param"] == "max_tokens"  # type: ignore[index]


def test_vllms_prompt_logprobs_give_each_prompt_tokens_logprob_and_rank(
    sidecar: SidecarThread,
) -> None:
    """vLLM's ``prompt_logprobs`` (refused before): per prompt token after the first, a map
    of token id -> {logprob, rank, decoded_token} with the token itself (its rank among
    the whole vocabulary) and the N most likely tokens (ranks 1..N); on completions'
    choices, at the top of a chat response, as vLLM places them. A stream does not carry
    them: 0 is accepted there, more is a 400, as vLLM."""
    import torch

    ids = sidecar.service.prompt_ids(Prompt(text=PROMPT))
    asked: Any = {"model": "target", "max_tokens": 2, "temperature": 0}
    reply = client(sidecar).completions.create(
        prompt=PROMPT, extra_body={"prompt_logprobs": 2}, **asked
    )
    extra = reply.choices[0].model_extra
    assert extra is not None
    entries = extra["prompt_logprobs"]
    assert len(entries) == len(ids) and entries[0] is None
    with torch.inference_mode():
        logits = sidecar.service.components.target.model(torch.tensor([ids])).logits
    rows = torch.log_softmax(logits[0, :-1].float(), dim=-1)
    for position, (token_id, entry) in enumerate(zip(ids[1:], entries[1:], strict=True)):
        row = rows[position]
        own = entry[str(token_id)]
        assert own["logprob"] == pytest.approx(float(row[token_id]), abs=1e-4)
        assert own["rank"] == int((row > row[token_id]).sum()) + 1
        best = row.topk(2).indices.tolist()
        assert [entry[str(i)]["rank"] for i in best] == [1, 2]
        assert len(entry) == 2 + (token_id not in best)
    scored = client(sidecar).completions.create(
        prompt=PROMPT, echo=True, logprobs=1, extra_body={"prompt_logprobs": 3}, **asked
    )
    echoed = scored.choices[0].logprobs
    assert echoed is not None and echoed.top_logprobs is not None
    assert all(len(top) <= 2 for top in echoed.top_logprobs[1:] if top)  # echo's own count
    messages: Any = [{"role": "user", "content": PROMPT}]
    chat = client(sidecar).chat.completions.create(
        messages=messages, extra_body={"prompt_logprobs": 0}, **asked
    )
    chat_ids = sidecar.service.prompt_ids(Prompt(messages=tuple(messages)))
    assert chat.model_extra is not None
    chat_entries = chat.model_extra["prompt_logprobs"]
    assert len(chat_entries) == len(chat_ids) and chat_entries[0] is None
    assert all(list(e) == [str(t)] for e, t in zip(chat_entries[1:], chat_ids[1:], strict=True))
    stream = client(sidecar).completions.create(
        prompt=PROMPT, stream=True, extra_body={"prompt_logprobs": 0}, **asked
    )
    assert "".join(c.choices[0].text for c in stream if c.choices)
    with pytest.raises(openai.BadRequestError) as streamed:
        client(sidecar).completions.create(
            prompt=PROMPT, stream=True, extra_body={"prompt_logprobs": 1}, **asked
        )
    assert streamed.value.body["param"] == "prompt_logprobs"  # type: ignore[index]


def test_skip_special_tokens_false_keeps_their_text(ending_sidecar: SidecarThread) -> None:
    """vLLM's ``skip_special_tokens: false`` (refused before): an end of turn the answer
    goes past (``ignore_eos``) is in its text, streamed or not; by default it is not."""
    from classifiers.chat import IM_END

    asked: Any = {
        "model": "target",
        "messages": [{"role": "user", "content": "What is 17 * 23?"}],
        "max_tokens": 24,
        "temperature": 0,
        "extra_body": {"ignore_eos": True, "skip_special_tokens": False},
    }
    answer = client(ending_sidecar).chat.completions.create(**asked)
    text = answer.choices[0].message.content
    assert text is not None and IM_END in text
    chunks = client(ending_sidecar).chat.completions.create(**asked, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    asked["extra_body"] = {"ignore_eos": True}
    skipped = client(ending_sidecar).chat.completions.create(**asked).choices[0].message.content
    assert skipped is not None and IM_END not in skipped


def test_chat_echo_leads_with_the_assistants_message_being_continued(
    sidecar: SidecarThread,
) -> None:
    """vLLM's chat ``echo`` (refused before): where the last message is the assistant's
    (continued with ``continue_final_message``), its text leads each choice's content,
    streamed as a delta after the role; after a user's message it adds nothing."""
    started = "The answer is"
    messages: Any = [
        {"role": "user", "content": "What is 17 * 23?"},
        {"role": "assistant", "content": started},
    ]
    asked: Any = {
        "model": "target",
        "messages": messages,
        "max_tokens": 6,
        "temperature": 0,
        "extra_body": {"continue_final_message": True, "add_generation_prompt": False},
    }
    plain = client(sidecar).chat.completions.create(**asked).choices[0].message.content
    asked["extra_body"] = {**asked["extra_body"], "echo": True}
    echoed = client(sidecar).chat.completions.create(**asked, n=2)
    assert [c.message.content for c in echoed.choices] == [started + (plain or "")] * 2
    chunks = list(client(sidecar).chat.completions.create(**asked, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert deltas[0].role == "assistant" and deltas[1].content == started
    assert "".join(d.content or "" for d in deltas) == started + (plain or "")
    after_user = client(sidecar).chat.completions.create(
        model="target",
        messages=messages[:1],
        max_tokens=4,
        temperature=0,
        extra_body={"echo": True},
    )
    alone = client(sidecar).chat.completions.create(
        model="target", messages=messages[:1], max_tokens=4, temperature=0
    )
    assert after_user.choices[0].message.content == alone.choices[0].message.content


def test_seeded_choices_are_lone_requests_with_seeds_in_turn(
    serving_world: ServingWorld, components: Components, tmp_path: Path
) -> None:
    """Choice i samples with seed + i: the choices differ, and each is what a lone request
    with that seed gets (plain decoding here, so every request runs the same arm)."""
    plain = SidecarThread(serving_world.settings(tmp_path / "state", policy="none"), components)
    try:
        asked = {"model": "target", "prompt": PROMPT, "max_tokens": 8, "temperature": 1.0}
        several = client(plain).completions.create(n=3, seed=11, logprobs=1, **asked)
        lone = [
            client(plain).completions.create(seed=11 + i, logprobs=1, **asked) for i in range(3)
        ]
        assert [c.text for c in several.choices] == [r.choices[0].text for r in lone]
        assert len({c.text for c in several.choices}) > 1
        for choice, reply in zip(several.choices, lone, strict=True):
            assert choice.logprobs is not None and reply.choices[0].logprobs is not None
            assert choice.logprobs.tokens == reply.choices[0].logprobs.tokens
    finally:
        plain.stop()


def test_a_prompt_of_token_ids_is_read_as_they_are(sidecar: SidecarThread) -> None:
    """OpenAI's token-id prompts (were refused by name): a list of ids, or a list of one
    such list, generates what the text they tokenize from does, the ids counted as the
    prompt's tokens; ids no text tokenizes to are read as they are."""
    service = sidecar.service
    ids = service.prompt_ids(Prompt(text=PROMPT))
    completions = client(sidecar).completions
    text = completions.create(model="target", prompt=PROMPT, max_tokens=8, temperature=0)
    for prompt in (ids, [ids]):
        reply = completions.create(model="target", prompt=prompt, max_tokens=8, temperature=0)
        assert reply.choices[0].text == text.choices[0].text
        assert reply.usage is not None and reply.usage.prompt_tokens == len(ids)
    # A token of the prompt spelt as two tokens: the same text, ids no tokenization gives
    # it (re-tokenized, the prompt would count one token fewer).
    tokenizer = service.tokenizer
    vocabulary = tokenizer.get_vocab()
    at, pieces = next(
        (i, [vocabulary[word[:cut]], vocabulary[word[cut:]]])
        for i, word in enumerate(tokenizer.convert_ids_to_tokens(ids))
        for cut in range(1, len(word))
        if word[:cut] in vocabulary and word[cut:] in vocabulary
    )
    spelt = [*ids[:at], *pieces, *ids[at + 1 :]]
    assert tokenizer.decode(spelt) == tokenizer.decode(ids)
    expected = service.components.engine.generate(
        spelt, service.drafters.get("none").drafter, 0, max_new_tokens=8
    )
    expected.collect()
    reply = completions.create(model="target", prompt=spelt, max_tokens=8, temperature=0)
    assert reply.choices[0].text == expected.text
    assert reply.usage is not None and reply.usage.prompt_tokens == len(ids) + 1


def penalised_reference(sidecar: SidecarThread, penalties: Any, tokens: int) -> str:
    """The engine's greedy text for PROMPT under ``penalties``, without speculation."""
    service = sidecar.service
    run = service.components.engine.generate(
        service.prompt_ids(Prompt(text=PROMPT)),
        service.drafters.get("none").drafter,
        0,
        max_new_tokens=tokens,
        penalties=penalties,
    )
    run.collect()
    return run.text


def test_penalties_and_min_tokens_are_served(
    sidecar: SidecarThread, ending_sidecar: SidecarThread
) -> None:
    """OpenAI's presence and frequency penalties and logit_bias, vLLM's repetition_penalty
    and min_tokens (were refused by name): the text is the target's own under them."""
    from drafters.penalties import Penalties

    penalties = Penalties(repetition=1.3, presence=0.5, frequency=0.8)
    expected = penalised_reference(sidecar, penalties, 12)
    assert expected != penalised_reference(sidecar, Penalties(), 12)
    for stream in (False, True):
        reply = client(sidecar).completions.create(
            model="target",
            prompt=PROMPT,
            max_tokens=12,
            temperature=0,
            presence_penalty=0.5,
            frequency_penalty=0.8,
            extra_body={"repetition_penalty": 1.3},
            stream=stream,
        )
        chunks = list(reply) if stream else [reply]
        assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    # min_p 1 keeps the most likely token alone: a sampled request writes the greedy text.
    top_only = client(sidecar).completions.create(
        model="target", prompt=PROMPT, max_tokens=12, temperature=0.8, extra_body={"min_p": 1.0}
    )
    assert top_only.choices[0].text == penalised_reference(sidecar, Penalties(), 12)
    ids, _ = greedy_reference(sidecar, PROMPT, 4)
    biased = client(sidecar).completions.create(
        model="target", prompt=PROMPT, max_tokens=4, temperature=0, logit_bias={str(ids[0]): -100}
    )
    assert biased.choices[0].text == penalised_reference(
        sidecar, Penalties(bias=((ids[0], -100.0),)), 4
    )
    assert sidecar.service.tokenizer.decode(ids[0]) not in biased.choices[0].text
    chat = [{"role": "user", "content": "What is 17 * 23?"}]
    replies = client(ending_sidecar).chat.completions
    ended = replies.create(model="target", messages=chat, max_tokens=16, temperature=0)
    assert ended.usage is not None and ended.usage.completion_tokens < 12
    longer = replies.create(
        model="target", messages=chat, max_tokens=16, temperature=0, extra_body={"min_tokens": 12}
    )
    assert longer.usage is not None and longer.usage.completion_tokens >= 12


def test_allowed_token_ids_and_bad_words_are_vllms(sidecar: SidecarThread) -> None:
    """vLLM's ``allowed_token_ids`` and ``bad_words`` (were refused by name): the text is
    the target's own under them, over OpenAI and over gRPC."""
    from drafters.penalties import Penalties

    _, text = greedy_reference(sidecar, PROMPT, 8)
    tokenizer = sidecar.service.tokenizer
    letters = tuple(tokenizer.convert_tokens_to_ids(list("abcdefgh")))
    expected = penalised_reference(sidecar, Penalties(allowed=letters), 8)
    assert expected != text and set(expected) <= set("abcdefgh")
    word = expected[0]  # a letter the allowed letters' text begins with: barred too
    barred = Penalties(allowed=letters, bad_words=sidecar.service.bad_word_ids([word]))
    unbarred = penalised_reference(sidecar, barred, 8)
    assert word not in unbarred and unbarred != expected
    for stream in (False, True):
        reply = client(sidecar).completions.create(
            model="target",
            prompt=PROMPT,
            max_tokens=8,
            temperature=0,
            extra_body={"allowed_token_ids": list(letters)},
            stream=stream,
        )
        chunks = list(reply) if stream else [reply]
        assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    reply = client(sidecar).completions.create(
        model="target",
        prompt=PROMPT,
        max_tokens=8,
        temperature=0,
        extra_body={"allowed_token_ids": list(letters), "bad_words": [word]},
    )
    assert reply.choices[0].text == unbarred
    sampling = pb.SamplingParams(allowed_token_ids=letters)
    request = pb.GenerateRequest(text=PROMPT, max_new_tokens=8, sampling=sampling, no_update=True)
    assert list(sidecar.stub.Generate(request, timeout=60))[-1].stats.generated_text == expected


def test_stop_token_ids_and_ignore_eos_are_vllms(
    ending_sidecar: SidecarThread, sidecar: SidecarThread
) -> None:
    """vLLM's ``stop_token_ids`` and ``ignore_eos`` (were refused by name; a benchmark's
    fixed-length outputs ask for ``ignore_eos``), through the official client's
    ``extra_body``: an answer the end of turn ended runs on to ``max_tokens`` (finish
    reason length); a stop token id ends one where that token first comes (stop)."""
    chat = [{"role": "user", "content": "What is 17 * 23?"}]
    replies = client(ending_sidecar).chat.completions
    ended = replies.create(model="target", messages=chat, max_tokens=16, temperature=0)
    ended_tokens = ended.usage.completion_tokens if ended.usage else 0
    assert ended.choices[0].finish_reason == "stop" and ended_tokens < 16
    going_on = replies.create(
        model="target", messages=chat, max_tokens=16, temperature=0, extra_body={"ignore_eos": True}
    )
    assert going_on.choices[0].finish_reason == "length"
    assert going_on.usage is not None and going_on.usage.completion_tokens == 16
    # On the other sidecar: the greedy ids of a completion, cut at a token of them.
    ids, _ = greedy_reference(sidecar, PROMPT, 12)
    token = ids[3]
    cut = ids.index(token) + 1
    text = sidecar.service.tokenizer.decode(ids[:cut])
    reply = client(sidecar).completions.create(
        model="target",
        prompt=PROMPT,
        max_tokens=12,
        temperature=0,
        extra_body={"stop_token_ids": [token]},
    )
    assert reply.choices[0].finish_reason == "stop" and reply.choices[0].text == text
    assert reply.usage is not None and reply.usage.completion_tokens == cut
    streamed = list(
        client(sidecar).completions.create(
            model="target",
            prompt=PROMPT,
            max_tokens=12,
            temperature=0,
            stream=True,
            extra_body={"stop_token_ids": [token]},
        )
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == text
    assert [c.choices[0].finish_reason for c in streamed if c.choices][-1] == "stop"


def test_neutral_values_of_unimplemented_parameters_are_served(sidecar: SidecarThread) -> None:
    """A client that sends a parameter at the value that asks for nothing (vLLM's
    repetition_penalty 1, OpenAI's tool_choice "none"), or a field neither API defines,
    is served."""
    request = {
        "model": "target",
        "prompt": PROMPT,
        "max_tokens": 2,
        "repetition_penalty": 1.0,
        "min_p": 0,
        "ignore_eos": False,
        "tool_choice": "none",
        "stop_token_ids": [],
        "skip_special_tokens": True,
        "response_format": {"type": "text"},
        "metadata_of_my_own": {"x": 1},
    }
    status, reply = post(f"{sidecar.http_url}/v1/completions", request)
    assert status == 200, reply


def test_a_malformed_message_names_it_as_openai_does(sidecar: SidecarThread) -> None:
    """The param of a malformed chat message was pydantic's "messages.0.content.str"."""
    body = {"model": "target", "messages": [{"role": "user", "content": 5}], "max_tokens": 2}
    status, reply = post(f"{sidecar.http_url}/v1/chat/completions", body)
    assert status == 400 and reply["error"]["param"] == "messages[0].content", reply


def test_client_raises_bad_request_and_not_found(sidecar: SidecarThread) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        client(sidecar).completions.create(model="target", prompt="   ", max_tokens=4)
    assert bad.value.status_code == 400
    assert "empty" in bad.value.message
    with pytest.raises(openai.NotFoundError) as missing:
        client(sidecar).completions.create(model="no-such-model", prompt=PROMPT, max_tokens=4)
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client(sidecar).chat.completions.create(
            model="target", messages=[{"role": "robot", "content": "x"}], max_tokens=4
        )  # type: ignore[misc, list-item]


def test_over_the_limits_is_context_length_exceeded(sidecar: SidecarThread) -> None:
    """Clients (LiteLLM's fallbacks, LangChain's trimming) tell an over-long request by
    the code ``context_length_exceeded``: a prompt over max_prompt_tokens, by characters
    or by tokens, and a max_tokens over the answer's limit carry it."""
    limits = sidecar.service.limits
    words = " ".join(["word"] * (limits.max_prompt_tokens + 8))
    for request in (
        {"prompt": words, "max_tokens": 4},  # too many tokens
        {"prompt": "x" * (sidecar.service._max_prompt_chars + 1), "max_tokens": 4},
        {"prompt": PROMPT, "max_tokens": limits.max_new_tokens + 1},
    ):
        status, reply = post(f"{sidecar.http_url}/v1/completions", {"model": "target", **request})
        assert status == 400 and reply["error"]["code"] == "context_length_exceeded", reply
    # The budget's refusal names the field as the client sent it (max_new_tokens before).
    over = limits.max_new_tokens + 1
    chat = {"model": "target", "messages": [{"role": "user", "content": PROMPT}]}
    for field in ("max_tokens", "max_completion_tokens"):
        status, reply = post(f"{sidecar.http_url}/v1/chat/completions", {**chat, field: over})
        assert status == 400 and reply["error"]["param"] == field, reply
        assert reply["error"]["code"] == "context_length_exceeded", reply


def test_body_that_is_not_json_is_400(sidecar: SidecarThread) -> None:
    status, reply = post(f"{sidecar.http_url}/v1/completions", b"{not json")
    assert status == 400
    assert reply["error"]["type"] == "invalid_request_error"
    status, reply = post(f"{sidecar.http_url}/v1/completions", {"model": "target"})
    assert status == 400
    assert reply["error"]["param"] == "prompt"


def test_unknown_route_is_404_with_an_openai_error(sidecar: SidecarThread) -> None:
    status, reply = post(f"{sidecar.http_url}/v1/embeddings", {"model": "target", "input": "x"})
    assert status == 404
    assert reply["error"]["type"] == "invalid_request_error"


def test_overload_is_429(sidecar: SidecarThread) -> None:
    # The fixture admits one generation (one worker, no queue): take that slot.
    slot = sidecar.service.queue.admit()
    try:
        with pytest.raises(openai.RateLimitError) as refused:
            client(sidecar).completions.create(model="target", prompt=PROMPT, max_tokens=4)
    finally:
        slot.release()
    assert refused.value.status_code == 429
    assert refused.value.code == "rate_limit_exceeded"


def test_data_token_is_401(
    serving_world: Any, components: Any, tmp_path_factory: pytest.TempPathFactory
) -> None:
    guarded = SidecarThread(
        # Plain decoding: this test is about the token; speculative outputs are checked
        # against the target's own elsewhere.
        serving_world.settings(
            tmp_path_factory.mktemp("token"), data_token="data-secret", policy="none"
        ),
        components,
    )
    try:
        anonymous = openai.OpenAI(base_url=f"{guarded.http_url}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as refused:
            anonymous.models.list()
        assert refused.value.status_code == 401
        allowed = openai.OpenAI(
            base_url=f"{guarded.http_url}/v1", api_key="data-secret", max_retries=0
        )
        reply = allowed.completions.create(model="target", prompt=PROMPT, max_tokens=2)
        # One token or two: the tiny world's target may end its turn after the first (a
        # run of make test on 2026-12-04 did, with plain decoding, in the run where two
        # builds of the tiny world also differed in their last bits).
        assert reply.usage is not None and 1 <= reply.usage.completion_tokens <= 2
        assert reply.choices[0].finish_reason in ("length", "stop")
    finally:
        guarded.stop()


def test_grpc_still_refuses_what_the_front_refuses(sidecar: SidecarThread) -> None:
    # Same domain checks behind both edges: a NaN temperature is refused by gRPC too.
    request = pb.GenerateRequest(
        text=PROMPT, max_new_tokens=4, sampling=pb.SamplingParams(temperature=float("nan"))
    )
    with pytest.raises(grpc.RpcError) as refused:
        list(sidecar.stub.Generate(request, timeout=60))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_request_over_the_targets_context_is_refused_or_fitted(
    serving_world: ServingWorld, components: Any, tmp_path: Any
) -> None:
    """Prompt and max_new_tokens over the target's context (2048 positions here), within
    the limits: the in-process engine ran until the context ended ("length"), where vLLM
    and TGI refuse the request, and /info promised more than the context. Now refused on
    every front; OpenAI chat without max_tokens is given what the context leaves, as vLLM
    does."""
    from router.settings import Limits
    from tests.router.conftest import SidecarThread

    limits = Limits(max_prompt_tokens=2000, max_new_tokens=1000, generation_queue_size=0)
    running = SidecarThread(serving_world.settings(tmp_path / "state", limits=limits), components)
    try:
        prompt = "word " * 750
        prompt_tokens = len(running.service.prompt_ids(Prompt(text=prompt)))
        assert 1100 < prompt_tokens <= 2000
        over = 2048 - prompt_tokens + 1
        with pytest.raises(grpc.RpcError) as refused:
            list(running.stub.Generate(pb.GenerateRequest(text=prompt, max_new_tokens=over)))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "context is 2048 tokens" in str(refused.value.details())
        tgi = {"inputs": prompt, "parameters": {"max_new_tokens": over}}
        assert post(f"{running.http_url}/generate", tgi)[0] == 422
        status, body = post(
            f"{running.http_url}/v1/completions",
            {"model": "target", "prompt": prompt, "max_tokens": over},
        )
        assert status == 400 and body["error"]["code"] == "context_length_exceeded"
        reply = client(running).chat.completions.create(
            model="target", messages=[{"role": "user", "content": prompt}], temperature=0
        )
        assert reply.usage is not None
        assert reply.usage.prompt_tokens + reply.usage.completion_tokens <= 2048
        with urllib.request.urlopen(f"{running.http_url}/info", timeout=30) as response:
            info = json.loads(response.read())
        assert info["max_total_tokens"] == 2048 and info["max_input_tokens"] == 2000
    finally:
        running.stop()


def test_a_generation_that_ends_without_its_result_is_an_error_not_a_silent_end(
    sidecar: SidecarThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run that ends without its result (no known path makes one; a bug would) was a
    stream ended by a silent ``[DONE]``: it ends with an error event after the text made
    so far, and a response that is not streamed is a 500."""
    from router.service import GenerationResult

    real = sidecar.service.generate

    async def short(request: Any) -> Any:
        async for item in real(request):
            if not isinstance(item, GenerationResult):
                yield item

    monkeypatch.setattr(sidecar.service, "generate", short)
    body = {"model": "target", "prompt": PROMPT, "max_tokens": 3, "temperature": 0}
    request = urllib.request.Request(
        f"{sidecar.http_url}/v1/completions",
        data=json.dumps({**body, "stream": True}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        raw = response.read().decode()
    events = [e[5:].strip() for e in raw.split("\n\n") if e.startswith("data:")]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert "without a result" in error["message"] and error["type"] == "server_error", error
    assert any("choices" in json.loads(e) for e in events[:-2])  # the text made was sent
    status, reply = post(f"{sidecar.http_url}/v1/completions", body)
    assert status == 500 and "without a result" in reply["error"]["message"], reply


def test_choices_run_at_most_width_at_once_in_order_and_a_failure_stops_the_rest() -> None:
    """``_all_at_most``: results in the jobs' order, never more than ``width`` running
    (1: one after another, as in-process), the first failure raised and the rest
    cancelled (a fleet's choices run at once, up to its replicas' free places)."""
    import asyncio

    from router.openai_front import _all_at_most

    running: list[int] = []
    peak: list[int] = []
    cancelled: list[int] = []

    started: list[int] = []

    def job(index: int, fails: bool = False, seconds: float = 0.02) -> Any:
        async def run() -> int:
            started.append(index)
            running.append(index)
            peak.append(len(running))
            try:
                await asyncio.sleep(seconds)
                if fails:
                    raise RuntimeError(f"choice {index} failed")
                return index
            except asyncio.CancelledError:
                cancelled.append(index)
                raise
            finally:
                running.remove(index)

        return run

    for width in (1, 2, 5):
        peak.clear()
        assert asyncio.run(_all_at_most(width, [job(i) for i in range(5)])) == list(range(5))
        assert max(peak) == width
    started.clear()
    slow = [job(0, seconds=5.0), job(1, fails=True), job(2, seconds=5.0)]
    with pytest.raises(RuntimeError, match="choice 1 failed"):
        asyncio.run(_all_at_most(2, slow))
    # Choice 0 was stopped mid-way, choice 2 never started, nothing is left running.
    assert cancelled == [0] and started == [0, 1] and not running


def test_a_chat_may_continue_its_last_message_or_leave_the_opening_out(
    sidecar: SidecarThread,
) -> None:
    """vLLM's continue_final_message and add_generation_prompt (were refused by name): the
    generation goes on from the last message's text, or from the conversation without the
    assistant's opening, as a completion of that rendering does; both true is a 400."""
    from classifiers.chat import render_chat

    messages: Any = [
        {"role": "user", "content": "What is 17 * 23?"},
        {"role": "assistant", "content": "The answer is"},
    ]
    asked: Any = {"model": "target", "max_tokens": 8, "temperature": 0}
    chat = client(sidecar).chat.completions
    completions = client(sidecar).completions
    opened = chat.create(messages=messages, **asked)
    counts = {opened.usage.prompt_tokens if opened.usage else 0}
    for flags, rendering in (
        ({"continue_final_message": True}, {"generation_prompt": False, "continue_final": True}),
        ({"add_generation_prompt": False}, {"generation_prompt": False}),
    ):
        reply = chat.create(messages=messages, extra_body=flags, **asked)
        text = render_chat(messages, **rendering)
        expected = completions.create(prompt=text, **asked)
        assert reply.choices[0].message.content == expected.choices[0].text, flags
        assert reply.usage is not None and expected.usage is not None
        assert reply.usage.prompt_tokens == expected.usage.prompt_tokens
        counts.add(reply.usage.prompt_tokens)
    assert len(counts) == 3  # three renderings of the same messages
    # vLLM's chat_template_kwargs reach the template (a variable Qwen2.5's ignores: the
    # same rendering); what the request's own fields set is refused.
    thinking = chat.create(
        messages=messages, extra_body={"chat_template_kwargs": {"enable_thinking": False}}, **asked
    )
    assert thinking.usage is not None and thinking.usage.prompt_tokens in counts
    status, body = post(
        f"{sidecar.http_url}/v1/chat/completions",
        {"messages": messages, "chat_template_kwargs": {"tokenize": True}, **asked},
    )
    assert status == 400 and body["error"]["param"] == "chat_template_kwargs", body
    both = {"continue_final_message": True, "add_generation_prompt": True}
    status, body = post(
        f"{sidecar.http_url}/v1/chat/completions", {"messages": messages, **both, **asked}
    )
    assert status == 400 and body["error"]["param"] == "continue_final_message", body
    # The gRPC Conversation has the same fields.
    conversation = pb.Conversation(
        messages=[pb.ChatMessage(**m) for m in messages], continue_final_message=True
    )
    chunks = list(
        sidecar.stub.Generate(
            pb.GenerateRequest(conversation=conversation, max_new_tokens=8), timeout=60
        )
    )
    continued = render_chat(messages, generation_prompt=False, continue_final=True)
    assert chunks[-1].stats.generated_text == grpc_greedy_text(sidecar, continued, 8)


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


def test_tools_are_rendered_by_the_chat_template(sidecar: SidecarThread) -> None:
    """A chat's tools (were refused by name), and earlier calls and tool answers, are what
    the target's chat template renders (Qwen2.5's tools section; arguments as objects);
    with tool_choice "none" the tools are left out."""
    service = sidecar.service
    messages: Any = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
    ]
    asked: Any = {"model": "target", "max_tokens": 4, "temperature": 0}
    reply = client(sidecar).chat.completions.create(
        messages=messages, tools=[WEATHER_TOOL], **asked
    )
    templated = [{**m, "content": m["content"] or ""} for m in messages]
    templated[1]["tool_calls"][0]["function"]["arguments"] = {"city": "Paris"}
    text = service.tokenizer.apply_chat_template(
        templated, tools=[WEATHER_TOOL], tokenize=False, add_generation_prompt=True
    )
    assert "<tools>" in text and '"arguments": {"city": "Paris"}' in text
    expected = client(sidecar).completions.create(prompt=text, **asked)
    assert reply.usage is not None and expected.usage is not None
    assert reply.usage.prompt_tokens == expected.usage.prompt_tokens
    assert reply.choices[0].message.content == expected.choices[0].text
    # A tool that is not Unicode (a lone surrogate, JSON's "\ud800") failed in the
    # tokenizer after rendering (a 500; found by test_fuzz).
    unicode_less = {"type": "function", "function": {"name": "f", "description": "\ud800"}}
    status, body = post(
        f"{sidecar.http_url}/v1/chat/completions",
        {"messages": messages, "tools": [unicode_less], **asked},
    )
    assert status == 400 and body["error"]["param"] is None and "tools" in body["error"]["message"]
    # A tool that is not a function tool, or a function without a name or with a schema
    # that is not an object, was rendered into the prompt as it was (found by fuzzing).
    for tool, param in (
        ({"type": "function"}, "tools[0].function"),
        ({"type": "code_interpreter"}, "tools[0].type"),
        ({"type": "function", "function": {"name": ""}}, "tools[0].function.name"),
        (
            {"type": "function", "function": {"name": "f", "parameters": 5}},
            "tools[0].function.parameters",
        ),
    ):
        status, body = post(
            f"{sidecar.http_url}/v1/chat/completions",
            {"messages": messages, "tools": [tool], **asked},
        )
        assert status == 400 and body["error"]["param"] == param, body
    # Nor an earlier call's arguments, sent as JSON text with a "\ud800" escape: the
    # template renders them parsed (a 500 too; found by test_fuzz through /v1/messages).
    surrogate = json.loads(json.dumps(messages))
    surrogate[1]["tool_calls"][0]["function"]["arguments"] = json.dumps({"city": "\ud800"})
    status, body = post(
        f"{sidecar.http_url}/v1/chat/completions",
        {"messages": surrogate, "tools": [WEATHER_TOOL], **asked},
    )
    assert status == 400 and "messages[1].tool_calls" in body["error"]["message"]
    # An earlier call without its arguments failed inside the template (a 500), one without
    # its name rendered a call to "" (found by fuzzing the HTTP bodies).
    for key, field in (("arguments", "arguments"), ("name", "name")):
        missing = json.loads(json.dumps(messages))
        del missing[1]["tool_calls"][0]["function"][key]
        status, body = post(
            f"{sidecar.http_url}/v1/chat/completions",
            {"messages": missing, "tools": [WEATHER_TOOL], **asked},
        )
        assert status == 400, body
        assert body["error"]["param"] == f"messages[1].tool_calls[0].function.{field}", body
    unused = client(sidecar).chat.completions.create(
        messages=messages, tools=[WEATHER_TOOL], tool_choice="none", **asked
    )
    assert unused.usage is not None and unused.usage.prompt_tokens < reply.usage.prompt_tokens


def test_a_tool_call_answer_is_openais_tool_calls_whole_and_streamed(
    sidecar: SidecarThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The answer's <tool_call> blocks become the message's tool_calls (finish reason
    tool_calls), the text before them its content; streamed, the content goes as it
    comes and the calls in one delta. (The tiny target never writes a call: its run's
    text is replaced by one, as a Qwen2.5 answer would have it.)"""
    import dataclasses

    from router.service import GenerationResult, TokenChunk

    answer = (
        'Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}'
        "\n</tool_call>"
    )
    pieces = [answer[:9], answer[9:20], answer[20:50], answer[50:]]
    real = sidecar.service.generate

    async def calling(request: Any) -> Any:
        async for item in real(request):
            if isinstance(item, GenerationResult):
                for piece in pieces:
                    yield TokenChunk((1,), (piece,), (False,), piece)
                yield dataclasses.replace(item, generated_text=answer)
            elif not isinstance(item, TokenChunk):
                yield item

    monkeypatch.setattr(sidecar.service, "generate", calling)
    chat = client(sidecar).chat.completions
    asked: Any = {
        "model": "target",
        "messages": [{"role": "user", "content": "Weather in Paris?"}],
        "tools": [WEATHER_TOOL],
        "max_tokens": 4,
    }
    reply = chat.create(**asked)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me check."
    (call,) = choice.message.tool_calls or []
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    content, calls, finishes = "", [], []
    for chunk in chat.create(**asked, stream=True):
        for streamed in chunk.choices:
            content += streamed.delta.content or ""
            calls.extend(streamed.delta.tool_calls or [])
            finishes.append(streamed.finish_reason)
    assert content == "Let me check." and finishes[-1] == "tool_calls"
    assert [c.function.name for c in calls] == ["get_weather"]
    assert json.loads(calls[0].function.arguments or "") == {"city": "Paris"}
    # Without tools the same text is content, as it was.
    plain = chat.create(**{**asked, "tools": None})
    assert plain.choices[0].message.content == answer and not plain.choices[0].message.tool_calls
