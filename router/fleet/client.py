"""Streaming completions from one vLLM replica's OpenAI-compatible API (aiohttp).

The request asks for what the router needs to learn: ``return_token_ids`` (each chunk's
token ids) and ``stream_options.include_usage``, on whose final usage chunk vLLM puts the
per-request ``metrics`` (timings, and ``speculative_decoding`` when the server runs with
``--per-request-spec-decode-metrics``).
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from router.domain import Sampling
from router.fleet.replica import Replica


class ReplicaFailedError(Exception):
    """The replica did not answer, broke off, or answered with a server error: another
    replica may serve the request. ``reached``: False when the request never got to the
    replica (no connection), so its failure says nothing about the request."""

    def __init__(self, message: str, *, reached: bool = True) -> None:
        super().__init__(message)
        self.reached = reached


class ReplicaRefusedError(Exception):
    """The replica refused the request itself (HTTP 4xx other than 429): no replica
    would serve it."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Delta:
    """Tokens of one streamed chunk and their text."""

    token_ids: tuple[int, ...]
    text: str


@dataclass(frozen=True)
class StreamEnd:
    """The end of a replica's stream: why it stopped, and vLLM's per-request metrics."""

    finish_reason: str  # "length" | "eos_token" | "stop_sequence"
    metrics: dict[str, Any] = field(default_factory=dict)
    completion_tokens: int = 0


def completion_body(
    model: str, prompt_ids: list[int], max_tokens: int, sampling: Sampling
) -> dict[str, Any]:
    """The ``/v1/completions`` body for a prompt given as token ids (so the replica
    reads exactly the tokens the sidecar counted and classified)."""
    body: dict[str, Any] = {
        "model": model,
        "prompt": prompt_ids,
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        "return_token_ids": True,
        "temperature": sampling.temperature if sampling.do_sample else 0.0,
        "top_p": sampling.top_p,
    }
    if sampling.do_sample and sampling.top_k > 0:
        body["top_k"] = sampling.top_k
    if sampling.seed is not None:
        body["seed"] = sampling.seed
    if sampling.stop:
        body["stop"] = list(sampling.stop)
    return body


def finish_reason_of(choice: dict[str, Any]) -> str:
    """vLLM's finish reason in the sidecar's words: a stop string is ``stop_sequence``, a
    stop token (``stop_reason`` null or an id) ``eos_token``."""
    if choice.get("finish_reason") == "length":
        return "length"
    return "stop_sequence" if isinstance(choice.get("stop_reason"), str) else "eos_token"


def _error_message(text: str) -> str:
    try:
        error = json.loads(text).get("error")
    except (json.JSONDecodeError, AttributeError):
        return text.strip()[:500]
    if isinstance(error, dict):
        return str(error.get("message", error))
    return str(error)


async def stream_completion(
    session: aiohttp.ClientSession,
    replica: Replica,
    body: dict[str, Any],
    connect_timeout_s: float,
    request_id: str | None = None,
) -> AsyncGenerator[Delta | StreamEnd, None]:
    """Yield the replica's deltas, then one :class:`StreamEnd`. Raises
    :class:`ReplicaFailedError` (connection, timeout: no byte for ``replica.timeout_s``,
    5xx, 429, 401 and 403 (the sidecar's API key, not the request), a stream without its
    end) or :class:`ReplicaRefusedError` (other 4xx). ``request_id`` goes as
    ``X-Request-Id``, which vLLM takes as its own request id (``cmpl-<id>`` in its logs)."""
    timeout = aiohttp.ClientTimeout(
        total=None, sock_connect=connect_timeout_s, sock_read=replica.timeout_s
    )
    finish: str | None = None
    metrics: dict[str, Any] = {}
    completion_tokens = 0
    url = f"{replica.spec.url}/v1/completions"
    try:
        headers = {**replica.headers, **({"X-Request-Id": request_id} if request_id else {})}
        async with session.post(url, json=body, headers=headers, timeout=timeout) as response:
            if response.status != 200:
                message = _error_message(await response.text())
                if response.status in (401, 403):  # the sidecar's key, not the request
                    raise ReplicaFailedError(
                        f"HTTP {response.status}: {message}: the replica refused the "
                        f"sidecar's API key ({replica.key_hint()})"
                    )
                if 400 <= response.status < 500 and response.status != 429:
                    raise ReplicaRefusedError(response.status, message)
                raise ReplicaFailedError(f"HTTP {response.status}: {message}")
            async for raw in response.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    raise ReplicaFailedError(f"error event: {_error_message(data.decode())}")
                for choice in chunk.get("choices") or ():
                    ids = tuple(int(t) for t in choice.get("token_ids") or ())
                    if ids:
                        yield Delta(ids, str(choice.get("text") or ""))
                    if choice.get("finish_reason"):
                        finish = finish_reason_of(choice)
                if chunk.get("metrics"):
                    metrics = dict(chunk["metrics"])
                usage = chunk.get("usage")
                if usage:
                    completion_tokens = int(usage.get("completion_tokens", 0))
    except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as error:
        raise ReplicaFailedError(f"{type(error).__name__}: {error}", reached=False) from error
    except (aiohttp.ClientError, TimeoutError, ConnectionError, json.JSONDecodeError) as error:
        raise ReplicaFailedError(f"{type(error).__name__}: {error}") from error
    if finish is None:
        raise ReplicaFailedError("the stream ended without a finish reason")
    yield StreamEnd(finish, metrics, completion_tokens)
