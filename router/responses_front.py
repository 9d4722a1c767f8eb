"""OpenAI's Responses API, ``POST /v1/responses``, beside chat completions.

The request's ``input`` (a text, or items: messages with text parts, function calls
and their outputs) and ``instructions`` (a system message before them) are one chat,
rendered by the target's template; it is routed, drafted and generated as a chat
completion is (the same checks, decisions and errors), and answered as a ``response``
object whose output is the assistant's message and its function calls, or streamed as
the Responses API's typed server-sent events (``response.created`` ... deltas ...
``response.completed``). Served: ``max_output_tokens``, ``temperature``, ``top_p``,
``text.format`` (``text``, ``json_object``, ``json_schema``: held to the grammar as
``response_format`` is), function ``tools`` with ``tool_choice`` and
``parallel_tool_calls`` (read as chat's, ``router.tool_calls``), the output's
log-probabilities (``include`` ``message.output_text.logprobs``, ``top_logprobs``),
``metadata``, ``user``, and vLLM's ``top_k``, ``min_p``, penalties and ``logit_bias``.
Nothing is stored (as vLLM without its response store): ``store`` is answered false,
and what needs a stored response (``previous_response_id``, ``conversation``,
``background``) is refused with 400 naming it, as are reasoning and the other features
in ``UNSERVED`` unless at the value that asks for nothing. A field the API does not
define is ignored.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict

from router.domain import Caller, GenerateInput, check_unicode
from router.errors import (
    GenerationFailedError,
    InvalidFieldError,
    NotFoundError,
    SidecarError,
    sidecar_error_of,
)
from router.openai_front import (
    ROLE_ALIASES,
    ChatRequest,
    LogprobsHoldback,
    ToolReader,
    chat_input,
    chat_logprobs,
    chat_prompt_tokens,
    error_body,
    error_response,
    parsed_body,
    run_choice,
    served_model_names,
    specroute_extra,
    typed_sse_event,
)
from router.service import (
    GenerationResult,
    RoutedRequest,
    RouterService,
    TokenChunk,
)
from router.tool_calls import check_function

# Responses API fields not served, with the values that ask for nothing, and why.
UNSERVED: dict[str, tuple[tuple[Any, ...], str]] = {
    "previous_response_id": ((None,), "responses are not stored: send the conversation as input"),
    "conversation": ((None,), "responses are not stored: send the conversation as input"),
    "background": ((None, False), "background responses are not served"),
    "prompt": ((None,), "stored prompt templates are not served"),
    "max_tool_calls": ((None,), "a limit on tool calls is not served"),
    "reasoning": ((None, {}), "reasoning options are not served"),
    "personality": ((None,), "personalities are not served"),
    "truncation": ((None, "disabled"), "the input is never truncated here: only 'disabled'"),
}
# What ``include`` may ask for: the output text's log-probabilities.
OUTPUT_LOGPROBS = "message.output_text.logprobs"
# The roles an input message may have, and the text parts each may hold.
INPUT_PARTS = {"user": "input_text", "system": "input_text", "developer": "input_text"}
OUTPUT_PART = "output_text"  # an assistant's earlier answer, sent back as input
# The chat completion's names of fields the Responses API names otherwise.
RESPONSE_FIELDS = {
    "max_completion_tokens": "max_output_tokens",
    "response_format.json_schema.schema": "text.format.schema",
    "response_format": "text.format",
}


class ResponsesRequest(BaseModel):
    """A ``/v1/responses`` body: the fields served, the others kept (``model_extra``) to
    be checked against ``UNSERVED``."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    model: str | None = None  # OpenAI requires it; vLLM takes none (the first served)
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # vLLM's
    min_p: float | None = None  # vLLM's
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None  # vLLM's
    text: dict[str, Any] | None = None
    stream: bool | None = False
    store: bool | None = True  # nothing is stored either way
    metadata: dict[str, str] | None = None
    user: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    include: list[str] | None = None
    top_logprobs: int | None = None


def check_served(body: ResponsesRequest) -> None:
    """400 naming the first field set to something this sidecar does not serve."""
    extra = body.model_extra or {}
    for name, (neutral, reason) in UNSERVED.items():
        if extra.get(name) not in neutral:
            raise InvalidFieldError(name, reason)


def input_messages(body: ResponsesRequest) -> list[dict[str, Any]]:
    """The chat the request stands for: ``instructions`` as a system message, then the
    input (a text is one user message; items are messages whose text parts are joined, a
    function call joins the assistant turn before it, or opens one, and its output is a
    tool message)."""
    messages: list[dict[str, Any]] = []
    # Named here: the chat's messages are numbered otherwise (instructions first).
    if body.instructions:
        check_unicode(body.instructions, "the text", "instructions")
        messages.append({"role": "system", "content": body.instructions})
    if isinstance(body.input, str):
        check_unicode(body.input, "the text", "input")
        return [*messages, {"role": "user", "content": body.input}]
    for index, item in enumerate(body.input):
        field = f"input[{index}]"
        kind = item.get("type", "message")
        if kind == "function_call":
            _add_call(messages, item, field)
        elif kind == "function_call_output":
            messages.append(_call_output(item, field))
        elif kind == "message":
            messages.append(_input_message(item, field))
        else:
            raise InvalidFieldError(
                f"{field}.type",
                f"must be message, function_call or function_call_output, got {kind!r}",
            )
    if not messages:
        raise InvalidFieldError("input", "must hold at least one message")
    return messages


def _string(item: dict[str, Any], key: str, field: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise InvalidFieldError(f"{field}.{key}", "must be a string")
    return value


def _add_call(messages: list[dict[str, Any]], item: dict[str, Any], field: str) -> None:
    """A function call the assistant made, as chat's ``tool_calls`` of its turn."""
    call = {
        "id": _string(item, "call_id", field),
        "type": "function",
        "function": {
            "name": _string(item, "name", field),
            "arguments": _string(item, "arguments", field),
        },
    }
    if not messages or messages[-1]["role"] != "assistant":
        messages.append({"role": "assistant", "content": ""})
    messages[-1].setdefault("tool_calls", []).append(call)


def _call_output(item: dict[str, Any], field: str) -> dict[str, Any]:
    """A function call's output, as chat's tool message answering it."""
    output = item.get("output")
    if isinstance(output, list):
        output = _text_of(output, "input_text", f"{field}.output")
    elif not isinstance(output, str):
        raise InvalidFieldError(f"{field}.output", "must be a text or a list of input_text parts")
    return {"role": "tool", "tool_call_id": _string(item, "call_id", field), "content": output}


def _input_message(item: dict[str, Any], field: str) -> dict[str, Any]:
    role = str(item.get("role"))
    part_type = OUTPUT_PART if role == "assistant" else INPUT_PARTS.get(role)
    if part_type is None:
        raise InvalidFieldError(
            f"{field}.role",
            f"must be user, system, developer or assistant, got {item.get('role')!r}",
        )
    content = item.get("content")
    if isinstance(content, list):
        content = _text_of(content, part_type, f"{field}.content")
    elif not isinstance(content, str):
        raise InvalidFieldError(f"{field}.content", "must be a text or a list of parts")
    check_unicode(content, "the text", f"{field}.content")
    return {"role": ROLE_ALIASES.get(role, role), "content": content}


def _text_of(parts: list[Any], part_type: str, field: str) -> str:
    """Text parts of ``part_type`` joined with newlines (as vLLM joins a message's)."""
    texts = []
    for number, part in enumerate(parts):
        if not isinstance(part, dict) or part.get("type") != part_type:
            got = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise InvalidFieldError(
                f"{field}[{number}]", f"only {part_type} parts are served, got {got!r}"
            )
        if not isinstance(part.get("text"), str):
            raise InvalidFieldError(f"{field}[{number}].text", "must be a string")
        texts.append(part["text"])
    return "\n".join(texts)


def chat_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """Chat's ``tools`` for the Responses API's function tools (the function's fields at
    the tool's top level there)."""
    if tools is None:
        return None
    converted = []
    for index, tool in enumerate(tools):
        if tool.get("type") != "function":
            raise InvalidFieldError(
                f"tools[{index}].type", f"only function tools are served, got {tool.get('type')!r}"
            )
        function = {key: tool[key] for key in ("name", "description", "parameters") if key in tool}
        check_function(function, f"tools[{index}]")
        converted.append({"type": "function", "function": function})
    return converted


def chat_tool_choice(choice: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
    """Chat's ``tool_choice`` for the Responses API's (a named function's name is at its
    top level there)."""
    if choice is None or isinstance(choice, str):
        return choice
    if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
        raise InvalidFieldError(
            "tool_choice", 'must be "none", "auto", "required" or {"type": "function", "name": ...}'
        )
    return {"type": "function", "function": {"name": choice["name"]}}


def response_format_of(text: dict[str, Any] | None) -> dict[str, Any] | None:
    """Chat's ``response_format`` for the Responses API's ``text`` (its ``format``)."""
    if text is None:
        return None
    if text.get("verbosity") is not None:
        raise InvalidFieldError("text.verbosity", "not served")
    form = text.get("format")
    if form is None or not isinstance(form, dict):
        if form is not None:
            raise InvalidFieldError("text.format", "must be an object")
        return None
    kind = form.get("type")
    if kind in ("text", "json_object"):
        return {"type": kind}
    if kind == "json_schema":
        if form.get("schema") is None:
            raise InvalidFieldError("text.format.schema", "a json_schema format needs one")
        return {
            "type": "json_schema",
            "json_schema": {"name": form.get("name", "response"), "schema": form["schema"]},
        }
    raise InvalidFieldError(
        "text.format.type", f"must be text, json_object or json_schema, got {kind!r}"
    )


def wants_logprobs(body: ResponsesRequest) -> bool:
    """Whether ``include`` asks for the output text's log-probabilities (``top_logprobs``
    alternatives each): the one thing it may ask for here."""
    for index, asked in enumerate(body.include or ()):
        if asked != OUTPUT_LOGPROBS:
            raise InvalidFieldError(
                f"include[{index}]", f"only {OUTPUT_LOGPROBS} is served, got {asked!r}"
            )
    wanted = OUTPUT_LOGPROBS in (body.include or ())
    if body.top_logprobs and not wanted:
        raise InvalidFieldError("top_logprobs", f'needs include: ["{OUTPUT_LOGPROBS}"]')
    return wanted


def model_of(service: RouterService, body: ResponsesRequest) -> str:
    return body.model if body.model is not None else served_model_names(service)[0]


def chat_request(service: RouterService, body: ResponsesRequest) -> ChatRequest:
    """The chat completion ``body`` stands for."""
    check_served(body)
    logprobs = wants_logprobs(body)
    return ChatRequest.model_validate(
        {
            "logprobs": logprobs or None,
            "top_logprobs": body.top_logprobs if logprobs else None,
            "model": model_of(service, body),
            "messages": input_messages(body),
            "tools": chat_tools(body.tools),
            "tool_choice": chat_tool_choice(body.tool_choice),
            "parallel_tool_calls": body.parallel_tool_calls,
            "max_completion_tokens": body.max_output_tokens,
            "temperature": body.temperature,
            "top_p": body.top_p,
            "top_k": body.top_k,
            "min_p": body.min_p,
            "presence_penalty": body.presence_penalty,
            "frequency_penalty": body.frequency_penalty,
            "logit_bias": body.logit_bias,
            "response_format": response_format_of(body.text),
            "user": body.user,
        }
    )


def responses_input(service: RouterService, chat: ChatRequest) -> GenerateInput:
    """The domain request for a Responses body's ``chat`` (errors name its fields)."""
    return chat_input(service, chat, RESPONSE_FIELDS)


class ResponseObject:
    """One response's objects and events: its ids, creation time, event numbers, and how
    its answer's function calls are read."""

    def __init__(self, service: RouterService, body: ResponsesRequest, chat: ChatRequest) -> None:
        self.body = body
        self.model = model_of(service, body)
        self.tools = ToolReader.of(chat)
        self.logprobs: list[dict[str, Any]] = []  # the message's tokens' (when asked for)
        self.id = f"resp_{uuid.uuid4().hex}"
        self.message_id = f"msg_{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.sequence = 0

    def response(
        self,
        status: str,
        output: list[dict[str, Any]] | None = None,
        result: GenerationResult | None = None,
        routed: RoutedRequest | None = None,
    ) -> dict[str, Any]:
        """The ``response`` object: in progress (no output yet), or finished with its
        ``output`` items and the ``result`` (``routed``: the decision, once made)."""
        body = self.body
        incomplete = status == "incomplete"
        answer: dict[str, Any] = {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens,
            "metadata": body.metadata or {},
            "model": self.model,
            "output": output or [],
            "parallel_tool_calls": body.parallel_tool_calls is not False,
            "previous_response_id": None,
            "reasoning": None,
            "store": False,
            "temperature": body.temperature,
            "text": {"format": (body.text or {}).get("format") or {"type": "text"}},
            "tool_choice": body.tool_choice or "auto",
            "tools": body.tools or [],
            "top_p": body.top_p,
            "truncation": "disabled",
            "usage": None,
            "user": body.user,
        }
        if result is not None:
            prompt_tokens, output_tokens = result.routed.prompt_tokens, len(result.output_ids)
            answer["usage"] = {
                "input_tokens": prompt_tokens,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": output_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": prompt_tokens + output_tokens,
            }
            answer["completed_at"] = int(time.time())
            answer["specroute"] = specroute_extra(result.routed, result)
        elif routed is not None:
            answer["specroute"] = specroute_extra(routed, None)
        return answer

    def output(self, content: str | None, calls: list[dict[str, Any]], status: str) -> list[Any]:
        """The output items: the assistant's message (unless the answer is calls alone),
        then one ``function_call`` item per call."""
        message = [self.message(content or "", status)] if content or not calls else []
        return message + [self.function_call(call) for call in calls]

    def message(self, text: str, status: str) -> dict[str, Any]:
        """The assistant's output message item."""
        return {
            "type": "message",
            "id": self.message_id,
            "status": status,
            "role": "assistant",
            "content": [] if status == "in_progress" else [self.part(text, self.logprobs)],
        }

    @staticmethod
    def part(text: str, logprobs: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
        """The message's text part (``logprobs``: its tokens', chat's entries)."""
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": list(logprobs)}

    @staticmethod
    def function_call(call: dict[str, Any], status: str = "completed") -> dict[str, Any]:
        """A chat tool call (``router.tool_calls``) as a ``function_call`` item; in
        progress, its arguments are still to come."""
        function = call["function"]
        return {
            "type": "function_call",
            "id": "fc_" + call["id"].removeprefix("call_"),
            "call_id": call["id"],
            "name": function["name"],
            "arguments": function["arguments"] if status == "completed" else "",
            "status": status,
        }

    def event(self, kind: str, **fields: Any) -> dict[str, Any]:
        """A streamed event of type ``kind``, numbered in order."""
        event = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return event

    def text_event(self, kind: str, **fields: Any) -> dict[str, Any]:
        """An event about the message's one text part."""
        where = {"item_id": self.message_id, "output_index": 0, "content_index": 0}
        return self.event(kind, **where, **fields)


def finish_status(result: GenerationResult) -> str:
    """``completed``, or ``incomplete`` where the output ran to its budget."""
    return "completed" if str(result.stats.finish_reason) != "length" else "incomplete"


async def collect(service: RouterService, body: ResponsesRequest, caller: Caller) -> dict[str, Any]:
    chat = chat_request(service, body)
    answer = ResponseObject(service, body, chat)
    ran = await run_choice(service, caller.generation(responses_input(service, chat)), chat)
    result, status = ran.result, finish_status(ran.result)
    if ran.scored is not None:
        answer.logprobs = chat_logprobs(ran.scored)["content"]
    output = answer.output(*answer.tools.read(result.generated_text), status)
    return answer.response(status, output, result)


async def stream(
    service: RouterService, request: web.Request, body: ResponsesRequest
) -> web.StreamResponse:
    """The Responses API's events: ``response.created``, ``response.in_progress``, the
    message and its text part added, one ``response.output_text.delta`` per speculative
    step's text, the text, part and message done, each function call (added, its
    arguments, done), then ``response.completed`` (or ``response.incomplete``). With
    tools, the message opens with its first text (an answer of calls alone has none),
    and text that may begin a call is held until it is read. An error after the first
    event is an ``error`` event and ``response.failed``; a client that leaves part-way
    stops the generation."""
    from router.http_front import CALLER_KEY, SSE_HEADERS, client_may_leave

    chat = chat_request(service, body)
    answer = ResponseObject(service, body, chat)
    asked = request[CALLER_KEY].generation(responses_input(service, chat))
    items: AsyncIterator[Any]
    async with contextlib.aclosing(service.generate(asked)) as items:  # type: ignore[type-var]
        routed = await anext(items)  # errors before the first event are plain HTTP errors
        response = web.StreamResponse(headers=SSE_HEADERS)
        with client_may_leave(request):
            await response.prepare(request)
            opening = answer.response("in_progress", routed=routed)
            await typed_sse_event(response, answer.event("response.created", response=opening))
            await typed_sse_event(response, answer.event("response.in_progress", response=opening))
            try:
                await StreamedOutput(response, answer, asked.logprobs is not None).send(items)
            except ConnectionResetError:
                raise  # the client left (client_may_leave)
            except Exception as error:
                await _send_failure(response, answer, routed, error)
            await response.write_eof()
        return response


class StreamedOutput:
    """The output events of one streamed response (``stream``): the message's text as it
    is released, then its function calls."""

    def __init__(
        self, response: web.StreamResponse, answer: ResponseObject, logprobs: bool
    ) -> None:
        self.response = response
        self.answer = answer
        self.holdback = answer.tools.holdback()
        # Each delta carries the log-probabilities of the tokens whose text it completes.
        self.scored = LogprobsHoldback() if logprobs else None
        self.text = ""  # the message's text sent so far
        self.opened = False

    async def send(self, items: AsyncIterator[Any]) -> None:
        if self.holdback is None:
            await self._open()  # no calls to tell apart: the message opens at once
        async for item in items:
            if isinstance(item, TokenChunk):
                if self.scored is not None:
                    self.scored.feed(item)
                if item.text:
                    released = self.holdback.feed(item.text) if self.holdback else item.text
                    await self._delta(released)
            elif isinstance(item, GenerationResult):
                await self._finish(item)
                return
        raise GenerationFailedError("generation ended without a result")

    async def _open(self) -> None:
        self.opened = True
        answer = self.answer
        added = answer.event(
            "response.output_item.added", output_index=0, item=answer.message("", "in_progress")
        )
        await typed_sse_event(self.response, added)
        part = answer.text_event("response.content_part.added", part=answer.part(""))
        await typed_sse_event(self.response, part)

    async def _delta(self, text: str) -> None:
        if not text:
            return
        if not self.opened:
            await self._open()
        self.text += text
        logprobs = self._released(len(text))
        delta = self.answer.text_event("response.output_text.delta", delta=text, logprobs=logprobs)
        await typed_sse_event(self.response, delta)

    def _released(self, characters: int | None) -> list[dict[str, Any]]:
        """The entries of the tokens whose text is out once ``characters`` more are (None:
        every one left), added to the message's."""
        if self.scored is None:
            return []
        entries = chat_logprobs(self.scored.release(characters)[0])["content"]
        self.answer.logprobs.extend(entries)
        return entries

    async def _finish(self, result: GenerationResult) -> None:
        answer, status = self.answer, finish_status(result)
        calls: list[dict[str, Any]] = []
        if self.holdback is not None:
            held, calls = self.holdback.finish()
            await self._delta(held)
        self._released(None)  # tokens with no text of their own (an end of turn), a call's
        if self.opened or not calls:
            await self._close_message(status)
        for index, call in enumerate(calls, start=int(self.opened)):
            await self._send_call(index, call)
        output = answer.output(self.text, calls, status)
        await typed_sse_event(
            self.response,
            answer.event(f"response.{status}", response=answer.response(status, output, result)),
        )

    async def _close_message(self, status: str) -> None:
        answer, text = self.answer, self.text
        if not self.opened:
            await self._open()
        logprobs = answer.logprobs
        await typed_sse_event(
            self.response,
            answer.text_event("response.output_text.done", text=text, logprobs=logprobs),
        )
        part = answer.part(text, logprobs)
        await typed_sse_event(
            self.response, answer.text_event("response.content_part.done", part=part)
        )
        done = answer.event(
            "response.output_item.done", output_index=0, item=answer.message(text, status)
        )
        await typed_sse_event(self.response, done)

    async def _send_call(self, index: int, call: dict[str, Any]) -> None:
        answer = self.answer
        item = answer.function_call(call, "in_progress")
        where = {"item_id": item["id"], "output_index": index}
        arguments = call["function"]["arguments"]
        events = [
            answer.event("response.output_item.added", output_index=index, item=item),
            answer.event("response.function_call_arguments.delta", **where, delta=arguments),
            answer.event("response.function_call_arguments.done", **where, arguments=arguments),
            answer.event(
                "response.output_item.done", output_index=index, item=answer.function_call(call)
            ),
        ]
        for event in events:
            await typed_sse_event(self.response, event)


async def _send_failure(
    response: web.StreamResponse, answer: ResponseObject, routed: RoutedRequest, error: Exception
) -> None:
    """An ``error`` event with the OpenAI error's code, message and param, then
    ``response.failed`` carrying the error."""
    where = f"the stream (request {routed.request_id})"
    failure = error_body(sidecar_error_of(error, where))[1]["error"]
    code = failure["code"] or failure["type"]
    await typed_sse_event(
        response,
        answer.event("error", code=code, message=failure["message"], param=failure["param"]),
    )
    failed = answer.response("failed", routed=routed)
    failed["error"] = {"code": code, "message": failure["message"]}
    await typed_sse_event(response, answer.event("response.failed", response=failed))


async def responses_route(request: web.Request) -> web.StreamResponse:
    from router.http_front import CALLER_KEY, SERVICE_KEY

    service = request.app[SERVICE_KEY]
    try:
        body = await parsed_body(request, ResponsesRequest)
        if body.stream:
            return await stream(service, request, body)
        return web.json_response(await collect(service, body, request[CALLER_KEY]))
    except SidecarError as error:
        return error_response(error)


async def input_tokens_route(request: web.Request) -> web.Response:
    """``POST /v1/responses/input_tokens`` (the client's ``responses.input_tokens.count``):
    the tokens of the prompt a response to the body would read."""
    from router.http_front import SERVICE_KEY

    service = request.app[SERVICE_KEY]
    try:
        chat = chat_request(service, await parsed_body(request, ResponsesRequest))
        counted = chat_prompt_tokens(service, chat)
    except SidecarError as error:
        return error_response(error)
    return web.json_response({"object": "response.input_tokens", "input_tokens": counted})


async def stored_response_route(request: web.Request) -> web.Response:
    """A stored response asked for (retrieved, deleted, cancelled, its input listed):
    404 that says none is kept, rather than the catch-all's "no route"."""
    from router.http_front import check_bearer

    try:
        check_bearer(request)
        raise NotFoundError(
            f"no response {request.match_info['id']!r}: responses are not stored here "
            "(store is answered false); send the conversation as input"
        )
    except SidecarError as error:
        return error_response(error)


def add_responses_routes(app: web.Application) -> None:
    """Mount ``POST /v1/responses`` and the stored-response routes (before the OpenAI
    front's catch-all of ``/v1/``)."""
    app.router.add_post("/v1/responses", responses_route)
    app.router.add_post("/v1/responses/input_tokens", input_tokens_route)
    app.router.add_route("*", "/v1/responses/{id}", stored_response_route)
    app.router.add_route("*", "/v1/responses/{id}/{action}", stored_response_route)
