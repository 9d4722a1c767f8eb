"""The sidecar's domain service: route, report, generate, and drafter/classifier/policy admin.

Protocol-free: the gRPC servicer and the TGI HTTP front both call this with domain
objects (router.domain) and convert the results at their edge.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from classifiers.api import Classification
from classifiers.chat import render_chat
from router.auto_distill import extra_model_roots
from router.capture import open_capture, unknown_capture_clusters
from router.clusters import ClusterCollector
from router.domain import (
    MAX_BAD_WORD_TOKENS,
    MAX_BAD_WORDS,
    DrafterSpec,
    GenerateInput,
    OutcomeInput,
    Prompt,
    RouteInput,
    Sampling,
    check_max_new_tokens,
    check_outcome_against_decision,
    check_prompt,
    check_prompt_chars,
    check_prompt_tokens,
    check_request_id,
    check_sampling,
    check_truncate,
    check_unicode,
    tokens_left,
)
from router.drafter_pool import DrafterPool, under_model_roots
from router.errors import (
    AlreadyExistsError,
    CutByStopError,
    GenerationFailedError,
    InvalidFieldError,
    InvalidRequestError,
    NotFoundError,
    PreconditionError,
    SidecarError,
)
from router.generation import Finished, GenerationQueue
from router.metrics import SidecarMetrics
from router.policy.base import NONE_DRAFTER, Context, Decision, DrafterHints
from router.policy_holder import PolicyHolder
from router.prompt_reader import InProcessReader, PromptReader
from router.route_process import ChildProcessReader
from router.settings import Limits, Settings
from router.store import DrafterRecord, SidecarStore

if TYPE_CHECKING:
    from drafters.engine import SpeculativeEngine
    from drafters.guard import LossGuard
    from drafters.loader import TargetInfo

logger = logging.getLogger(__name__)

DEFAULT_COUNTERFACTUAL_K = 4
MAX_COUNTERFACTUAL_BACKLOG = 4
#: A policy switch waits for the scores queued before it at most the learner's budgets for
#: a full backlog plus this slack (a drafter's score can overrun its budget), and never
#: longer than LEARNING_WAIT_MAX_S (the budget has no upper bound; a client's deadline does).
LEARNING_WAIT_SLACK_S = 10.0
LEARNING_WAIT_MAX_S = 30.0
# What a model drafter's drafted token costs the loss guard of a sampled run, in plain
# target steps (the policy's default_draft_cost_ratio): fixed, so the run is repeatable.
SAMPLED_DRAFT_COST = 0.1


@dataclass(frozen=True)
class Components:
    """What the service needs from the other packages, built once at start.

    In fleet mode ``target`` is a weight-free ``TargetDescription`` and ``engine`` None:
    the vLLM replicas run the target (``router.components.build_components``)."""

    target: TargetInfo  # drafters.loader.LoadedModel, or a TargetDescription (fleet mode)
    engine: SpeculativeEngine | None
    classifiers: Any  # classifiers.ClassifierHolder
    builtin_drafters: tuple[DrafterRecord, ...] = ()
    model_roots: tuple[Path, ...] = ()
    tasks: tuple[str, ...] = ()


@dataclass(frozen=True)
class RoutedRequest:
    """A routing decision with everything needed to generate for it or learn from it."""

    request_id: str
    task_cluster: str
    confidence: float
    out_of_distribution: bool
    decision: Any  # router.policy.Decision
    context: Any  # router.policy.Context
    policy: str
    policy_version: int
    prompt_tokens: int
    length_bucket: int
    prompt_ids: tuple[int, ...] = ()
    replica: str = ""  # fleet mode: the URL of the replica chosen to serve it
    # The registration of the decision's drafter it was routed to (DrafterPool.serial).
    drafter_serial: int = 0

    def as_row(self) -> tuple[Any, ...]:
        """This request as one flat tuple of plain values (:class:`PendingReports`; the
        collector leaves a tuple in a tuple tracked)."""
        d, c = self.decision, self.context
        return (
            self.request_id,
            self.task_cluster,
            self.confidence,
            self.out_of_distribution,
            d.drafter,
            d.k,
            d.expected_speedup,
            d.explored,
            d.stop_threshold,
            c.cluster,
            c.length_bucket,
            c.structured,
            self.policy,
            self.policy_version,
            self.prompt_tokens,
            self.length_bucket,
            self.prompt_ids,
            self.replica,
            self.drafter_serial,
        )

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> RoutedRequest:
        """The request :meth:`as_row` wrote."""
        rid, cluster, confidence, ood, *rest = row
        drafter, k, expected, explored, stop, *rest = rest
        context_cluster, context_bucket, context_structured, *rest = rest
        policy, version, prompt_tokens, bucket, prompt_ids, replica, serial = rest
        return cls(
            rid,
            cluster,
            confidence,
            ood,
            Decision(drafter, k, expected, explored, stop),
            Context(context_cluster, context_bucket, context_structured),
            policy,
            version,
            prompt_tokens,
            bucket,
            prompt_ids,
            replica,
            serial,
        )


class PendingReports:
    """The routed requests awaiting their Report (the oldest dropped past ``limit``),
    and the ids of the last ``limit`` reported, so that a second Report of one is told
    apart from an unknown id.

    Each waits as one tuple of plain values (:meth:`RoutedRequest.as_row`), not as its
    objects: the garbage collector stops tracking a tuple that holds only strings,
    numbers and the like (a Route's prompt ids are the empty tuple), while a
    RoutedRequest with its Decision and Context is three objects that every full
    collection scans. Routes that are never reported (a serving stack that only asks)
    fill the table to its 100,000 entries, and a full collection then stalled the event
    loop for 14-40 ms, about every 50,000 Routes (benchmarks/load/HISTORY.md)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._rows: OrderedDict[str, tuple[Any, ...]] = OrderedDict()
        self._reported: OrderedDict[str, None] = OrderedDict()

    def remember(self, routed: RoutedRequest) -> None:
        self._rows[routed.request_id] = routed.as_row()
        while len(self._rows) > self.limit:
            self._rows.popitem(last=False)

    def take(self, request_id: str) -> RoutedRequest:
        """The request ``request_id`` names, no longer pending; ALREADY_EXISTS when it
        was reported, NOT_FOUND when it is not known (or was dropped)."""
        row = self._rows.pop(request_id, None)
        if row is not None:
            return RoutedRequest.from_row(row)
        if request_id in self._reported:
            raise AlreadyExistsError(f"request {request_id!r} was already reported")
        raise NotFoundError(f"no routed request with id {request_id!r}")

    def mark_reported(self, request_id: str) -> None:
        self._reported[request_id] = None
        while len(self._reported) > self.limit:
            self._reported.popitem(last=False)


@dataclass(frozen=True)
class Alternative:
    """One of the most likely tokens at a position: its id, its text decoded alone, its
    log-probability under the target, and its bytes (``TokenTexts.raw``)."""

    token_id: int
    text: str
    logprob: float
    special: bool = False
    raw: bytes = b""


@dataclass(frozen=True)
class TokenLogprobs:
    """An emitted token's log-probability under the target (raw: before the sampling
    parameters) and the most likely tokens at its position, most likely first; ``text``
    is the token decoded alone (a character split across tokens shows as U+FFFD in each
    piece), ``raw`` its bytes (each piece's own)."""

    text: str
    logprob: float
    top: tuple[Alternative, ...] = ()
    raw: bytes = b""


class TokenTexts:
    """Token id -> its text decoded alone and its bytes, cached (a request's alternatives
    decode the same few ids again and again)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._decoded: dict[int, tuple[str, bytes]] = {}
        self._lock = threading.Lock()
        self._special = frozenset(int(i) for i in getattr(tokenizer, "all_special_ids", ()))
        self._byte_of = _byte_level_table(tokenizer)

    def text(self, token_id: int) -> str:
        return self._decode(token_id)[0]

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special

    def raw(self, token_id: int) -> bytes:
        """The token's bytes: a byte-level BPE vocabulary's piece mapped back to the bytes
        it stands for (a piece of a multi-byte character included), else its text's UTF-8."""
        return self._decode(token_id)[1]

    def _decode(self, token_id: int) -> tuple[str, bytes]:
        decoded = self._decoded.get(token_id)
        if decoded is None:
            text = self._tokenizer.decode([token_id])
            piece = self._tokenizer.convert_ids_to_tokens(token_id)
            raw = text.encode("utf-8", errors="replace")
            if self._byte_of and isinstance(piece, str) and all(c in self._byte_of for c in piece):
                raw = bytes(self._byte_of[c] for c in piece)
            decoded = (text, raw)
            with self._lock:
                self._decoded[token_id] = decoded
        return decoded

    def scored(
        self, token_ids: Sequence[int], scored: Sequence[tuple[float, Sequence[tuple[int, float]]]]
    ) -> tuple[TokenLogprobs, ...]:
        """Each token's (logprob, [(id, logprob) of its alternatives]) with their texts."""
        return tuple(
            TokenLogprobs(
                self.text(token_id),
                float(logprob),
                tuple(
                    Alternative(i, self.text(i), float(lp), self.is_special(i), self.raw(i))
                    for i, lp in top
                ),
                self.raw(token_id),
            )
            for token_id, (logprob, top) in zip(token_ids, scored, strict=True)
        )


def _byte_level_table(tokenizer: Any) -> dict[str, int]:
    """Character -> byte of a byte-level BPE vocabulary (GPT-2's, Qwen2.5's), whose pieces
    spell bytes as characters; empty for another kind of tokenizer."""
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    if type(decoder).__name__ != "ByteLevel":
        return {}
    from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

    return {char: byte for byte, char in bytes_to_unicode().items()}


@dataclass(frozen=True)
class TokenChunk:
    """Tokens accepted in one speculative step, with their per-token texts."""

    token_ids: tuple[int, ...]
    token_texts: tuple[str, ...]
    special: tuple[bool, ...]
    text: str
    # One per token when the request asked for them.
    logprobs: tuple[TokenLogprobs, ...] | None = None


@dataclass(frozen=True)
class PromptScores:
    """The prompt's tokens as the target read them, each decoded alone, and those after
    the first scored by the target's prefill (``logprobs[i]`` scores ``token_ids[i + 1]``;
    ``GenerateInput.prompt_logprobs``): a generation's first item after its decision."""

    token_ids: tuple[int, ...]
    texts: tuple[str, ...]
    special: tuple[bool, ...]
    logprobs: tuple[TokenLogprobs, ...]
    ranks: tuple[int, ...] = ()  # of each scored token in its row (1: the most likely)


@dataclass(frozen=True)
class GenerationResult:
    """The end of a generation: output and statistics."""

    routed: RoutedRequest
    output_ids: tuple[int, ...]
    generated_text: str
    stats: Any  # drafters.GenerationStats
    policy_version: int
    seed: int | None = None
    prediction: Any = None  # drafters.prediction.PredictionTally, when one was sent


@dataclass(frozen=True)
class ClassifierView:
    path: str
    version: str
    labels: tuple[str, ...]
    training_data_hash: str
    created_unix: float


@dataclass(frozen=True)
class PolicyView:
    policy: str
    version: int
    contexts: list[Any] = field(default_factory=list)


@dataclass
class RouteBatch:
    """A Route batch on its way: per slot an error, a routed request once decided, or
    nothing yet; and (slot, classification, prompt tokens) of each request to decide."""

    results: list[RoutedRequest | SidecarError | None]
    placed: list[tuple[int, Classification, int]] = field(default_factory=list)


def prompt_reader_for(limits: Limits, tokenizer: Any, classifiers: Any) -> PromptReader:
    """The prompt reader ``limits.prompt_reader`` names (router.prompt_reader), not started.
    A child process needs a fast tokenizer (it is sent as JSON): without one, in-process."""
    if limits.prompt_reader == "child_process":
        if getattr(tokenizer, "backend_tokenizer", None) is not None:
            spin_s = limits.prompt_reader_spin_ms / 1000
            return ChildProcessReader(tokenizer, classifiers, spin_s=spin_s)
        logger.warning("the target's tokenizer is not a fast one: prompts are read in-process")
    return InProcessReader(tokenizer, classifiers)


def _structured(request: RouteInput) -> bool:
    """Whether a request's output is held to a grammar: its own context for the policy."""
    return request.sampling.structured_output is not None


class RouterService:
    """Routes prompts, learns from outcomes, generates, and manages drafters."""

    def __init__(
        self,
        settings: Settings,
        components: Components,
        store: SidecarStore,
        metrics: SidecarMetrics,
    ) -> None:
        self.settings = settings
        self.limits = settings.limits
        self.components = components
        self.store = store
        self.metrics = metrics
        self.tokenizer = components.target.tokenizer
        self._max_prompt_chars = prompt_char_bound(self.tokenizer, self.limits.max_prompt_tokens)
        self._fast_tokenizer = getattr(self.tokenizer, "backend_tokenizer", None)
        # Tokens the tokenizer adds to a text prompt (a BOS; none for Qwen2.5), as TGI and
        # vLLM's completions add them; a chat's template spells its own.
        self._text_specials = int(self.tokenizer.num_special_tokens_to_add(pair=False))
        self.token_texts = TokenTexts(self.tokenizer)
        # The target's configured context (None: unknown); see ``context_tokens``.
        self._target_context: int | None = components.target.context_tokens
        # Registrations, removals and policy switches, pool and policy together (worker
        # threads); SetPolicy calls one after another (``set_policy``).
        self._admin_lock = threading.Lock()
        self._policy_switch = asyncio.Lock()
        self.stopping = False  # set when the sidecar begins to stop (HTTP /health: 503)
        # Automatic distillation's output directory is a model root while it is on.
        self.model_roots = (*components.model_roots, *extra_model_roots(settings))
        self.drafters = DrafterPool(
            components.target, components.engine, store, self.model_roots, settings.limits
        )
        self.policy = PolicyHolder(
            store,
            self.drafters.eligible,
            self._similarity_of,
            self.drafter_hints,
            kept=lambda: [record.name for record, _ in self.drafters.unserved()],
            registered=self.drafters.registration_times,
        )
        self.queue = GenerationQueue(
            self.limits.generation_workers,
            self.limits.generation_queue_size,
            on_depth=metrics.queue_depth.set,
        )
        self._learner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="counterfactual")
        # RegisterDrafter and RemoveDrafter run one at a time (``_admin_lock``) in this
        # thread: in the loop's default executor a burst of them, each loading a model,
        # took every thread and held up the /metrics scrapes and policy snapshots behind.
        self._admin = ThreadPoolExecutor(max_workers=1, thread_name_prefix="admin")
        # Served prompts and verified outputs for distillation; None unless [capture] is on.
        self.capture = open_capture(settings.state_dir, settings.capture)
        unknown = unknown_capture_clusters(
            settings.capture.clusters if self.capture is not None else (),
            components.classifiers.current.labels,
        )
        if unknown is not None:
            logger.warning(unknown)
        self._capture_failures = 0  # in a row: the first is logged, the rest counted
        # Counts prompts' tokens and classifies them, for Route and Generate alike.
        self.prompt_reader = prompt_reader_for(self.limits, self.tokenizer, components.classifiers)
        self._learning_lock = threading.Lock()
        self._learning_backlog = 0
        # Server-assigned request ids: unique per process start, cheaper than uuid4.
        self._id_prefix = uuid.uuid4().hex[:12]
        self._ids = itertools.count(1)
        self._decision_counters: dict[tuple[str, str, int], Any] = {}
        self._pending = PendingReports(self.limits.pending_reports)
        self._bucket: Any = None
        self._context: Any = None

    # -- start / stop -----------------------------------------------------------------
    def start(self) -> None:
        """Load built-in and stored drafters, then the policy (restored from its snapshot)."""
        from router.policy.base import Context, length_bucket

        self._bucket, self._context = length_bucket, Context
        for record in self.components.builtin_drafters:
            self.drafters.add_builtin(record)
        restored = self.drafters.restore()
        logger.info("drafters: %s (restored %s)", self.drafters.names(), restored)
        self.policy.start(self.settings.policy, self.settings.policy_config)
        self.metrics.drafters.set(len(self.drafters.names()))
        self.metrics.policy_version.set(self.policy.version)
        self.metrics.registry.register(ClusterCollector(self._contexts, self.capture))
        self.prompt_reader.start()

    def close(self) -> bool:
        """Stop the workers, then take the final policy snapshot; whether it was saved (a
        start that failed before the policy started has nothing to save)."""
        saved = False
        try:
            self.prompt_reader.close()
            self.queue.shutdown()
            self._learner.shutdown(wait=True, cancel_futures=True)
            self._admin.shutdown(wait=True, cancel_futures=True)
        finally:
            try:
                if self.policy.started:
                    self.save_policy()
                    saved = True
            except SidecarError as error:  # full or locked: stop anyway, the last one stays
                logger.error("final policy snapshot not saved: %s", error)
            except Exception:
                logger.exception("final policy snapshot not saved")
            if self.capture is not None:
                self.capture.close()
        return saved

    async def aclose(self) -> None:
        """Close what runs on the event loop (a fleet's HTTP client and probes): nothing
        in-process. ``close`` follows."""

    async def close_after_failed_start(self) -> None:
        """Close a service whose start failed; a second failure is logged, not raised over
        the first."""
        try:
            await self.aclose()
            await asyncio.to_thread(self.close)
        except Exception:
            logger.exception("closing the service after a failed start")

    def generation_problem(self) -> str | None:
        """Why a Generate could not run now, or None (the in-process engine can, until the
        sidecar stops)."""
        return "the sidecar is shutting down" if self.stopping else None

    def cut_generations(self, grace_s: float) -> int:
        """End every generation still admitted when a stop's grace of ``grace_s`` seconds
        has run out: each fails with UNAVAILABLE (an HTTP stream's last event says so; a
        client may retry it elsewhere); how many there were."""
        return self.queue.cut(CutByStopError(grace_s))

    @property
    def context_tokens(self) -> int | None:
        """The most tokens prompt and output may have together (None: unknown): the
        target's ``max_position_embeddings``."""
        return self._target_context

    # -- routing ----------------------------------------------------------------------
    def new_request_id(self) -> str:
        """An id for a request whose caller gave none: unique to this process's run."""
        return f"{self._id_prefix}-{next(self._ids)}"

    def eligible_drafters(self) -> list[str]:
        """The drafters the policy may choose now (a fleet narrows them to the
        configurations that have a replica free)."""
        return self.drafters.eligible()

    def prompt_ids(self, prompt: Prompt) -> list[int]:
        """The ids the target reads: a text prompt with the tokens the tokenizer adds (a
        BOS, as TGI and vLLM's completions add it), a chat as its template renders it,
        token ids as they are."""
        if prompt.token_ids:
            return list(prompt.token_ids)
        return self._ids_of(self._model_text(prompt), special=prompt.text is not None)

    def tokenized(self, prompt: Prompt, special: bool | None = None) -> list[int]:
        """:meth:`prompt_ids` of a prompt checked as a Route's is (not empty, Unicode,
        within the character bound), for the ``/tokenize`` route; ``special``: whether
        the tokenizer adds its special tokens (None: as the target reads the prompt)."""
        prompt = check_prompt(prompt)
        check_prompt_chars(prompt, self._max_prompt_chars, self.limits)
        if special is None or prompt.token_ids:
            return self.prompt_ids(prompt)
        return self._ids_of(self._model_text(prompt), special=special)

    def token_id_prompt(self, ids: Sequence[int], truncate: int | None = None) -> Prompt:
        """A prompt given as token ids: the ids as they are (their last ``truncate`` when
        given, as a text prompt is cut), their decoding as its text. An empty list, more
        ids than ``limits.max_prompt_tokens`` (before anything is decoded) or an id
        outside the tokenizer's vocabulary is refused."""
        if truncate is not None:
            ids = ids[-truncate:]
        check_prompt_tokens(len(ids), self.limits)
        self.check_in_vocabulary("prompt", ids)
        return Prompt(text=self.tokenizer.decode(list(ids)), token_ids=tuple(ids))

    def check_in_vocabulary(self, field: str, ids: Iterable[int]) -> None:
        """INVALID_ARGUMENT naming ``field`` for a token id the tokenizer does not have."""
        vocabulary = len(self.tokenizer)
        outside = next((t for t in ids if not 0 <= t < vocabulary), None)
        if outside is not None:
            raise InvalidFieldError(
                field, f"token id {outside} is not in the vocabulary (0 to {vocabulary - 1})"
            )

    def _ids_of(self, text: str, *, special: bool) -> list[int]:
        if self._fast_tokenizer is not None:
            return list(self._fast_tokenizer.encode(text, add_special_tokens=special).ids)
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def _chat_text(self, prompt: Prompt) -> str:
        """The messages rendered by the target's chat template, ending as the prompt asks
        (``add_generation_prompt``, ``continue_final_message``). A template may refuse them
        (``raise_exception``: Gemma's "System role not supported", Mistral's alternating
        roles), and a last message to continue may not be found in the rendering:
        INVALID_ARGUMENT with the message, not INTERNAL."""
        ending = {
            "add_generation_prompt": prompt.add_generation_prompt,
            "continue_final_message": prompt.continue_final_message,
        }
        if prompt.template_kwargs and not getattr(self.tokenizer, "chat_template", None):
            raise InvalidFieldError(
                "chat_template_kwargs",
                "the target's tokenizer has no chat template to pass them to",
            )
        tooled = bool(prompt.tools) or any(
            m.get("tool_calls") or m.get("role") == "tool" for m in prompt.messages
        )
        if not getattr(self.tokenizer, "chat_template", None):
            if tooled:
                raise InvalidFieldError(
                    "tools", "the target's tokenizer has no chat template to render tools with"
                )
            return render_chat(
                prompt.messages,
                generation_prompt=prompt.add_generation_prompt,
                continue_final=prompt.continue_final_message,
            )
        from jinja2 import TemplateError

        from router.tool_calls import templated_messages

        messages = templated_messages(prompt.messages) if tooled else list(prompt.messages)
        try:
            rendered = self.tokenizer.apply_chat_template(
                messages,
                tokenize=False,
                tools=list(prompt.tools) or None,
                **ending,
                **prompt.template_kwargs,
            )
        except (TemplateError, ValueError) as error:
            raise InvalidRequestError(
                f"the target's chat template refuses these messages: {error}"
            ) from None
        return str(rendered)

    def _hinted(self, task_hint: str) -> Classification:
        """The classification a task hint stands for (certain, in distribution)."""
        labels = self.components.classifiers.current.labels
        if task_hint not in labels:
            raise InvalidRequestError(f"unknown task hint {task_hint!r}; clusters: {list(labels)}")
        return Classification(task_hint, 1.0, False)

    def _count_decision(self, routed: RoutedRequest) -> None:
        key = (routed.task_cluster, routed.decision.drafter, int(routed.decision.k))
        counter = self._decision_counters.get(key)
        if counter is None:  # labelled children are cached: labels() costs microseconds
            counter = self.metrics.decisions.labels(cluster=key[0], drafter=key[1], k=str(key[2]))
            self._decision_counters[key] = counter
        counter.inc()

    async def prepare_routes(self, requests: list[RouteInput]) -> RouteBatch:
        """The Route RPC for a batch of requests, up to the policy (on the event loop):
        check each request, then count tokens and classify the whole batch with the
        prompt reader. A refused request gets its error in its slot. Nothing is decided
        or remembered yet: :meth:`commit_routes` does that."""
        results, valid, texts = self._checked_batch(requests)
        unhinted, classifier_texts = self._batch_texts(requests, valid)
        read = await self.prompt_reader.read(texts, classifier_texts)
        classifications = dict(zip(unhinted, read.classifications, strict=True))
        return self._placed(requests, results, valid, read.token_counts, classifications)

    def commit_routes(
        self, requests: Sequence[RouteInput], prepared: RouteBatch
    ) -> list[RoutedRequest | SidecarError]:
        """The rest of a Route batch, on the event loop (after :meth:`prepare_routes`):
        the policy's decisions, then remember each routed request for a later Report and
        count the decisions; one result per request, in order."""
        results: list[RoutedRequest | SidecarError] = []
        for result in self._decide_routes(requests, prepared).results:
            if isinstance(result, RoutedRequest):
                self._pending.remember(result)
                self._count_decision(result)
            if result is not None:
                results.append(result)
        return results

    def _checked_batch(
        self, requests: Sequence[RouteInput]
    ) -> tuple[list[RoutedRequest | SidecarError | None], list[tuple[int, Prompt]], list[str]]:
        """Per slot the error of a refused request, and (slot, prompt) of the others with
        what to count for each (its model text, rendered here so that a prompt the chat
        template refuses fails its own slot, not the batch)."""
        results: list[RoutedRequest | SidecarError | None] = [None] * len(requests)
        valid: list[tuple[int, Prompt]] = []
        texts: list[str] = []
        for index, request in enumerate(requests):
            try:
                prompt = self._checked_prompt(request, generating=False)
                texts.append(self._model_text(prompt))
                valid.append((index, prompt))
            except SidecarError as error:
                results[index] = error
        return results, valid, texts

    def _batch_texts(
        self, requests: Sequence[RouteInput], valid: Sequence[tuple[int, Prompt]]
    ) -> tuple[list[int], list[str]]:
        """Which slots to classify (no task hint) and what the classifier reads for them."""
        unhinted = [(i, p) for i, p in valid if not requests[i].task_hint]
        return [i for i, _ in unhinted], [_classifier_text(p) for _, p in unhinted]

    def _placed(
        self,
        requests: Sequence[RouteInput],
        results: list[RoutedRequest | SidecarError | None],
        valid: Sequence[tuple[int, Prompt]],
        counts: Sequence[int],
        classifications: Mapping[int, Classification],
    ) -> RouteBatch:
        """A RouteBatch from a checked batch's token counts and classifications (by slot;
        a hinted slot takes its hint)."""
        prepared = RouteBatch(results)
        for (index, prompt), counted in zip(valid, counts, strict=True):
            # The reader counts the text alone; a text prompt also gets the tokenizer's BOS.
            tokens = counted + (self._text_specials if prompt.text is not None else 0)
            try:
                check_prompt_tokens(tokens, self.limits)
                found = classifications.get(index)
                hint = requests[index].task_hint
                classification = found if found is not None else self._hinted(hint)
            except SidecarError as error:
                prepared.results[index] = error
                continue
            prepared.placed.append((index, classification, tokens))
        return prepared

    def _decide_routes(self, requests: Sequence[RouteInput], prepared: RouteBatch) -> RouteBatch:
        """Policy decisions for a prepared batch, in its result slots."""
        results = prepared.results
        buckets = [int(self._bucket(tokens)) for _, _, tokens in prepared.placed]
        contexts = [
            self._context(classification.cluster, bucket, _structured(requests[index]))
            for (index, classification, _), bucket in zip(prepared.placed, buckets, strict=True)
        ]
        decisions, version = self.policy.select_many(contexts, self.eligible_drafters())
        for (index, classification, tokens), bucket, context, decision in zip(
            prepared.placed, buckets, contexts, decisions, strict=True
        ):
            results[index] = self._routed_request(
                requests[index], classification, tokens, (), (bucket, context, decision, version)
            )
        return prepared

    def _checked_prompt(self, request: RouteInput, *, generating: bool) -> Prompt:
        check_request_id(request.request_id)
        prompt = check_prompt(request.prompt)
        check_prompt_chars(prompt, self._max_prompt_chars, self.limits)
        check_sampling(request.sampling)
        check_max_new_tokens(request.max_new_tokens, self.limits, required=generating)
        self._check_sampling_fits(request, generating=generating)
        check_truncate(request.truncate, self.limits)
        return prompt

    def _check_sampling_fits(self, request: RouteInput, *, generating: bool) -> None:
        """What ``check_sampling`` cannot see alone: a logit bias's and the stop token ids
        against the vocabulary, ``min_tokens`` against ``max_new_tokens``."""
        sampling = request.sampling
        if sampling.logit_bias:
            self.check_in_vocabulary("sampling.logit_bias", (t for t, _ in sampling.logit_bias))
        if sampling.stop_token_ids:
            self.check_in_vocabulary("sampling.stop_token_ids", sampling.stop_token_ids)
        if sampling.allowed_token_ids is not None:
            self.check_in_vocabulary("sampling.allowed_token_ids", sampling.allowed_token_ids)
        if sampling.bad_words:
            self.bad_word_ids(sampling.bad_words)
        if generating and sampling.min_tokens > request.max_new_tokens:
            raise InvalidFieldError(
                "sampling.min_tokens",
                f"must be at most max_new_tokens ({request.max_new_tokens}), "
                f"got {sampling.min_tokens}",
            )

    def bad_word_ids(self, words: Sequence[str]) -> tuple[tuple[int, ...], ...]:
        """``words``' token sequences as vLLM tokenizes them (``bad_word_ids``), within
        vLLM's bounds on their count and their tokens (INVALID_ARGUMENT naming
        ``sampling.bad_words`` beyond them, or for a word of no token)."""
        from drafters.penalties import bad_word_ids

        try:
            sequences = bad_word_ids(words, lambda text: self._ids_of(text, special=False))
        except ValueError as error:
            raise InvalidFieldError("sampling.bad_words", str(error)) from None
        tokens = sum(len(s) for s in sequences)
        if len(sequences) > MAX_BAD_WORDS or tokens > MAX_BAD_WORD_TOKENS:
            raise InvalidFieldError(
                "sampling.bad_words",
                f"{len(sequences)} token sequences of {tokens} tokens in all: at most "
                f"{MAX_BAD_WORDS} and {MAX_BAD_WORD_TOKENS}",
            )
        return sequences

    def served_sampling(self, sampling: Sampling) -> Sampling:
        """``sampling`` as this sidecar serves it: its grammar's JSON compact, or closed,
        where the ``structured_output`` settings say so."""
        grammar = sampling.structured_output
        if grammar is None:
            return sampling
        settings = self.settings.structured_output
        served = replace(
            grammar,
            any_whitespace=grammar.any_whitespace and not settings.disable_any_whitespace,
            additional_properties=(
                grammar.additional_properties and not settings.disable_additional_properties
            ),
        )
        return replace(sampling, structured_output=served)

    def _check_grammar_served(self) -> None:
        """The in-process target's tokenizer can hold a grammar (llguidance reads it, on
        the first request with one); FAILED_PRECONDITION where it cannot."""
        engine = self.components.engine
        if engine is None:
            return  # fleet mode: vLLM holds the output to it
        from drafters.grammar import GrammarError

        try:
            engine.grammars  # noqa: B018 - built once, here, where it can be refused
        except GrammarError as error:
            raise PreconditionError(f"structured output: {error}") from error

    def _model_text(self, prompt: Prompt) -> str:
        return prompt.text if prompt.text is not None else self._chat_text(prompt)

    async def _route(
        self,
        request: RouteInput,
        *,
        force_drafter: str = "",
        force_k: int | None = None,
    ) -> RoutedRequest:
        """A Generate request routed: checked, its prompt tokenized (the ids the engine
        reads, whose number is the prompt's token count), classified by the prompt reader
        (as a batch of one), decided."""
        if request.sampling.structured_output is not None:
            # The first grammar reads the target's tokenizer (a second): off the loop.
            await asyncio.to_thread(self._check_grammar_served)
        prompt = self._checked_prompt(request, generating=True)
        ids = self.prompt_ids(prompt)
        if request.truncate is not None:
            ids = ids[-request.truncate :]  # the last tokens, as TGI and vLLM keep them
        check_prompt_tokens(len(ids), self.limits)
        tokens_left(len(ids), request.max_new_tokens, self.context_tokens, request.fit_context)
        if request.task_hint:
            classification = self._hinted(request.task_hint)
        else:
            read = await self.prompt_reader.read([], [_classifier_text(prompt)])
            (classification,) = read.classifications
        return self._routed(
            request,
            classification,
            len(ids),
            tuple(ids),
            force_drafter=force_drafter,
            force_k=force_k,
        )

    def _routed(
        self,
        request: RouteInput,
        classification: Classification,
        prompt_tokens: int,
        prompt_ids: tuple[int, ...],
        *,
        force_drafter: str = "",
        force_k: int | None = None,
    ) -> RoutedRequest:
        """The policy's decision for a checked, tokenized and classified request."""
        bucket = int(self._bucket(prompt_tokens))
        context = self._context(classification.cluster, bucket, _structured(request))
        decision, version = self._decide(context, force_drafter, force_k)
        return self._routed_request(
            request, classification, prompt_tokens, prompt_ids, (bucket, context, decision, version)
        )

    def _routed_request(
        self,
        request: RouteInput,
        classification: Classification,
        prompt_tokens: int,
        prompt_ids: tuple[int, ...],
        placement: tuple[int, Any, Any, int],
    ) -> RoutedRequest:
        """The RoutedRequest of a classified request placed at (bucket, context) and
        decided (decision, policy version)."""
        bucket, context, decision, version = placement
        return RoutedRequest(
            request_id=request.request_id or self.new_request_id(),
            task_cluster=classification.cluster,
            confidence=classification.probability,
            out_of_distribution=classification.out_of_distribution,
            decision=decision,
            context=context,
            policy=self.policy.name,
            policy_version=version,
            prompt_tokens=prompt_tokens,
            length_bucket=bucket,
            prompt_ids=prompt_ids,
            drafter_serial=self.drafters.serial(decision.drafter),
        )

    def _eligible_at(self, k: int | None) -> list[str]:
        """The drafters the policy may choose for a request that forces draft length
        ``k`` (None: not forced): any eligible one, which then drafts ``k`` tokens."""
        return self.eligible_drafters()

    def _decide(self, context: Any, force_drafter: str, force_k: int | None) -> tuple[Any, int]:
        if not force_drafter:
            decision, version = self.policy.select(context, self._eligible_at(force_k))
            if force_k is None:
                return decision, version
            force_drafter = decision.drafter if force_k > 0 else NONE_DRAFTER
        self.drafters.get(force_drafter)  # NOT_FOUND for an unknown drafter
        k = 0 if force_drafter == NONE_DRAFTER else (force_k if force_k is not None else 4)
        if k == 0 and force_drafter != NONE_DRAFTER:
            force_drafter = NONE_DRAFTER
        decision = Decision(drafter=force_drafter, k=k, expected_speedup=math.nan, explored=False)
        return decision, self.policy.version

    # -- reports ----------------------------------------------------------------------
    def report(self, outcome: OutcomeInput) -> int:
        """Feed a reported outcome to the policy; returns the new policy version."""
        routed = self._pending.take(outcome.request_id)
        try:
            check_outcome_against_decision(outcome, routed.decision.k)
            policy_outcome = outcome_from_report(outcome, routed.decision.k)
        except InvalidRequestError:
            self._pending.remember(routed)  # a fixed report may follow
            raise
        self._pending.mark_reported(outcome.request_id)
        if not self._still_registered(routed):
            return int(self.policy.version)
        version = self.policy.update(routed.context, routed.decision, policy_outcome)
        self._count_outcome(routed, policy_outcome, "report")
        return version

    def _count_outcome(self, routed: RoutedRequest, outcome: Any, source: str) -> None:
        labels = {"cluster": routed.task_cluster, "drafter": routed.decision.drafter}
        self.metrics.drafted_tokens.labels(**labels).inc(sum(outcome.drafted_per_step))
        self.metrics.accepted_tokens.labels(**labels).inc(sum(outcome.accepted_per_step))
        self.metrics.reports.labels(source=source).inc()
        self.metrics.policy_version.set(self.policy.version)

    # -- generation -------------------------------------------------------------------
    @property
    def max_concurrent_requests(self) -> int:
        """Generations admitted at once (running or waiting); one more is refused."""
        return self.queue.capacity

    @property
    def ranks_prompt_tokens(self) -> bool:
        """Whether the prompt's scores carry each token's rank in the vocabulary (vLLM's
        ``prompt_logprobs`` answer needs them): the in-process engine's prefill does."""
        return True

    def free_generation_places(self) -> int:
        """How many generations would run at once now if started: one, the in-process
        engine runs one at a time (more would only wait, holding queue places)."""
        return 1

    def fitted(self, request: GenerateInput, prompt_tokens: int) -> GenerateInput:
        """``request`` with the ``max_new_tokens`` its prompt leaves in the target's
        context when it asks to fit it (``fit_context``; ``_route`` refused the others
        that do not fit)."""
        route = request.route
        if not route.fit_context:
            return request
        left = tokens_left(prompt_tokens, route.max_new_tokens, self.context_tokens, True)
        return replace(request, route=replace(route, max_new_tokens=left))

    async def generate(self, request: GenerateInput) -> AsyncIterator[Any]:
        """Yield the :class:`RoutedRequest`, then (when asked) :class:`PromptScores`, then
        :class:`TokenChunk` s, then the result."""
        prediction = self.prediction_ids(request.prediction)
        slot = self.queue.admit()
        try:
            routed = await self._route(
                request.route,
                force_drafter=request.force_drafter,
                force_k=request.force_draft_length,
            )
            request = self.fitted(request, routed.prompt_tokens)
            if request.force_stop_threshold is not None:
                decision = replace(routed.decision, stop_threshold=request.force_stop_threshold)
                routed = replace(routed, decision=decision)
            self._count_decision(routed)
            yield routed
            job = self._generation_job(routed, request, prediction)
            async for item in self.queue.stream(slot, job):
                yield item.result if isinstance(item, Finished) else item
        finally:
            slot.release_unless_handed_off()

    def prediction_ids(self, prediction: str | None) -> tuple[int, ...] | None:
        """A request's predicted output as the target's tokens (None: none sent); one
        that is not Unicode, or longer than ``limits.max_prompt_tokens``, is refused."""
        if prediction is None:
            return None
        check_unicode(prediction, "the prediction")
        if len(prediction) > self._max_prompt_chars:
            raise InvalidFieldError(
                "prediction", f"is {len(prediction)} characters, over {self._max_prompt_chars}"
            )
        ids = tuple(self._ids_of(prediction, special=False))
        if len(ids) > self.limits.max_prompt_tokens:
            raise InvalidFieldError(
                "prediction",
                f"has {len(ids)} tokens, over the limit of {self.limits.max_prompt_tokens}",
            )
        return ids

    def _generation_job(
        self,
        routed: RoutedRequest,
        request: GenerateInput,
        prediction: tuple[int, ...] | None = None,
    ) -> Any:
        sampling = request.route.sampling.seeded()
        max_new_tokens = request.route.max_new_tokens

        def job(emit: Any, should_stop: Any) -> GenerationResult:
            served, drafter = self._still_served(routed, pinned=bool(request.force_drafter))
            # Pinned to no drafter: plain decoding, the reference speed-ups are measured
            # against (a replay's), prediction or not.
            plain = request.force_drafter == NONE_DRAFTER
            predicted = None if plain else self._predicted(served, drafter, prediction)
            result = self._run_engine(
                served,
                drafter if predicted is None else predicted,
                sampling,
                max_new_tokens,
                emit,
                should_stop,
                request.logprobs,
                request.prompt_logprobs,
                predicted=predicted,
            )
            # A cancelled run's partial outcome would bias the policy. The update is cheap
            # and lands before the caller sees the last chunk; scoring is offloaded. A
            # predicted run's drafts say how good its prediction was, not its arm: not
            # learnt from.
            if not request.no_update and not should_stop() and predicted is None:
                self._learn(result, sampling)
            if not should_stop():
                self._capture(result)
            return result

        return job

    def _predicted(
        self, routed: RoutedRequest, drafter: Any, prediction: tuple[int, ...] | None
    ) -> Any:
        """``drafter`` with ``prediction`` drafted first (``drafters/prediction.py``), or
        None without one (nor an engine: fleet mode refuses predictions)."""
        engine = self.components.engine
        if prediction is None or engine is None:
            return None
        from drafters.prediction import PredictedDrafter

        return PredictedDrafter(drafter, prediction, routed.decision.k, engine.target.device)

    def _run_engine(
        self,
        routed: RoutedRequest,
        drafter: Any,
        sampling: Sampling,
        max_new_tokens: int,
        emit: Any,
        should_stop: Any,
        logprobs: int | None = None,
        prompt_logprobs: int | None = None,
        *,
        predicted: Any = None,
    ) -> GenerationResult:
        from drafters import SamplingConfig
        from drafters.penalties import Penalties
        from drafters.stopping import stop_rule

        config = SamplingConfig(
            do_sample=sampling.do_sample,
            temperature=sampling.temperature or 1.0,
            top_k=sampling.top_k,
            top_p=sampling.top_p,
            seed=sampling.seed,
            typical_p=sampling.typical_p,
            min_p=sampling.min_p,
        )
        engine = self.components.engine
        if engine is None:
            raise GenerationFailedError("this sidecar has no in-process engine (fleet mode)")
        k = routed.decision.k
        # A predicted run drafts up to the prediction's length, its own guard (module doc
        # of drafters/prediction.py) in place of the loss guard.
        guard = None if predicted is not None else self._loss_guard(k, sampling, drafter)
        if predicted is not None:
            k = max(k, self.settings.prediction.draft_length)
        run = engine.generate(
            list(routed.prompt_ids),
            drafter,
            guard if guard is not None else k,
            max_new_tokens=max_new_tokens,
            sampling=config,
            stop_sequences=sampling.stop,
            should_stop=should_stop,
            stop_rule=stop_rule(routed.decision.stop_threshold),
            logprobs=logprobs,
            ignore_eos=sampling.ignore_eos,
            stop_token_ids=sampling.stop_token_ids,
            penalties=Penalties(
                repetition=sampling.repetition_penalty,
                presence=sampling.presence_penalty,
                frequency=sampling.frequency_penalty,
                min_tokens=sampling.min_tokens,
                bias=sampling.logit_bias,
                allowed=sampling.allowed_token_ids,
                bad_words=self.bad_word_ids(sampling.bad_words) if sampling.bad_words else (),
            ),
            prompt_logprobs=prompt_logprobs,
            skip_special_tokens=sampling.skip_special_tokens,
            grammar=self.served_sampling(sampling).structured_output,
        )
        scores_sent = prompt_logprobs is None
        # The engine detokenizes each token once; its texts are passed on as they are.
        for event in run:
            if not scores_sent:
                emit(self._prompt_scores(routed, run.prompt_logprobs))
                scores_sent = True
            emit(
                TokenChunk(
                    token_ids=tuple(event.token_ids),
                    token_texts=tuple(event.token_texts),
                    special=tuple(event.special),
                    text=event.text,
                    logprobs=(
                        self.token_texts.scored(
                            event.token_ids, [(lp.logprob, lp.top) for lp in event.logprobs]
                        )
                        if event.logprobs is not None
                        else None
                    ),
                )
            )
        if not scores_sent and run.prompt_logprobs is not None:  # no token came out
            emit(self._prompt_scores(routed, run.prompt_logprobs))
        output = tuple(int(t) for t in run.output_ids)
        text = run.text
        stats = run.stats
        self.metrics.generated_tokens.inc(stats.generated_tokens)
        self.metrics.generations.labels(finish_reason=str(stats.finish_reason)).inc()
        self.metrics.generation_tokens_per_s.observe(stats.tokens_per_s)
        if guard is not None and guard.shortest is not None:
            self.metrics.loss_guard_trips.labels(
                drafter=routed.decision.drafter, to=str(min(guard.shortest, 1))
            ).inc()
        tally = None if predicted is None else predicted.tally
        if tally is not None:
            self.metrics.prediction_tokens.labels(outcome="accepted").inc(tally.accepted)
            self.metrics.prediction_tokens.labels(outcome="rejected").inc(tally.rejected)
        return GenerationResult(
            routed, output, text, stats, self.policy.version, sampling.seed, tally
        )

    def _prompt_scores(self, routed: RoutedRequest, scored: Any) -> PromptScores:
        """The engine's scores of prompt tokens 1.. (``TokenLogprob`` s) with their texts."""
        pairs = [(lp.logprob, lp.top) for lp in scored]
        ranks = tuple(int(lp.rank or 0) for lp in scored)
        return self.prompt_scores(routed.prompt_ids, pairs, ranks)

    def prompt_scores(
        self,
        token_ids: Sequence[int],
        pairs: Sequence[tuple[float, Sequence[tuple[int, float]]]],
        ranks: tuple[int, ...] = (),
    ) -> PromptScores:
        """The prompt's tokens with their texts, and ``pairs``, the (logprob, alternatives)
        of tokens 1.., as :class:`PromptScores` (``ranks``: theirs, where known)."""
        ids = tuple(int(t) for t in token_ids)
        texts = tuple(self.token_texts.text(token_id) for token_id in ids)
        special = tuple(self.token_texts.is_special(token_id) for token_id in ids)
        scored = self.token_texts.scored(ids[1 : len(pairs) + 1], pairs)
        return PromptScores(ids, texts, special, scored, ranks)

    def _still_registered(self, routed: RoutedRequest) -> bool:
        """Whether the drafter ``routed`` ran with is the registration serving its name:
        an outcome learnt after the drafter was removed (a late Report) brought its
        figures back into the policy, and after it was registered again (other weights,
        say) landed on the new one. Such an outcome is dropped and counted
        (``specroute_reports_total{source="stale"}``)."""
        serial = routed.drafter_serial  # 0: routed to no registration (a fleet replica's)
        if serial and self.drafters.serial(routed.decision.drafter) == serial:
            return True
        logger.info(
            "request %s: outcome dropped, drafter %s was removed or registered again since",
            routed.request_id,
            routed.decision.drafter,
        )
        self.metrics.reports.labels(source="stale").inc()
        return False

    def _still_served(self, routed: RoutedRequest, *, pinned: bool) -> tuple[RoutedRequest, Any]:
        """``routed`` and its drafter, read once; or, when the policy's drafter was removed
        while the request waited for a worker, the same request without speculation and
        the no-drafter arm (lossless; learnt from as that arm): it failed with NOT_FOUND
        for a drafter its caller never named. A drafter the caller pinned
        (``force_drafter``) and that is gone is still NOT_FOUND."""
        live = self.drafters.find(routed.decision.drafter)
        if live is not None:
            return routed, live.drafter
        if pinned:
            self.drafters.get(routed.decision.drafter)  # NOT_FOUND, naming the drafter
        logger.warning(
            "request %s: drafter %s was removed before it ran; served without speculation",
            routed.request_id,
            routed.decision.drafter,
        )
        none = self.drafters.get(NONE_DRAFTER)
        plain = replace(routed.decision, drafter=NONE_DRAFTER, k=0, stop_threshold=0.0)
        return replace(routed, decision=plain, drafter_serial=none.serial), none.drafter

    def _loss_guard(self, k: int, sampling: Sampling, drafter: Any) -> LossGuard | None:
        """The request's in-flight guard (``drafters/guard.py``); None when off or k = 0.
        A sampled run's prices drafts at a fixed cost (its kind's hint, else
        ``SAMPLED_DRAFT_COST``) and plain decoding at q = 1, not the request's or the
        policy's measured times: the k of each step decides which draws the run
        consumes, so a schedule that followed the machine's timing gave another text for
        the same seed, drafter and k. A greedy run's guard prices plain decoding at the
        policy's measured q (``PolicyHolder.plain_step_terms``)."""
        settings = self.settings.loss_guard
        if not settings.enabled or k <= 0:
            return None
        from drafters import draft_cost_hint
        from drafters.guard import LossGuard

        if sampling.do_sample:
            hint = draft_cost_hint(drafter)
            fixed = SAMPLED_DRAFT_COST if hint is None else hint
            return LossGuard(k, confidence=settings.confidence, draft_cost_ratio=fixed)
        q, slope = self.policy.plain_step_terms() or (1.0, None)
        return LossGuard(
            k, confidence=settings.confidence, plain_step_ratio=q, plain_step_slope=slope
        )

    def _capture(self, result: GenerationResult) -> None:
        """Keep the run's prompt and verified output when capture is on (router.capture).
        A failure to store is never the request's: each is counted
        (``specroute_capture_failures_total``), the first of a run of them is logged, and
        the first capture stored after them says so."""
        if self.capture is None:
            return
        routed = result.routed
        try:
            self.capture.record(routed.task_cluster, routed.prompt_ids, result.output_ids)
        except Exception:
            self.metrics.capture_failures.inc()
            self._capture_failures += 1
            if self._capture_failures == 1:  # a full disk would log every request
                logger.exception(
                    "capturing a %s request failed (the next failures are counted in "
                    "specroute_capture_failures_total, not logged, until one is stored)",
                    routed.task_cluster,
                )
            return
        if self._capture_failures:
            logger.info("capture stored again after %d that failed", self._capture_failures)
            self._capture_failures = 0

    def _learn(self, result: GenerationResult, sampling: Sampling) -> None:
        """Update the policy from the run, and score other drafters when greedy."""
        from router.policy.base import Outcome

        stats = result.stats
        routed = result.routed
        if stats.steps == 0:
            # Answered by the prefill's token alone (max_new_tokens 1, or an immediate end
            # of turn): no step ran, so there is nothing of drafting or of step costs to
            # learn (its wall time, all prefill, would price a plain step).
            return
        if not self._still_registered(routed):
            return
        outcome = Outcome.from_steps(
            stats.drafted_per_step,
            stats.accepted_per_step,
            draft_time_s=stats.draft_time_s,
            verify_time_s=stats.verify_time_s,
            wall_time_s=stats.wall_time_s,
            generated_tokens=stats.generated_tokens,
            stopped_steps=stats.stopped_steps,
            requested_per_step=stats.requested_per_step,
            plain_steps_time_s=stats.plain_verify_time_s,
            draft_lead_steps=stats.lead_steps,
            draft_lead_time_s=stats.lead_time_s,
            draft_further_forwards=stats.further_forwards,
            draft_further_time_s=stats.further_time_s,
        )
        self.policy.update(routed.context, routed.decision, outcome)
        self._count_outcome(routed, outcome, "generate")
        if sampling.greedy and result.output_ids:
            self._offload_counterfactuals(result)

    def _offload_counterfactuals(self, result: GenerationResult) -> None:
        """Score off the generation worker; dropped (not queued) when scoring lags behind."""
        with self._learning_lock:
            if self._learning_backlog >= MAX_COUNTERFACTUAL_BACKLOG:
                logger.debug("counterfactual scoring skipped: %d pending", self._learning_backlog)
                return
            self._learning_backlog += 1

        def score() -> None:
            try:
                self._score_counterfactuals(result)
            finally:
                with self._learning_lock:
                    self._learning_backlog -= 1

        self._learner.submit(score)

    async def _learning_settled(self) -> None:
        """Wait until the learner's jobs queued so far are done (it runs one at a time, in
        order: at most MAX_COUNTERFACTUAL_BACKLOG scorings, each checking its budget
        before each drafter, and in fleet mode the capture of finished requests), for at
        most the budgets of a full backlog plus LEARNING_WAIT_SLACK_S, and never past
        LEARNING_WAIT_MAX_S; past it the switch goes on and later scores go to the next
        policy."""
        try:
            done = self._learner.submit(lambda: None)
        except RuntimeError:  # shut down: nothing more will be scored
            return
        budgets = (MAX_COUNTERFACTUAL_BACKLOG + 1) * self.limits.counterfactual_budget_s
        bound = min(budgets + LEARNING_WAIT_SLACK_S, LEARNING_WAIT_MAX_S)
        try:
            await asyncio.wait_for(asyncio.wrap_future(done), bound)
        except TimeoutError:
            logger.warning("policy switched before the last counterfactual scores were learnt")

    def _score_counterfactuals(self, result: GenerationResult) -> None:
        """Full-information updates (HedgeSpec-style) for other drafters, within a budget."""
        from drafters import score_counterfactual_drafts

        routed = result.routed
        k = routed.decision.k or DEFAULT_COUNTERFACTUAL_K
        deadline = time.perf_counter() + self.limits.counterfactual_budget_s
        for name in self.eligible_drafters():
            if name == routed.decision.drafter:
                continue
            if time.perf_counter() >= deadline:
                break
            try:
                live = self.drafters.get(name)
                drafted, accepted = score_counterfactual_drafts(
                    live.drafter, list(routed.prompt_ids), list(result.output_ids), k
                )
            except NotFoundError:
                continue  # removed meanwhile
            except Exception:
                logger.exception("counterfactual scoring failed for %s", name)
                continue
            if self.drafters.serial(name) != live.serial:
                continue  # removed, maybe registered again, while scored: not its score
            self.policy.update_counterfactual(routed.context, name, accepted, k, drafted)
            self.metrics.reports.labels(source="counterfactual").inc()

    # -- admin ------------------------------------------------------------------------
    async def register_drafter(
        self,
        spec: DrafterSpec,
        announce: Callable[[DrafterSpec, DrafterRecord], None] | None = None,
    ) -> DrafterRecord:
        """Validate, persist and publish a drafter; it is eligible for the next request.
        ``announce`` (the pooled registry) is told of it in the same worker thread."""
        return await self._in_admin_thread(self._register_drafter, spec, announce)

    def _register_drafter(
        self,
        spec: DrafterSpec,
        announce: Callable[[DrafterSpec, DrafterRecord], None] | None = None,
    ) -> DrafterRecord:
        """All of a registration in one worker thread: a caller cancelled meanwhile (a
        client's deadline while the model loads, pooling's replay time limit) cannot stop
        it, so a drafter that is served is always one the policy knows (the policy's
        ``add_drafter`` was on the caller's side, and a cancelled one left the drafter
        served and listed but never chosen), and one the other replicas are told of
        (``announce``, under the admin lock: in the order of the changes; it was on the
        caller's side too, and a client's deadline left the drafter unknown to them)."""
        with self._admin_lock:
            record = self.drafters.register(spec)
            self.policy.add_drafter(record.name, self._similarity_of(record.name))
            if announce is not None:
                announce(spec, record)
        self.metrics.drafters.set(len(self.drafters.names()))
        return record

    async def remove_drafter(
        self, name: str, announce: Callable[[str], None] | None = None
    ) -> DrafterRecord:
        """In a worker thread, as a registration: the pool's write lock may be held by a
        registration loading its model, and waiting for it on the event loop stalled every
        call for the length of that load. ``announce`` as for a registration."""
        return await self._in_admin_thread(self._remove_drafter, name, announce)

    async def _in_admin_thread(self, function: Callable[..., Any], *args: Any) -> Any:
        """``function(*args)`` in the admin thread (after the admin changes before it)."""
        return await asyncio.get_running_loop().run_in_executor(self._admin, function, *args)

    def _remove_drafter(
        self, name: str, announce: Callable[[str], None] | None = None
    ) -> DrafterRecord:
        # One admin change at a time, pool and policy together: a registration of the same
        # name between the pool's removal and the policy's found the old arms still there
        # (adding is idempotent), and the removal then took the new drafter's arms away.
        with self._admin_lock:
            record = self.drafters.remove(name)
            if name not in self.drafters.names():  # a built-in namesake keeps its arms
                self.policy.remove_drafter(name)
                self._forget_series(name)
            if announce is not None:
                announce(name)
        self.metrics.drafters.set(len(self.drafters.names()))
        return record

    def _forget_series(self, name: str) -> None:
        """Drop a removed drafter's metric series and their cached counters (a drafter
        registered again under the name counts from zero, in series that are exported)."""
        for key in list(self._decision_counters):  # a copy: Routes add keys meanwhile
            if key[1] == name:
                self._decision_counters.pop(key, None)
        self.metrics.forget_drafter(name)

    def list_drafters(self) -> list[DrafterRecord]:
        return self.drafters.records()

    def drafter_hints(self) -> DrafterHints:
        """What the live drafters' kinds say before anything is measured
        (``drafters.draft_cost_hint``, ``drafters.copies_context``,
        ``drafters.cost_shape``); the policy holder
        applies them at start, on SetPolicy and when a drafter is registered or removed,
        so a restart configures the policy as it was before."""
        from drafters import copies_context, cost_shape, draft_cost_hint

        costs: dict[str, float] = {}
        copies: list[str] = []
        shapes: dict[str, str] = {}
        for name in self.drafters.eligible():
            try:
                live = self.drafters.get(name)
            except NotFoundError:  # removed meanwhile
                continue
            drafter = live.drafter
            hint = draft_cost_hint(drafter)
            if hint is not None:
                costs[name] = hint
            if copies_context(drafter):
                copies.append(name)
            shape = cost_shape(drafter)
            if shape is not None:
                shapes[name] = shape
        return DrafterHints(costs, tuple(copies), cost_shape=shapes)

    def _similarity_of(self, name: str) -> Mapping[str, float] | None:
        try:
            sample = self.drafters.get(name).record.finetune_sample
        except NotFoundError:
            return None
        if not sample:
            return None
        return dict(self.components.classifiers.current.similarity(list(sample)))

    async def reload_classifier(self, path: str) -> ClassifierView:
        from classifiers import ClassifierLoadError

        if not path:
            raise InvalidRequestError("a classifier directory path is required")
        directory = under_model_roots(path, self.model_roots)
        try:
            await asyncio.to_thread(self.components.classifiers.reload, directory)
        except ClassifierLoadError as exc:
            raise PreconditionError(str(exc)) from exc
        return self.classifier_view(path)

    def classifier_view(self, path: str = "") -> ClassifierView:
        classifier = self.components.classifiers.current
        meta = dict(getattr(classifier, "metadata", {}) or {})
        return ClassifierView(
            path=str(getattr(classifier, "source", "") or path),
            version=str(meta.get("version", "")),
            labels=tuple(classifier.labels),
            training_data_hash=str(meta.get("training_data_hash", "")),
            created_unix=float(meta.get("created_unix", 0.0) or 0.0),
        )

    async def set_policy(self, name: str, config: Mapping[str, Any], reset: bool) -> PolicyView:
        """Switch (or reset) the policy once the counterfactual scores of the requests
        already finished are learnt: they belong to the policy those requests ran under.
        Scored after the switch, they went to the next policy (a baseline ignores them),
        and the policy switched away from, saved meanwhile, never had them."""
        # A misspelt name or configuration is told at once, not after the wait.
        await asyncio.to_thread(self.policy.check, name, config)
        # One switch at a time, its reply read before the next: concurrent calls each
        # answered with another's policy. The switch runs in the admin thread, after the
        # registrations and removals before it, and checked again there: a drafter that a
        # configuration plays could be removed between the check and the switch.
        async with self._policy_switch:
            await self._learning_settled()
            await self._in_admin_thread(self._switch_policy, name, config, reset)
            self.metrics.policy_version.set(self.policy.version)
            return self.policy_view()

    def _switch_policy(self, name: str, config: Mapping[str, Any], reset: bool) -> None:
        with self._admin_lock:
            self.policy.check(name, config)
            self.policy.start(name, config, restore=not reset)

    def _contexts(self) -> list[Any]:
        return self.policy.describe()[2]

    def policy_view(self) -> PolicyView:
        """The policy's state, each context's choice made among the drafters it may
        choose now (``eligible_drafters``: in fleet mode, the configurations served)."""
        name, version, contexts = self.policy.describe()
        servable = set(self.eligible_drafters())
        return PolicyView(name, version, [c.chosen_among(servable) for c in contexts])

    def snapshot(self) -> None:
        """The periodic save (a worker thread): the policy, and the capture's retention,
        which a failed save (a full disk) does not hold back: deleting frees room."""
        try:
            self.save_policy()
        finally:
            if self.capture is not None:
                self.capture.expire()

    def save_policy(self) -> None:
        """Save the policy's state; a failure is counted
        (``specroute_policy_snapshot_failures_total``) and raised."""
        try:
            self.policy.snapshot()
        except Exception:
            self.metrics.policy_snapshot_failures.inc()
            raise


def prompt_char_bound(tokenizer: Any, max_prompt_tokens: int) -> int:
    """The most characters a prompt of ``max_prompt_tokens`` tokens can have: no token of
    the vocabulary spells more characters than its own string has (one per byte for a
    byte-level BPE), and the factor 2 leaves room for a normaliser that composes two
    characters into one. A longer prompt is refused before it is tokenized: tokenizing
    a 1 MB prompt (gRPC's largest message) held every other Route for ~0.3 s."""
    vocab = tokenizer.get_vocab()
    longest = max((len(token) for token in vocab), default=1)
    return 2 * max_prompt_tokens * max(longest, 1)


def _classifier_text(prompt: Prompt) -> str:
    """What the classifier reads: the text, or the system prompt and last user turn."""
    if prompt.text is not None:  # the hot path: no import statement per call
        return prompt.text
    from classifiers.text import prompt_from_messages

    return prompt_from_messages(prompt.messages)


def _draft_split(report: OutcomeInput) -> dict[str, Any]:
    return {
        "draft_lead_steps": report.draft_lead_steps,
        "draft_lead_time_s": report.draft_lead_time_s,
        "draft_further_forwards": report.draft_further_forwards,
        "draft_further_time_s": report.draft_further_time_s,
    }


def outcome_from_report(report: OutcomeInput, k: int) -> Any:
    """A policy Outcome from per-step lists, or from totals + per-position counts."""
    from router.policy.base import Outcome

    try:
        if report.accepted_per_step or report.drafted_per_step:
            drafted = report.drafted_per_step or (k,) * len(report.accepted_per_step)
            return Outcome.from_steps(
                drafted,
                report.accepted_per_step,
                draft_time_s=report.draft_time_s,
                verify_time_s=report.verify_time_s,
                wall_time_s=report.wall_time_s,
                generated_tokens=report.generated_tokens or None,
                plain_token_time_s=report.plain_token_time_s,
                **_draft_split(report),
            )
        return Outcome.from_totals(
            steps=report.steps,
            drafted_tokens=report.drafted_tokens,
            accepted_tokens=report.accepted_tokens,
            accepted_per_position=report.accepted_per_position,
            draft_time_s=report.draft_time_s,
            verify_time_s=report.verify_time_s,
            wall_time_s=report.wall_time_s,
            generated_tokens=report.generated_tokens,
            plain_token_time_s=report.plain_token_time_s,
            draft_length=k,
            **_draft_split(report),
        )
    except ValueError as exc:
        raise InvalidRequestError(f"invalid outcome: {exc}") from exc
