"""Anthropic's Messages API, ``POST /v1/messages`` (and ``/v1/messages/count_tokens``),
as vLLM serves it, for clients written against the ``anthropic`` package.

A request is the chat completion it stands for (``system`` a system message; text blocks
joined; an assistant's ``tool_use`` blocks its tool calls; a user's ``tool_result``
blocks tool messages before its text), routed, drafted and generated on the OpenAI
front's chat path (the same checks, decisions and fleet forwarding), and answered as a
``message``: a text block (unless the answer is tool calls alone), one ``tool_use`` block
per call, ``stop_reason`` ``end_turn``, ``max_tokens``, ``stop_sequence`` (with the
``stop_sequence`` that ended it) or ``tool_use``, and the usage. ``stream`` sends the
API's events (``message_start``, ``content_block_start``, ``ping``, text and
``input_json_delta`` deltas, ``content_block_stop``, ``message_delta``,
``message_stop``). Served besides: ``temperature``, ``top_p``, ``top_k``,
``stop_sequences``, ``tools`` with ``tool_choice`` (``auto``, ``any``, ``tool``, ``none``;
``disable_parallel_tool_use``), ``output_config.format`` (a JSON schema the answer is held
to), ``metadata``, and the OpenAI front's ``min_p``, penalties, ``logit_bias`` and
``seed``. Thinking, effort levels, images, documents and server tools are
refused with 400 naming the field; hints with no effect on the output (``cache_control``,
``service_tier``) are taken and ignored. Errors are Anthropic's (``{"type": "error",
"error": {"type", "message"}}``); the data token may come as ``x-api-key`` (what the
client sends) or as a bearer token.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict

from router.domain import Caller, GenerateInput, check_unicode
from router.errors import (
    GenerationFailedError,
    InvalidFieldError,
    SidecarError,
    sidecar_error_of,
    status_of,
)
from router.openai_front import (
    ChatRequest,
    StopHoldback,
    ToolReader,
    chat_input,
    chat_prompt_tokens,
    ending_stop,
    error_body,
    parsed_body,
    run_choice,
    specroute_extra,
    typed_sse_event,
    validated,
    without_stop,
)
from router.service import GenerationResult, RouterService, TokenChunk
from router.tool_calls import check_function

# Anthropic's error types by HTTP status (what its clients raise on).
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}
# Chat's names of fields the Messages API names otherwise.
MESSAGE_FIELDS = {
    "max_completion_tokens": "max_tokens",
    "stop": "stop_sequences",
    "response_format.json_schema.schema": "output_config.format.schema",
}
# Chat's finish reasons as stop reasons (a call's is tool_use, whatever chat says).
STOP_REASONS = {"length": "max_tokens", "eos_token": "end_turn", "stop_sequence": "stop_sequence"}


class MessagesRequest(BaseModel):
    """A ``/v1/messages`` body (``count_tokens`` takes it without ``max_tokens``)."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    model: str
    messages: list[dict[str, Any]]
    max_tokens: int | None = None
    system: str | list[dict[str, Any]] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stop_sequences: list[str] | None = None
    stream: bool | None = False
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None
    output_config: dict[str, Any] | None = None
    # The OpenAI front's sampling extensions, which the Messages API lacks.
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    seed: int | None = None


def _text_blocks(blocks: Any, field: str) -> str:
    """A content that is a text or text blocks, joined."""
    if isinstance(blocks, str):
        check_unicode(blocks, "the text", field)
        return blocks
    if not isinstance(blocks, list):
        raise InvalidFieldError(field, "must be a text or a list of content blocks")
    texts = []
    for index, block in enumerate(blocks):
        if not isinstance(block, dict) or block.get("type") != "text":
            got = block.get("type") if isinstance(block, dict) else type(block).__name__
            raise InvalidFieldError(f"{field}[{index}].type", f"must be text, got {got!r}")
        if not isinstance(block.get("text"), str):
            raise InvalidFieldError(f"{field}[{index}].text", "must be a string")
        check_unicode(block["text"], "the text", f"{field}[{index}].text")
        texts.append(block["text"])
    return "\n".join(texts)


def chat_messages(body: MessagesRequest) -> list[dict[str, Any]]:
    """The chat the request stands for (module doc)."""
    messages: list[dict[str, Any]] = []
    if body.system:
        messages.append({"role": "system", "content": _text_blocks(body.system, "system")})
    for index, message in enumerate(body.messages):
        field = f"messages[{index}]"
        role = message.get("role")
        if role not in ("user", "assistant"):
            raise InvalidFieldError(f"{field}.role", f"must be user or assistant, got {role!r}")
        content = message.get("content")
        if isinstance(content, str):
            # Named here: the chat's messages are numbered otherwise (a system message first).
            check_unicode(content, "the text", f"{field}.content")
            messages.append({"role": role, "content": content})
        elif isinstance(content, list):
            messages.extend(_turn(role, content, f"{field}.content"))
        else:
            raise InvalidFieldError(f"{field}.content", "must be a text or a list of blocks")
    if not body.messages:
        raise InvalidFieldError("messages", "must hold at least one message")
    return messages


def _turn(role: str, blocks: list[Any], field: str) -> list[dict[str, Any]]:
    """One message's blocks: its tool results (a user's) as tool messages first, then its
    text, with an assistant's tool uses as the text's tool calls."""
    tools: list[dict[str, Any]] = []
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for index, block in enumerate(blocks):
        where = f"{field}[{index}]"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            if not isinstance(block.get("text"), str):  # "blocks are text, got 'text'" before
                raise InvalidFieldError(f"{where}.text", "must be a string")
            check_unicode(block["text"], "the text", f"{where}.text")
            texts.append(block["text"])
        elif kind == "tool_use" and role == "assistant":
            calls.append(_tool_use(block, where))
        elif kind == "tool_result" and role == "user":
            tools.append(_tool_result(block, where))
        else:
            raise InvalidFieldError(
                f"{where}.type",
                f"a {role}'s blocks are text and "
                f"{'tool_use' if role == 'assistant' else 'tool_result'}, got {kind!r}",
            )
    turn: list[dict[str, Any]] = []
    if texts or calls or not tools:
        message: dict[str, Any] = {"role": role, "content": "\n".join(texts)}
        if calls:
            message["tool_calls"] = calls
        turn.append(message)
    return tools + turn


def _tool_use(block: dict[str, Any], field: str) -> dict[str, Any]:
    if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str):
        raise InvalidFieldError(field, "a tool_use block needs an id and a name")
    if not isinstance(block.get("input", {}), dict):
        raise InvalidFieldError(f"{field}.input", "must be an object")
    arguments = json.dumps(block.get("input", {}))
    return {
        "id": block["id"],
        "type": "function",
        "function": {"name": block["name"], "arguments": arguments},
    }


def _tool_result(block: dict[str, Any], field: str) -> dict[str, Any]:
    if not isinstance(block.get("tool_use_id"), str):
        raise InvalidFieldError(f"{field}.tool_use_id", "must be a string")
    content = block.get("content", "")
    text = _text_blocks(content, f"{field}.content")
    return {"role": "tool", "tool_call_id": block["tool_use_id"], "content": text}


def chat_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """Chat's function tools for the Messages API's (``input_schema`` the parameters)."""
    if tools is None:
        return None
    converted = []
    for index, tool in enumerate(tools):
        if tool.get("type") not in (None, "custom") or not isinstance(tool.get("name"), str):
            raise InvalidFieldError(
                f"tools[{index}]",
                "only client tools ({name, description, input_schema}) are served",
            )
        if not isinstance(tool.get("input_schema"), dict):
            raise InvalidFieldError(
                f"tools[{index}].input_schema", "is required: the input's JSON schema, an object"
            )
        function = {"name": tool["name"], "parameters": tool["input_schema"]}
        if tool.get("description") is not None:
            function["description"] = tool["description"]
        check_function(function, f"tools[{index}]")
        converted.append({"type": "function", "function": function})
    return converted


def chat_tool_choice(choice: dict[str, Any] | None) -> tuple[Any, bool | None]:
    """Chat's ``tool_choice`` and ``parallel_tool_calls`` for the Messages API's."""
    if choice is None:
        return None, None
    parallel = False if choice.get("disable_parallel_tool_use") else None
    kind = choice.get("type")
    if kind in ("auto", "none"):
        return kind, parallel
    if kind == "any":
        return "required", parallel
    if kind == "tool" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}, parallel
    raise InvalidFieldError(
        "tool_choice", 'must be {"type": "auto" | "any" | "none"} or {"type": "tool", "name"}'
    )


def response_format_of(config: dict[str, Any] | None) -> dict[str, Any] | None:
    """Chat's ``response_format`` for ``output_config`` (its ``format``, a JSON schema)."""
    if not config:
        return None
    unknown = sorted(set(config) - {"format", "effort"})
    if unknown:
        raise InvalidFieldError(f"output_config.{unknown[0]}", "not served")
    if config.get("effort") is not None:
        raise InvalidFieldError("output_config.effort", "effort levels are not served")
    form = config.get("format")
    if form is None:
        return None
    if not isinstance(form, dict) or form.get("type") != "json_schema" or "schema" not in form:
        raise InvalidFieldError(
            "output_config.format", 'must be {"type": "json_schema", "schema": {...}}'
        )
    return {"type": "json_schema", "json_schema": {"name": "output", "schema": form["schema"]}}


def chat_request(body: MessagesRequest) -> ChatRequest:
    """The chat completion ``body`` stands for."""
    if body.thinking not in (None, {"type": "disabled"}):
        raise InvalidFieldError("thinking", "extended thinking is not served")
    choice, parallel = chat_tool_choice(body.tool_choice)
    chat: ChatRequest = validated(
        ChatRequest,
        {
            "model": body.model,
            "messages": chat_messages(body),
            "max_completion_tokens": body.max_tokens,
            "temperature": body.temperature,
            "top_p": body.top_p,
            "top_k": body.top_k,
            "min_p": body.min_p,
            "presence_penalty": body.presence_penalty,
            "frequency_penalty": body.frequency_penalty,
            "logit_bias": body.logit_bias,
            "seed": body.seed,
            "stop": body.stop_sequences,
            "tools": chat_tools(body.tools),
            "tool_choice": choice,
            "parallel_tool_calls": parallel,
            "response_format": response_format_of(body.output_config),
        },
    )
    return chat


def messages_input(service: RouterService, chat: ChatRequest) -> GenerateInput:
    """The domain request for a Messages body's ``chat`` (errors name its fields)."""
    return chat_input(service, chat, MESSAGE_FIELDS)


class MessageObject:
    """One answer's objects: its id, model, stops and how its tool calls are read."""

    def __init__(self, body: MessagesRequest, chat: ChatRequest) -> None:
        self.id = f"msg_{uuid.uuid4().hex}"
        self.model = body.model
        self.stops = list(body.stop_sequences or ())
        self.tools = ToolReader.of(chat)

    def message(
        self,
        content: list[dict[str, Any]],
        stop: tuple[str | None, str | None],
        usage: dict[str, int],
    ) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": content,
            "stop_reason": stop[0],
            "stop_sequence": stop[1],
            "usage": usage,
        }

    def stop(self, result: GenerationResult, calls: Sequence[Any]) -> tuple[str, str | None]:
        """(stop_reason, stop_sequence) of a finished answer."""
        reason = STOP_REASONS.get(str(result.stats.finish_reason), "end_turn")
        if calls and reason != "max_tokens":
            return "tool_use", None
        if reason != "stop_sequence":
            return reason, None
        return reason, ending_stop(result.generated_text, self.stops)

    @staticmethod
    def text_block(text: str) -> dict[str, Any]:
        return {"type": "text", "text": text}

    @staticmethod
    def tool_use(call: dict[str, Any], whole: bool = True) -> dict[str, Any]:
        """A chat tool call as a ``tool_use`` block (its input empty until streamed)."""
        function = call["function"]
        try:
            arguments = json.loads(function["arguments"]) if whole else {}
        except json.JSONDecodeError:
            arguments = {}
        return {"type": "tool_use", "id": call["id"], "name": function["name"], "input": arguments}


def usage_of(result: GenerationResult) -> dict[str, int]:
    return {"input_tokens": result.routed.prompt_tokens, "output_tokens": len(result.output_ids)}


async def collect(service: RouterService, body: MessagesRequest, caller: Caller) -> dict[str, Any]:
    chat = chat_request(body)
    answer = MessageObject(body, chat)
    result = (
        await run_choice(service, caller.generation(messages_input(service, chat)), chat)
    ).result
    text = result.generated_text
    if str(result.stats.finish_reason) == "stop_sequence":
        text = without_stop(text, answer.stops)
    content, calls = answer.tools.read(text)
    blocks = [answer.text_block(content or "")] if content or not calls else []
    blocks += [answer.tool_use(call) for call in calls]
    message = answer.message(blocks, answer.stop(result, calls), usage_of(result))
    message["specroute"] = specroute_extra(result.routed, result)
    return message


async def stream(
    service: RouterService, request: web.Request, body: MessagesRequest
) -> web.StreamResponse:
    """The Messages API's events (module doc): the text block opens with the first text
    (at once without tools); text that may be a stop sequence or begin a tool call is
    held until it is not; each call is a ``tool_use`` block whose input comes as one
    ``input_json_delta``. An error after the first event is an ``error`` event."""
    from router.http_front import CALLER_KEY, SSE_HEADERS, client_may_leave, failed_in

    chat = chat_request(body)
    answer = MessageObject(body, chat)
    asked = request[CALLER_KEY].generation(messages_input(service, chat))
    items: AsyncIterator[Any]
    async with contextlib.aclosing(service.generate(asked)) as items:  # type: ignore[type-var]
        routed = await anext(items)  # errors before the first event are plain HTTP errors
        response = web.StreamResponse(headers=SSE_HEADERS)
        with client_may_leave(request):
            await response.prepare(request)
            usage = {"input_tokens": routed.prompt_tokens, "output_tokens": 0}
            opening = answer.message([], (None, None), usage)
            opening["specroute"] = specroute_extra(routed, None)
            await typed_sse_event(response, {"type": "message_start", "message": opening})
            try:
                await StreamedMessage(response, answer).send(items)
            except ConnectionResetError:
                raise  # the client left (client_may_leave)
            except Exception as error:
                where = failed_in(request, "the stream")
                _, failure = anthropic_error_body(sidecar_error_of(error, where))
                await typed_sse_event(response, failure)
            await response.write_eof()
        return response


class StreamedMessage:
    """The content blocks' events of one streamed answer."""

    def __init__(self, response: web.StreamResponse, answer: MessageObject) -> None:
        self.response = response
        self.answer = answer
        self.stops = StopHoldback(answer.stops)
        self.calling = answer.tools.holdback()
        self.index = 0  # the next block's
        self.opened = False  # the text block

    async def send(self, items: AsyncIterator[Any]) -> None:
        if self.calling is None:
            await self._open()
        await typed_sse_event(self.response, {"type": "ping"})
        async for item in items:
            if isinstance(item, TokenChunk) and item.text:
                await self._text(self._released(self.stops.feed(item.text)))
            elif isinstance(item, GenerationResult):
                await self._finish(item)
                return
        raise GenerationFailedError("generation ended without a result")

    def _released(self, text: str) -> str:
        return text if self.calling is None else self.calling.feed(text)

    async def _open(self) -> None:
        self.opened = True
        start = {
            "type": "content_block_start",
            "index": self.index,
            "content_block": self.answer.text_block(""),
        }
        await typed_sse_event(self.response, start)

    async def _text(self, text: str) -> None:
        if not text:
            return
        if not self.opened:
            await self._open()
        delta = {"type": "text_delta", "text": text}
        await typed_sse_event(
            self.response, {"type": "content_block_delta", "index": self.index, "delta": delta}
        )

    async def _finish(self, result: GenerationResult) -> None:
        stopped = str(result.stats.finish_reason) == "stop_sequence"
        await self._text(self._released(self.stops.finish(stopped)))
        calls: list[dict[str, Any]] = []
        if self.calling is not None:
            held, calls = self.calling.finish()
            await self._text(held)
        if self.opened or not calls:
            if not self.opened:
                await self._open()
            await typed_sse_event(
                self.response, {"type": "content_block_stop", "index": self.index}
            )
            self.index += 1
        for call in calls:
            await self._send_call(call)
        reason, sequence = self.answer.stop(result, calls)
        delta = {"stop_reason": reason, "stop_sequence": sequence}
        usage = {"output_tokens": len(result.output_ids)}
        await typed_sse_event(
            self.response, {"type": "message_delta", "delta": delta, "usage": usage}
        )
        await typed_sse_event(self.response, {"type": "message_stop"})

    async def _send_call(self, call: dict[str, Any]) -> None:
        block = self.answer.tool_use(call, whole=False)
        arguments = call["function"]["arguments"]
        events = [
            {"type": "content_block_start", "index": self.index, "content_block": block},
            {
                "type": "content_block_delta",
                "index": self.index,
                "delta": {"type": "input_json_delta", "partial_json": arguments},
            },
            {"type": "content_block_stop", "index": self.index},
        ]
        for event in events:
            await typed_sse_event(self.response, event)
        self.index += 1


def anthropic_error_body(error: BaseException) -> tuple[int, dict[str, Any]]:
    """HTTP status (the OpenAI front's) and Anthropic's error object for ``error``."""
    status, failure = error_body(error)
    kind = ERROR_TYPES.get(status, "api_error")
    message = failure["error"]["message"]
    return status, {"type": "error", "error": {"type": kind, "message": message}}


def anthropic_error(error: BaseException) -> web.Response:
    """Anthropic's error response for ``error``."""
    from router.http_front import HTTP_ERROR_CODE

    status, body = anthropic_error_body(error)
    response = web.json_response(body, status=status)
    response[HTTP_ERROR_CODE] = status_of(error).grpc_code.name
    return response


async def _parsed(request: web.Request) -> MessagesRequest:
    from router.http_front import check_api_key

    body: MessagesRequest = await parsed_body(request, MessagesRequest, check_api_key)
    return body


async def messages_route(request: web.Request) -> web.StreamResponse:
    from router.http_front import CALLER_KEY, SERVICE_KEY

    service = request.app[SERVICE_KEY]
    try:
        body = await _parsed(request)
        if body.max_tokens is None:
            raise InvalidFieldError("max_tokens", "is required")
        if body.stream:
            return await stream(service, request, body)
        return web.json_response(await collect(service, body, request[CALLER_KEY]))
    except SidecarError as error:
        return anthropic_error(error)


async def count_tokens_route(request: web.Request) -> web.Response:
    """``POST /v1/messages/count_tokens``: the prompt's tokens as the target reads them."""
    from router.http_front import SERVICE_KEY

    service = request.app[SERVICE_KEY]
    try:
        chat = chat_request(await _parsed(request))
        return web.json_response({"input_tokens": chat_prompt_tokens(service, chat)})
    except SidecarError as error:
        return anthropic_error(error)


def add_anthropic_routes(app: web.Application) -> None:
    """Mount the Messages API (before the OpenAI front's catch-all of ``/v1/``)."""
    app.router.add_post("/v1/messages", messages_route)
    app.router.add_post("/v1/messages/count_tokens", count_tokens_route)
