"""A text-generation-inference compatible HTTP front, served in the sidecar's event loop.

Follows TGI's routes and JSON so the official ``text-generation`` ``Client`` and
``AsyncClient`` work unchanged: they POST to ``/`` with ``"stream": true|false``
(a JSON list with one object, or server-sent events); ``/generate``,
``/generate_stream``, ``/info`` and ``/health`` are served as well. Errors are
``{"error", "error_type"}`` with TGI's status codes (422 validation, 429 overloaded,
424 generation).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError
from pydantic import BaseModel, ConfigDict, ValidationError

from router.domain import (
    MAX_STOP_SEQUENCES,
    Caller,
    GenerateInput,
    Prompt,
    RouteInput,
    Sampling,
    caller_request_id,
    check_logprobs,
    trace_context,
)
from router.errors import (
    GenerationFailedError,
    InvalidRequestError,
    RequestTooLargeError,
    SidecarError,
    UnauthenticatedError,
    sidecar_error_of,
    status_of,
)
from router.service import (
    GenerationResult,
    PromptScores,
    RoutedRequest,
    RouterService,
    TokenChunk,
    TokenTexts,
)
from router.structured_output import from_tgi

logger = logging.getLogger(__name__)

#: Where an HTTP error response keeps its gRPC status code's name, for the error counter
#: (``specroute_errors_total{code}`` counts refusals on every front).
HTTP_ERROR_CODE = web.ResponseKey("specroute_error_code", str)

# TGI's server default, for clients that leave max_new_tokens out (huggingface_hub's
# InferenceClient; the text-generation client always sends its own, 20).
DEFAULT_MAX_NEW_TOKENS = 100
FINISH_REASONS = ("length", "eos_token", "stop_sequence")
SERVICE_KEY = web.AppKey("service", RouterService)
# A stream's headers on both fronts: no proxy (nginx's X-Accel-Buffering) or cache holds
# the tokens back to send them in bursts.
SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}
TOKEN_KEY = web.AppKey("data_token", str)
# Every request's Caller (``callers``): its X-Request-Id, or one the sidecar assigned,
# which the response's X-Request-Id header gives back.
CALLER_KEY = web.RequestKey("caller", Caller)
REQUEST_ID_HEADER = "X-Request-Id"


class TgiParameters(BaseModel):
    """TGI's ``parameters`` object; unsupported features must be null/default. NaN and
    infinities (which Python's JSON parser accepts) are refused in every float."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    do_sample: bool = False
    max_new_tokens: int | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None
    return_full_text: bool | None = False
    stop: list[str] = []
    seed: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    truncate: int | None = None
    typical_p: float | None = None
    best_of: int | None = None
    watermark: bool = False
    details: bool = False
    decoder_input_details: bool = False
    top_n_tokens: int | None = None
    grammar: Any = None  # {"type": "json" | "json_object" | "regex" | "json_schema", "value": ...}
    adapter_id: str | None = None  # a LoRA adapter (huggingface_hub always sends the key)


class TgiRequest(BaseModel):
    """TGI's request body."""

    model_config = ConfigDict(extra="ignore")

    inputs: str
    parameters: TgiParameters | None = None
    stream: bool = False


def _unsupported(params: TgiParameters) -> list[str]:
    """Parameters set to something this sidecar does not implement."""
    problems = []
    # TGI's frequency penalty is its own rule (neither OpenAI's nor vLLM's): not served.
    if params.frequency_penalty not in (None, 0.0):
        problems.append("frequency_penalty")
    if params.best_of not in (None, 1):
        problems.append("best_of")
    if params.watermark:
        problems.append("watermark")
    if params.adapter_id:
        problems.append("adapter_id")
    return problems


def sampling_from_tgi(params: TgiParameters) -> Sampling:
    """TGI semantics: any warper (temperature != 1, top_k, top_p < 1, typical_p < 1) turns
    sampling on."""
    if params.temperature is not None and params.temperature <= 0:
        raise InvalidRequestError("`temperature` must be strictly positive")
    if params.top_p is not None and not 0 < params.top_p <= 1:
        raise InvalidRequestError("`top_p` must be > 0.0 and <= 1.0")
    if params.top_k is not None and params.top_k <= 0:
        raise InvalidRequestError("`top_k` must be strictly positive")
    if params.typical_p is not None and not 0 < params.typical_p <= 1:
        raise InvalidRequestError("`typical_p` must be > 0.0 and <= 1.0")
    if params.repetition_penalty is not None and params.repetition_penalty <= 0:
        raise InvalidRequestError("`repetition_penalty` must be strictly positive")
    warped = (
        (params.temperature is not None and params.temperature != 1.0)
        or bool(params.top_k)
        or (params.top_p is not None and params.top_p < 1.0)
        or (params.typical_p is not None and params.typical_p < 1.0)
    )
    return Sampling(
        do_sample=params.do_sample or warped,
        temperature=params.temperature or 1.0,
        top_k=params.top_k or 0,
        top_p=params.top_p or 1.0,
        seed=params.seed,
        stop=tuple(params.stop),
        typical_p=params.typical_p or 1.0,
        # A logits processor, not a warper: greedy stays greedy (as in TGI).
        repetition_penalty=params.repetition_penalty or 1.0,
        structured_output=from_tgi(params.grammar),
    )


def generate_input_from_tgi(
    body: TgiRequest, max_new_tokens_limit: int, *, streaming: bool = False
) -> GenerateInput:
    """The request in the sidecar's terms; ``max_new_tokens`` left out is TGI's default,
    within ``max_new_tokens_limit`` (``limits.max_new_tokens``)."""
    # TGI: without a parameters object, sampling is on by default.
    params = body.parameters or TgiParameters(do_sample=True)
    problems = _unsupported(params)
    if problems:
        raise InvalidRequestError(f"unsupported parameters: {', '.join(problems)}")
    max_new = params.max_new_tokens
    if max_new is None:
        max_new = min(DEFAULT_MAX_NEW_TOKENS, max_new_tokens_limit)
    if max_new <= 0:
        raise InvalidRequestError("`max_new_tokens` must be strictly positive")
    if streaming and params.decoder_input_details:  # TGI's own words
        raise InvalidRequestError(
            "`decoder_input_details` == true is not supported when streaming tokens"
        )
    route = RouteInput(
        prompt=Prompt(text=body.inputs),
        max_new_tokens=max_new,
        sampling=sampling_from_tgi(params),
        truncate=params.truncate,
    )
    # details.prefill: the prompt's tokens with their logprobs (the engine's prefill).
    prefill = 0 if params.details and params.decoder_input_details else None
    return GenerateInput(
        route=route, logprobs=_tgi_logprobs(params, streaming), prompt_logprobs=prefill
    )


def _tgi_logprobs(params: TgiParameters, streaming: bool) -> int | None:
    """Tokens carry their logprob when the request asks for details (the text-generation
    client's streams always do), and a stream's events their ``top_n_tokens``; otherwise
    it is null and no log-softmax is computed."""
    top = check_logprobs(params.top_n_tokens or None, "top_n_tokens")  # 0: none, as TGI
    if not params.details and not (streaming and top):
        return None
    return top or 0


def _reported_seed(body: TgiRequest, result: GenerationResult) -> int | None:
    """TGI's ``details.seed``: the seed a sampled run used (drawn for it when the request
    had none, in-process), so that it can be repeated; null for a greedy run."""
    params = body.parameters or TgiParameters(do_sample=True)
    return result.seed if sampling_from_tgi(params).do_sample else None


def error_response(error: BaseException) -> web.Response:
    status = status_of(error)
    response = web.json_response(
        {"error": str(error), "error_type": status.tgi_error_type}, status=status.http_status
    )
    response[HTTP_ERROR_CODE] = status.grpc_code.name
    return response


def _token_json(
    token_id: int, text: str, special: bool, logprob: float | None = None
) -> dict[str, Any]:
    return {"id": token_id, "text": text, "logprob": logprob, "special": special}


def _prefill_json(scores: PromptScores) -> list[dict[str, Any]]:
    """TGI's ``details.prefill``: each prompt token's id, text and logprob (null for the
    first, which nothing precedes)."""
    logprobs = [None, *(scored.logprob for scored in scores.logprobs)]
    return [
        {"id": token_id, "text": text, "logprob": logprob}
        for token_id, text, logprob in zip(scores.token_ids, scores.texts, logprobs, strict=True)
    ]


def _tokens_json(
    chunk: TokenChunk, texts: TokenTexts
) -> list[tuple[dict[str, Any], list[dict[str, Any]] | None]]:
    """Each token of ``chunk`` in TGI's shape, with its top tokens (None when the request
    asked for none). A special token's text is the token itself (``<|im_end|>``), as TGI
    gives it and as the top tokens do, not the empty text the output skips it as."""
    scored = chunk.logprobs or [None] * len(chunk.token_ids)
    return [
        (
            _token_json(i, texts.text(i) if s else t, s, lp.logprob if lp is not None else None),
            [_token_json(a.token_id, a.text, a.special, a.logprob) for a in lp.top]
            if lp is not None and lp.top
            else None,
        )
        for i, t, s, lp in zip(
            chunk.token_ids, chunk.token_texts, chunk.special, scored, strict=True
        )
    ]


def _finish_reason(stats: Any) -> str:
    reason = str(getattr(stats, "finish_reason", "length"))
    return reason if reason in FINISH_REASONS else "length"


def _specroute_details(result: GenerationResult) -> dict[str, Any]:
    """Extra (ignored by TGI clients): the routing decision that finished the request and
    the speculation statistics, as the OpenAI front's, and the prompt's token count."""
    from router.openai_front import specroute_extra

    return {**specroute_extra(result.routed, result), "prompt_tokens": result.routed.prompt_tokens}


async def json_body(request: web.Request) -> Any:
    """The request's body parsed as JSON; INVALID_ARGUMENT (HTTP 422) when it is not, or
    nests deeper than the parser recurses (a 200 KB body of brackets is enough), or cannot
    be decoded as its ``Content-Encoding`` says (a 500 before); HTTP 413 in the front's own
    error body (not aiohttp's plain text) when it is over ``limits.max_request_bytes``."""
    try:
        return await request.json()
    except RequestPayloadError as exc:  # "gzip" that is not, a broken chunked body
        raise InvalidRequestError(f"the body cannot be read: {exc.__cause__ or exc}") from exc
    except web.HTTPRequestEntityTooLarge:
        raise RequestTooLargeError(
            f"the body is over {request.app[SERVICE_KEY].limits.max_request_bytes} bytes "
            "(limits.max_request_bytes)"
        ) from None
    except ValueError as exc:  # not JSON, not UTF-8, an integer past Python's 4,300 digits
        reason = str(exc).split(";")[0]  # not the int-conversion hint to set a sys limit
        raise InvalidRequestError(f"the body is not JSON this sidecar reads: {reason}") from exc
    except RecursionError:
        raise InvalidRequestError("the body nests too deeply to be read as JSON") from None


async def _parse(request: web.Request) -> TgiRequest:
    _check_token(request)
    raw = await json_body(request)
    try:
        return TgiRequest.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise InvalidRequestError(f"invalid request: {where}: {first['msg']}") from exc


def _check_token(request: web.Request) -> None:
    expected = request.app[TOKEN_KEY]
    if not expected:
        return
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), expected.encode()):
        raise UnauthenticatedError("missing or invalid bearer token")


def check_bearer(request: web.Request) -> None:
    """The data token check, for the other fronts mounted on this application."""
    _check_token(request)


def check_api_key(request: web.Request) -> None:
    """The data token check for Anthropic's clients, which send it as ``x-api-key``: that
    header when present, else the bearer token."""
    expected = request.app[TOKEN_KEY]
    key = request.headers.get("x-api-key")
    if not expected or key is None:
        _check_token(request)
    elif not hmac.compare_digest(key.encode(), expected.encode()):
        raise UnauthenticatedError("missing or invalid API key")


def _generation(
    service: RouterService, body: TgiRequest, caller: Caller, *, streaming: bool
) -> AsyncGenerator[Any, None]:
    request = generate_input_from_tgi(body, service.limits.max_new_tokens, streaming=streaming)
    return service.generate(caller.generation(request))  # type: ignore[return-value]


async def _first(items: AsyncIterator[Any]) -> RoutedRequest:
    routed = await anext(items)
    assert isinstance(routed, RoutedRequest)
    return routed


async def _collect(service: RouterService, body: TgiRequest, caller: Caller) -> dict[str, Any]:
    """Run a whole generation; the TGI response object."""
    params = body.parameters or TgiParameters()
    tokens: list[dict[str, Any]] = []
    top_tokens: list[list[dict[str, Any]]] = []
    prefill: list[dict[str, Any]] = []
    async with contextlib.aclosing(_generation(service, body, caller, streaming=False)) as items:
        await _first(items)  # the decision announced; the result's is the one that finished
        result: GenerationResult | None = None
        async for item in items:
            if isinstance(item, PromptScores):
                prefill = _prefill_json(item)
            elif isinstance(item, TokenChunk):
                for token, top in _tokens_json(item, service.token_texts):
                    tokens.append(token)
                    top_tokens.append(top or [])
            elif isinstance(item, GenerationResult):
                result = item
    if result is None:
        raise GenerationFailedError("generation ended without a result")
    text = (body.inputs if params.return_full_text else "") + result.generated_text
    response: dict[str, Any] = {"generated_text": text}
    if params.details:
        response["details"] = {
            "finish_reason": _finish_reason(result.stats),
            "generated_tokens": len(tokens),
            "seed": _reported_seed(body, result),
            "prefill": prefill,
            "tokens": tokens,
            "top_tokens": top_tokens if params.top_n_tokens else None,
            "best_of_sequences": None,
            "specroute": _specroute_details(result),
        }
    return response


async def _sse(
    service: RouterService, request: web.Request, body: TgiRequest
) -> web.StreamResponse:
    """Stream one ``data:{json}`` event per token; the last carries text and details."""
    generation = _generation(service, body, request[CALLER_KEY], streaming=True)
    async with contextlib.aclosing(generation) as items:
        await _first(items)  # errors before the first event become plain HTTP errors
        response = web.StreamResponse(headers=SSE_HEADERS)
        with client_may_leave(request):
            await response.prepare(request)
            where = failed_in(request, "the stream")
            await _tgi_events(response, items, body, service.token_texts, where)
            await response.write_eof()
        return response


async def _tgi_events(
    response: web.StreamResponse,
    items: AsyncIterator[Any],
    body: TgiRequest,
    texts: TokenTexts,
    where: str,
) -> None:
    """``_sse``'s events: each token once the next one (or the result) has arrived, so
    that the last one carries the generated text and the details; an error after the
    first event is an error event, and so is a run that ends without a token or without
    its result (a client would otherwise wait for a last event that never comes)."""
    params = body.parameters or TgiParameters()
    held: dict[str, Any] | None = None
    index = 0
    try:
        async for item in items:
            if isinstance(item, TokenChunk):
                for token, top in _tokens_json(item, texts):
                    if held is not None:
                        await _event(response, held)
                    index += 1
                    held = _stream_event(index, token, top)
            elif isinstance(item, GenerationResult):
                if held is None:
                    raise GenerationFailedError("the generation ended without a token")
                held["generated_text"] = (
                    body.inputs if params.return_full_text else ""
                ) + item.generated_text
                held["details"] = {
                    "finish_reason": _finish_reason(item.stats),
                    "generated_tokens": index,
                    "seed": _reported_seed(body, item),
                }
                await _event(response, held)
                return
        if held is not None:
            await _event(response, held)
        raise GenerationFailedError("the generation ended without its result")
    except ConnectionResetError:
        raise  # the client left (client_may_leave)
    except Exception as error:
        failure = sidecar_error_of(error, where)
        await _event(
            response, {"error": str(failure), "error_type": status_of(failure).tgi_error_type}
        )


@contextlib.contextmanager
def client_may_leave(request: web.Request) -> Iterator[None]:
    """A client that closes a stream part-way (a stop button, a cancelled call) is no
    error: the generation stops (the stream's ``aclosing`` closes it, which frees its
    worker) and it is logged at INFO, not as aiohttp's ERROR with a traceback."""
    try:
        yield
    # A write to a closed connection (aiohttp's ClientConnectionResetError is one), or the
    # handler cancelled as the connection was lost (``handler_cancellation``).
    except (ConnectionResetError, asyncio.CancelledError) as gone:
        # While the sidecar stops, aiohttp closes the streams it still holds as well.
        stopping = request.app[SERVICE_KEY].stopping
        who = "the client or the sidecar's stop" if stopping else "the client"
        logger.info(
            "%s %s: %s closed the stream; generation stopped", request.method, request.path, who
        )
        if isinstance(gone, asyncio.CancelledError):
            raise


def _stream_event(
    index: int, token: dict[str, Any], top_tokens: list[dict[str, Any]] | None
) -> dict[str, Any]:
    return {
        "index": index,
        "token": token,
        "top_tokens": top_tokens,
        "generated_text": None,
        "details": None,
    }


async def _event(response: web.StreamResponse, payload: dict[str, Any]) -> None:
    await response.write(b"data:" + json.dumps(payload).encode() + b"\n\n")


async def compat_route(request: web.Request) -> web.StreamResponse:
    """``POST /``: TGI's compatibility route, the one the text-generation client uses."""
    service = request.app[SERVICE_KEY]
    try:
        body = await _parse(request)
        if body.stream:
            return await _sse(service, request, body)
        return web.json_response([await _collect(service, body, request[CALLER_KEY])])
    except SidecarError as error:
        return error_response(error)


async def generate_route(request: web.Request) -> web.StreamResponse:
    """``POST /generate``: one JSON object."""
    service = request.app[SERVICE_KEY]
    try:
        body = await _parse(request)
        return web.json_response(await _collect(service, body, request[CALLER_KEY]))
    except SidecarError as error:
        return error_response(error)


async def generate_stream_route(request: web.Request) -> web.StreamResponse:
    """``POST /generate_stream``: server-sent events."""
    service = request.app[SERVICE_KEY]
    try:
        body = await _parse(request)
        return await _sse(service, request, body)
    except SidecarError as error:
        return error_response(error)


async def info_route(request: web.Request) -> web.Response:
    """``GET /info``: TGI's model info, plus the routing setup. In fleet mode the target's
    weights are not read here: ``model_sha`` is null, dtype and device are the settings'."""
    from router.openai_front import served_model_names, specroute_version

    service = request.app[SERVICE_KEY]
    target = service.components.target
    limits = service.limits
    context = service.context_tokens or limits.max_prompt_tokens + limits.max_new_tokens
    return web.json_response(
        {
            # The name the OpenAI front answers to, not the directory's path (which a client
            # could not send back as ``model``, and which tells the host's layout).
            "model_id": served_model_names(service)[0],
            "model_sha": target.weights_digest[:16] or None,
            "model_dtype": str(target.dtype).removeprefix("torch."),
            "model_device_type": target.device.type,
            "model_pipeline_tag": "text-generation",
            "max_concurrent_requests": service.max_concurrent_requests,
            "max_best_of": 1,
            "max_stop_sequences": MAX_STOP_SEQUENCES,
            # Within the target's context too, where its config gives one.
            "max_input_tokens": min(limits.max_prompt_tokens, context - 1),
            "max_total_tokens": min(limits.max_prompt_tokens + limits.max_new_tokens, context),
            "validation_workers": 1,
            "max_client_batch_size": 1,
            "router": "specroute",
            "version": specroute_version(),
            "policy": service.policy.name,
            "drafters": service.drafters.names(),
        }
    )


async def health_route(request: web.Request) -> web.Response:
    """``GET /health``: 200 when this front can generate; 503 in TGI's error shape when it
    cannot (a fleet with no replica serving), so that a probe or a load balancer sends
    generations elsewhere. (gRPC health stays SERVING: Route still answers.)"""
    problem = request.app[SERVICE_KEY].generation_problem()
    if problem is None:
        return web.Response(status=200)
    return web.json_response({"error": problem, "error_type": "healthcheck"}, status=503)


@web.middleware
async def callers(request: web.Request, handler: Any) -> web.StreamResponse:
    """Every request's ``Caller``: the id it is served under (its X-Request-Id when usable,
    else one the sidecar assigns; ``caller_request_id``) and its W3C trace context
    (``traceparent``, ``tracestate``), which a fleet replica is sent."""
    headers = request.headers
    request_id = caller_request_id(headers.get(REQUEST_ID_HEADER))
    request[CALLER_KEY] = Caller(
        request_id or request.app[SERVICE_KEY].new_request_id(),
        trace_context(headers.get("traceparent"), headers.get("tracestate")),
    )
    return await handler(request)  # type: ignore[no-any-return]


def failed_in(request: web.Request, what: str) -> str:
    """``what`` (a route, "the stream") with the id its request is served under, for the
    log line and message of a failure: the id the client has (X-Request-Id)."""
    caller = request.get(CALLER_KEY)
    return f"{what} (request {caller.request_id})" if caller is not None else what


async def _request_id_header(request: web.Request, response: web.StreamResponse) -> None:
    """Each response (a stream's before its first byte, an error's too) names the id its
    request was served under, as OpenAI's API and vLLM's do: the id in the sidecar's logs,
    its Route decision and the fleet replica's request."""
    caller = request.get(CALLER_KEY)
    if caller is not None:
        response.headers[REQUEST_ID_HEADER] = caller.request_id


@web.middleware
async def counted_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """Count each error response in ``specroute_errors_total`` by its gRPC code, as the
    gRPC front counts its refusals (HTTP overload, 422 and 401 were never counted, so an
    alert on RESOURCE_EXHAUSTED missed every HTTP overload). An error sent inside a
    stream that had begun is not counted here."""
    response: web.StreamResponse = await handler(request)
    code = response.get(HTTP_ERROR_CODE)
    if code:
        request.app[SERVICE_KEY].metrics.errors.labels(code=code).inc()
    return response


@web.middleware
async def unexpected_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """An exception no error type covers is a 500 in the front's own JSON error shape
    (Anthropic's under ``/v1/messages``, OpenAI's elsewhere under ``/v1/`` and on the
    tokenizer routes, else TGI's), with its traceback logged, not aiohttp's plain-text 500
    that the clients cannot parse."""
    try:
        return await handler(request)  # type: ignore[no-any-return]
    except (web.HTTPException, SidecarError):
        raise
    except Exception as error:
        failure = sidecar_error_of(error, failed_in(request, f"{request.method} {request.path}"))
        return _front_error_response(request.path, failure)


def _front_error_response(path: str, failure: SidecarError) -> web.Response:
    """``failure`` in the error shape of the front that serves ``path``."""
    from router.anthropic_front import anthropic_error
    from router.openai_front import error_response as openai_error_response

    if path == "/v1/messages" or path.startswith("/v1/messages/"):
        return anthropic_error(failure)
    if path.startswith("/v1/") or path in ("/tokenize", "/detokenize"):
        return openai_error_response(failure)
    return error_response(failure)


def build_http_app(service: RouterService, data_token: str | None = None) -> web.Application:
    """The TGI-compatible aiohttp application, with the OpenAI-compatible routes."""
    app = web.Application(
        client_max_size=service.limits.max_request_bytes,
        middlewares=[callers, counted_errors, unexpected_errors],
    )
    app.on_response_prepare.append(_request_id_header)
    app[SERVICE_KEY] = service
    app[TOKEN_KEY] = data_token or ""
    app.router.add_post("/", compat_route)
    app.router.add_post("/generate", generate_route)
    app.router.add_post("/generate_stream", generate_stream_route)
    app.router.add_get("/info", info_route)
    app.router.add_get("/health", health_route)
    from router.anthropic_front import add_anthropic_routes
    from router.openai_front import add_openai_routes
    from router.responses_front import add_responses_routes
    from router.tokenize_routes import add_tokenize_routes

    add_anthropic_routes(app)  # these two before the OpenAI front's catch-all of /v1/
    add_responses_routes(app)
    add_openai_routes(app)
    add_tokenize_routes(app)
    return app
