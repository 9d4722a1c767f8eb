"""Streaming completions from one vLLM replica's OpenAI-compatible API (aiohttp).

The request asks for what the router needs to learn: ``return_token_ids`` (each chunk's
token ids) and ``stream_options.include_usage``, on whose final usage chunk vLLM puts the
per-request ``metrics`` (timings, and ``speculative_decoding`` when the server runs with
``--per-request-spec-decode-metrics``).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import aiohttp.http_exceptions

from router.domain import Sampling
from router.fleet.replica import OpenStream, Replica, StreamCutError
from router.structured_output import vllm_structured_outputs


class ReplicaFailedError(Exception):
    """The replica did not answer, broke off, or answered with a server error: another
    replica may serve the request. ``reached``: False when the request never got to the
    replica (no connection), so its failure says nothing about the request."""

    def __init__(self, message: str, *, reached: bool = True) -> None:
        super().__init__(message)
        self.reached = reached


class ReplicaBusyError(ReplicaFailedError):
    """The replica is shedding load (HTTP 503, or 429 from it or a proxy before it): it is
    healthy and the request is fine; another replica may serve it now."""


class ReplicaRefusedError(Exception):
    """The replica refused the request itself (HTTP 4xx other than 429): no replica
    would serve it."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


#: (logprob, ((id, logprob) of the most likely tokens, most likely first)) of one token.
ScoredToken = tuple[float, tuple[tuple[int, float], ...]]


@dataclass(frozen=True)
class Delta:
    """Tokens of one streamed chunk and their text; with their logprobs when asked."""

    token_ids: tuple[int, ...]
    text: str
    logprobs: tuple[ScoredToken, ...] | None = None
    finish_reason: str | None = None  # on the stream's last tokens (``finish_reason_of``)


@dataclass(frozen=True)
class PromptScored:
    """The prompt's tokens after the first with their logprobs (vLLM's echo: the first
    chunk's logprobs lead with the prompt's), most likely alternatives first."""

    token_ids: tuple[int, ...]
    scored: tuple[ScoredToken, ...]


@dataclass(frozen=True)
class StreamEnd:
    """The end of a replica's stream: why it stopped, and vLLM's per-request metrics."""

    finish_reason: str  # "length" | "eos_token" | "stop_sequence"
    metrics: dict[str, Any] = field(default_factory=dict)
    completion_tokens: int = 0


def completion_body(
    model: str,
    prompt_ids: list[int],
    max_tokens: int,
    sampling: Sampling,
    logprobs: int | None = None,
) -> dict[str, Any]:
    """The ``/v1/completions`` body for a prompt given as token ids (so the replica
    reads exactly the tokens the sidecar counted and classified).

    Every sampling parameter is sent, neutral where the request leaves it: vLLM fills an
    unset one from the model's ``generation_config.json`` (a Qwen2.5 Instruct checkpoint's
    repetition penalty 1.05, top_k 20, top_p 0.8), which would make greedy output differ
    from the target's own and apply top-k where none was asked. The stop string stays in
    the text, as the in-process engine and TGI keep it (the OpenAI front cuts it off).
    ``logprobs``: vLLM's count of alternatives, with tokens named by id
    (``return_tokens_as_token_ids``: ``token_id:N``), read back by ``scored_tokens``."""
    body: dict[str, Any] = {
        "model": model,
        "prompt": prompt_ids,
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        "return_token_ids": True,
        "temperature": sampling.temperature if sampling.do_sample else 0.0,
        "top_p": sampling.top_p,
        "top_k": sampling.top_k if sampling.do_sample else 0,
        "min_p": sampling.min_p if sampling.do_sample else 0.0,
        "repetition_penalty": sampling.repetition_penalty,
        "presence_penalty": sampling.presence_penalty,
        "frequency_penalty": sampling.frequency_penalty,
        "include_stop_str_in_output": True,
    }
    if sampling.seed is not None:
        body["seed"] = sampling.seed
    if sampling.stop:
        body["stop"] = list(sampling.stop)
    if sampling.ignore_eos:
        body["ignore_eos"] = True
    if sampling.stop_token_ids:
        body["stop_token_ids"] = list(sampling.stop_token_ids)
    if not sampling.skip_special_tokens:  # its stop strings then match the same text
        body["skip_special_tokens"] = False
    if sampling.min_tokens:
        body["min_tokens"] = sampling.min_tokens
    if sampling.logit_bias:
        body["logit_bias"] = {str(token): bias for token, bias in sampling.logit_bias}
    if sampling.allowed_token_ids is not None:
        body["allowed_token_ids"] = list(sampling.allowed_token_ids)
    if sampling.bad_words:
        body["bad_words"] = list(sampling.bad_words)
    if sampling.structured_output is not None:
        body["structured_outputs"] = vllm_structured_outputs(sampling.structured_output)
    if logprobs is not None:
        body["logprobs"] = logprobs
        body["return_tokens_as_token_ids"] = True
    return body


def with_prompt_scored(body: dict[str, Any], top: int) -> dict[str, Any]:
    """``body`` asking vLLM to echo the prompt with its logprobs (``top`` alternatives,
    or the output's count where that is larger: vLLM has one count for both), which its
    stream sends in the first chunk (``PromptScored``)."""
    return {
        **body,
        "echo": True,
        "logprobs": max(top, body.get("logprobs") or 0),
        "return_tokens_as_token_ids": True,
    }


def _token_id(name: str) -> int:
    """vLLM's ``token_id:N`` (``return_tokens_as_token_ids``) -> N."""
    prefix, _, number = name.partition(":")
    if prefix != "token_id" or not number.isdigit():
        raise ValueError(f"a logprobs token that is not 'token_id:N': {name!r}")
    return int(number)


def scored_tokens(
    logprobs: dict[str, Any], ids: tuple[int, ...], top: int
) -> tuple[ScoredToken, ...]:
    """A completions chunk's ``logprobs`` (``tokens``, ``token_logprobs``, ``top_logprobs``)
    as each token's (logprob, its ``top`` most likely alternatives). vLLM lists the chosen
    token among the alternatives as well: sorted, the first ``top`` are kept. Its logprobs
    are the model's raw ones by default (``logprobs_mode``), as the in-process engine's."""
    values = logprobs.get("token_logprobs") or []
    tops = logprobs.get("top_logprobs") or [None] * len(values)
    if len(values) != len(ids) or len(tops) != len(ids):
        raise ValueError(f"logprobs for {len(values)} tokens in a chunk of {len(ids)}")
    return _scored(values, tops, top)


def _scored(values: list[Any], tops: list[Any], top: int) -> tuple[ScoredToken, ...]:
    scored = []
    for value, alternatives in zip(values, tops, strict=True):
        ranked = sorted(
            ((_token_id(name), float(lp)) for name, lp in (alternatives or {}).items()),
            key=lambda pair: -pair[1],
        )
        scored.append((float(value), tuple(ranked[:top])))
    return tuple(scored)


def _split_echo(
    choice: dict[str, Any], prompt_tokens: int, top: int
) -> tuple[tuple[ScoredToken, ...], dict[str, Any]]:
    """An echoed chunk's logprobs: the prompt's tokens after the first, scored, and the
    output's part of the logprobs (vLLM lists the prompt's first, the first with none)."""
    logprobs = choice.get("logprobs") or {}
    values = list(logprobs.get("token_logprobs") or [])
    tops = list(logprobs.get("top_logprobs") or [None] * len(values))
    if len(values) < prompt_tokens or len(tops) != len(values):
        raise ValueError(f"an echo of {len(values)} logprobs for {prompt_tokens} prompt tokens")
    scored = _scored(values[1:prompt_tokens], tops[1:prompt_tokens], top)
    rest = {"token_logprobs": values[prompt_tokens:], "top_logprobs": tops[prompt_tokens:]}
    return scored, rest


def finish_reason_of(choice: dict[str, Any]) -> str:
    """vLLM's finish reason in the sidecar's words: a stop string is ``stop_sequence``, a
    stop token (``stop_reason`` null or an id) ``eos_token``. Any other reason (``abort``:
    the replica stopping, or paused; ``error``) is the replica's failure, not an answer."""
    reason = choice.get("finish_reason")
    if reason == "length":
        return "length"
    if reason != "stop":
        raise ReplicaFailedError(f"the replica ended the request with finish_reason {reason!r}")
    return "stop_sequence" if isinstance(choice.get("stop_reason"), str) else "eos_token"


def _event_error(data: bytes, received: bool) -> Exception:
    """An error event in the stream: a 4xx before any token is the request's own (vLLM
    checks some parameters only once it streams), anything else the replica's failure."""
    message = _error_message(data.decode(errors="replace"))
    try:
        error = json.loads(data).get("error")
        code = int(error.get("code") or 0) if isinstance(error, dict) else 0
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
        code = 0
    if 400 <= code < 500 and code != 429 and not received:
        return ReplicaRefusedError(code, message)
    return ReplicaFailedError(f"error event: {message}")


def _error_message(text: str) -> str:
    try:
        error = json.loads(text).get("error")
    except (json.JSONDecodeError, AttributeError):
        return text.strip()[:500]
    if isinstance(error, dict):
        return str(error.get("message", error))
    return str(error)


def _chunk_of(data: bytes) -> dict[str, Any]:
    """An SSE event's JSON, checked to have vLLM's shape where the stream reads it (an
    object; ``choices`` a list of objects; ``metrics`` and ``usage`` objects): anything
    else (a proxy's page, another engine) is a ValueError, the replica's failure."""
    chunk = json.loads(data)
    if not isinstance(chunk, dict):
        raise ValueError(f"an event that is not a JSON object: {data[:200]!r}")
    choices = chunk.get("choices") or []
    if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
        raise ValueError(f"an event whose choices are not objects: {data[:200]!r}")
    for choice in choices:
        for name in ("token_ids", "prompt_token_ids"):
            if not isinstance(choice.get(name) or [], list):
                raise ValueError(f"an event whose {name} is not a list: {data[:200]!r}")
    for name in ("metrics", "usage"):
        if not isinstance(chunk.get(name) or {}, dict):
            raise ValueError(f"an event whose {name} is not an object: {data[:200]!r}")
    return {**chunk, "choices": choices}


def _streamed_id(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"a token id that is not an integer: {value!r}")
    return value


async def stream_completion(
    session: aiohttp.ClientSession,
    replica: Replica,
    body: dict[str, Any],
    connect_timeout_s: float,
    request_id: str | None = None,
    trace: Sequence[tuple[str, str]] = (),
) -> AsyncGenerator[Delta | PromptScored | StreamEnd, None]:
    """Yield the replica's deltas, then one :class:`StreamEnd`. Raises
    :class:`ReplicaFailedError` (connection, timeout: no byte for ``replica.timeout_s``,
    cut by a failed health check (:meth:`Replica.cut_silent_streams`), 5xx but 503, 401
    and 403 (the sidecar's API key, not the request), 404 (the model is not served there),
    a stream without its end, an ``abort`` finish), :class:`ReplicaBusyError` (503, 429) or
    :class:`ReplicaRefusedError` (other 4xx, also as an error event before any token).
    A stream that breaks once its finish reason has arrived ends normally (without the
    usage chunk's metrics). ``request_id`` goes as ``X-Request-Id``, which vLLM takes as
    its own request id (``cmpl-<id>`` in its logs); ``trace``, the caller's W3C trace
    context headers, go as they came, so that vLLM's spans (``--otlp-traces-endpoint``)
    join the caller's trace."""
    timeout = aiohttp.ClientTimeout(
        total=None, sock_connect=connect_timeout_s, sock_read=replica.timeout_s
    )
    finish: str | None = None
    metrics: dict[str, Any] = {}
    completion_tokens = 0
    url = f"{replica.spec.url}/v1/completions"
    opened = OpenStream()
    replica.streams.add(opened)
    try:
        headers = {**replica.headers, **dict(trace)}
        if request_id:
            headers["X-Request-Id"] = request_id
        call = session.post(url, json=body, headers=headers, timeout=timeout)
        async with await opened.until_cut(call) as response:
            opened.response = response
            if response.status != 200:
                message = _error_message(await response.text())
                if response.status in (401, 403):  # the sidecar's key, not the request
                    raise ReplicaFailedError(
                        f"HTTP {response.status}: {message}: the replica refused the "
                        f"sidecar's API key ({replica.key_hint()})"
                    )
                if response.status in (429, 503):
                    raise ReplicaBusyError(f"HTTP {response.status}: {message}")
                if response.status == 404:  # vLLM: "The model `x` does not exist."
                    raise ReplicaFailedError(
                        f"HTTP 404: {message}: the replica no longer serves the fleet "
                        f"file's model {body.get('model')!r} (redeployed with another?)",
                        reached=False,  # the replica's configuration, not the request
                    )
                if 400 <= response.status < 500:
                    raise ReplicaRefusedError(response.status, message)
                raise ReplicaFailedError(f"HTTP {response.status}: {message}")
            count = 0  # token ids received
            async for raw in response.content:
                opened.last_byte = time.monotonic()
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                chunk = _chunk_of(data)
                if "error" in chunk:
                    raise _event_error(data, count > 0)
                for choice in chunk["choices"]:
                    ids = tuple(_streamed_id(t) for t in choice.get("token_ids") or ())
                    prompt = tuple(_streamed_id(t) for t in choice.get("prompt_token_ids") or ())
                    if prompt and body.get("echo"):
                        scored_prompt, rest = _split_echo(choice, len(prompt), body["logprobs"])
                        yield PromptScored(prompt, scored_prompt)
                        choice = {**choice, "logprobs": rest}
                    ending = finish_reason_of(choice) if choice.get("finish_reason") else None
                    if ids:
                        count += len(ids)
                        scored = (
                            scored_tokens(choice.get("logprobs") or {}, ids, body["logprobs"])
                            if body.get("logprobs") is not None
                            else None
                        )
                        yield Delta(ids, str(choice.get("text") or ""), scored, ending)
                    finish = ending or finish
                if chunk.get("metrics"):
                    metrics = chunk["metrics"]
                usage = chunk.get("usage")
                if usage:
                    completion_tokens = int(usage.get("completion_tokens", 0))
    except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as error:
        raise ReplicaFailedError(f"{type(error).__name__}: {error}", reached=False) from error
    except StreamCutError as error:
        # The replica hangs for every request, not for this one: not the request's failure.
        raise ReplicaFailedError(str(error), reached=False) from error
    except (
        aiohttp.ClientError,
        aiohttp.http_exceptions.HttpProcessingError,  # a line over the read buffer
        TimeoutError,
        ConnectionError,
        ValueError,  # a chunk that is not JSON, or not of vLLM's shape (``_chunk_of``)
    ) as error:
        if finish is None and opened.cut_reason:
            raise ReplicaFailedError(opened.cut_reason, reached=False) from error
        if finish is None:
            raise ReplicaFailedError(f"{type(error).__name__}: {error}") from error
    finally:
        replica.streams.discard(opened)
    if finish is None:
        raise ReplicaFailedError("the stream ended without a finish reason")
    if completion_tokens and not count:
        # A server that ignores return_token_ids (an older vLLM; another engine) answers
        # text only: an empty answer would be served and learnt from as a finished one.
        raise ReplicaFailedError(
            f"the replica generated {completion_tokens} tokens but sent {count} token ids: "
            "it does not honour return_token_ids, which the sidecar needs (a vLLM "
            "version that has it)"
        )
    yield StreamEnd(finish, metrics, completion_tokens)
