"""vLLM's ``POST /tokenize`` and ``POST /detokenize`` on the sidecar's HTTP port.

Clients of a vLLM server count a prompt's tokens (a chat as the template renders it)
before they send it, and read token ids back as text, through these two routes; the
sidecar answers them with the target's tokenizer and chat template, the ids its engine
(or its fleet's replicas, which share the tokenizer) reads. The bodies and answers are
vLLM's: ``{"prompt"}`` or ``{"messages", "add_generation_prompt",
"continue_final_message", "tools", "chat_template_kwargs"}``, with ``add_special_tokens``
and ``return_token_strs``, answered ``{"count", "max_model_len", "tokens",
"token_strs"}`` (``max_model_len`` null where the target declares no context length);
``{"tokens"}`` answered ``{"prompt"}`` (special tokens kept, as vLLM decodes). Errors
are the OpenAI front's.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict

from router.domain import Prompt, check_prompt_tokens
from router.errors import InvalidFieldError, InvalidRequestError, SidecarError
from router.openai_front import (
    CHAT,
    ChatMessage,
    ChatRequest,
    check_model,
    error_response,
    parsed_body,
)
from router.service import RouterService


class TokenizeRequest(BaseModel):
    """A text ``prompt`` or chat ``messages`` (exactly one), as vLLM's two shapes."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    tools: list[Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    # None: as the engine reads the prompt (a text's with the tokenizer's special tokens,
    # a chat's with the template's only), which is vLLM's default for each shape.
    add_special_tokens: bool | None = None
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    tokens: list[int]


def _prompt_of(body: TokenizeRequest, service: RouterService) -> Prompt:
    if (body.prompt is None) == (body.messages is None):
        raise InvalidRequestError("send either prompt (a text) or messages (a chat)")
    if body.prompt is not None:
        return Prompt(text=body.prompt)
    chat = ChatRequest(
        model="tokenize",
        messages=body.messages or [],
        add_generation_prompt=body.add_generation_prompt,
        continue_final_message=body.continue_final_message,
        tools=body.tools,
        chat_template_kwargs=body.chat_template_kwargs,
    )
    return CHAT.prompts_of(chat, service)[0]


def tokenize(service: RouterService, body: TokenizeRequest) -> dict[str, Any]:
    """vLLM's ``/tokenize`` answer for ``body``."""
    check_model(service, body.model)
    if body.add_generation_prompt and body.continue_final_message and body.messages:
        raise InvalidFieldError(
            "continue_final_message", "cannot be set with add_generation_prompt (as vLLM)"
        )
    ids = service.tokenized(_prompt_of(body, service), body.add_special_tokens)
    strings = service.tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
    return {
        "count": len(ids),
        "max_model_len": service.context_tokens,
        "tokens": ids,
        "token_strs": strings,
    }


def detokenize(service: RouterService, body: DetokenizeRequest) -> dict[str, Any]:
    """vLLM's ``/detokenize`` answer: the ids decoded, special tokens kept."""
    check_model(service, body.model)
    check_prompt_tokens(len(body.tokens), service.limits)
    service.check_in_vocabulary("tokens", body.tokens)
    return {"prompt": service.tokenizer.decode(body.tokens)}


async def tokenize_route(request: web.Request) -> web.Response:
    from router.http_front import SERVICE_KEY

    try:
        body = await parsed_body(request, TokenizeRequest)
        return web.json_response(tokenize(request.app[SERVICE_KEY], body))
    except SidecarError as error:
        return error_response(error)


async def detokenize_route(request: web.Request) -> web.Response:
    from router.http_front import SERVICE_KEY

    try:
        body = await parsed_body(request, DetokenizeRequest)
        return web.json_response(detokenize(request.app[SERVICE_KEY], body))
    except SidecarError as error:
        return error_response(error)


def add_tokenize_routes(app: web.Application) -> None:
    app.router.add_post("/tokenize", tokenize_route)
    app.router.add_post("/detokenize", detokenize_route)
