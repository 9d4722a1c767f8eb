"""The speculative decoding loop: prefill, then propose -> verify -> roll back, streaming.

The prefill feeds the whole prompt and its last position gives the first output token,
as a serving engine's does: it streams before any draft is made (time to first token is
the prefill's), and no step is spent on it. Invariant between steps: ``history`` (prompt
+ verified output) has length L and the target's KV cache holds its first L - 1 tokens.
A step feeds the last verified token and d <= k drafts (d + 1 positions) in one target
forward, verifies, and crops the cache to L + accepted entries, which restores the
invariant for the L + accepted + 1 tokens now verified. With d = 0 a step is one plain
decoding step, so "none" runs the same loop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from transformers import DynamicCache

from drafters.attention import cached_causal_mask
from drafters.base import Drafter, DraftSession, Proposal, empty_proposal
from drafters.detokenize import IncrementalDetokenizer, push_until_stop
from drafters.grammar import GrammarCompiler, OutputGrammar
from drafters.loader import LoadedModel
from drafters.penalties import NO_PENALTIES, Penalties, PenaltyState
from drafters.sampling import SamplingConfig, make_generator
from drafters.stats import GenerationStats
from drafters.stopping import DraftStopRule
from drafters.verify import verify

logger = logging.getLogger(__name__)

GREEDY = SamplingConfig()
# Prompt positions scored per LM-head call when the prompt's log-probabilities are asked
# for: a row is the vocabulary (152k at Qwen2.5's), so a long prompt's all at once would
# be gigabytes.
PROMPT_SCORE_ROWS = 256

DraftLengthSchedule = Callable[[int, GenerationStats], int]
"""``(step_index, stats_so_far) -> k`` for the next step; 0 disables speculation."""


class LogitsAdjuster(Protocol):
    """What a request asks of the target's distribution beyond sampling (penalties, a
    grammar): each verify row adjusted for its own prefix, then moved on by the tokens
    emitted."""

    def adjust(self, logits: torch.Tensor, drafts: torch.Tensor) -> torch.Tensor: ...

    def extend(self, tokens: Sequence[int]) -> None: ...


class Adjusters:
    """Several adjusters applied in order (penalties before a grammar's mask, which
    then has the last word)."""

    def __init__(self, adjusters: Sequence[LogitsAdjuster]) -> None:
        self._adjusters = tuple(adjusters)

    def adjust(self, logits: torch.Tensor, drafts: torch.Tensor) -> torch.Tensor:
        for adjuster in self._adjusters:
            logits = adjuster.adjust(logits, drafts)
        return logits

    def extend(self, tokens: Sequence[int]) -> None:
        for adjuster in self._adjusters:
            adjuster.extend(tokens)


@dataclass(frozen=True)
class TokenLogprob:
    """The target's log-probability of an emitted token given everything before it, and
    the ``top`` most likely tokens there as (id, log-probability), most likely first.

    Raw: the model's own distribution (log-softmax of its logits), before temperature,
    top-k, top-p or typical-p, as vLLM reports by default; a speculative step reads it
    from the verify pass, so it does not depend on the drafter."""

    logprob: float
    top: tuple[tuple[int, float], ...] = ()
    rank: int | None = None  # 1 + how many tokens are likelier, where asked for (the prompt's)


@dataclass(frozen=True)
class TokenEvent:
    """Tokens verified in one step, each with the text it completes.

    This is the one detokenization of the output: ``token_texts[i]`` is what token i adds
    to the text ("" for a special token, which is never emitted as text, or while a
    character is still incomplete); ``special[i]`` marks the special tokens. ``logprobs``:
    one per token when the request asked for them (``generate(logprobs=...)``).
    """

    token_ids: list[int]
    token_texts: list[str]
    special: list[bool]
    logprobs: list[TokenLogprob] | None = None

    @property
    def text(self) -> str:
        return "".join(self.token_texts)


class GenerationRun:
    """An iterator of :class:`TokenEvent`; ``stats``, ``output_ids`` and ``text`` are
    complete once iteration ends (or the run is closed early, which counts as cancelled)."""

    def __init__(
        self,
        events: Iterator[TokenEvent],
        stats: GenerationStats,
        output_ids: list[int],
        output_texts: list[str],
        prompt_logprobs: list[TokenLogprob] | None = None,
    ):
        self._events = events
        self.stats = stats
        self.output_ids = output_ids
        self._output_texts = output_texts
        # Prompt tokens 1.. scored by the prefill, when asked for (``generate``): filled
        # in once the prefill has run (before the first event, or an end without any).
        self.prompt_logprobs = prompt_logprobs

    @property
    def text(self) -> str:
        """The text emitted so far: the events' texts, concatenated."""
        return "".join(self._output_texts)

    def __iter__(self) -> GenerationRun:
        return self

    def __next__(self) -> TokenEvent:
        return next(self._events)

    def close(self) -> None:
        """Stop generating now (cancelled, unless it had ended)."""
        close = getattr(self._events, "close", None)
        if close is not None:
            close()
        if not self.stats.finish_reason:  # closed before its first event: never started
            self.stats.finish_reason = "cancelled"

    def collect(self) -> list[int]:
        """Run to the end and return the output ids."""
        for _ in self:
            pass
        return self.output_ids


def token_logprobs(
    logits: torch.Tensor, tokens: Sequence[int], top: int, ranks: bool = False
) -> list[TokenLogprob]:
    """Row i of ``logits`` [n >= len(tokens), vocab] scores ``tokens[i]``: its
    log-probability, the ``top`` most likely tokens of that row, and with ``ranks`` its
    rank there (1: the most likely)."""
    rows = torch.log_softmax(logits[: len(tokens)].float(), dim=-1)  # [n, vocab]
    ids = torch.tensor(tokens, dtype=torch.long, device=rows.device)
    picked = rows.gather(1, ids.unsqueeze(1))  # [n, 1]
    chosen = picked.squeeze(1).tolist()
    rank_of: list[int | None] = [None] * len(chosen)
    if ranks:
        rank_of = [int(r) + 1 for r in (rows > picked).sum(dim=-1).tolist()]
    if top <= 0:
        return [TokenLogprob(float(lp), rank=r) for lp, r in zip(chosen, rank_of, strict=True)]
    values, indices = torch.topk(rows, min(top, rows.shape[-1]), dim=-1)
    return [
        TokenLogprob(float(lp), tuple(zip(ids_row, values_row, strict=True)), rank)
        for lp, ids_row, values_row, rank in zip(
            chosen, indices.tolist(), values.tolist(), rank_of, strict=True
        )
    ]


@torch.inference_mode()
def prefill(
    model: Any, device: torch.device, cache: DynamicCache, history: list[int]
) -> torch.Tensor:
    """Fill the cache with every prompt token; the logits [1, vocab] of the last one,
    which score the first output token."""
    ids = torch.tensor([history], dtype=torch.long, device=device)
    out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return out.logits[0, -1:]


@torch.inference_mode()
def scoring_prefill(
    model: Any,
    device: torch.device,
    cache: DynamicCache,
    history: list[int],
    top: int,
    scored: list[TokenLogprob],
) -> torch.Tensor:
    """:func:`prefill`, also scoring each prompt token after the first into ``scored``
    (its rank and ``top`` alternatives): the LM head applied to the decoder's hidden
    states, as the model's own forward does, ``PROMPT_SCORE_ROWS`` positions at a time."""
    ids = torch.tensor([history], dtype=torch.long, device=device)
    out = model.get_decoder()(input_ids=ids, past_key_values=cache, use_cache=True)
    hidden = out.last_hidden_state[0]  # [n, hidden]
    head = model.get_output_embeddings()
    for start in range(0, len(history) - 1, PROMPT_SCORE_ROWS):
        rows = hidden[start : min(start + PROMPT_SCORE_ROWS, len(history) - 1)]
        following = history[start + 1 : start + 1 + rows.shape[0]]
        scored.extend(token_logprobs(head(rows), following, top, ranks=True))
    return head(hidden[-1:])


def stop_token_ids(target: LoadedModel) -> frozenset[int]:
    """Token ids that end a generation, as the model declares them: the tokenizer's EOS and
    the generation config's EOS ids (a Qwen2.5 instruct checkpoint lists both its
    end-of-turn and end-of-text tokens there)."""
    ids: set[int] = set()
    tokenizer = target.tokenizer
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    config_eos = getattr(getattr(target.model, "generation_config", None), "eos_token_id", None)
    if isinstance(config_eos, int):
        ids.add(config_eos)
    elif config_eos is not None:
        ids.update(int(i) for i in config_eos)
    return frozenset(ids)


#: Fields of a checkpoint's generation_config.json that change what is generated beside
#: its EOS ids (transformers' ``generate`` applies them; the engine does not).
SAMPLING_DEFAULTS = (
    "do_sample",
    "temperature",
    "top_p",
    "top_k",
    "typical_p",
    "min_p",
    "repetition_penalty",
    "no_repeat_ngram_size",
)


def unapplied_generation_defaults(target: LoadedModel) -> dict[str, Any]:
    """What the target's generation config sets, apart from transformers' defaults, of
    ``SAMPLING_DEFAULTS``: a request decodes as it asks (greedy unless it samples), so
    these are not applied (a Qwen2.5 Instruct checkpoint's repetition_penalty 1.1 made
    transformers' ``generate`` differ from the sidecar's greedy output)."""
    config = getattr(target.model, "generation_config", None)
    if config is None:
        return {}
    changed = config.to_diff_dict()
    return {name: changed[name] for name in SAMPLING_DEFAULTS if name in changed}


@dataclass(frozen=True)
class _Request:
    prompt_ids: list[int]
    drafter: Drafter
    draft_length: int | DraftLengthSchedule
    max_new_tokens: int
    sampling: SamplingConfig
    stop_sequences: tuple[str, ...]
    stop_ids: frozenset[int]  # the tokens that end this generation
    should_stop: Callable[[], bool] | None
    stop_rule: DraftStopRule | None
    logprobs: int | None
    penalties: Penalties
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    grammar: OutputGrammar | None = None


class SpeculativeEngine:
    """Runs speculative decoding against one target model, one request at a time."""

    def __init__(self, target: LoadedModel) -> None:
        self.target = target
        self.stop_token_ids = stop_token_ids(target)
        config = target.model.config
        self.max_positions: int | None = getattr(config, "max_position_embeddings", None)
        self._synchronize = target.device.type == "cuda"
        self._empty = empty_proposal(target.device)
        self._grammars: GrammarCompiler | None = None
        self._grammars_lock = threading.Lock()
        self._drafter_prefill_thread = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="drafter-prefill"
        )

    @property
    def grammars(self) -> GrammarCompiler:
        """Structured output for this target (``drafters/grammar.py``), built on first use
        (about a second and 80 MB at Qwen2.5's vocabulary, so not for a sidecar that
        never serves a grammar); :class:`~drafters.grammar.GrammarError` where the
        target's tokenizer cannot hold one."""
        with self._grammars_lock:
            if self._grammars is None:
                width = int(self.target.model.get_output_embeddings().weight.shape[0])
                self._grammars = GrammarCompiler(self.target.tokenizer, width, self.stop_token_ids)
            return self._grammars

    def generate(
        self,
        prompt_ids: Sequence[int],
        drafter: Drafter,
        draft_length: int | DraftLengthSchedule,
        *,
        max_new_tokens: int,
        sampling: SamplingConfig = GREEDY,
        stop_sequences: Sequence[str] = (),
        should_stop: Callable[[], bool] | None = None,
        stop_rule: DraftStopRule | None = None,
        logprobs: int | None = None,
        ignore_eos: bool = False,
        stop_token_ids: Collection[int] = (),
        penalties: Penalties = NO_PENALTIES,
        prompt_logprobs: int | None = None,
        skip_special_tokens: bool = True,
        grammar: OutputGrammar | None = None,
    ) -> GenerationRun:
        """Stream the target's continuation of ``prompt_ids``, drafted by ``drafter``.

        ``stop_rule`` lets a model drafter end a step's draft before k when its own
        next-token distribution says the draft will probably be rejected
        (``drafters/stopping.py``); the output is the same either way (lossless).
        ``logprobs``: None, none; n >= 0, each token's :class:`TokenLogprob` with its n
        most likely alternatives.

        The generation ends at the model's end-of-sequence tokens (``stop_token_ids`` of the
        engine) unless ``ignore_eos``, and at any of ``stop_token_ids`` (vLLM's parameters
        of those names): the model's distribution is the same either way, only where it
        ends differs. ``penalties``: vLLM's repetition, frequency and presence penalties,
        OpenAI's logit bias and ``min_tokens`` on the target's distribution
        (``drafters/penalties.py``), lossless as well.

        ``prompt_logprobs``: None, none; n >= 0, the prefill also scores each prompt token
        after the first as ``logprobs`` scores output tokens (``run.prompt_logprobs``, one
        per prompt token but the first, which nothing precedes). ``skip_special_tokens``
        off (vLLM's parameter): special tokens' text is part of the output's, but for the
        one that ends the generation. ``grammar``: the output held to it (vLLM's structured
        output, ``drafters/grammar.py``), lossless as well; a grammar that does not compile
        raises :class:`~drafters.grammar.GrammarError` here."""
        if not prompt_ids:
            raise ValueError("prompt_ids must not be empty")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        for name, top in (("logprobs", logprobs), ("prompt_logprobs", prompt_logprobs)):
            if top is not None and top < 0:
                raise ValueError(f"{name} must be >= 0, got {top}")
        request = _Request(
            prompt_ids=[int(t) for t in prompt_ids],
            drafter=drafter,
            draft_length=draft_length,
            max_new_tokens=max_new_tokens,
            sampling=sampling,
            stop_sequences=tuple(stop_sequences),
            stop_ids=(frozenset() if ignore_eos else self.stop_token_ids)
            | frozenset(int(t) for t in stop_token_ids),
            should_stop=should_stop,
            stop_rule=stop_rule if stop_rule is not None and stop_rule.active else None,
            logprobs=logprobs,
            penalties=penalties,
            prompt_logprobs=prompt_logprobs,
            skip_special_tokens=skip_special_tokens,
            grammar=grammar,
        )
        adjuster = self._adjuster(request)
        stats = GenerationStats(prompt_tokens=len(request.prompt_ids))
        output_ids: list[int] = []
        output_texts: list[str] = []
        scored: list[TokenLogprob] | None = [] if prompt_logprobs is not None else None
        events = self._events(request, stats, output_ids, output_texts, scored, adjuster)
        return GenerationRun(events, stats, output_ids, output_texts, scored)

    def _events(
        self,
        request: _Request,
        stats: GenerationStats,
        output: list[int],
        texts: list[str],
        prompt_scored: list[TokenLogprob] | None,
        adjuster: LogitsAdjuster | None,
    ) -> Iterator[TokenEvent]:
        began = time.perf_counter()
        history = list(request.prompt_ids)
        cache = DynamicCache()
        # The drafter's session starts and takes in the prompt on another thread while the
        # target prefills (both release the GIL inside torch), off the serial path.
        starting = self._drafter_prefill_thread.submit(self._start_session, request)
        first: torch.Tensor | None
        model, device = self.target.model, self.target.device
        if prompt_scored is None:
            first = prefill(model, device, cache, history)  # [1, vocab]
        else:
            top = request.prompt_logprobs or 0
            first = scoring_prefill(model, device, cache, history, top, prompt_scored)
        session = starting.result()
        stats.prefill_time_s = time.perf_counter() - began
        generator = make_generator(request.sampling, self.target.device)
        detokenizer = IncrementalDetokenizer(self.target.tokenizer, request.skip_special_tokens)
        elapsed = time.perf_counter() - began
        finish_reason = "cancelled"
        try:
            while True:
                resumed = time.perf_counter()
                stopped = self._reason_to_stop_before_step(request, history, len(output))
                if stopped is not None:
                    finish_reason = stopped
                    break
                if first is not None:  # the prefill's token: no step, no draft
                    logits, first = first, None
                    adjusted = (
                        logits
                        if adjuster is None
                        else adjuster.adjust(logits, self._empty.token_ids)
                    )
                    tokens = [
                        verify(
                            self._empty.token_ids, None, adjusted, request.sampling, generator
                        ).next_token
                    ]
                else:
                    k = self._draft_length(request, stats, history, len(output))
                    tokens, logits = self._speculative_step(
                        cache,
                        session,
                        history,
                        k,
                        request.sampling,
                        generator,
                        stats,
                        stop_rule=request.stop_rule,
                        adjuster=adjuster,
                    )
                tokens, token_texts, stopped = self._detokenize(
                    tokens, request, detokenizer, len(output)
                )
                if adjuster is not None:
                    adjuster.extend(tokens)
                scored = (
                    token_logprobs(logits, tokens, request.logprobs)
                    if request.logprobs is not None
                    else None
                )
                del logits  # not kept across the yield below
                output.extend(tokens)
                history.extend(tokens)
                if stopped is None:
                    stopped = self._length_reached(request, history, len(output))
                if stopped in ("eos_token", "length"):
                    # The last token: release a character it left incomplete (a stop
                    # sequence's text ends at the stop, so nothing is added after it).
                    token_texts[-1] += detokenizer.flush()
                texts.extend(token_texts)
                elapsed += time.perf_counter() - resumed
                if stopped is not None:
                    # Known before the last event goes out: a consumer that closes the
                    # run on it (or reads the stats while it holds it) saw "cancelled".
                    finish_reason = stats.finish_reason = stopped
                    stats.generated_tokens = len(output)
                yield TokenEvent(
                    token_ids=tokens,
                    token_texts=token_texts,
                    special=[detokenizer.is_special(t) for t in tokens],
                    logprobs=scored,
                )
                if stopped is not None:
                    break
        finally:
            stats.finish_reason = finish_reason
            stats.generated_tokens = len(output)
            stats.wall_time_s = elapsed

    def _adjuster(self, request: _Request) -> LogitsAdjuster | None:
        """What the request changes in the target's distribution, if anything."""
        adjusters: list[LogitsAdjuster] = []
        if request.penalties.active:
            adjusters.append(PenaltyState(request.penalties, request.prompt_ids, request.stop_ids))
        if request.grammar is not None:
            adjusters.append(self.grammars.state(request.grammar))
        if len(adjusters) > 1:
            return Adjusters(adjusters)
        return adjusters[0] if adjusters else None

    def _start_session(self, request: _Request) -> DraftSession:
        session = request.drafter.start(request.prompt_ids, request.stop_ids)
        session.prefill(request.prompt_ids)
        return session

    def _reason_to_stop_before_step(
        self, request: _Request, history: list[int], generated: int
    ) -> str | None:
        length = self._length_reached(request, history, generated)
        if length is not None:
            return length
        if request.should_stop is not None and request.should_stop():
            return "cancelled"
        return None

    def _length_reached(self, request: _Request, history: list[int], generated: int) -> str | None:
        if generated >= request.max_new_tokens:
            return "length"
        if self.max_positions is not None and len(history) >= self.max_positions:
            return "length"
        return None

    def _draft_length(
        self, request: _Request, stats: GenerationStats, history: list[int], generated: int
    ) -> int:
        """The schedule's k, capped so a step never emits past max_new_tokens or the
        model's context (a step emits at most k + 1 tokens)."""
        wanted = request.draft_length
        k = wanted if isinstance(wanted, int) else int(wanted(stats.steps, stats))
        k = min(max(k, 0), request.max_new_tokens - generated - 1)
        if self.max_positions is not None:  # and never past the context: k + 1 tokens
            k = min(k, self.max_positions - len(history) - 1)
        return max(k, 0)

    @torch.inference_mode()
    def _speculative_step(
        self,
        cache: DynamicCache,
        session: DraftSession,
        history: list[int],
        k: int,
        sampling: SamplingConfig,
        generator: torch.Generator | None,
        stats: GenerationStats,
        *,
        stop_rule: DraftStopRule | None = None,
        adjuster: LogitsAdjuster | None = None,
    ) -> tuple[list[int], torch.Tensor]:
        """Propose up to k, verify all d + 1 positions in one target forward, roll back.
        Returns the verified tokens and the target's logits [d + 1, vocab], whose row i
        scores token i (the model's own: ``adjuster`` adjusts what is verified only)."""
        started = time.perf_counter()
        proposal: Proposal = (
            session.propose(history, k, sampling, generator, stop_rule) if k > 0 else self._empty
        )
        if self._synchronize and proposal.length:
            torch.cuda.synchronize(self.target.device)
        drafted = time.perf_counter()
        last = torch.tensor([[history[-1]]], dtype=torch.long, device=self.target.device)
        inputs = (
            torch.cat([last, proposal.token_ids.unsqueeze(0)], dim=1) if proposal.length else last
        )  # [1, d + 1]
        mask = cached_causal_mask(
            self.target.model, inputs.shape[1], len(history) - 1, self.target.device
        )
        logits = self.target.model(
            input_ids=inputs, attention_mask=mask, past_key_values=cache, use_cache=True
        ).logits[0]  # [d + 1, vocab]
        adjusted = logits if adjuster is None else adjuster.adjust(logits, proposal.token_ids)
        verdict = verify(proposal.token_ids, proposal.probs, adjusted, sampling, generator)
        # Keep the L - 1 cached prefix, the last verified token and the accepted drafts.
        cache.crop(len(history) + verdict.accepted)
        if proposal.length:
            session.observe_accepted(verdict.accepted)
        tokens = [*proposal.token_ids[: verdict.accepted].tolist(), verdict.next_token]
        stats.observe_step(
            requested=k,
            drafted=proposal.length,
            accepted=verdict.accepted,
            stopped=proposal.stopped,
            further_time_s=proposal.further_time_s,
            further_forwards=proposal.further_forwards,
            draft_time_s=drafted - started,
            verify_time_s=time.perf_counter() - drafted,
        )
        return tokens, logits

    def _detokenize(
        self,
        tokens: list[int],
        request: _Request,
        detokenizer: IncrementalDetokenizer,
        generated: int,
    ) -> tuple[list[int], list[str], str | None]:
        """Each token's text, the step cut after its first EOS or completed stop sequence
        (the last text then ends at the stop sequence's end); nothing stops a generation
        before ``min_tokens`` (``generated``: the tokens before this step)."""
        texts, stopped = push_until_stop(
            detokenizer,
            tokens,
            request.stop_ids,
            request.stop_sequences,
            unchecked=request.penalties.min_tokens - generated,
        )
        return tokens[: len(texts)], texts, stopped
