"""The TGI-compatible HTTP front, driven by the official text-generation client."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
from text_generation import AsyncClient, Client
from text_generation.errors import ValidationError

from router.domain import MAX_STOP_SEQUENCES
from tests.router.conftest import (
    COMPLETION_PROMPT,
    ServingWorld,
    SidecarThread,
    greedy_reference,
    target_logprobs,
)

PROMPT = COMPLETION_PROMPT


def post(
    url: str, body: dict[str, Any], headers: dict[str, str] | None = None
) -> tuple[int, str, bytes]:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read()


def test_client_generate_is_exactly_the_greedy_output(sidecar: SidecarThread) -> None:
    expected_ids, expected_text = greedy_reference(sidecar, PROMPT, 24)
    assert len(expected_ids) == 24  # a real comparison, not a lone EOS
    response = Client(sidecar.http_url, timeout=60).generate(PROMPT, max_new_tokens=24)
    assert response.generated_text == expected_text
    assert [token.id for token in response.details.tokens] == expected_ids
    assert response.details.generated_tokens == len(expected_ids)
    assert response.details.finish_reason.value in {"length", "eos_token"}
    assert response.details.prefill == []


def test_decoder_input_details_are_the_prompts_tokens_with_the_targets_logprobs(
    sidecar: SidecarThread,
) -> None:
    """``decoder_input_details`` (refused before): ``details.prefill`` lists the prompt's
    tokens, the first with no logprob and each other with the target's after the tokens
    before it, as one forward pass over the prompt gives it; the output is unchanged. A
    stream refuses it, in TGI's words."""
    import torch

    from router.domain import Prompt

    _, expected_text = greedy_reference(sidecar, PROMPT, 8)
    response = Client(sidecar.http_url, timeout=60).generate(
        PROMPT, max_new_tokens=8, decoder_input_details=True
    )
    assert response.generated_text == expected_text
    ids = sidecar.service.prompt_ids(Prompt(text=PROMPT))
    prefill = response.details.prefill
    assert [token.id for token in prefill] == ids
    assert prefill[0].logprob is None
    with torch.inference_mode():
        logits = sidecar.service.components.target.model(torch.tensor([ids])).logits
    rows = torch.log_softmax(logits[0, :-1].float(), dim=-1)
    want = rows.gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1).tolist()
    assert [token.logprob for token in prefill[1:]] == pytest.approx(want, abs=1e-4)
    assert "".join(token.text for token in prefill) == PROMPT
    streamed = {"inputs": PROMPT, "parameters": {"decoder_input_details": True}}
    for route, body in (("/generate_stream", streamed), ("/", {**streamed, "stream": True})):
        status, _, raw = post(sidecar.http_url + route, body)
        assert status == 422 and b"not supported when streaming" in raw, raw


def test_client_generate_stream_is_exactly_the_greedy_output(sidecar: SidecarThread) -> None:
    expected_ids, expected_text = greedy_reference(sidecar, PROMPT, 24)
    events = list(Client(sidecar.http_url, timeout=60).generate_stream(PROMPT, max_new_tokens=24))
    assert [event.token.id for event in events] == expected_ids
    assert all(event.generated_text is None for event in events[:-1])
    assert events[-1].generated_text == expected_text
    assert events[-1].details is not None
    assert events[-1].details.generated_tokens == len(expected_ids)
    text = "".join(event.token.text for event in events if not event.token.special)
    assert text.split() == expected_text.split()


def test_details_carry_the_targets_logprobs_and_top_n_tokens(sidecar: SidecarThread) -> None:
    """Every token's logprob was null and top_n_tokens was refused (422). With details
    (the client's streams always ask for them) each token carries the target's raw
    logprob, and top_n_tokens its most likely tokens, in both routes."""
    expected_ids, _ = greedy_reference(sidecar, PROMPT, 16)
    reference = target_logprobs(sidecar, PROMPT, expected_ids)
    client = Client(sidecar.http_url, timeout=60)
    details = client.generate(PROMPT, max_new_tokens=16, top_n_tokens=2).details
    assert [t.logprob for t in details.tokens] == pytest.approx(reference, abs=1e-4)
    assert details.top_tokens is not None and len(details.top_tokens) == 16
    for token, top in zip(details.tokens, details.top_tokens, strict=True):
        assert len(top) == 2 and top[0].id == token.id  # greedy: the likeliest comes first
        assert top[0].logprob == pytest.approx(token.logprob)
        assert top[0].logprob >= top[1].logprob
    events = list(client.generate_stream(PROMPT, max_new_tokens=16, top_n_tokens=2))
    assert [e.token.logprob for e in events] == pytest.approx(reference, abs=1e-4)
    assert all(len(e.top_tokens or []) == 2 for e in events)
    # Without details (the raw route's default) nothing is computed: logprob null.
    status, _, raw = post(
        sidecar.http_url + "/generate", {"inputs": PROMPT, "parameters": {"max_new_tokens": 2}}
    )
    assert status == 200 and "details" not in json.loads(raw)
    bare = {"inputs": PROMPT, "parameters": {"max_new_tokens": 2}, "stream": True}
    status, _, raw = post(sidecar.http_url + "/generate_stream", bare)
    first = json.loads(raw.split(b"\n\n")[0].removeprefix(b"data:"))
    assert status == 200 and first["token"]["logprob"] is None and first["top_tokens"] is None


def test_async_client_generate_and_stream(sidecar: SidecarThread) -> None:
    expected_ids, expected_text = greedy_reference(sidecar, PROMPT, 16)

    async def run() -> tuple[Any, list[Any]]:
        client = AsyncClient(sidecar.http_url, timeout=60)
        response = await client.generate(PROMPT, max_new_tokens=16)
        events = [event async for event in client.generate_stream(PROMPT, max_new_tokens=16)]
        return response, events

    response, events = asyncio.run(run())
    assert response.generated_text == expected_text
    assert [t.id for t in response.details.tokens] == expected_ids
    assert [event.token.id for event in events] == expected_ids
    assert events[-1].generated_text == expected_text


def test_client_sampling_with_a_seed_runs(sidecar: SidecarThread) -> None:
    client = Client(sidecar.http_url, timeout=60)
    response = client.generate(
        PROMPT, max_new_tokens=8, do_sample=True, temperature=0.8, top_p=0.9, seed=7
    )
    assert response.details.generated_tokens == len(response.details.tokens) > 0
    assert response.details.seed == 7


def test_a_temperature_below_float32s_range_samples_the_greedy_output(
    sidecar: SidecarThread,
) -> None:
    """JSON carries temperatures that float32 cannot: 1e-50 became 0 in the engine, 0 / 0
    made the probabilities NaN and the request failed (424 with a traceback) where it asks
    for the near-greedy output, on the TGI and OpenAI fronts."""
    expected_ids, expected_text = greedy_reference(sidecar, PROMPT, 8)
    client = Client(sidecar.http_url, timeout=60)
    reply = client.generate(PROMPT, max_new_tokens=8, do_sample=True, temperature=1e-50, seed=1)
    assert [t.id for t in reply.details.tokens] == expected_ids
    assert reply.generated_text == expected_text


def test_repetition_penalty_reaches_the_engine(sidecar: SidecarThread) -> None:
    """TGI's repetition_penalty (was refused): greedy output is the target's under it."""
    from drafters.penalties import Penalties
    from tests.router.test_openai_front import penalised_reference

    expected = penalised_reference(sidecar, Penalties(repetition=2.0), 16)
    client = Client(sidecar.http_url, timeout=60)
    response = client.generate(
        "The capital of France is", max_new_tokens=16, repetition_penalty=2.0
    )
    assert response.generated_text == expected
    assert expected != client.generate("The capital of France is", max_new_tokens=16).generated_text


def test_typical_p_reaches_the_engine(sidecar: SidecarThread) -> None:
    """typical_p was refused (422), and LangChain's TGI classes send 0.95 by default. At a
    mass so small that only the most typical token of each step is kept, two seeds give
    one text; without it, the same two seeds give two."""
    client = Client(sidecar.http_url, timeout=60)

    def text(seed: int, **typical: float) -> str:
        reply = client.generate(
            PROMPT,
            max_new_tokens=12,
            temperature=1.5,
            seed=seed,
            **typical,  # type: ignore[arg-type]
        )
        assert reply.details.seed == seed
        return reply.generated_text

    assert text(1) != text(2)
    assert text(1, typical_p=1e-6) == text(2, typical_p=1e-6)
    # LangChain's defaults (do_sample off; the warpers turn sampling on, as in TGI).
    langchain = {"temperature": 0.8, "top_p": 0.95, "typical_p": 0.95, "seed": 3}
    assert client.generate(PROMPT, max_new_tokens=8, **langchain).details.seed == 3  # type: ignore[arg-type]


def test_truncate_keeps_the_prompts_last_tokens(
    sidecar: SidecarThread, serving_world: ServingWorld
) -> None:
    """TGI's truncate was refused (422); a prompt over the limit with it is served from
    its last tokens (details.specroute counts them), greedy output equal to the target's
    own on them."""
    long_prompt = "word " * 600 + serving_world.prompts["math"]  # over the limit
    expected_ids, expected_text = greedy_reference(sidecar, long_prompt, 6, last_tokens=24)
    body = {
        "inputs": long_prompt,
        "parameters": {"max_new_tokens": 6, "truncate": 24, "details": True},
    }
    status, _, raw = post(f"{sidecar.http_url}/generate", body)
    assert status == 200, raw
    reply = json.loads(raw)
    assert reply["details"]["specroute"]["prompt_tokens"] == 24
    assert [t["id"] for t in reply["details"]["tokens"]] == expected_ids
    assert reply["generated_text"] == expected_text
    limit = sidecar.service.limits.max_prompt_tokens
    at_limit = {"max_new_tokens": 2, "truncate": limit, "details": True}
    status, _, raw = post(
        f"{sidecar.http_url}/generate", {"inputs": long_prompt, "parameters": at_limit}
    )
    assert status == 200 and json.loads(raw)["details"]["specroute"]["prompt_tokens"] == limit
    for truncate in (limit + 1, 0):
        refused = {"inputs": PROMPT, "parameters": {"max_new_tokens": 6, "truncate": truncate}}
        status, _, raw = post(f"{sidecar.http_url}/generate", refused)
        assert status == 422 and "truncate" in json.loads(raw)["error"]


def test_generate_and_generate_stream_routes(sidecar: SidecarThread) -> None:
    expected_ids, expected_text = greedy_reference(sidecar, PROMPT, 10)
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 10, "details": True}}
    status, content_type, raw = post(f"{sidecar.http_url}/generate", body)
    assert status == 200 and content_type.startswith("application/json")
    reply = json.loads(raw)
    assert reply["generated_text"] == expected_text
    assert [t["id"] for t in reply["details"]["tokens"]] == expected_ids
    assert reply["details"]["specroute"]["task_cluster"]

    status, content_type, raw = post(f"{sidecar.http_url}/generate_stream", body)
    assert status == 200 and content_type.startswith("text/event-stream")
    stream = urllib.request.Request(
        f"{sidecar.http_url}/generate_stream",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(stream, timeout=60) as response:  # no proxy buffering
        assert response.headers["X-Accel-Buffering"] == "no"
        response.read()
    events = [
        json.loads(line[5:]) for line in raw.decode().split("\n\n") if line.startswith("data:")
    ]
    assert [e["token"]["id"] for e in events] == expected_ids
    assert events[-1]["generated_text"] == expected_text
    assert events[-1]["details"]["finish_reason"] in {"length", "eos_token"}


@contextlib.contextmanager
def _posted(sidecar: SidecarThread, path: str, body: dict[str, Any]) -> Iterator[socket.socket]:
    """A raw HTTP connection that has sent ``body`` to ``path``; closing it is leaving."""
    address = urlsplit(sidecar.http_url)
    payload = json.dumps(body).encode()
    with socket.create_connection((address.hostname, address.port), timeout=30) as client:
        client.sendall(
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        yield client


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/generate_stream", {"inputs": PROMPT, "parameters": {"max_new_tokens": 200}}),
        (
            "/v1/completions",
            {"model": "target", "prompt": PROMPT, "max_tokens": 200, "stream": True},
        ),
    ],
)
def test_a_client_that_leaves_a_stream_is_no_error(
    sidecar: SidecarThread, caplog: pytest.LogCaptureFixture, path: str, body: dict[str, Any]
) -> None:
    """A client closing a stream part-way (a stop button) was logged by aiohttp as an
    ERROR with a traceback (ClientConnectionResetError); it is an INFO line now, the
    generation stops, and the sidecar serves on."""
    import logging
    import time

    caplog.set_level(logging.INFO)
    with _posted(sidecar, path, body) as client:
        assert b"200 OK" in client.recv(200)
    deadline = time.monotonic() + 30
    while "the client closed the stream" not in caplog.text:
        assert time.monotonic() < deadline, caplog.text
        time.sleep(0.05)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    while sidecar.service.queue.depth:  # the engine stops between steps, freeing the slot
        assert time.monotonic() < deadline, "the generation went on"
        time.sleep(0.01)
    status, _, _ = post(f"{sidecar.http_url}/generate", {"inputs": PROMPT})
    assert status == 200


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/generate", {"inputs": PROMPT, "parameters": {"max_new_tokens": 200}}),
        (
            "/v1/completions",
            {"model": "target", "prompt": PROMPT, "max_tokens": 200, "temperature": 0},
        ),
    ],
)
def test_a_client_that_leaves_a_request_stops_its_generation(
    sidecar: SidecarThread, path: str, body: dict[str, Any]
) -> None:
    """A client that gives up on a non-streamed request (its timeout, after which the
    official clients retry) cancels the generation, which frees its slot, instead of
    leaving it to run to ``max_new_tokens`` (200 greedy tokens here, ~0.2 s)."""
    import time

    expected_ids, _ = greedy_reference(sidecar, PROMPT, 200)
    assert len(expected_ids) == 200  # no end of turn before: only leaving stops it
    generated = sidecar.service.metrics.generated_tokens
    before = generated._value.get()
    with _posted(sidecar, path, body):
        deadline = time.monotonic() + 30
        while sidecar.service.queue.depth == 0:  # admitted
            assert time.monotonic() < deadline, "the request was not admitted"
            time.sleep(0.001)
    while sidecar.service.queue.depth:  # cancelled (or, before the fix, run to the end)
        assert time.monotonic() < deadline, "the generation did not end"
        time.sleep(0.01)
    assert generated._value.get() - before < 200
    status, _, _ = post(f"{sidecar.http_url}/generate", {"inputs": PROMPT})
    assert status == 200


def _failing_after_the_decision(sidecar: SidecarThread) -> Any:
    """The service's ``generate``, failing with a bug (a KeyError) after the decision."""
    real = sidecar.service.generate

    async def generate(request: Any) -> Any:
        items = real(request)
        try:
            yield await anext(items)
        finally:
            await items.aclose()
        raise KeyError("a bug")

    return generate


@pytest.mark.parametrize(
    ("path", "body", "error_of"),
    [
        (
            "/generate",
            {"inputs": PROMPT},
            lambda raw: (json.loads(raw)["error_type"], json.loads(raw)["error"]),
        ),
        (
            "/v1/completions",
            {"model": "target", "prompt": PROMPT},
            lambda raw: (json.loads(raw)["error"]["type"], json.loads(raw)["error"]["message"]),
        ),
        (  # Anthropic's shape (it was OpenAI's, which Anthropic's client does not read)
            "/v1/messages",
            {"model": "target", "max_tokens": 4, "messages": [{"role": "user", "content": PROMPT}]},
            lambda raw: (
                json.loads(raw)["type"] + "/" + json.loads(raw)["error"]["type"],
                json.loads(raw)["error"]["message"],
            ),
        ),
        (
            "/generate_stream",
            {"inputs": PROMPT},
            lambda raw: (
                json.loads(raw.split(b"data:")[-1])["error_type"],
                json.loads(raw.split(b"data:")[-1])["error"],
            ),
        ),
        (
            "/v1/completions",
            {"model": "target", "prompt": PROMPT, "stream": True},
            lambda raw: (
                json.loads(raw.split(b"data: ")[-2])["error"]["type"],
                json.loads(raw.split(b"data: ")[-2])["error"]["message"],
            ),
        ),
    ],
)
def test_an_unexpected_error_is_the_fronts_own_json_error(
    sidecar: SidecarThread,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    path: str,
    body: dict[str, Any],
    error_of: Any,
) -> None:
    """A bug (an exception no error type covers) is a 500 in the front's JSON shape, or
    an error event in a stream that has begun, with the traceback in the log; never
    aiohttp's plain-text 500 (which the clients cannot parse) or a cut connection. The
    message and the log line name the request's id (its X-Request-Id)."""
    monkeypatch.setattr(sidecar.service, "generate", _failing_after_the_decision(sidecar))
    status, _, raw = post(f"{sidecar.http_url}{path}", body, {"X-Request-Id": "bug-report-1"})
    kind, message = error_of(raw)
    if "stream" in path or body.get("stream"):
        assert status == 200  # the error arrives as the stream's last event
    else:
        assert status == 500
    assert kind in {"incomplete_generation", "server_error", "error/api_error"}
    assert "(request bug-report-1) failed: KeyError (the sidecar's log has the traceback)" in (
        message
    )
    assert "(request bug-report-1) failed unexpectedly" in caplog.text
    assert "KeyError: 'a bug'" in caplog.text


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/messages", {"model": "target", "max_tokens": 4, "stream": True}),
        ("/v1/responses", {"model": "target", "stream": True}),
    ],
)
def test_a_streams_unexpected_error_names_its_request(
    sidecar: SidecarThread,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    path: str,
    body: dict[str, Any],
) -> None:
    """The Messages and Responses streams' error events name the request's id, as the
    other fronts' do, and so does the log line with the traceback."""
    monkeypatch.setattr(sidecar.service, "generate", _failing_after_the_decision(sidecar))
    hi = [{"role": "user", "content": "Hi"}]
    asked = {**body, "messages": hi} if "messages" in path else {**body, "input": hi}
    status, _, raw = post(f"{sidecar.http_url}{path}", asked, {"X-Request-Id": "bug-report-2"})
    assert status == 200 and b"(request bug-report-2) failed: KeyError" in raw, raw
    assert "(request bug-report-2) failed unexpectedly" in caplog.text


def test_details_seed_is_the_seed_a_sampled_run_used(sidecar: SidecarThread) -> None:
    """TGI reports the seed a sampled run used, drawn when none was sent, so that it can
    be repeated; it was null unless the client sent one. Greedy runs report none."""
    sampled = {
        "inputs": PROMPT,
        "parameters": {"do_sample": True, "max_new_tokens": 3, "details": True},
    }
    status, _, raw = post(f"{sidecar.http_url}/generate", {**sampled})
    seed = json.loads(raw)["details"]["seed"]
    assert status == 200 and isinstance(seed, int) and 0 <= seed < 2**63
    status, _, raw = post(f"{sidecar.http_url}/generate", {**sampled})
    assert json.loads(raw)["details"]["seed"] != seed  # drawn per run
    chosen = {"do_sample": True, "seed": 7, "max_new_tokens": 3, "details": True}
    status, _, raw = post(f"{sidecar.http_url}/generate", {"inputs": PROMPT, "parameters": chosen})
    assert json.loads(raw)["details"]["seed"] == 7
    greedy = {"inputs": PROMPT, "parameters": {"seed": 7, "max_new_tokens": 3, "details": True}}
    status, _, raw = post(f"{sidecar.http_url}/generate", greedy)
    assert json.loads(raw)["details"]["seed"] is None


@pytest.mark.parametrize(
    ("drop", "says"),
    [("tokens", "ended without a token"), ("result", "ended without its result")],
)
def test_a_stream_that_ends_short_ends_with_an_error_event(
    sidecar: SidecarThread, monkeypatch: pytest.MonkeyPatch, drop: str, says: str
) -> None:
    """A run that yields no token (a cancelled one), or no result, sent no last event:
    a TGI client waits for it until its timeout. It ends with an error event now, after
    every token that was made."""
    from router.service import GenerationResult, TokenChunk

    real = sidecar.service.generate
    dropped = TokenChunk if drop == "tokens" else GenerationResult

    async def short(request: Any) -> Any:
        async for item in real(request):
            if not isinstance(item, dropped):
                yield item

    monkeypatch.setattr(sidecar.service, "generate", short)
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 3}}
    status, _, raw = post(f"{sidecar.http_url}/generate_stream", body)
    events = [json.loads(e[5:]) for e in raw.decode().split("\n\n") if e.startswith("data:")]
    assert status == 200 and says in events[-1]["error"], events
    assert len(events) == (1 if drop == "tokens" else 4)  # every token made, then the error


def test_return_full_text(sidecar: SidecarThread) -> None:
    _, expected_text = greedy_reference(sidecar, PROMPT, 6)
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 6, "return_full_text": True}}
    status, _, raw = post(f"{sidecar.http_url}/generate", body)
    assert status == 200 and json.loads(raw)["generated_text"] == PROMPT + expected_text


def test_info_and_health(sidecar: SidecarThread) -> None:
    info = json.loads(urllib.request.urlopen(f"{sidecar.http_url}/info", timeout=10).read())
    assert info["max_input_tokens"] == 512 and info["max_total_tokens"] == 712
    assert info["max_stop_sequences"] == MAX_STOP_SEQUENCES  # said 8 while 16 were served
    assert info["router"] == "specroute" and "generic" in info["drafters"]
    assert info["model_id"] == "target"  # the OpenAI front's model name, not the directory
    assert urllib.request.urlopen(f"{sidecar.http_url}/health", timeout=10).status == 200


def test_max_new_tokens_left_out_is_tgis_default_of_100(sidecar: SidecarThread) -> None:
    """huggingface_hub's InferenceClient leaves max_new_tokens out and documents TGI's
    default, 100; the front gave 20 (the text-generation client's own default)."""
    expected_ids, _ = greedy_reference(sidecar, PROMPT, 100)
    assert len(expected_ids) == 100  # no end of turn before
    body = {"inputs": PROMPT, "parameters": {"details": True}}  # greedy: no warper set
    status, _, raw = post(f"{sidecar.http_url}/generate", body)
    assert status == 200 and json.loads(raw)["details"]["generated_tokens"] == 100


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"inputs": "", "parameters": {"max_new_tokens": 4}}, "empty"),
        ({"inputs": PROMPT, "parameters": {"max_new_tokens": 0}}, "max_new_tokens"),
        ({"inputs": PROMPT, "parameters": {"max_new_tokens": 999}}, "over the limit"),
        ({"inputs": PROMPT, "parameters": {"temperature": -1.0}}, "temperature"),
        ({"inputs": PROMPT, "parameters": {"top_p": 1.5}}, "top_p"),
        ({"inputs": PROMPT, "parameters": {"typical_p": 0}}, "typical_p"),
        # NaN and infinities (JSON as Python writes and reads it) are refused by name;
        # a NaN temperature failed inside the engine before (HTTP 424).
        (
            {"inputs": PROMPT, "parameters": {"do_sample": True, "temperature": math.nan}},
            "parameters.temperature: Input should be a finite number",
        ),
        (
            {"inputs": PROMPT, "parameters": {"temperature": math.inf}},
            "parameters.temperature: Input should be a finite number",
        ),
        (
            {"inputs": PROMPT, "parameters": {"top_p": math.nan}},
            "parameters.top_p: Input should be a finite number",
        ),
        (
            {"inputs": PROMPT, "parameters": {"repetition_penalty": -math.inf}},
            "parameters.repetition_penalty: Input should be a finite number",
        ),
        ({"inputs": PROMPT, "parameters": {"repetition_penalty": 0}}, "repetition_penalty"),
        ({"inputs": PROMPT, "parameters": {"frequency_penalty": 0.5}}, "frequency_penalty"),
        ({"inputs": PROMPT, "parameters": {"top_n_tokens": 21}}, "top_n_tokens"),
        # huggingface_hub's InferenceClient sends a LoRA adapter id: served by the base model.
        ({"inputs": PROMPT, "parameters": {"adapter_id": "my-lora"}}, "adapter_id"),
        # A seed no generator takes failed inside the engine (424, "generation").
        ({"inputs": PROMPT, "parameters": {"do_sample": True, "seed": 2**64}}, "sampling.seed"),
        ({"inputs": "word " * 600, "parameters": {}}, "over the limit"),
        ({"parameters": {}}, "invalid request"),
    ],
)
def test_http_validation_errors_are_tgi_shaped(
    sidecar: SidecarThread, body: dict[str, Any], fragment: str
) -> None:
    for route in ("/", "/generate", "/generate_stream"):
        status, content_type, raw = post(sidecar.http_url + route, body)
        assert status == 422 and content_type.startswith("application/json")
        error = json.loads(raw)
        assert error["error_type"] == "validation" and fragment in error["error"]
    assert Client(sidecar.http_url, timeout=60).generate(PROMPT, max_new_tokens=2).generated_text


def test_a_body_over_the_size_limit_is_413_in_each_fronts_error_shape(
    sidecar: SidecarThread,
) -> None:
    """Over ``limits.max_request_bytes`` (1 MiB): 413 with the front's JSON error body, not
    aiohttp's plain "Maximum request body size exceeded" (which TGI's client, reading the
    error as JSON, cannot parse); the sidecar serves on."""
    limit = sidecar.service.limits.max_request_bytes
    text = "word " * (limit // 5 + 10)
    bodies = {
        "/generate": {"inputs": text},
        "/generate_stream": {"inputs": text},
        "/": {"inputs": text},
        "/v1/completions": {"model": "target", "prompt": text},
        "/v1/chat/completions": {
            "model": "target",
            "messages": [{"role": "user", "content": text}],
        },
    }
    # Counted, as the gRPC front counts its refusals (HTTP refusals never were).
    counted = sidecar.service.metrics.errors.labels(code="INVALID_ARGUMENT")
    before = counted._value.get()
    for route, body in bodies.items():
        status, content_type, raw = post(sidecar.http_url + route, body)
        assert status == 413 and content_type.startswith("application/json"), (route, raw[:80])
        error = json.loads(raw)
        message = error["error"]["message"] if route.startswith("/v1") else error["error"]
        assert f"over {limit} bytes" in message, (route, error)
    assert counted._value.get() == before + len(bodies)
    assert Client(sidecar.http_url, timeout=60).generate(PROMPT, max_new_tokens=2).generated_text


def test_client_raises_its_own_error_types(sidecar: SidecarThread) -> None:
    client = Client(sidecar.http_url, timeout=60)
    with pytest.raises(ValidationError):
        client.generate("word " * 600, max_new_tokens=4)


def test_a_special_tokens_text_is_the_token_as_tgi_gives_it(sidecar: SidecarThread) -> None:
    """An emitted <|im_end|> had the text "" in details.tokens (the output's text skips
    it), while the same id among the top tokens read "<|im_end|>"."""
    from router.http_front import _tokens_json
    from router.service import TokenChunk

    texts = sidecar.service.token_texts
    tokenizer = sidecar.service.tokenizer
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    word = tokenizer.encode("hello", add_special_tokens=False)[0]
    chunk = TokenChunk((word, end), ("hello", ""), (False, True), "hello")
    (first, _), (last, _) = _tokens_json(chunk, texts)
    assert (first["text"], first["special"]) == ("hello", False)
    assert (last["text"], last["special"]) == ("<|im_end|>", True)


def _answer(url: str, body: dict[str, Any], headers: dict[str, str]) -> tuple[int, Any, Any]:
    """(status, headers, JSON body) of a POST, an error's included."""
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json", **headers}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.headers, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, error.headers, json.loads(error.read())


def test_every_response_names_the_request_id_it_was_served_under(sidecar: SidecarThread) -> None:
    """As OpenAI's API and vLLM: X-Request-Id on every front's answers, refusals and streams
    included, the caller's own when it sent one; the id is the one the answer's specroute
    details and the sidecar's logs give."""
    url = sidecar.http_url
    tgi = {"inputs": PROMPT, "parameters": {"max_new_tokens": 2, "details": True}}
    status, headers, body = _answer(f"{url}/generate", tgi, {})
    assigned = headers["X-Request-Id"]
    assert status == 200 and assigned and body["details"]["specroute"]["request_id"] == assigned
    status, headers, body = _answer(f"{url}/generate", tgi, {"X-Request-Id": "lb-1"})
    assert headers["X-Request-Id"] == body["details"]["specroute"]["request_id"] == "lb-1"
    refused = {"inputs": PROMPT, "parameters": {"max_new_tokens": 0}}
    status, headers, _ = _answer(f"{url}/generate", refused, {"X-Request-Id": "lb-2"})
    assert status == 422 and headers["X-Request-Id"] == "lb-2"
    messages = {"model": "target", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]}
    for path in ("/v1/messages", "/v1/chat/completions"):
        status, headers, body = _answer(f"{url}{path}", messages, {"X-Request-Id": "lb-3"})
        assert status == 200 and headers["X-Request-Id"] == "lb-3", (path, body)
        assert body["specroute"]["request_id"] == "lb-3"
    streamed = {**tgi, "stream": True}
    with urllib.request.urlopen(
        urllib.request.Request(
            f"{url}/generate_stream",
            data=json.dumps(streamed).encode(),
            headers={"Content-Type": "application/json", "X-Request-Id": "lb-4"},
        ),
        timeout=60,
    ) as response:
        assert response.headers["X-Request-Id"] == "lb-4" and response.read()
