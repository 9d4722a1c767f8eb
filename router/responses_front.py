"""OpenAI's Responses API, ``POST /v1/responses``, beside chat completions.

The request's ``input`` (a text, or message items with text parts) and ``instructions``
(a system message before them) are one chat, rendered by the target's template; it is
routed, drafted and generated as a chat completion is (the same checks, decisions and
errors), and answered as a ``response`` object with one assistant message, or streamed as
the Responses API's typed server-sent events (``response.created`` ... deltas ...
``response.completed``). Served: ``max_output_tokens``, ``temperature``, ``top_p``, the
presence and frequency penalties, ``text.format`` (``text``, ``json_object``,
``json_schema``: held to the grammar as ``response_format`` is), ``metadata``, ``user``,
and vLLM's ``top_k``, ``min_p`` and ``logit_bias``. Nothing is stored (as vLLM without
its response store): ``store`` is answered false, and what needs a stored response
(``previous_response_id``, ``conversation``, ``background``) is refused with 400 naming
it, as are tools, log-probabilities, reasoning and the other features in ``UNSERVED``
unless at the value that asks for nothing. A field the API does not define is ignored.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict

from router.domain import GenerateInput, Prompt
from router.errors import (
    GenerationFailedError,
    InvalidFieldError,
    SidecarError,
    sidecar_error_of,
)
from router.openai_front import (
    CHAT,
    ROLE_ALIASES,
    ChatRequest,
    error_body,
    error_response,
    generate_input,
    parsed_body,
    served_model_names,
    specroute_extra,
)
from router.service import GenerationResult, RoutedRequest, RouterService, TokenChunk

# Responses API fields not served, with the values that ask for nothing, and why.
UNSERVED: dict[str, tuple[tuple[Any, ...], str]] = {
    "previous_response_id": ((None,), "responses are not stored: send the conversation as input"),
    "conversation": ((None,), "responses are not stored: send the conversation as input"),
    "background": ((None, False), "background responses are not served"),
    "prompt": ((None,), "stored prompt templates are not served"),
    "tools": ((None, []), "tools are served on /v1/chat/completions"),
    "tool_choice": ((None, "auto", "none"), "tools are served on /v1/chat/completions"),
    "max_tool_calls": ((None,), "tools are served on /v1/chat/completions"),
    "include": ((None, []), "nothing more to include is served"),
    "top_logprobs": ((None, 0), "log-probabilities are served on /v1/chat/completions"),
    "reasoning": ((None,), "reasoning options are not served"),
    "truncation": ((None, "disabled"), "the input is never truncated here: only 'disabled'"),
}
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


def check_served(body: ResponsesRequest) -> None:
    """400 naming the first field set to something this sidecar does not serve."""
    extra = body.model_extra or {}
    for name, (neutral, reason) in UNSERVED.items():
        if extra.get(name) not in neutral:
            raise InvalidFieldError(name, reason)


def input_messages(body: ResponsesRequest) -> list[dict[str, str]]:
    """The chat the request stands for: ``instructions`` as a system message, then the
    input (a text is one user message; items are messages whose text parts are joined)."""
    messages = [{"role": "system", "content": body.instructions}] if body.instructions else []
    if isinstance(body.input, str):
        return [*messages, {"role": "user", "content": body.input}]
    for index, item in enumerate(body.input):
        messages.append(_input_message(item, f"input[{index}]"))
    if not messages:
        raise InvalidFieldError("input", "must hold at least one message")
    return messages


def _input_message(item: dict[str, Any], field: str) -> dict[str, str]:
    kind = item.get("type", "message")
    if kind != "message":
        raise InvalidFieldError(f"{field}.type", f"only message items are served, got {kind!r}")
    role = str(item.get("role"))
    part_type = OUTPUT_PART if role == "assistant" else INPUT_PARTS.get(role)
    if part_type is None:
        raise InvalidFieldError(
            f"{field}.role",
            f"must be user, system, developer or assistant, got {item.get('role')!r}",
        )
    content = item.get("content")
    if isinstance(content, str):
        return {"role": ROLE_ALIASES.get(role, role), "content": content}
    if not isinstance(content, list):
        raise InvalidFieldError(f"{field}.content", "must be a text or a list of parts")
    texts = []
    for number, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != part_type:
            got = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise InvalidFieldError(
                f"{field}.content[{number}]", f"only {part_type} parts are served, got {got!r}"
            )
        if not isinstance(part.get("text"), str):
            raise InvalidFieldError(f"{field}.content[{number}].text", "must be a string")
        texts.append(part["text"])
    return {"role": ROLE_ALIASES.get(role, role), "content": "\n".join(texts)}


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


def model_of(service: RouterService, body: ResponsesRequest) -> str:
    return body.model if body.model is not None else served_model_names(service)[0]


def responses_input(service: RouterService, body: ResponsesRequest) -> GenerateInput:
    """The domain request for ``body``, checked as a chat completion's is; an error names
    the Responses API's field."""
    check_served(body)
    chat = ChatRequest.model_validate(
        {
            "model": model_of(service, body),
            "messages": [],
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
    try:
        return generate_input(service, CHAT, chat, Prompt(messages=tuple(input_messages(body))))
    except InvalidFieldError as error:
        renamed = RESPONSE_FIELDS.get(error.field)
        if renamed is None:
            raise
        problem = str(error).removeprefix(f"{error.field}: ")
        raise InvalidFieldError(renamed, problem) from None


class ResponseObject:
    """One response's objects and events: its ids, creation time and event numbers."""

    def __init__(self, service: RouterService, body: ResponsesRequest) -> None:
        self.body = body
        self.model = model_of(service, body)
        self.id = f"resp_{uuid.uuid4().hex}"
        self.message_id = f"msg_{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.sequence = 0

    def response(
        self,
        status: str,
        text: str | None = None,
        result: GenerationResult | None = None,
        routed: RoutedRequest | None = None,
    ) -> dict[str, Any]:
        """The ``response`` object: in progress (no output yet), or finished with
        ``text`` and the ``result`` (``routed``: the decision, once made)."""
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
            "output": [] if text is None else [self.message(text, status)],
            "parallel_tool_calls": True,
            "previous_response_id": None,
            "reasoning": None,
            "store": False,
            "temperature": body.temperature,
            "text": {"format": (body.text or {}).get("format") or {"type": "text"}},
            "tool_choice": (body.model_extra or {}).get("tool_choice") or "auto",
            "tools": [],
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

    def message(self, text: str, status: str) -> dict[str, Any]:
        """The assistant's output message item."""
        return {
            "type": "message",
            "id": self.message_id,
            "status": status,
            "role": "assistant",
            "content": [] if status == "in_progress" else [self.part(text)],
        }

    @staticmethod
    def part(text: str) -> dict[str, Any]:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

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


async def collect(service: RouterService, body: ResponsesRequest) -> dict[str, Any]:
    answer = ResponseObject(service, body)
    request = responses_input(service, body)
    result: GenerationResult | None = None
    async with contextlib.aclosing(service.generate(request)) as items:  # type: ignore[type-var]
        async for item in items:
            if isinstance(item, GenerationResult):
                result = item
    if result is None:
        raise GenerationFailedError("generation ended without a result")
    return answer.response(finish_status(result), result.generated_text, result)


async def _send(response: web.StreamResponse, event: dict[str, Any]) -> None:
    await response.write(f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode())


async def stream(
    service: RouterService, request: web.Request, body: ResponsesRequest
) -> web.StreamResponse:
    """The Responses API's events: ``response.created``, ``response.in_progress``, the
    message and its text part added, one ``response.output_text.delta`` per speculative
    step's text, the text, part and message done, then ``response.completed`` (or
    ``response.incomplete``). An error after the first event is an ``error`` event and
    ``response.failed``; a client that leaves part-way stops the generation."""
    from router.http_front import SSE_HEADERS, client_may_leave

    answer = ResponseObject(service, body)
    asked = responses_input(service, body)
    items: AsyncIterator[Any]
    async with contextlib.aclosing(service.generate(asked)) as items:  # type: ignore[type-var]
        routed = await anext(items)  # errors before the first event are plain HTTP errors
        response = web.StreamResponse(headers=SSE_HEADERS)
        with client_may_leave(request):
            await response.prepare(request)
            opening = answer.response("in_progress", routed=routed)
            await _send(response, answer.event("response.created", response=opening))
            await _send(response, answer.event("response.in_progress", response=opening))
            item = answer.message("", "in_progress")
            await _send(
                response, answer.event("response.output_item.added", output_index=0, item=item)
            )
            await _send(
                response, answer.text_event("response.content_part.added", part=answer.part(""))
            )
            try:
                await _stream_text(response, answer, items)
            except ConnectionResetError:
                raise  # the client left (client_may_leave)
            except Exception as error:
                await _send_failure(response, answer, routed, error)
            await response.write_eof()
        return response


async def _send_failure(
    response: web.StreamResponse, answer: ResponseObject, routed: RoutedRequest, error: Exception
) -> None:
    """An ``error`` event with the OpenAI error's code, message and param, then
    ``response.failed`` carrying the error."""
    failure = error_body(sidecar_error_of(error, "the stream"))[1]["error"]
    code = failure["code"] or failure["type"]
    await _send(
        response,
        answer.event("error", code=code, message=failure["message"], param=failure["param"]),
    )
    failed = answer.response("failed", routed=routed)
    failed["error"] = {"code": code, "message": failure["message"]}
    await _send(response, answer.event("response.failed", response=failed))


async def _stream_text(
    response: web.StreamResponse, answer: ResponseObject, items: AsyncIterator[Any]
) -> None:
    """The text deltas, then the events that close the part, the message and the
    response."""
    async for item in items:
        if isinstance(item, TokenChunk) and item.text:
            delta = answer.text_event("response.output_text.delta", delta=item.text, logprobs=[])
            await _send(response, delta)
        elif isinstance(item, GenerationResult):
            status = finish_status(item)
            text = item.generated_text
            await _send(
                response, answer.text_event("response.output_text.done", text=text, logprobs=[])
            )
            await _send(
                response, answer.text_event("response.content_part.done", part=answer.part(text))
            )
            done = answer.event(
                "response.output_item.done", output_index=0, item=answer.message(text, status)
            )
            await _send(response, done)
            final = answer.response(status, text, item)
            await _send(response, answer.event(f"response.{status}", response=final))
            return
    raise GenerationFailedError("generation ended without a result")


async def responses_route(request: web.Request) -> web.StreamResponse:
    from router.http_front import SERVICE_KEY

    service = request.app[SERVICE_KEY]
    try:
        body = await parsed_body(request, ResponsesRequest)
        if body.stream:
            return await stream(service, request, body)
        return web.json_response(await collect(service, body))
    except SidecarError as error:
        return error_response(error)


def add_responses_routes(app: web.Application) -> None:
    """Mount ``POST /v1/responses`` (before the OpenAI front's catch-all of ``/v1/``)."""
    app.router.add_post("/v1/responses", responses_route)
