"""Domain objects of the sidecar's request path (frozen), and their validation.

Both edges (gRPC servicer, TGI HTTP front) convert their wire types into these; the
service only ever sees validated domain objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from router.errors import InvalidRequestError
from router.settings import Limits

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Sampling:
    """Decoding parameters; ``do_sample=False`` is greedy."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    @property
    def greedy(self) -> bool:
        return not self.do_sample


@dataclass(frozen=True)
class Prompt:
    """Either raw (already templated) text or chat messages."""

    text: str | None = None
    messages: tuple[dict[str, str], ...] = ()

    @property
    def is_chat(self) -> bool:
        return self.text is None


@dataclass(frozen=True)
class RouteInput:
    """A request to classify and route (also the first half of a generation)."""

    prompt: Prompt
    request_id: str = ""
    task_hint: str = ""
    max_new_tokens: int = 0  # 0: unknown (Route only; Generate needs > 0)
    sampling: Sampling = field(default_factory=Sampling)


@dataclass(frozen=True)
class GenerateInput:
    """A request the sidecar routes and then generates for itself."""

    route: RouteInput
    force_drafter: str = ""
    force_draft_length: int | None = None
    no_update: bool = False


@dataclass(frozen=True)
class OutcomeInput:
    """What a serving stack reports back for a routed request."""

    request_id: str
    steps: int = 0
    drafted_per_step: tuple[int, ...] = ()
    accepted_per_step: tuple[int, ...] = ()
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    accepted_per_position: tuple[int, ...] = ()
    draft_time_s: float = 0.0
    verify_time_s: float = 0.0
    wall_time_s: float = 0.0
    generated_tokens: int = 0
    plain_token_time_s: float | None = None


@dataclass(frozen=True)
class DrafterSpec:
    """A drafter an operator asks to register."""

    name: str
    kind: str
    path: str = ""
    tasks: tuple[str, ...] = ()
    finetune_sample: tuple[str, ...] = ()
    options: dict[str, str] = field(default_factory=dict)


def check_sampling(sampling: Sampling) -> Sampling:
    """Refuse impossible decoding parameters (INVALID_ARGUMENT)."""
    if sampling.temperature < 0:
        raise InvalidRequestError(f"temperature must be >= 0, got {sampling.temperature}")
    if sampling.do_sample and sampling.temperature == 0:
        raise InvalidRequestError("temperature must be > 0 when sampling")
    if not 0 < sampling.top_p <= 1:
        raise InvalidRequestError(f"top_p must be in (0, 1], got {sampling.top_p}")
    if sampling.top_k < 0:
        raise InvalidRequestError(f"top_k must be >= 0, got {sampling.top_k}")
    if any(not stop for stop in sampling.stop):
        raise InvalidRequestError("stop sequences must not be empty strings")
    return sampling


def check_prompt(prompt: Prompt) -> Prompt:
    """Refuse an empty prompt or malformed chat messages (INVALID_ARGUMENT)."""
    if prompt.text is not None:
        if not prompt.text.strip():
            raise InvalidRequestError("the prompt is empty")
        return prompt
    if not prompt.messages:
        raise InvalidRequestError("the prompt is empty: no text and no chat messages")
    for message in prompt.messages:
        if message.get("role") not in ROLES:
            raise InvalidRequestError(f"chat role must be one of {ROLES}, got {message!r}")
    if not any(m.get("content", "").strip() for m in prompt.messages):
        raise InvalidRequestError("the prompt is empty: every chat message is blank")
    return prompt


def check_max_new_tokens(requested: int, limits: Limits, *, required: bool) -> int:
    """``requested`` within ``1..limit``; 0 is allowed only where not ``required`` (Route)."""
    if requested < 0 or (required and requested == 0):
        raise InvalidRequestError(f"max_new_tokens must be > 0, got {requested}")
    if requested > limits.max_new_tokens:
        raise InvalidRequestError(
            f"max_new_tokens {requested} is over the limit of {limits.max_new_tokens}"
        )
    return requested


def check_prompt_tokens(count: int, limits: Limits) -> None:
    """Refuse prompts over the token limit (INVALID_ARGUMENT)."""
    if count == 0:
        raise InvalidRequestError("the prompt is empty after tokenization")
    if count > limits.max_prompt_tokens:
        raise InvalidRequestError(
            f"the prompt has {count} tokens, over the limit of {limits.max_prompt_tokens}"
        )
