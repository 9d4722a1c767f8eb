"""An OpenAI-compatible HTTP front beside the TGI one, on the same aiohttp application.

``POST /v1/completions``, ``POST /v1/chat/completions`` (both with ``"stream": true`` as
server-sent events ending with ``data: [DONE]``) and ``GET /v1/models``, with OpenAI's
JSON, so the official ``openai`` client works unchanged against the sidecar (the
in-process engine, or a vLLM fleet behind it); ``POST /v1/responses`` is
``router.responses_front``, on this module's chat path. Errors are
``{"error": {"message", "type", "param", "code"}}`` with 400 / 401 / 404 / 429 / 500.

A request the sidecar cannot honour (``best_of``, ``suffix`` and vLLM's extensions in
``UNSUPPORTED_UNLESS``) is refused with 400 naming the parameter, never ignored; a field
neither API defines is ignored. Structured output (``response_format``, vLLM's
``structured_outputs`` and ``guided_*``) is read by ``router.structured_output``, and
``tool_choice`` "required" or named holds the answer to the tools' schema. Served
besides the basics: ``n`` choices, log-probabilities (chat's ``logprobs``/
``top_logprobs``, completions' ``logprobs``), completions' ``echo`` and vLLM's
``prompt_logprobs`` (the prompt's log-probabilities, in-process), chat's ``echo``,
token-id and several prompts, the presence and frequency penalties, ``logit_bias``, and
vLLM's ``min_p``, ``repetition_penalty``, ``min_tokens``, ``ignore_eos``,
``stop_token_ids``, ``include_stop_str_in_output``, ``skip_special_tokens``, ``top_k``,
``allowed_token_ids``, ``bad_words``,
``truncate_prompt_tokens``, ``add_generation_prompt``, ``continue_final_message``,
``chat_template_kwargs`` and ``stream_options.continuous_usage_stats``; ``tools``,
answered as ``tool_calls`` (``router.tool_calls``); OpenAI's ``prediction``, drafted from
in process (``drafters/prediction.py``; a fleet refuses it).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import importlib.metadata
import json
import time
import uuid
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Mapping,
    Sequence,
)
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, ValidationError

from drafters.grammar import OutputGrammar
from router.domain import (
    MAX_STOP_SEQUENCES,
    Caller,
    GenerateInput,
    Prompt,
    RouteInput,
    Sampling,
    check_logprobs,
)
from router.errors import (
    ContextLengthError,
    ContextLengthFieldError,
    GenerationFailedError,
    InvalidFieldError,
    InvalidRequestError,
    NotFoundError,
    OverloadedError,
    PermissionDeniedError,
    PreconditionError,
    RequestFailsReplicasError,
    RequestTooLargeError,
    SidecarError,
    UnauthenticatedError,
    UnavailableError,
    sidecar_error_of,
    status_of,
)
from router.service import (
    GenerationResult,
    PromptScores,
    RoutedRequest,
    RouterService,
    TokenChunk,
    TokenLogprobs,
)
from router.structured_output import from_openai, grammar_of
from router.tool_calls import (
    ForcedToolCallHoldback,
    ForcedToolChoice,
    ToolCallHoldback,
    check_chat_tools,
    parse_tool_calls,
)

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
# What TGI's own clients send as the model (the text-generation client's chat(), and
# huggingface_hub's InferenceClient given a URL): TGI serves its one model whatever the
# name, so these are the served model too.
TGI_CLIENT_MODEL_NAMES = ("tgi", "dummy")
FINISH_REASONS = {"length": "length", "eos_token": "stop", "stop_sequence": "stop"}

# HTTP status, OpenAI error type, code: the OpenAI wire's view of the sidecar's errors.
OPENAI_ERRORS: dict[type[SidecarError], tuple[int, str, str | None]] = {
    RequestTooLargeError: (413, "invalid_request_error", None),
    ContextLengthError: (400, "invalid_request_error", "context_length_exceeded"),
    InvalidRequestError: (400, "invalid_request_error", None),
    PreconditionError: (400, "invalid_request_error", None),
    NotFoundError: (404, "invalid_request_error", "not_found"),
    PermissionDeniedError: (403, "permission_error", None),
    OverloadedError: (429, "rate_limit_error", "rate_limit_exceeded"),
    UnauthenticatedError: (401, "authentication_error", "invalid_api_key"),
    GenerationFailedError: (500, "server_error", None),
    UnavailableError: (503, "server_error", "service_unavailable"),
}
UNEXPECTED_ERROR = (500, "server_error", None)


class ModelNotFoundError(NotFoundError):
    """The request names a model this sidecar does not serve."""


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool | None = False
    # vLLM's: with include_usage, every chunk carries its choice's usage so far.
    continuous_usage_stats: bool | None = False


# Parameters of OpenAI's API and vLLM's extensions to it that the sidecar does not
# implement and that have no field below, with the values that ask for nothing (accepted);
# any other value is refused by name, so that a client relying on one (a benchmark's
# allowed_token_ids, beam search) is told rather than silently served something else.
UNSUPPORTED_UNLESS: dict[str, tuple[Any, ...]] = {
    "logprob_token_ids": (None, []),
    "functions": (None, []),
    "function_call": (None, "none"),
    "modalities": (None, ["text"]),
    "audio": (None,),
    "chat_template": (None,),
    # vLLM's sampling extensions beyond those above.
    "use_beam_search": (None, False),
    "length_penalty": (None, 1, 1.0),
    "spaces_between_special_tokens": (None, True),
    "logits_processors": (None, []),
    "guided_whitespace_pattern": (None,),
    "return_tokens_as_token_ids": (None, False),
}


class Prediction(BaseModel):
    """OpenAI's predicted output: text the answer is expected to repeat."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["content"]
    content: str | list[dict[str, Any]]


class OpenAIParameters(BaseModel):
    """What completions and chat completions share. Unsupported features must be left at
    their defaults; NaN and infinities are refused in every float. Other fields are kept
    (``model_extra``) to be checked against ``UNSUPPORTED_UNLESS``."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # vLLM's extension, accepted by the sidecar as well
    typical_p: float | None = None  # TGI's; vLLM has none (refused in fleet mode)
    truncate_prompt_tokens: int | None = None  # vLLM's: the last N; -1: the prompt limit
    seed: int | None = None
    stop: str | list[str] | None = None
    repetition_penalty: float | None = None  # vLLM's: > 0, 1 off
    min_p: float | None = None  # vLLM's: [0, 1], 0 off
    min_tokens: int | None = None  # vLLM's: no stop of any kind before this many tokens
    ignore_eos: bool | None = False  # vLLM's: generate past the model's EOS tokens
    include_stop_str_in_output: bool | None = False  # vLLM's: the text keeps its stop
    stop_token_ids: list[int] | None = None  # vLLM's: more tokens that end the generation
    skip_special_tokens: bool | None = True  # vLLM's: False keeps their text
    allowed_token_ids: list[int] | None = None  # vLLM's: only these tokens are generated
    bad_words: list[str] | None = None  # vLLM's: words never generated
    stream: bool | None = False  # null (OpenAI's clients send it for None): not streamed
    stream_options: StreamOptions | None = None
    n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None  # token id (a string in JSON) -> bias
    logprobs: Any = None
    top_logprobs: int | None = None
    # vLLM's: each prompt token's logprob, rank and this many alternatives (not streamed).
    prompt_logprobs: int | None = None
    user: str | None = None
    # OpenAI's (vLLM takes it on completions too); vLLM's structured_outputs and older
    # guided_* ride in model_extra (``router.structured_output``).
    response_format: dict[str, Any] | None = None
    # OpenAI's predicted outputs (chat; taken on completions too): drafted from in process.
    prediction: Prediction | None = None


class CompletionRequest(OpenAIParameters):
    prompt: str | list[Any]  # texts or token-id lists, one or several (_completion_prompts)
    echo: bool | None = False
    best_of: int | None = None
    suffix: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool's answer: the call it answers


class ChatRequest(OpenAIParameters):
    messages: list[ChatMessage]
    # vLLM's: how the rendering ends (the assistant's opening, or the last message left
    # open and continued); add_generation_prompt unset: unless continuing.
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = False
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM's: the template's variables
    max_completion_tokens: int | None = None
    tools: list[Any] | None = None
    echo: bool | None = False  # vLLM's: the assistant's last message leads the reply


@dataclass(frozen=True)
class Endpoint:
    """One generation route: its request model, OpenAI object names, how it reads the prompt."""

    request_type: type[OpenAIParameters]
    object_name: Literal["text_completion", "chat.completion"]
    chunk_name: Literal["text_completion", "chat.completion.chunk"]
    prompts_of: Callable[[Any, RouterService], list[Prompt]]
    max_tokens_of: Callable[[Any], int | None]

    @property
    def is_chat(self) -> bool:
        return self.object_name == "chat.completion"


def _unsupported(body: OpenAIParameters) -> list[str]:
    """Parameters set to something this sidecar does not implement."""
    problems = []
    if isinstance(body, CompletionRequest):
        if body.top_logprobs:  # chat's; completions take the count in ``logprobs``
            problems.append("top_logprobs")
        if body.best_of not in (None, 1):
            problems.append("best_of")
        if body.suffix:
            problems.append("suffix")
        if (body.model_extra or {}).get("tool_choice") not in (None, "none", "auto"):
            problems.append("tool_choice")  # chat's
    extra = body.model_extra or {}
    problems.extend(
        name
        for name, neutral in UNSUPPORTED_UNLESS.items()
        if name in extra and extra[name] not in neutral
    )
    return problems


def usage_asked(body: OpenAIParameters) -> tuple[bool, bool]:
    """(a usage chunk at the end, usage on every chunk): ``stream_options``'
    ``include_usage``, and vLLM's ``continuous_usage_stats`` with it (alone it asks for
    nothing, as vLLM reads it)."""
    options = body.stream_options
    if options is None or not options.include_usage:
        return False, False
    return True, bool(options.continuous_usage_stats)


def stops_of(body: OpenAIParameters) -> list[str]:
    """The request's stop sequences (OpenAI's ``stop`` is one string or a list)."""
    return [body.stop] if isinstance(body.stop, str) else list(body.stop or [])


def cut_stops_of(body: OpenAIParameters) -> list[str]:
    """The stop sequences the reply's text ends before: none with vLLM's
    ``include_stop_str_in_output`` (the text then ends after its stop, as the engine's)."""
    return [] if body.include_stop_str_in_output else stops_of(body)


def ending_stop(text: str, stops: Sequence[str]) -> str | None:
    """The stop sequence ``text`` ends with, if any (the longest that fits: the one that
    starts first)."""
    return next((s for s in sorted(stops, key=len, reverse=True) if s and text.endswith(s)), None)


def without_stop(text: str, stops: Sequence[str]) -> str:
    """``text`` without the stop sequence it ends with, if any (``ending_stop``). The
    engine's text, as TGI's, ends after the stop; OpenAI's ends before it."""
    stop = ending_stop(text, stops)
    return text[: -len(stop)] if stop else text


class StopHoldback:
    """A stream's text without its stop sequence: the last ``max(len(stop))`` characters
    are held back until more text shows they are not the stop the run ended on, so no
    part of a stop is ever sent (what vLLM does for OpenAI's streams)."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = list(stops)
        self._hold = max((len(stop) for stop in stops), default=0)
        self._pending = ""

    def feed(self, text: str) -> str:
        """What of the text so far can be sent now."""
        if not self._hold:
            return text
        self._pending += text
        cut = len(self._pending) - self._hold
        if cut <= 0:
            return ""
        released, self._pending = self._pending[:cut], self._pending[cut:]
        return released

    def finish(self, stopped: bool) -> str:
        """The held text at the end, without the stop when the run ended on one."""
        rest, self._pending = self._pending, ""
        return without_stop(rest, self._stops) if stopped else rest


def sampling_from_openai(body: OpenAIParameters) -> Sampling:
    """OpenAI semantics: temperature 0 is greedy, and the default temperature is 1
    (sampling); top_p and top_k narrow the sampled distribution."""
    temperature = 1.0 if body.temperature is None else body.temperature
    if temperature < 0 or temperature > 2:
        raise InvalidFieldError("temperature", f"must be in [0, 2], got {temperature:g}")
    top_p = 1.0 if body.top_p is None else body.top_p
    if not 0 < top_p <= 1:
        raise InvalidFieldError("top_p", f"must be in (0, 1], got {top_p:g}")
    top_k = body.top_k or 0
    if top_k < -1:
        raise InvalidFieldError("top_k", f"must be -1 (off) or > 0, got {top_k}")
    stops = stops_of(body)
    if any(not stop for stop in stops):
        raise InvalidFieldError("stop", "stop sequences must not be empty strings")
    if len(stops) > MAX_STOP_SEQUENCES:
        raise InvalidFieldError("stop", f"at most {MAX_STOP_SEQUENCES} stop sequences")
    greedy = temperature == 0
    return Sampling(
        do_sample=not greedy,
        temperature=1.0 if greedy else temperature,
        top_k=max(top_k, 0),
        top_p=top_p,
        seed=body.seed,
        stop=tuple(stops),
        typical_p=1.0 if body.typical_p is None else body.typical_p,  # checked with the rest
        ignore_eos=bool(body.ignore_eos),
        stop_token_ids=tuple(body.stop_token_ids or ()),
        # Checked with the rest (``check_sampling``; a 400 names OpenAI's field).
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        min_tokens=body.min_tokens or 0,
        logit_bias=_logit_bias(body),
        min_p=body.min_p or 0.0,
        skip_special_tokens=body.skip_special_tokens is not False,
        structured_output=_structured_output(body),
        allowed_token_ids=(
            None if body.allowed_token_ids is None else tuple(body.allowed_token_ids)
        ),
        bad_words=tuple(body.bad_words or ()),
    )


def _structured_output(body: OpenAIParameters) -> OutputGrammar | None:
    """The grammar the body asks for: its own structured output, or a forced tool call's
    schema (not both)."""
    asked = from_openai(body.response_format, body.model_extra or {})
    forced = forced_tool_choice(body)
    if forced is None:
        return asked
    if asked is not None:
        raise InvalidFieldError(
            "tool_choice", "a forced tool call holds the output to its own schema: no other"
        )
    try:
        schema = forced.schema()
    except ValueError as error:
        raise InvalidFieldError("tools", str(error)) from error
    return grammar_of("json", schema, "tools")


def forced_tool_choice(body: Any) -> ForcedToolChoice | None:
    """Chat's ``tool_choice`` "required" or ``{"type": "function", "function": {"name"}}``
    (``router.tool_calls.ForcedToolChoice``); None for "auto", "none" or unset."""
    if not isinstance(body, ChatRequest):
        return None
    extra = body.model_extra or {}
    choice = extra.get("tool_choice")
    if choice in (None, "none", "auto"):
        return None
    name = None
    if choice != "required":
        function = choice.get("function") if isinstance(choice, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise InvalidFieldError(
                "tool_choice",
                'must be "none", "auto", "required" or '
                '{"type": "function", "function": {"name": ...}}',
            )
        name = function["name"]
    if not body.tools:
        # Said in no API's own terms: the Messages and Responses fronts come through here.
        raise InvalidFieldError("tool_choice", "calls a tool, but the request has no tools")
    try:
        return ForcedToolChoice(body.tools, name, extra.get("parallel_tool_calls") is not False)
    except ValueError as error:
        raise InvalidFieldError("tool_choice", str(error)) from error


def _logit_bias(body: OpenAIParameters) -> tuple[tuple[int, float], ...]:
    """OpenAI's ``logit_bias``, its keys token ids (ranges are checked with the rest)."""
    pairs = []
    for key, bias in (body.logit_bias or {}).items():
        if not key.strip().isdigit():
            raise InvalidFieldError("logit_bias", f"keys must be token ids, got {key!r}")
        pairs.append((int(key), bias))
    return tuple(sorted(pairs))


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# The most prompts one completions request may hold (each generated in turn, n times).
MAX_PROMPTS = 64


def _completion_prompts(body: CompletionRequest, service: RouterService) -> list[Prompt]:
    """OpenAI's prompt forms: a text, token ids (read as they are, as vLLM reads them), or
    a list of either (several prompts, up to MAX_PROMPTS). Token ids are cut to
    ``truncate_prompt_tokens`` here, before their count is checked, as a text is later."""
    prompt = body.prompt
    truncate = truncate_of(body, service.limits.max_prompt_tokens)
    if isinstance(prompt, str):
        return [Prompt(text=prompt)]
    if not prompt:
        raise InvalidFieldError("prompt", "the prompt is empty")
    if all(_is_token_id(p) for p in prompt):
        return [service.token_id_prompt(prompt, truncate)]
    if len(prompt) > MAX_PROMPTS:
        raise InvalidFieldError("prompt", f"at most {MAX_PROMPTS} prompts, got {len(prompt)}")
    prompts = []
    for one in prompt:
        if isinstance(one, str):
            prompts.append(Prompt(text=one))
        elif isinstance(one, list) and one and all(_is_token_id(p) for p in one):
            prompts.append(service.token_id_prompt(one, truncate))
        else:
            raise InvalidFieldError(
                "prompt", "must be a text, token ids, or a list of texts or of token-id lists"
            )
    return prompts


def _message_text(message: ChatMessage, index: int) -> str:
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    texts = []
    for number, part in enumerate(message.content):
        if part.get("type") != "text":
            raise InvalidFieldError(
                f"messages[{index}].content", f"only text parts are served, got {part.get('type')}"
            )
        text = part.get("text")
        if not isinstance(text, str):  # None or an object was rendered as "None" or "{...}"
            raise InvalidFieldError(
                f"messages[{index}].content[{number}].text",
                f"must be a string, got {type(text).__name__}",
            )
        texts.append(text)
    return "\n".join(texts)  # as vLLM joins a message's text parts


# OpenAI's newer models take "developer" where older ones took "system" (its clients send
# either); the chat template knows "system".
ROLE_ALIASES = {"developer": "system"}


def chat_echo(body: Any) -> str:
    """Chat's ``echo`` (vLLM's): the last message's text when it is the assistant's (a
    reply being continued, ``continue_final_message``), leading each choice's content;
    "" otherwise, and when not asked for."""
    if not isinstance(body, ChatRequest) or not body.echo or not body.messages:
        return ""
    last = body.messages[-1]
    return _message_text(last, len(body.messages) - 1) if last.role == "assistant" else ""


def uses_tools(body: Any) -> bool:
    """Whether a chat request offers tools the model may call (``tool_choice`` "auto" or
    unset; with "none" they are neither rendered nor parsed, as vLLM does by default)."""
    if not isinstance(body, ChatRequest) or not body.tools:
        return False
    return (body.model_extra or {}).get("tool_choice") != "none"


# What the sidecar itself passes to the chat template: not for a request to set.
TEMPLATE_ARGUMENTS = frozenset(
    {
        "conversation",
        "messages",
        "tools",
        "documents",
        "chat_template",
        "add_generation_prompt",
        "continue_final_message",
        "tokenize",
        "padding",
        "truncation",
        "max_length",
        "return_tensors",
        "return_dict",
        "return_assistant_tokens_mask",
        "tokenizer_kwargs",
    }
)


def _template_kwargs(body: ChatRequest) -> dict[str, Any]:
    """vLLM's ``chat_template_kwargs``: variables for the chat template (Qwen3's
    ``enable_thinking``, say); the arguments the sidecar sets itself are refused."""
    kwargs = dict(body.chat_template_kwargs or {})
    taken = sorted(TEMPLATE_ARGUMENTS & set(kwargs))
    if taken:
        raise InvalidFieldError(
            "chat_template_kwargs", f"sets what the request's own fields set: {', '.join(taken)}"
        )
    return kwargs


def _chat_message(message: ChatMessage, index: int) -> dict[str, Any]:
    turn: dict[str, Any] = {
        "role": ROLE_ALIASES.get(message.role, message.role),
        "content": _message_text(message, index),
    }
    if message.tool_calls:
        turn["tool_calls"] = message.tool_calls
    if message.tool_call_id is not None:
        turn["tool_call_id"] = message.tool_call_id
    return turn


def _chat_prompts(body: ChatRequest, service: RouterService) -> list[Prompt]:
    check_chat_tools(body.tools)
    messages = tuple(_chat_message(message, i) for i, message in enumerate(body.messages))
    continuing = bool(body.continue_final_message)
    opening = not continuing if body.add_generation_prompt is None else body.add_generation_prompt
    return [  # one conversation
        Prompt(
            messages=messages,
            add_generation_prompt=opening,
            continue_final_message=continuing,
            tools=tuple(body.tools or ()) if uses_tools(body) else (),
            template_kwargs=_template_kwargs(body),
        )
    ]


COMPLETIONS = Endpoint(
    CompletionRequest,
    "text_completion",
    "text_completion",
    _completion_prompts,
    lambda body: DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens,
)
CHAT = Endpoint(
    ChatRequest,
    "chat.completion",
    "chat.completion.chunk",
    _chat_prompts,
    lambda body: (
        body.max_tokens if body.max_completion_tokens is None else body.max_completion_tokens
    ),
)


@functools.cache
def specroute_version() -> str:
    """The installed package's version (``/info``, ``system_fingerprint``)."""
    try:
        return importlib.metadata.version("specroute")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def served_model_names(service: RouterService) -> list[str]:
    """The model ids this sidecar answers to: the ``served_model_names`` setting, else a
    fleet's replicas' model, else the target directory's name."""
    configured = service.settings.served_model_names
    if configured:
        return list(configured)
    names = getattr(service, "model_names", None)
    if names:
        return list(names)
    return [model_id_of(Path(str(service.components.target.path)))]


def model_id_of(target_dir: Path) -> str:
    """The id a target directory is served as: its name; in a Hugging Face cache
    (``models--Org--Name/snapshots/<revision>``) the repository's, ``Org/Name`` (the
    revision's hash was the id clients had to send)."""
    repository = target_dir.parent.parent.name
    if target_dir.parent.name == "snapshots" and repository.startswith("models--"):
        return repository.removeprefix("models--").replace("--", "/")
    return target_dir.name


def truncate_of(body: OpenAIParameters, max_prompt_tokens: int) -> int | None:
    """vLLM's ``truncate_prompt_tokens``: keep the prompt's last N tokens, -1 as many as
    the limit allows; ``truncation_side`` "right" (the first N) is not implemented."""
    truncate = body.truncate_prompt_tokens
    if truncate is None:
        return None
    if (body.model_extra or {}).get("truncation_side") not in (None, "left"):
        raise InvalidFieldError("truncation_side", "only 'left' (the last tokens) is served")
    if truncate == -1:
        return max_prompt_tokens
    if not 0 < truncate <= max_prompt_tokens:
        raise InvalidFieldError(
            "truncate_prompt_tokens", f"must be -1 or in [1, {max_prompt_tokens}], got {truncate}"
        )
    return truncate


def logprobs_of(endpoint: Endpoint, body: Any) -> int | None:
    """The alternatives per token the request asks for, None for no logprobs: chat's
    ``logprobs`` (a boolean) with ``top_logprobs`` (0-20), completions' ``logprobs`` (an
    integer, 0-20; OpenAI's own stops at 5, vLLM's at its ``max_logprobs``)."""
    if endpoint.is_chat:
        if body.logprobs is not None and not isinstance(body.logprobs, bool):
            raise InvalidFieldError("logprobs", "must be a boolean (top_logprobs: the count)")
        if body.top_logprobs is not None and not body.logprobs:
            raise InvalidFieldError("top_logprobs", "needs logprobs: true")
        return check_logprobs(body.top_logprobs or 0, "top_logprobs") if body.logprobs else None
    if body.logprobs is None or body.logprobs is False:
        return None
    if isinstance(body.logprobs, bool) or not isinstance(body.logprobs, int):
        raise InvalidFieldError("logprobs", f"must be an integer, got {body.logprobs!r}")
    return check_logprobs(body.logprobs, "logprobs")


def chat_logprobs(scored: Sequence[TokenLogprobs]) -> dict[str, Any]:
    """Chat's ``choices[].logprobs``: per token its text, logprob, bytes (a piece of a
    multi-byte character has its own, so the pieces' bytes join into the text) and the
    most likely tokens at its position."""
    return {
        "content": [
            {
                "token": token.text,
                "logprob": token.logprob,
                "bytes": list(token.raw),
                "top_logprobs": [
                    {"token": a.text, "logprob": a.logprob, "bytes": list(a.raw)} for a in token.top
                ],
            }
            for token in scored
        ],
        "refusal": None,
    }


def completion_logprobs(
    scored: Sequence[TokenLogprobs | str], texts: Sequence[str], offset: int
) -> dict[str, Any]:
    """Completions' ``choices[].logprobs``: tokens, their logprobs, the most likely tokens
    at each position with the chosen one among them (as OpenAI and vLLM report), and each
    token's character offset in the generated text (``texts``: what each token added,
    from ``offset`` on). A string entry is a token with no logprob (an echoed prompt's
    first): its text, and null logprob and alternatives."""
    offsets = []
    for text in texts:
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": [token if isinstance(token, str) else token.text for token in scored],
        "token_logprobs": [None if isinstance(t, str) else t.logprob for t in scored],
        "top_logprobs": [
            None
            if isinstance(token, str)
            else {**{a.text: a.logprob for a in token.top}, token.text: token.logprob}
            for token in scored
        ],
        "text_offset": offsets,
    }


def _joined_logprobs(first: dict[str, Any], then: dict[str, Any]) -> dict[str, Any]:
    """Two completions logprobs objects as one (an echoed prompt's, then the output's)."""
    return {key: [*first[key], *then[key]] for key in first}


class LogprobsHoldback:
    """A stream's logprobs, sent with the text they belong to: a token's entry goes out in
    the chunk that releases the last of its text (``StopHoldback`` may hold text back),
    the rest with the last chunk."""

    def __init__(self) -> None:
        self._pending: list[tuple[int, str, TokenLogprobs]] = []  # (text end, text, entry)
        self._queued = 0  # characters of the tokens fed so far
        self._sent = 0  # characters released so far
        self._offset = 0  # where the first pending token's text starts

    def feed(self, chunk: TokenChunk) -> None:
        for text, scored in zip(chunk.token_texts, chunk.logprobs or (), strict=False):
            self._queued += len(text)
            self._pending.append((self._queued, text, scored))

    def release(self, characters: int | None) -> tuple[list[TokenLogprobs], list[str], int]:
        """The entries whose text is out once ``characters`` more are sent (None: all),
        their texts, and the offset of the first in the generated text."""
        self._sent = self._queued if characters is None else self._sent + characters
        count = 0
        while count < len(self._pending) and self._pending[count][0] <= self._sent:
            count += 1
        released, self._pending = self._pending[:count], self._pending[count:]
        start = self._offset
        texts = [text for _, text, _ in released]
        self._offset += sum(len(text) for text in texts)
        return [entry for *_, entry in released], texts, start


def generate_input(
    service: RouterService, endpoint: Endpoint, body: Any, prompt: Prompt
) -> GenerateInput:
    """The domain request for an OpenAI body's ``prompt`` (checked against what the
    sidecar serves)."""
    problems = _unsupported(body)
    if problems:
        raise InvalidFieldError(problems[0], f"unsupported parameters: {', '.join(problems)}")
    check_model(service, body.model)
    max_tokens = endpoint.max_tokens_of(body)
    fit_context = max_tokens is None
    if max_tokens is None:
        # Chat completions default to what is left of the context (as vLLM), within the
        # sidecar's limit.
        max_tokens = service.limits.max_new_tokens
    named = getattr(body, "max_completion_tokens", None) is not None
    field = "max_completion_tokens" if named else "max_tokens"
    if max_tokens <= 0 and not prompt_only(endpoint, body):
        with_echo = " (0 only with echo)" if endpoint is COMPLETIONS else ""
        raise InvalidFieldError(field, f"must be > 0{with_echo}, got {max_tokens}")
    if max_tokens > service.limits.max_new_tokens:  # named as the client named it
        raise ContextLengthFieldError(
            field,
            f"{max_tokens} is over the limit of {service.limits.max_new_tokens} "
            "(limits.max_new_tokens)",
        )
    route = RouteInput(
        prompt=prompt,
        max_new_tokens=max(max_tokens, 1),
        sampling=sampling_from_openai(body),
        truncate=truncate_of(body, service.limits.max_prompt_tokens),
        fit_context=fit_context,
    )
    logprobs = logprobs_of(endpoint, body)
    asked = prompt_logprobs_of(body)
    # The prompt is scored for echo's logprobs and for vLLM's prompt_logprobs, with the
    # larger of their counts of alternatives (each answer keeps its own).
    wanted = [n for n in (logprobs if echoes(body) else None, asked) if n is not None]
    if asked is not None and not service.ranks_prompt_tokens:
        raise InvalidFieldError(
            "prompt_logprobs",
            "each prompt token's rank: a vLLM fleet's replicas stream the prompt's top "
            "alternatives only (echo with logprobs is served)",
        )
    prompt_logprobs = max(wanted) if wanted else None
    return GenerateInput(
        route=route,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        prediction=prediction_text(body.prediction),
    )


def prediction_text(prediction: Prediction | None) -> str | None:
    """The predicted output's text (its text parts joined, as OpenAI reads them)."""
    if prediction is None:
        return None
    if isinstance(prediction.content, str):
        return prediction.content
    texts = []
    for i, part in enumerate(prediction.content):
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise InvalidFieldError(
                f"prediction.content[{i}]", "must be a text part: {type: text, text: ...}"
            )
        texts.append(part["text"])
    return "".join(texts)


def prompt_logprobs_of(body: OpenAIParameters) -> int | None:
    """vLLM's ``prompt_logprobs`` (0-20 alternatives), None when not asked for; a stream
    does not carry them, so there only 0 is accepted (and nothing computed), as vLLM."""
    asked = check_logprobs(body.prompt_logprobs, "prompt_logprobs")
    if asked is not None and body.stream:
        if asked > 0:
            raise InvalidFieldError("prompt_logprobs", "not available when stream is true")
        return None
    return asked


def vllm_prompt_logprobs(scores: PromptScores, top: int) -> list[dict[str, Any] | None]:
    """vLLM's ``prompt_logprobs``: None for the first token, then per token a map of token
    id -> {logprob, rank, decoded_token} holding the token itself and the ``top`` most
    likely there (as vLLM, -inf written -9999)."""
    entries: list[dict[str, Any] | None] = [None]
    for token_id, scored, rank in zip(
        scores.token_ids[1:], scores.logprobs, scores.ranks, strict=True
    ):
        entry = {str(token_id): _vllm_logprob(scored.logprob, rank, scored.text)}
        for i, alternative in enumerate(scored.top[:top], start=1):
            entry.setdefault(
                str(alternative.token_id), _vllm_logprob(alternative.logprob, i, alternative.text)
            )
        entries.append(entry)
    return entries


def _vllm_logprob(logprob: float, rank: int, text: str) -> dict[str, Any]:
    return {"logprob": max(logprob, -9999.0), "rank": rank, "decoded_token": text}


def prompt_only(endpoint: Endpoint, body: Any) -> bool:
    """Completions' ``echo`` with ``max_tokens`` 0: the prompt alone comes back (with its
    logprobs: the scoring call). As vLLM, one token is generated and not returned (the
    usage counts it)."""
    return echoes(body) and endpoint.max_tokens_of(body) == 0


def echoes(body: Any) -> bool:
    """Completions' ``echo``: each choice's text starts with the prompt's, and with
    ``logprobs`` its tokens lead the logprobs (the first with none: nothing precedes it;
    the others as the target's prefill scored them), as vLLM echoes."""
    return isinstance(body, CompletionRequest) and bool(body.echo)


def echo_text(service: RouterService, route: RouteInput, routed: RoutedRequest) -> str:
    """The prompt as echoed: its text as sent, or, for token ids or a prompt cut to
    ``truncate_prompt_tokens``, the tokens the target read, decoded (the text is
    tokenized again only where a truncation may have cut it)."""
    prompt = route.prompt
    if prompt.text is not None and not prompt.token_ids:
        uncut = route.truncate is None or routed.prompt_tokens == len(service.prompt_ids(prompt))
        if uncut:
            return prompt.text
    return str(service.tokenizer.decode(list(routed.prompt_ids)))


def echoed_logprobs(scores: PromptScores, top: int) -> dict[str, Any]:
    """Completions' logprobs of an echoed prompt: its first token without any, the others
    as the prefill scored them with their ``top`` alternatives (it may have scored more,
    for vLLM's ``prompt_logprobs``), offsets in the echoed text from 0."""
    scored = [dataclasses.replace(entry, top=entry.top[:top]) for entry in scores.logprobs]
    entries: list[TokenLogprobs | str] = [scores.texts[0], *scored]
    return completion_logprobs(entries, scores.texts, 0)


# ``n``: the most completions one request may ask for. Each is generated (and streamed),
# routed and learned from as a request of its own (``choice_width``: how many at once).
MAX_CHOICES = 16


def choice_count(body: OpenAIParameters) -> int:
    """The number of choices asked for (``n``, 1 when unset), checked."""
    count = 1 if body.n is None else body.n
    if not 1 <= count <= MAX_CHOICES:
        raise InvalidFieldError("n", f"must be in [1, {MAX_CHOICES}], got {count}")
    return count


def choice_inputs(
    service: RouterService, endpoint: Endpoint, body: Any, caller: Caller
) -> list[GenerateInput]:
    """One generation per choice: ``n`` per prompt, prompt after prompt (choice index =
    prompt index * n + i, as vLLM numbers them), each the ``caller``'s (the first under
    its request id, choice i under ``<id>-<i>``). With a seed, a prompt's choice i samples
    with seed + i, so that sampled choices differ and each is the output of a lone request
    with that seed (at the same drafter and k); without one, each run draws its own."""
    count = choice_count(body)
    prompts = endpoint.prompts_of(body, service)
    asked = generate_input(service, endpoint, body, prompts[0])  # the body checked once
    inputs = []
    for prompt in prompts:
        first = dataclasses.replace(asked, route=dataclasses.replace(asked.route, prompt=prompt))
        inputs.extend([first, *(_reseeded(first, i) for i in range(1, count))])
    return [caller.generation(request, index) for index, request in enumerate(inputs)]


def _reseeded(request: GenerateInput, index: int) -> GenerateInput:
    sampling = request.route.sampling
    if sampling.seed is None:
        return request
    reseeded = dataclasses.replace(sampling, seed=sampling.seed + index)
    return dataclasses.replace(request, route=dataclasses.replace(request.route, sampling=reseeded))


def error_body(error: BaseException) -> tuple[int, dict[str, Any]]:
    """HTTP status and OpenAI error object for ``error``."""
    status, kind, code = UNEXPECTED_ERROR
    for cls in type(error).__mro__:
        if cls in OPENAI_ERRORS:
            status, kind, code = OPENAI_ERRORS[cls]  # type: ignore[index]
            break
    if isinstance(error, ModelNotFoundError):
        code = "model_not_found"
    field = getattr(error, "field", None)
    # The sidecar's "sampling.seed" is OpenAI's "seed" (the sampling names are the same).
    param = field.removeprefix("sampling.") if isinstance(field, str) else field
    return status, {"error": {"message": str(error), "type": kind, "param": param, "code": code}}


def error_response(error: BaseException) -> web.Response:
    from router.http_front import HTTP_ERROR_CODE

    status, body = error_body(error)
    # The official clients retry a 500 twice; not one that would take out more replicas.
    no_retry = {"x-should-retry": "false"} if isinstance(error, RequestFailsReplicasError) else None
    response = web.json_response(body, status=status, headers=no_retry)
    response[HTTP_ERROR_CODE] = status_of(error).grpc_code.name
    return response


async def _parse(request: web.Request, endpoint: Endpoint) -> Any:
    return await parsed_body(request, endpoint.request_type)


async def parsed_body(
    request: web.Request,
    model: type[BaseModel],
    authenticate: Callable[[web.Request], None] | None = None,
) -> Any:
    """The request's JSON body as ``model``, once its token is checked (``authenticate``;
    by default the bearer token); a field that does not validate is INVALID_ARGUMENT
    naming it as OpenAI's ``param``."""
    from router.http_front import check_bearer, json_body

    (authenticate or check_bearer)(request)
    return validated(model, await json_body(request))


def validated(model: type[BaseModel], raw: Any) -> Any:
    """``raw`` as ``model``; a field that does not validate is INVALID_ARGUMENT naming it
    as OpenAI's ``param``."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise InvalidFieldError(param_of(first["loc"]), str(first["msg"])) from exc


def check_model(service: RouterService, model: str | None) -> None:
    """A named model must be one this sidecar serves (or a name TGI's own clients send);
    None: the route takes none (vLLM's tokenizer routes, counts)."""
    served = served_model_names(service)
    if model is not None and model not in (*served, *TGI_CLIENT_MODEL_NAMES):
        raise ModelNotFoundError(f"the model {model!r} does not exist; served: {served}")


def chat_prompt_tokens(service: RouterService, chat: ChatRequest) -> int:
    """How many tokens the prompt ``chat`` renders is, as the target reads it (the count
    routes of the Responses and Messages APIs)."""
    check_model(service, chat.model)
    return len(service.tokenized(CHAT.prompts_of(chat, service)[0]))


def chat_input(
    service: RouterService, chat: ChatRequest, renamed: Mapping[str, str]
) -> GenerateInput:
    """The domain request for ``chat``, a body of another API (Responses, Anthropic's
    Messages) as the chat completion it stands for, checked as one; an error names that
    API's field (``renamed``: chat's names to its own)."""
    try:
        return generate_input(service, CHAT, chat, CHAT.prompts_of(chat, service)[0])
    except (InvalidFieldError, ContextLengthFieldError) as error:
        field = renamed.get(error.field)
        if field is None:
            raise
        problem = str(error).removeprefix(f"{error.field}: ")
        raise type(error)(field, problem) from None


# The names pydantic gives the members of a union in an error's location ("str",
# "list[dict[str,any]]"): not fields, left out of OpenAI's ``param``.
UNION_MEMBER_TAGS = frozenset({"str", "int", "float", "bool", "dict", "list", "none"})


def param_of(location: Sequence[int | str]) -> str:
    """OpenAI's ``param`` for a validation error's location: ``messages[0].content``, not
    pydantic's ``messages.0.content.str``."""
    param = ""
    for part in location:
        if isinstance(part, int):
            param += f"[{part}]"
        elif part.lower() not in UNION_MEMBER_TAGS and "[" not in part:
            param += f".{part}" if param else part
    return param or "body"


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _choices_usage(
    runs: Sequence[tuple[RoutedRequest, GenerationResult]], per_prompt: int
) -> dict[str, Any]:
    """The usage of every choice's run, each prompt counted once (as vLLM counts it): the
    runs are ``per_prompt`` choices of each prompt in turn."""
    prompt_tokens = sum(routed.prompt_tokens for routed, _ in runs[::per_prompt])
    usage: dict[str, Any] = _usage(prompt_tokens, sum(len(result.output_ids) for _, result in runs))
    tallies = [result.prediction for _, result in runs if result.prediction is not None]
    if tallies:
        # OpenAI's counts for a predicted output: here its drafted tokens the target
        # accepted and those it rejected (drafters/prediction.py).
        usage["completion_tokens_details"] = {
            "accepted_prediction_tokens": sum(t.accepted for t in tallies),
            "rejected_prediction_tokens": sum(t.rejected for t in tallies),
        }
    return usage


def specroute_extra(routed: RoutedRequest, result: GenerationResult | None) -> dict[str, Any]:
    """Extra (ignored by OpenAI clients): the routing decision and speculation statistics.
    With the ``result``, the decision is the one that finished the request (fleet mode: a
    replica failed under it and another, maybe another configuration, went on), not the
    one first announced."""
    if result is not None:
        routed = result.routed
    extra: dict[str, Any] = {
        "request_id": routed.request_id,
        "task_cluster": routed.task_cluster,
        "drafter": routed.decision.drafter,
        "draft_length": routed.decision.k,
    }
    replica = getattr(routed, "replica", "")
    if replica:
        extra["replica"] = replica
    if result is not None:
        stats = result.stats
        extra.update(
            steps=stats.steps,
            accepted_per_step=list(stats.accepted_per_step),
            tokens_per_s=stats.tokens_per_s,
            mean_accepted_length=stats.mean_accepted_length,
        )
    return extra


def _finish_reason(result: GenerationResult) -> str:
    return FINISH_REASONS.get(str(result.stats.finish_reason), "length")


def _stopped(result: GenerationResult) -> bool:
    """Whether the run ended on one of the request's stop sequences."""
    return str(result.stats.finish_reason) == "stop_sequence"


def fingerprint_of(routed: RoutedRequest) -> str:
    """``system_fingerprint``: the build and the decision (drafter and k) that answered."""
    decision = routed.decision
    return f"specroute-{specroute_version()}-{decision.drafter}-k{decision.k}"


@dataclass(frozen=True)
class ToolReader:
    """How a chat answer's tool calls are read (``router.tool_calls``): parsed from the
    text where tools are ``offered``, or the whole output where ``forced`` (tool_choice
    "required" or named); neither: the text is all content."""

    offered: bool = False
    forced: ForcedToolChoice | None = None

    @classmethod
    def of(cls, body: Any) -> ToolReader:
        return cls(uses_tools(body), forced_tool_choice(body))

    def read(self, text: str) -> tuple[str | None, list[dict[str, Any]]]:
        """(content, calls) of an answer's text."""
        if self.forced is not None:
            return self.forced.read(text)
        return parse_tool_calls(text) if self.offered else (text, [])

    def holdback(self) -> ToolCallHoldback | ForcedToolCallHoldback | None:
        """What holds a stream's calls back until they can be read (None: nothing to)."""
        if self.forced is not None:
            return self.forced.holdback()
        return ToolCallHoldback() if self.offered else None

    def finish_reason(self, finish: str) -> str:
        """An answer's finish reason once it made calls (a named call's is its own)."""
        if self.forced is None:
            return "tool_calls"
        return self.forced.finish_reason or finish


class _Reply:
    """Builds one response's OpenAI objects (one id and creation time for all chunks)."""

    def __init__(
        self,
        endpoint: Endpoint,
        model: str,
        per_prompt: int = 1,
        tools: ToolReader | None = None,
        prompt_only: bool = False,
        echo_content: str = "",
    ) -> None:
        prefix = "chatcmpl" if endpoint.is_chat else "cmpl"
        self.per_prompt = per_prompt  # choices per prompt (n): each prompt's usage once
        self.tools = tools or ToolReader()  # how the answers' tool calls are read
        self.prompt_only = prompt_only  # each choice is its echoed prompt (``prompt_only``)
        self.echo_content = echo_content  # chat's echo: leads each choice's content
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.endpoint = endpoint
        self.model = model
        # A chat stream's role goes in its first delta only, as OpenAI and vLLM send it:
        # the openai package's stream helper joins every delta's strings, so a role in
        # each made "assistantassistant...". TGI's own client (model "tgi") requires it in
        # every delta, as TGI sends it.
        self._roles_sent: set[int] = set()  # the choices whose role has been streamed
        self._repeat_role = model in TGI_CLIENT_MODEL_NAMES
        self.fingerprint = f"specroute-{specroute_version()}"

    @classmethod
    def for_body(cls, endpoint: Endpoint, body: Any) -> _Reply:
        """The reply to ``body``: its choices per prompt, tool calls, echo."""
        return cls(
            endpoint,
            body.model,
            choice_count(body),
            ToolReader.of(body),
            prompt_only(endpoint, body),
            chat_echo(body),
        )

    def decided(self, routed: RoutedRequest) -> None:
        """Name the decision in ``system_fingerprint``: a seed repeats a sampled output at
        the same drafter and k only (the draws depend on both), and OpenAI's field is the
        one that tells a client its seeded request ran on another configuration."""
        self.fingerprint = fingerprint_of(routed)

    def _object(
        self, name: str, choices: list[dict[str, Any]], fingerprint: str | None = None
    ) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": name,
            "created": self.created,
            "model": self.model,
            # Which build and decision answered (OpenAI's field; TGI's client requires it).
            "system_fingerprint": fingerprint or self.fingerprint,
            "choices": choices,
        }

    def logprobs(
        self, scored: Sequence[TokenLogprobs] | None, texts: Sequence[str], offset: int
    ) -> dict[str, Any] | None:
        """A choice's ``logprobs`` in this endpoint's shape; None when not asked for."""
        if scored is None:
            return None
        if self.endpoint.is_chat:
            return chat_logprobs(scored)
        return completion_logprobs(scored, texts, offset)

    def _choice(self, index: int, ran: ChoiceRun, stops: Sequence[str]) -> dict[str, Any]:
        result = ran.result
        finish = _finish_reason(result)
        text = result.generated_text
        if _stopped(result):
            text = without_stop(text, stops)
        choice: dict[str, Any] = {"index": index}
        if self.endpoint.is_chat:
            message: dict[str, Any] = {"role": "assistant", "content": text}
            calls = self.tools.read(text)
            if calls[1]:
                message.update(content=calls[0], tool_calls=calls[1])
                finish = self.tools.finish_reason(finish)
            if self.echo_content:
                message["content"] = self.echo_content + (message["content"] or "")
            choice["message"] = message
        else:
            choice["text"] = text if ran.echo is None else ran.echo + text
        offset = 0 if ran.echo is None else len(ran.echo)
        logprobs = self.logprobs(ran.scored, ran.token_texts, offset)
        if logprobs is not None and ran.echo_logprobs is not None:
            logprobs = _joined_logprobs(ran.echo_logprobs, logprobs)
        if self.prompt_only:
            choice["text"], logprobs = ran.echo, ran.echo_logprobs
        choice["logprobs"] = logprobs
        choice["finish_reason"] = finish
        if ran.prompt_logprobs is not None and not self.endpoint.is_chat:
            choice["prompt_logprobs"] = ran.prompt_logprobs
        return choice

    def complete(self, runs: Sequence[ChoiceRun], stops: Sequence[str]) -> dict[str, Any]:
        """The response for ``runs``, one per choice; with several choices each carries its
        own ``specroute`` (its own request, decision and statistics), the response's is the
        first's."""
        choices = [self._choice(index, ran, stops) for index, ran in enumerate(runs)]
        if len(runs) > 1:
            for choice, ran in zip(choices, runs, strict=True):
                choice["specroute"] = specroute_extra(ran.routed, ran.result)
        first = runs[0]
        body = self._object(self.endpoint.object_name, choices)
        body["usage"] = _choices_usage([(ran.routed, ran.result) for ran in runs], self.per_prompt)
        if self.endpoint.is_chat and first.prompt_logprobs is not None:
            body["prompt_logprobs"] = first.prompt_logprobs  # vLLM's place for chat's
        body["specroute"] = specroute_extra(first.routed, first.result)
        return body

    def chunk(
        self,
        text: str | None,
        finish: str | None,
        logprobs: dict[str, Any] | None = None,
        index: int = 0,
        routed: RoutedRequest | None = None,
        tool_calls: list[dict[str, Any]] | None = None,
        usage: dict[str, int] | None = None,
    ) -> dict[str, Any]:
        """One chunk of choice ``index``; its fingerprint names ``routed``'s decision (a
        choice's own, where choices stream at once), else the reply's. ``tool_calls``:
        a chat delta's calls, each whole (with its index among them); ``usage``: the
        choice's so far (``continuous_usage_stats``)."""
        choice: dict[str, Any]
        if self.endpoint.is_chat:
            # tool_calls in every delta: TGI's own client requires it (as TGI sends it);
            # OpenAI's clients take it as it comes.
            delta: dict[str, Any] = {
                "tool_calls": [{"index": i, **call} for i, call in enumerate(tool_calls)]
                if tool_calls
                else None
            }
            if index not in self._roles_sent or self._repeat_role:
                delta["role"] = "assistant"
                self._roles_sent.add(index)
            if text is not None:
                delta["content"] = text
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        else:
            choice = {
                "index": index,
                "text": text or "",
                "logprobs": logprobs,
                "finish_reason": finish,
            }
        fingerprint = fingerprint_of(routed) if routed is not None else None
        body = self._object(self.endpoint.chunk_name, [choice], fingerprint)
        if usage is not None:
            body["usage"] = usage
        return body

    def usage_chunk(self, runs: Sequence[tuple[RoutedRequest, GenerationResult]]) -> dict[str, Any]:
        """The usage of every choice and the first's decision."""
        body = self._object(self.endpoint.chunk_name, [])
        body["usage"] = _choices_usage(runs, self.per_prompt)
        body["specroute"] = specroute_extra(*runs[0])
        return body


def _generation(service: RouterService, request: GenerateInput) -> AsyncGenerator[Any, None]:
    return service.generate(request)  # type: ignore[return-value]


async def _first(items: AsyncIterator[Any]) -> RoutedRequest:
    routed = await anext(items)
    assert isinstance(routed, RoutedRequest)
    return routed


@dataclass(frozen=True)
class ChoiceRun:
    """One choice's finished generation (its log-probabilities when they were asked for)."""

    routed: RoutedRequest
    result: GenerationResult
    scored: list[TokenLogprobs] | None
    token_texts: list[str]
    echo: str | None = None  # the prompt's text, leading the choice's (``echoes``)
    echo_logprobs: dict[str, Any] | None = None  # its tokens' (``echoed_logprobs``)
    prompt_logprobs: list[dict[str, Any] | None] | None = None  # vLLM's, when asked for


async def run_choice(service: RouterService, request: GenerateInput, body: Any) -> ChoiceRun:
    """One choice generated whole: its decision, result, and log-probabilities when
    ``request`` asks for them (with ``body``'s prompt logprobs and echo, where it has
    them)."""
    scored: list[TokenLogprobs] = []
    texts: list[str] = []
    prompt_scored: PromptScores | None = None
    async with contextlib.aclosing(_generation(service, request)) as it:
        routed = await _first(it)
        result: GenerationResult | None = None
        async for item in it:
            if isinstance(item, TokenChunk) and item.logprobs is not None:
                scored.extend(item.logprobs)
                texts.extend(item.token_texts)
            elif isinstance(item, PromptScores):
                prompt_scored = item
            elif isinstance(item, GenerationResult):
                result = item
    if result is None:
        raise GenerationFailedError("generation ended without a result")
    ran = ChoiceRun(routed, result, scored if request.logprobs is not None else None, texts)
    if prompt_scored is not None and body.prompt_logprobs is not None:
        asked = vllm_prompt_logprobs(prompt_scored, body.prompt_logprobs)
        ran = dataclasses.replace(ran, prompt_logprobs=asked)
    if not echoes(body):
        return ran
    echoed = None
    if prompt_scored is not None and request.logprobs is not None:
        echoed = echoed_logprobs(prompt_scored, request.logprobs)
    text = echo_text(service, request.route, routed)
    return dataclasses.replace(ran, echo=text, echo_logprobs=echoed)


def choice_width(service: RouterService, count: int) -> int:
    """How many of ``count`` choices run at once: each is admitted as a request of its own,
    so in-process (one engine, one generation at a time) one after another, never taking
    more than one place of the generation queue (all at once, n over the free places was a
    429 on an otherwise idle sidecar); in fleet mode as many as the replicas have free
    places now (``free_generation_places``), at least one."""
    return max(1, min(count, service.free_generation_places()))


async def _all_at_most(width: int, jobs: Sequence[Callable[[], Awaitable[Any]]]) -> list[Any]:
    """Each job's result, in order, with at most ``width`` running at once (started in
    order); the first failure cancels the rest, starts no other, and is raised."""
    gate = asyncio.Semaphore(width)
    failed = asyncio.Event()

    async def run(job: Callable[[], Awaitable[Any]]) -> Any:
        async with gate:
            if failed.is_set():  # a place freed by the failure: nothing more starts
                raise asyncio.CancelledError
            try:
                return await job()
            except BaseException:
                failed.set()
                raise

    tasks = [asyncio.ensure_future(run(job)) for job in jobs]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _collect(
    service: RouterService, endpoint: Endpoint, body: Any, caller: Caller
) -> dict[str, Any]:
    reply = _Reply.for_body(endpoint, body)
    requests = choice_inputs(service, endpoint, body, caller)
    jobs = [functools.partial(run_choice, service, r, body) for r in requests]
    finished = await _all_at_most(choice_width(service, len(requests)), jobs)
    reply.decided(finished[0].result.routed)
    return reply.complete(finished, cut_stops_of(body))


async def _sse_event(response: web.StreamResponse, payload: dict[str, Any] | str) -> None:
    data = payload if isinstance(payload, str) else json.dumps(payload)
    await response.write(f"data: {data}\n\n".encode())


async def typed_sse_event(response: web.StreamResponse, event: dict[str, Any]) -> None:
    """An event named by its ``type`` (``event:`` then ``data:``), as the Responses and
    Messages APIs stream them."""
    await response.write(f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode())


async def _stream_choice(
    service: RouterService,
    response: web.StreamResponse,
    reply: _Reply,
    body: Any,
    index: int,
    asked: GenerateInput,
    items: AsyncIterator[Any],
    several: bool,
    routed: RoutedRequest,
) -> GenerationResult:
    """Stream choice ``index``: its text chunks, then a chunk with its finish reason (and,
    among several choices, its own ``specroute``), each naming its own decision and,
    with ``continuous_usage_stats``, carrying the choice's usage so far (the tokens
    generated, text held back included, as vLLM counts them). The generation's first
    item, that decision (``routed``), has been read."""
    holdback = StopHoldback(cut_stops_of(body))
    calling = reply.tools.holdback()
    returned = asked.logprobs is not None and not reply.prompt_only
    scored = LogprobsHoldback() if returned else None
    continuous = usage_asked(body)[1]
    generated = 0
    # Completions' echo: the prompt's text goes first, with its logprobs when asked
    # (once the prefill has scored them), and the output's offsets follow it.
    echo = echo_text(service, asked.route, routed) if echoes(body) else None
    offset = 0 if echo is None else len(echo)

    def usage() -> dict[str, int] | None:
        return _usage(routed.prompt_tokens, generated) if continuous else None

    def content(text: str) -> str:
        return text if calling is None else calling.feed(text)

    def logprobs(characters: int | None) -> dict[str, Any] | None:
        if scored is None:
            return None
        entries, texts, start = scored.release(characters)
        return reply.logprobs(entries, texts, offset + start)

    async def send_echo(echoed: dict[str, Any] | None) -> None:
        await _sse_event(response, reply.chunk(echo, None, echoed, index, routed, usage=usage()))

    is_chat = reply.endpoint.is_chat
    if is_chat:
        first = reply.chunk("", None, index=index, routed=routed, usage=usage())
        await _sse_event(response, first)
        if reply.echo_content:  # chat's echo, as vLLM streams it: after the role
            echoed = reply.chunk(reply.echo_content, None, None, index, routed, usage=usage())
            await _sse_event(response, echoed)
    elif echo is not None and asked.prompt_logprobs is None:
        await send_echo(None)
    async for item in items:
        if isinstance(item, PromptScores):
            await send_echo(echoed_logprobs(item, asked.logprobs or 0))
        elif isinstance(item, TokenChunk):
            generated += len(item.token_ids)
            if reply.prompt_only:
                continue  # generated with the prompt scored, not returned (as vLLM)
            if scored is not None:
                scored.feed(item)
            released = content(holdback.feed(item.text)) if item.text else ""
            if released:
                scored_part = logprobs(len(released))
                chunk = reply.chunk(released, None, scored_part, index, routed, usage=usage())
                await _sse_event(response, chunk)
        elif isinstance(item, GenerationResult):
            # The last chunks name the decision that finished the request (a fleet
            # failover, a drafter removed while it waited).
            routed = item.routed
            rest = content(holdback.finish(_stopped(item)))
            calls: list[dict[str, Any]] = []
            if calling is not None:
                held, calls = calling.finish()
                rest += held
            # The last text chunk carries the logprobs not sent yet (those of a stop
            # sequence's tokens too: they were generated).
            if rest or scored is not None:
                chunk = reply.chunk(rest, None, logprobs(None), index, routed, usage=usage())
                await _sse_event(response, chunk)
            finish = _finish_reason(item)
            if calls:
                call_chunk = reply.chunk(
                    None, None, None, index, routed, tool_calls=calls, usage=usage()
                )
                await _sse_event(response, call_chunk)
                finish = reply.tools.finish_reason(finish)
            last = reply.chunk(
                None if is_chat else "", finish, index=index, routed=routed, usage=usage()
            )
            if several:
                last["choices"][0]["specroute"] = specroute_extra(item.routed, item)
            await _sse_event(response, last)
            return item
    raise GenerationFailedError("generation ended without a result")


async def _stream(
    service: RouterService, request: web.Request, endpoint: Endpoint, body: Any
) -> web.StreamResponse:
    """Server-sent events: per choice (``n`` per prompt, as many at once as
    ``choice_width`` allows, their chunks interleaved, each with its index) one chunk per
    speculative step's text and a last chunk with the finish reason; the usage chunk when
    asked (``stream_options.include_usage``; on every chunk too with vLLM's
    ``continuous_usage_stats``), then ``data: [DONE]``. An error after the first
    event is sent as an error event; a client that leaves part-way stops the generation
    (``client_may_leave``)."""
    from router.http_front import SSE_HEADERS, client_may_leave, failed_in

    reply = _Reply.for_body(endpoint, body)
    include_usage = usage_asked(body)[0]
    from router.http_front import CALLER_KEY

    requests = choice_inputs(service, endpoint, body, request[CALLER_KEY])
    several = len(requests) > 1
    async with contextlib.aclosing(_generation(service, requests[0])) as items:
        routed = await _first(items)  # errors before the first event are plain HTTP errors
        reply.decided(routed)
        response = web.StreamResponse(headers=SSE_HEADERS)
        with client_may_leave(request):
            await response.prepare(request)

            async def first() -> tuple[RoutedRequest, GenerationResult]:
                streamed = _stream_choice(
                    service, response, reply, body, 0, requests[0], items, several, routed
                )
                return routed, await streamed

            async def later(index: int, asked: GenerateInput) -> tuple[Any, GenerationResult]:
                async with contextlib.aclosing(_generation(service, asked)) as more:
                    ran = await _first(more)
                    streamed = _stream_choice(
                        service, response, reply, body, index, asked, more, several, ran
                    )
                    return ran, await streamed

            jobs = [first]
            jobs += [functools.partial(later, i, r) for i, r in enumerate(requests[1:], start=1)]
            try:
                runs = await _all_at_most(choice_width(service, len(requests)), jobs)
                reply.decided(runs[0][1].routed)  # the decision that finished the first
                if include_usage:
                    await _sse_event(response, reply.usage_chunk(runs))
            except ConnectionResetError:
                raise  # the client left (client_may_leave)
            except Exception as error:
                failure = sidecar_error_of(error, failed_in(request, "the stream"))
                await _sse_event(response, error_body(failure)[1])
            await _sse_event(response, "[DONE]")
            await response.write_eof()
        return response


def _generation_handler(endpoint: Endpoint) -> Callable[[web.Request], Any]:
    async def handle(request: web.Request) -> web.StreamResponse:
        from router.http_front import CALLER_KEY, SERVICE_KEY

        service = request.app[SERVICE_KEY]
        try:
            body = await _parse(request, endpoint)
            if body.stream:
                return await _stream(service, request, endpoint, body)
            collected = await _collect(service, endpoint, body, request[CALLER_KEY])
            return web.json_response(collected)
        except SidecarError as error:
            return error_response(error)

    return handle


def _model_object(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "specroute"}


async def models_route(request: web.Request) -> web.Response:
    """``GET /v1/models``: the served model ids."""
    from router.http_front import SERVICE_KEY, check_bearer

    try:
        check_bearer(request)
    except SidecarError as error:
        return error_response(error)
    models = [_model_object(name) for name in served_model_names(request.app[SERVICE_KEY])]
    return web.json_response({"object": "list", "data": models})


async def model_route(request: web.Request) -> web.Response:
    """``GET /v1/models/{model}``: one served model (the client's ``models.retrieve``)."""
    from router.http_front import SERVICE_KEY, check_bearer

    name = request.match_info["model"]
    try:
        check_bearer(request)
        served = served_model_names(request.app[SERVICE_KEY])
        if name not in served:
            raise ModelNotFoundError(f"the model {name!r} does not exist; served: {served}")
    except SidecarError as error:
        return error_response(error)
    return web.json_response(_model_object(name))


async def not_found_route(request: web.Request) -> web.Response:
    return error_response(NotFoundError(f"no route {request.method} {request.path}"))


def add_openai_routes(app: web.Application) -> None:
    """Mount the OpenAI-compatible routes on the sidecar's HTTP application."""
    app.router.add_post("/v1/completions", _generation_handler(COMPLETIONS))
    app.router.add_post("/v1/chat/completions", _generation_handler(CHAT))
    app.router.add_get("/v1/models", models_route)
    app.router.add_get("/v1/models/{model}", model_route)
    app.router.add_route("*", "/v1/{tail:.*}", not_found_route)
