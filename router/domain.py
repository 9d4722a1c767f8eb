"""Domain objects of the sidecar's request path (frozen), and their validation.

Both edges (gRPC servicer, TGI HTTP front) convert their wire types into these; the
service only ever sees validated domain objects.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from drafters.grammar import GrammarError, OutputGrammar, check_grammar
from router.errors import ContextLengthError, InvalidFieldError, InvalidRequestError
from router.policy.base import MAX_DRAFT_LENGTH
from router.settings import Limits

ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class Sampling:
    """Decoding parameters; ``do_sample=False`` is greedy."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    typical_p: float = 1.0  # locally typical sampling (TGI's parameter); 1.0: off
    # vLLM's: go on past the model's end-of-sequence tokens (to max_new_tokens, or a stop
    # below); the tokens are generated as the model chooses them, nothing is masked.
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()  # more tokens that end the generation (vLLM's)
    # vLLM's penalties on the target's logits (``drafters/penalties.py``); neutral: off.
    repetition_penalty: float = 1.0  # > 0: over the prompt's and the output's tokens
    presence_penalty: float = 0.0  # [-2, 2]: over the output's tokens
    frequency_penalty: float = 0.0  # [-2, 2]: per occurrence in the output
    min_tokens: int = 0  # no EOS, stop token or stop sequence before this many tokens
    logit_bias: tuple[tuple[int, float], ...] = ()  # OpenAI's: (token id, [-100, 100])
    min_p: float = 0.0  # vLLM's: [0, 1], a sampling warper after temperature; 0: off
    # vLLM's: False keeps special tokens' text in the output's (not the one that ends it).
    skip_special_tokens: bool = True
    # vLLM's: only these tokens may be generated (None: any), and words never generated.
    allowed_token_ids: tuple[int, ...] | None = None
    bad_words: tuple[str, ...] = ()
    # vLLM's structured output: the output held to a grammar (``drafters/grammar.py``).
    structured_output: OutputGrammar | None = None

    @property
    def greedy(self) -> bool:
        return not self.do_sample

    def seeded(self) -> Sampling:
        """A sampled run without a seed with one drawn for it, so that the seed it ran
        with can be reported (TGI's ``details.seed``) and the run repeated; greedy and
        seeded ones as they are."""
        if self.greedy or self.seed is not None:
            return self
        return replace(self, seed=secrets.randbits(63))


@dataclass(frozen=True)
class Prompt:
    """Either raw (already templated) text or chat messages."""

    text: str | None = None
    # Each {"role", "content"}; an assistant's may carry "tool_calls", a tool's answer
    # "tool_call_id" (OpenAI's fields, rendered by the target's chat template).
    messages: tuple[dict[str, Any], ...] = ()
    tools: tuple[dict[str, Any], ...] = ()  # OpenAI's function tools, rendered likewise
    # vLLM's chat_template_kwargs: more variables for the chat template (enable_thinking...)
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    # How a chat's rendering ends (vLLM's chat parameters): with the assistant's opening
    # (the default), without it, or with the last message left open, to be continued.
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    # A prompt given as token ids (OpenAI's completions take them): the ids the target
    # reads as they are, ``text`` their decoding (what the classifier reads).
    token_ids: tuple[int, ...] = ()

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
    # Generate only: keep the prompt's last this many tokens (TGI's ``truncate``, vLLM's
    # ``truncate_prompt_tokens``); None keeps them all.
    truncate: int | None = None
    # Generate only: ``max_new_tokens`` is the server's default, not the caller's, and is
    # lowered to what the target's context leaves after the prompt (OpenAI chat without
    # max_tokens, as vLLM); otherwise a request over the context is refused.
    fit_context: bool = False


@dataclass(frozen=True)
class GenerateInput:
    """A request the sidecar routes and then generates for itself."""

    route: RouteInput
    force_drafter: str = ""
    force_draft_length: int | None = None
    force_stop_threshold: float | None = None  # the decision's stop_threshold, pinned
    no_update: bool = False
    # None: no log-probabilities; n: each token's, with its n most likely alternatives.
    logprobs: int | None = None
    # The same for the prompt's tokens after the first (in-process engine only).
    prompt_logprobs: int | None = None
    # The text the answer is expected to repeat (OpenAI's predicted outputs), drafted
    # from before the routed drafter (in-process engine only; drafters/prediction.py).
    prediction: str | None = None
    # The caller's W3C trace context (``traceparent``, ``tracestate``), sent on with the
    # request to a fleet replica so that its spans join the caller's trace (``Caller``).
    trace: tuple[tuple[str, str], ...] = ()


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
    # A model drafter's first forward of each draft timed apart (``Outcome``'s fields).
    draft_lead_steps: int = 0
    draft_lead_time_s: float = 0.0
    draft_further_forwards: int = 0
    draft_further_time_s: float = 0.0


class DrafterFields(Protocol):
    """What a registration is made of, as a RegisterDrafter message and a stored
    ``DrafterRecord`` both hold it."""

    @property
    def name(self) -> str: ...
    @property
    def kind(self) -> str: ...
    @property
    def path(self) -> str: ...
    @property
    def tasks(self) -> Iterable[str]: ...
    @property
    def finetune_sample(self) -> Iterable[str]: ...
    @property
    def options(self) -> Mapping[str, str]: ...


@dataclass(frozen=True)
class DrafterSpec:
    """A drafter an operator asks to register."""

    name: str
    kind: str
    path: str = ""
    tasks: tuple[str, ...] = ()
    finetune_sample: tuple[str, ...] = ()
    options: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, source: DrafterFields) -> DrafterSpec:
        """The spec ``source`` (a RegisterDrafter message, a stored record) describes."""
        return cls(
            name=source.name,
            kind=source.kind,
            path=source.path,
            tasks=tuple(source.tasks),
            finetune_sample=tuple(source.finetune_sample),
            options=dict(source.options),
        )


#: What a registration may carry besides its drafter. Pooled replicas share each
#: registration as one Redis entry of at most 1 MiB (``router.pooling.entries``) and drop
#: a larger one, or one of more tasks, as malformed: a drafter accepted here was then
#: never registered on the other replicas.
MAX_DRAFTER_TASKS = 256
MAX_SAMPLE_TEXTS = 64  # as many as a drafter directory's finetune_sample.jsonl gives
MAX_SAMPLE_JSON_BYTES = 512 * 1024


def check_registration_lists(spec: DrafterSpec) -> None:
    """A registration's tasks and fine-tuning sample within the bounds above
    (INVALID_ARGUMENT naming the field otherwise)."""
    if len(spec.tasks) > MAX_DRAFTER_TASKS:
        raise InvalidFieldError("tasks", f"at most {MAX_DRAFTER_TASKS}, got {len(spec.tasks)}")
    sample = spec.finetune_sample
    if len(sample) > MAX_SAMPLE_TEXTS:
        raise InvalidFieldError(
            "finetune_sample", f"at most {MAX_SAMPLE_TEXTS} texts, got {len(sample)}"
        )
    size = len(json.dumps(list(sample)))
    if size > MAX_SAMPLE_JSON_BYTES:
        raise InvalidFieldError(
            "finetune_sample",
            f"at most {MAX_SAMPLE_JSON_BYTES // 1024} KiB in all (as JSON), got {size // 1024} KiB",
        )


def check_finite(name: str, value: float) -> float:
    """``value`` if it is a number; NaN and infinities are refused, naming the field."""
    if not math.isfinite(value):
        raise InvalidFieldError(name, f"must be a finite number, got {value}")
    return value


#: Stop sequences a request may give (OpenAI's API and TGI's default take 4): each is
#: searched for after every step, so ten thousand of them (a 1 MB request) cost the
#: shared target's worker about 3 ms a step.
MAX_STOP_SEQUENCES = 16
#: Stop token ids: each generated token is looked up in a set, so the count costs little;
#: the cap keeps a request's size sane.
MAX_STOP_TOKEN_IDS = 256
#: Tokens one request may bias (each is one column of every verified row).
MAX_LOGIT_BIAS = 2048
#: Bad words one request may name, and their token sequences in all (vLLM's defaults:
#: ``VLLM_MAX_NUM_BAD_WORDS``, ``VLLM_MAX_BAD_WORDS_TOTAL_TOKENS``).
MAX_BAD_WORDS = 128
MAX_BAD_WORD_TOKENS = 1024
#: The seeds a torch generator takes (a 64-bit integer, signed or not); gRPC's is a uint64.
SEED_RANGE = (-(2**63), 2**64 - 1)
MAX_GRAMMAR_CHARS = 100_000  # a structured output's schema, regex or grammar text


def check_structured_output(
    grammar: OutputGrammar | None, field: str = "sampling.structured_output"
) -> None:
    """A grammar the output can be held to: not over MAX_GRAMMAR_CHARS, and one that
    compiles (INVALID_ARGUMENT naming ``field`` with the reason otherwise)."""
    if grammar is None:
        return
    if len(grammar.spec) > MAX_GRAMMAR_CHARS:
        raise InvalidFieldError(
            field, f"at most {MAX_GRAMMAR_CHARS} characters, got {len(grammar.spec)}"
        )
    try:
        check_grammar(grammar)
    except GrammarError as error:
        raise InvalidFieldError(field, str(error)) from error


def check_sampling(sampling: Sampling) -> Sampling:
    """Refuse impossible decoding parameters (INVALID_ARGUMENT)."""
    check_finite("sampling.temperature", sampling.temperature)
    check_finite("sampling.top_p", sampling.top_p)
    check_finite("sampling.typical_p", sampling.typical_p)
    if sampling.temperature < 0:
        raise InvalidFieldError(
            "sampling.temperature", f"must be >= 0, got {sampling.temperature:g}"
        )
    if sampling.do_sample and sampling.temperature == 0:
        raise InvalidFieldError("sampling.temperature", "must be > 0 when sampling")
    if not 0 < sampling.top_p <= 1:
        raise InvalidFieldError("sampling.top_p", f"must be in (0, 1], got {sampling.top_p:g}")
    if not 0 < sampling.typical_p <= 1:
        raise InvalidFieldError(
            "sampling.typical_p", f"must be in (0, 1], got {sampling.typical_p:g}"
        )
    if sampling.top_k < 0:
        raise InvalidRequestError(f"top_k must be >= 0, got {sampling.top_k}")
    if any(not stop for stop in sampling.stop):
        raise InvalidFieldError("sampling.stop", "stop sequences must not be empty strings")
    if len(sampling.stop) > MAX_STOP_SEQUENCES:
        raise InvalidFieldError(
            "sampling.stop",
            f"at most {MAX_STOP_SEQUENCES} stop sequences, got {len(sampling.stop)}",
        )
    if len(sampling.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise InvalidFieldError(
            "sampling.stop_token_ids",
            f"at most {MAX_STOP_TOKEN_IDS} stop token ids, got {len(sampling.stop_token_ids)}",
        )
    if any(token < 0 for token in sampling.stop_token_ids):
        raise InvalidFieldError("sampling.stop_token_ids", "token ids must be >= 0")
    check_finite("sampling.min_p", sampling.min_p)
    if not 0 <= sampling.min_p <= 1:
        raise InvalidFieldError("sampling.min_p", f"must be in [0, 1], got {sampling.min_p:g}")
    check_finite("sampling.repetition_penalty", sampling.repetition_penalty)
    if sampling.repetition_penalty <= 0:
        raise InvalidFieldError(
            "sampling.repetition_penalty", f"must be > 0, got {sampling.repetition_penalty:g}"
        )
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(sampling, name)
        check_finite(f"sampling.{name}", value)
        if not -2 <= value <= 2:
            raise InvalidFieldError(f"sampling.{name}", f"must be in [-2, 2], got {value:g}")
    if len(sampling.logit_bias) > MAX_LOGIT_BIAS:
        raise InvalidFieldError(
            "sampling.logit_bias",
            f"at most {MAX_LOGIT_BIAS} tokens, got {len(sampling.logit_bias)}",
        )
    for token, bias in sampling.logit_bias:
        check_finite("sampling.logit_bias", bias)
        if token < 0 or not -100 <= bias <= 100:
            raise InvalidFieldError(
                "sampling.logit_bias",
                f"token ids must be >= 0 and biases in [-100, 100], got {token}: {bias:g}",
            )
    if sampling.min_tokens < 0:
        raise InvalidFieldError("sampling.min_tokens", f"must be >= 0, got {sampling.min_tokens}")
    if sampling.allowed_token_ids is not None:
        if not sampling.allowed_token_ids:
            raise InvalidFieldError("sampling.allowed_token_ids", "must not be empty")
        if any(token < 0 for token in sampling.allowed_token_ids):
            raise InvalidFieldError("sampling.allowed_token_ids", "token ids must be >= 0")
    if len(sampling.bad_words) > MAX_BAD_WORDS:
        raise InvalidFieldError(
            "sampling.bad_words", f"at most {MAX_BAD_WORDS} words, got {len(sampling.bad_words)}"
        )
    if any(not word.strip() for word in sampling.bad_words):
        raise InvalidFieldError("sampling.bad_words", "a bad word must not be empty")
    for text in sampling.stop:
        check_unicode(text, "a stop sequence", "sampling.stop")
    for text in sampling.bad_words:
        check_unicode(text, "a bad word", "sampling.bad_words")
    if sampling.seed is not None and not SEED_RANGE[0] <= sampling.seed <= SEED_RANGE[1]:
        raise InvalidFieldError(
            "sampling.seed", f"must be in [{SEED_RANGE[0]}, {SEED_RANGE[1]}], got {sampling.seed}"
        )
    check_structured_output(sampling.structured_output)
    return sampling


def check_forced_draft_length(k: int | None) -> int | None:
    """A forced draft length must be one a policy can model and learn from: at most
    MAX_DRAFT_LENGTH (a larger one would be clamped by the engine, unlike its echo)."""
    if k is not None and k > MAX_DRAFT_LENGTH:
        raise InvalidFieldError(
            "force_draft_length", f"must be at most {MAX_DRAFT_LENGTH}, got {k}"
        )
    return k


def check_forced_stop_threshold(threshold: float | None) -> float | None:
    """A forced stop threshold is a number in [0, 1) (``drafters/stopping.py``)."""
    if threshold is None:
        return None
    check_finite("force_stop_threshold", threshold)
    if not 0.0 <= threshold < 1.0:
        raise InvalidFieldError("force_stop_threshold", f"must be in [0, 1), got {threshold:g}")
    return threshold


def check_outcome(
    outcome: OutcomeInput, limits: Limits, context_tokens: int | None = None
) -> OutcomeInput:
    """Refuse a report whose numbers contradict each other, before the policy sees it:
    times must be finite and >= 0; per-step lists must pair up; in totals form at most
    as many tokens are accepted as drafted, and ``accepted_per_position[i]`` counts the
    steps whose draft token i was accepted, so it is at most ``steps``, non-increasing
    in i (token i + 1 is accepted only after token i), and sums to ``accepted_tokens``.
    No step drafts more than ``MAX_DRAFT_LENGTH`` tokens.
    No more tokens are generated than the target's context holds (``context_tokens``,
    when known) or than the steps can emit (k + 1 each, and the prefill's): a forged count
    made the measured speed-up as large as it liked. (Not ``max_new_tokens``: a Route may
    leave the budget unknown.) A step emits at least one token, so there
    are at most ``limits.max_new_tokens`` steps (the policy expands totals into one entry
    per step: an unchecked uint32 count would cost minutes and gigabytes)."""
    steps = len(outcome.accepted_per_step) or outcome.steps
    if steps > limits.max_new_tokens:
        raise InvalidFieldError(
            "steps",
            f"{steps} is over the limit of {limits.max_new_tokens} "
            "(max_new_tokens: a step emits at least one token)",
        )
    _check_generated_tokens(outcome.generated_tokens, steps, context_tokens)
    for name in (
        "draft_time_s",
        "verify_time_s",
        "wall_time_s",
        "draft_lead_time_s",
        "draft_further_time_s",
    ):
        if check_finite(name, getattr(outcome, name)) < 0:
            raise InvalidFieldError(name, f"must be >= 0, got {getattr(outcome, name)}")
    _check_draft_split(outcome, steps)
    plain = outcome.plain_token_time_s
    if plain is not None and check_finite("plain_token_time_s", plain) <= 0:
        raise InvalidFieldError("plain_token_time_s", f"must be > 0 when given, got {plain}")
    if outcome.drafted_per_step or outcome.accepted_per_step:
        _check_per_step_lists(outcome)
    else:
        _check_totals(outcome)
    return outcome


def _check_draft_split(outcome: OutcomeInput, steps: int) -> None:
    """The lead and further forwards' figures within the draft they split: at most one
    lead per step, their times together at most the draft time."""
    if outcome.draft_lead_steps > steps:
        raise InvalidFieldError(
            "draft_lead_steps", f"{outcome.draft_lead_steps} is more than the {steps} steps"
        )
    split = outcome.draft_lead_time_s + outcome.draft_further_time_s
    if split > outcome.draft_time_s * (1 + 1e-9):
        raise InvalidFieldError(
            "draft_lead_time_s",
            f"with draft_further_time_s ({split:g} s) is more than draft_time_s "
            f"({outcome.draft_time_s:g} s)",
        )


def _check_generated_tokens(generated: int, steps: int, context_tokens: int | None) -> None:
    if context_tokens is not None and generated > context_tokens:
        raise InvalidFieldError(
            "generated_tokens",
            f"{generated} is more than the target's context of {context_tokens} tokens",
        )
    most = steps * (MAX_DRAFT_LENGTH + 1) + 1
    if steps and generated > most:
        raise InvalidFieldError(
            "generated_tokens",
            f"{generated} is more than {steps} steps can emit ({most}: at most "
            f"{MAX_DRAFT_LENGTH + 1} a step, and the prefill's)",
        )


def _check_per_step_lists(outcome: OutcomeInput) -> None:
    drafted, accepted = outcome.drafted_per_step, outcome.accepted_per_step
    if drafted and len(drafted) != len(accepted):
        raise InvalidFieldError(
            "accepted_per_step",
            f"has {len(accepted)} entries but drafted_per_step has {len(drafted)}",
        )
    if outcome.steps and outcome.steps != len(accepted):
        raise InvalidFieldError(
            "steps", f"is {outcome.steps} but accepted_per_step has {len(accepted)} entries"
        )
    for i, (k, n) in enumerate(zip(drafted, accepted, strict=False)):
        if k > MAX_DRAFT_LENGTH:
            raise InvalidFieldError(
                f"drafted_per_step[{i}]",
                f"{k} is over the largest draft length, {MAX_DRAFT_LENGTH}",
            )
        if n > k:
            raise InvalidFieldError(
                f"accepted_per_step[{i}]", f"{n} accepted is more than the {k} drafted"
            )
    _check_totals_beside_steps(outcome)


def _check_totals_beside_steps(outcome: OutcomeInput) -> None:
    """Totals sent beside per-step lists must be what the lists add up to (the lists are
    what the policy reads; contradicting totals were taken without a word)."""
    drafted, accepted = outcome.drafted_per_step, outcome.accepted_per_step
    if drafted and outcome.drafted_tokens and outcome.drafted_tokens != sum(drafted):
        raise InvalidFieldError(
            "drafted_tokens",
            f"is {outcome.drafted_tokens} but drafted_per_step adds up to {sum(drafted)}",
        )
    if outcome.accepted_tokens and outcome.accepted_tokens != sum(accepted):
        raise InvalidFieldError(
            "accepted_tokens",
            f"is {outcome.accepted_tokens} but accepted_per_step adds up to {sum(accepted)}",
        )
    if outcome.accepted_per_position:
        longest = max(len(outcome.accepted_per_position), max(accepted, default=0))
        counts = tuple(sum(n > i for n in accepted) for i in range(longest))
        given = tuple(outcome.accepted_per_position) + (0,) * (
            longest - len(outcome.accepted_per_position)
        )
        if given != counts:
            raise InvalidFieldError(
                "accepted_per_position",
                f"is {list(outcome.accepted_per_position)} but accepted_per_step gives "
                f"{list(counts)}",
            )


def check_outcome_against_decision(outcome: OutcomeInput, k: int) -> None:
    """Per-step accepts sent without ``drafted_per_step`` are read as drafts of the
    routed decision's k each, so no step may accept more than k (it was refused without
    naming the field). Drafted counts sent as lists are taken as the engine ran them."""
    if outcome.drafted_per_step:
        return
    over = next(((i, n) for i, n in enumerate(outcome.accepted_per_step) if n > k), None)
    if over is not None:
        raise InvalidFieldError(
            f"accepted_per_step[{over[0]}]",
            f"{over[1]} accepted is more than the decision's draft length, {k} (send "
            "drafted_per_step when the steps drafted other than k)",
        )


def _check_totals(outcome: OutcomeInput) -> None:
    steps, drafted, accepted = outcome.steps, outcome.drafted_tokens, outcome.accepted_tokens
    if accepted > drafted:
        raise InvalidFieldError(
            "accepted_tokens", f"{accepted} is more than drafted_tokens ({drafted})"
        )
    if drafted > 0 and steps == 0:
        raise InvalidFieldError("steps", f"must be > 0 when drafted_tokens is {drafted}")
    if drafted > steps * MAX_DRAFT_LENGTH:
        raise InvalidFieldError(
            "drafted_tokens",
            f"{drafted} is over {steps} steps x the largest draft length, {MAX_DRAFT_LENGTH}",
        )
    positions = outcome.accepted_per_position
    if not positions:
        return
    previous = steps
    for i, count in enumerate(positions):
        if count > steps:
            raise InvalidFieldError(
                f"accepted_per_position[{i}]", f"{count} is more than steps ({steps})"
            )
        if count > previous:
            raise InvalidFieldError(
                f"accepted_per_position[{i}]",
                f"{count} is more than accepted_per_position[{i - 1}] ({previous}): "
                "a draft token is accepted only after the one before it",
            )
        previous = count
    if sum(positions) != accepted:
        raise InvalidFieldError(
            "accepted_per_position", f"sums to {sum(positions)}, not accepted_tokens ({accepted})"
        )


def check_prompt(prompt: Prompt) -> Prompt:
    """Refuse an empty prompt, text that is not Unicode, or malformed chat messages
    (INVALID_ARGUMENT). Token ids are checked where the vocabulary is known
    (``RouterService.token_id_prompt``)."""
    if prompt.token_ids:
        return prompt
    if prompt.text is not None:
        if not prompt.text.strip():
            raise InvalidRequestError("the prompt is empty")
        check_unicode(prompt.text, "the prompt")
        return prompt
    if not prompt.messages:
        raise InvalidRequestError("the prompt is empty: no text and no chat messages")
    if prompt.continue_final_message and prompt.add_generation_prompt:
        raise InvalidFieldError(
            "continue_final_message",
            "continues the last message: add_generation_prompt must be false with it",
        )
    for i, message in enumerate(prompt.messages):
        if message.get("role") not in ROLES:
            raise InvalidFieldError(
                f"messages[{i}].role", f"must be one of {ROLES}, got {message.get('role')!r}"
            )
        check_unicode(message.get("content", ""), f"messages[{i}].content")
    # What the template renders besides the contents must be Unicode too.
    for i, message in enumerate(prompt.messages):
        if message.get("tool_calls"):
            check_tool_calls(message["tool_calls"], f"messages[{i}].tool_calls")
            for text in _rendered_calls(message["tool_calls"]):
                check_unicode(text, f"messages[{i}].tool_calls")
    if prompt.tools:
        check_unicode(json.dumps(list(prompt.tools), ensure_ascii=False), "tools")
    if prompt.template_kwargs:
        rendered = json.dumps(prompt.template_kwargs, ensure_ascii=False, default=str)
        check_unicode(rendered, "chat_template_kwargs")
    if not any(m.get("content", "").strip() for m in prompt.messages):
        raise InvalidRequestError("the prompt is empty: every chat message is blank")
    return prompt


def check_tool_calls(calls: Any, where: str) -> None:
    """An assistant's earlier tool calls as the chat template reads them: each an object
    whose ``function`` (else the call itself, as Qwen's template reads it) has a ``name``
    (text) and ``arguments`` (JSON text, or a JSON object). A call without arguments
    failed inside the template (a 500), one without a name rendered as a call to ""."""
    if not isinstance(calls, list):
        raise InvalidFieldError(where, "must be a list of tool calls")
    for j, call in enumerate(calls):
        function = (call.get("function") or call) if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise InvalidFieldError(f"{where}[{j}].function.name", "must be the function's name")
        if not isinstance(function.get("arguments"), str | dict):
            raise InvalidFieldError(
                f"{where}[{j}].function.arguments", "must be JSON text (or a JSON object)"
            )


def _rendered_calls(calls: Any) -> list[str]:
    """An assistant's tool calls as text, and each call's arguments as the template renders
    them: arguments sent as JSON text are parsed first, so a ``\\ud800`` escape in that
    text is a lone surrogate there."""
    texts = [json.dumps(calls, ensure_ascii=False)]
    for call in calls if isinstance(calls, list) else ():
        function = call.get("function") if isinstance(call, dict) else None
        arguments = function.get("arguments") if isinstance(function, dict) else None
        if isinstance(arguments, str):
            with contextlib.suppress(json.JSONDecodeError, RecursionError):
                texts.append(json.dumps(json.loads(arguments), ensure_ascii=False))
    return texts


def check_unicode(text: str, where: str, field: str | None = None) -> None:
    """Refuse text that no UTF-8 can spell: JSON's ``\\ud800`` escapes decode to lone
    surrogates, which the tokenizer cannot read (INVALID_ARGUMENT, not INTERNAL); with
    ``field``, the error names it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        problem = (
            f"{where} is not valid Unicode: a lone surrogate {text[error.start]!r} at "
            f"character {error.start}"
        )
        if field is not None:
            raise InvalidFieldError(field, problem) from None
        raise InvalidRequestError(problem) from None


def check_prompt_chars(prompt: Prompt, max_chars: int, limits: Limits) -> None:
    """Refuse a prompt with more characters than ``limits.max_prompt_tokens`` tokens can
    spell (``max_chars``), before it is tokenized (INVALID_ARGUMENT). A chat prompt is
    counted as the template spells it, each message's role included, and refused when it
    has more messages than that many tokens hold (each message's markers take at least
    one): blank messages cost nothing here and thousands of them were rendered and
    tokenized in full on the event loop (seconds) before the token count refused them."""
    if prompt.text is not None:
        chars = len(prompt.text)
    else:
        if len(prompt.messages) > limits.max_prompt_tokens:
            raise ContextLengthError(
                f"the prompt has {len(prompt.messages)} chat messages, more than "
                f"{limits.max_prompt_tokens} tokens can hold"
            )
        chars = sum(len(m.get("role", "")) + len(m.get("content", "")) for m in prompt.messages)
        # Tools and earlier tool calls are rendered too (as JSON, at least as long).
        calls = [m["tool_calls"] for m in prompt.messages if m.get("tool_calls")]
        if prompt.tools or calls:
            chars += len(json.dumps([list(prompt.tools), calls], default=str))
    if chars > max_chars:
        raise ContextLengthError(
            f"the prompt has {chars} characters, more than {limits.max_prompt_tokens} "
            f"tokens can spell (the limit is {max_chars} characters)"
        )


#: The most alternatives a request may ask for per token (OpenAI's chat ``top_logprobs``
#: and vLLM's default ``max_logprobs`` are 20).
MAX_TOP_LOGPROBS = 20


def check_logprobs(logprobs: int | None, field_name: str) -> int | None:
    """None (off) or 0..MAX_TOP_LOGPROBS alternatives per token (INVALID_ARGUMENT)."""
    if logprobs is not None and not 0 <= logprobs <= MAX_TOP_LOGPROBS:
        raise InvalidFieldError(field_name, f"must be in [0, {MAX_TOP_LOGPROBS}], got {logprobs}")
    return logprobs


MAX_REQUEST_ID_CHARS = 128
# A request id an HTTP caller gives (X-Request-Id) is used up to this length: the choices
# of one request (OpenAI's n) are numbered after it (``<id>-1``...).
MAX_CALLER_REQUEST_ID_CHARS = 120
# W3C Trace Context: version-trace id-parent id-flags, all lower-case hex (a later version
# may add fields after a dash). The all-zero ids are invalid.
TRACEPARENT = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}(-[ -~]*)?")
MAX_TRACESTATE_CHARS = 512


@dataclass(frozen=True)
class Caller:
    """What an HTTP request's headers (or a gRPC call's metadata) say of who asked: the
    request id to serve it under (empty: the sidecar assigns one), and the W3C trace
    context to send on to a fleet replica (empty when absent or malformed)."""

    request_id: str = ""
    trace: tuple[tuple[str, str], ...] = ()

    def generation(self, request: GenerateInput, index: int = 0) -> GenerateInput:
        """``request`` as this caller's: its id (``<id>-<index>`` for a request's later
        choices) and trace context."""
        request_id = self.request_id
        if request_id and index:
            request_id = f"{request_id}-{index}"
        route = replace(request.route, request_id=request_id or request.route.request_id)
        return replace(request, route=route, trace=self.trace)


def caller_request_id(header: str | None) -> str:
    """A caller's ``X-Request-Id``, or "" where it is absent or unusable as a request id
    (over MAX_CALLER_REQUEST_ID_CHARS characters, or not printable ASCII): the sidecar
    then assigns one, as for a caller that sent none, rather than refuse the request for
    what a proxy added."""
    if not header or len(header) > MAX_CALLER_REQUEST_ID_CHARS:
        return ""
    return header if all(" " <= char <= "~" for char in header) else ""


def trace_context(traceparent: str | None, tracestate: str | None) -> tuple[tuple[str, str], ...]:
    """The W3C trace-context headers to send on: none when ``traceparent`` is absent or
    malformed (tracestate means nothing without it, as the specification says); a
    malformed tracestate is left out alone."""
    if not traceparent:
        return ()
    traceparent = traceparent.strip()
    if not TRACEPARENT.fullmatch(traceparent) or traceparent.startswith("ff-"):
        return ()
    _, trace_id, parent_id, _ = traceparent.split("-", 3)[:4]
    if set(trace_id) == {"0"} or set(parent_id) == {"0"}:
        return ()
    headers = [("traceparent", traceparent)]
    printable = all(" " <= char <= "~" for char in tracestate or "")
    if tracestate and len(tracestate) <= MAX_TRACESTATE_CHARS and printable:
        headers.append(("tracestate", tracestate))
    return tuple(headers)


def check_request_id(request_id: str) -> str:
    """A caller's request id: at most 128 printable ASCII characters (it is kept until its
    Report, logged, and sent on as a replica's ``X-Request-Id`` header); empty: the server
    assigns one (INVALID_ARGUMENT)."""
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidFieldError(
            "request_id", f"{len(request_id)} characters, over {MAX_REQUEST_ID_CHARS}"
        )
    if not all(" " <= char <= "~" for char in request_id):
        raise InvalidFieldError(
            "request_id", f"only printable ASCII characters are allowed, got {request_id!r}"
        )
    return request_id


def check_max_new_tokens(requested: int, limits: Limits, *, required: bool) -> int:
    """``requested`` within ``1..limit``; 0 is allowed only where not ``required`` (Route)."""
    if requested < 0 or (required and requested == 0):
        raise InvalidRequestError(f"max_new_tokens must be > 0, got {requested}")
    if requested > limits.max_new_tokens:
        raise ContextLengthError(
            f"max_new_tokens {requested} is over the limit of {limits.max_new_tokens}"
        )
    return requested


def check_truncate(truncate: int | None, limits: Limits) -> None:
    """A truncation must keep at least one token and at most the prompt limit."""
    if truncate is not None and not 0 < truncate <= limits.max_prompt_tokens:
        raise InvalidFieldError(
            "truncate", f"must be in [1, {limits.max_prompt_tokens}], got {truncate}"
        )


def tokens_left(prompt_tokens: int, max_new_tokens: int, context: int | None, fit: bool) -> int:
    """``max_new_tokens`` for a prompt of ``prompt_tokens`` in a target context of
    ``context`` tokens (None: unknown, no bound): refused when it does not fit
    (INVALID_ARGUMENT, as TGI and vLLM refuse it), or lowered to fit when ``fit``."""
    if context is None or prompt_tokens + max_new_tokens <= context:
        return max_new_tokens
    left = context - prompt_tokens
    if fit and left > 0:
        return left
    raise ContextLengthError(
        f"the target's context is {context} tokens, and the request asks for "
        f"{prompt_tokens + max_new_tokens}: {prompt_tokens} in the prompt and "
        f"{max_new_tokens} to generate"
    )


def check_prompt_tokens(count: int, limits: Limits) -> None:
    """Refuse prompts over the token limit (INVALID_ARGUMENT)."""
    if count == 0:
        raise InvalidRequestError("the prompt is empty after tokenization")
    if count > limits.max_prompt_tokens:
        raise ContextLengthError(
            f"the prompt has {count} tokens, over the limit of {limits.max_prompt_tokens}"
        )
