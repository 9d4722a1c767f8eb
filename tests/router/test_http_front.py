"""The TGI-compatible HTTP front, driven by the official text-generation client."""

from __future__ import annotations

import asyncio
import json
import math
import urllib.error
import urllib.request
from typing import Any

import pytest
from text_generation import AsyncClient, Client
from text_generation.errors import ValidationError

from router.domain import MAX_STOP_SEQUENCES
from tests.router.conftest import COMPLETION_PROMPT, SidecarThread, greedy_reference

PROMPT = COMPLETION_PROMPT


def post(url: str, body: dict[str, Any]) -> tuple[int, str, bytes]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
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
    events = [
        json.loads(line[5:]) for line in raw.decode().split("\n\n") if line.startswith("data:")
    ]
    assert [e["token"]["id"] for e in events] == expected_ids
    assert events[-1]["generated_text"] == expected_text
    assert events[-1]["details"]["finish_reason"] in {"length", "eos_token"}


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
    import socket
    import time
    from urllib.parse import urlsplit

    caplog.set_level(logging.INFO)
    address = urlsplit(sidecar.http_url)
    payload = json.dumps(body).encode()
    with socket.create_connection((address.hostname, address.port), timeout=30) as client:
        client.sendall(
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        assert b"200 OK" in client.recv(200)
    deadline = time.monotonic() + 30
    while "the client closed the stream" not in caplog.text:
        assert time.monotonic() < deadline, caplog.text
        time.sleep(0.05)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    status, _, _ = post(f"{sidecar.http_url}/generate", {"inputs": PROMPT})
    assert status == 200


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
    assert urllib.request.urlopen(f"{sidecar.http_url}/health", timeout=10).status == 200


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"inputs": "", "parameters": {"max_new_tokens": 4}}, "empty"),
        ({"inputs": PROMPT, "parameters": {"max_new_tokens": 0}}, "max_new_tokens"),
        ({"inputs": PROMPT, "parameters": {"max_new_tokens": 999}}, "over the limit"),
        ({"inputs": PROMPT, "parameters": {"temperature": -1.0}}, "temperature"),
        ({"inputs": PROMPT, "parameters": {"top_p": 1.5}}, "top_p"),
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
        ({"inputs": PROMPT, "parameters": {"repetition_penalty": 1.2}}, "repetition_penalty"),
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
    for route, body in bodies.items():
        status, content_type, raw = post(sidecar.http_url + route, body)
        assert status == 413 and content_type.startswith("application/json"), (route, raw[:80])
        error = json.loads(raw)
        message = error["error"]["message"] if route.startswith("/v1") else error["error"]
        assert f"over {limit} bytes" in message, (route, error)
    assert Client(sidecar.http_url, timeout=60).generate(PROMPT, max_new_tokens=2).generated_text


def test_client_raises_its_own_error_types(sidecar: SidecarThread) -> None:
    client = Client(sidecar.http_url, timeout=60)
    with pytest.raises(ValidationError):
        client.generate("word " * 600, max_new_tokens=4)
