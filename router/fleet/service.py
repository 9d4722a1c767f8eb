"""The sidecar's service in fleet mode: the policy decides, vLLM replicas generate.

Each replica runs one speculative configuration (``none``, ``ngram`` at k, or a drafter at
k), so the policy's arms are the fleet's drafters and sending a prompt to a replica is
choosing its drafter. Route, Report, the classifier and the policy are the in-process
sidecar's; only where generation runs changes:

- **Eligible arms**: the drafters with a replica that is healthy and not saturated, so a
  configuration whose replicas are all saturated (or out) is passed over for the policy's
  next best.
- **Placement**: among the replicas of the chosen configuration, the least loaded (our
  requests in flight, or vLLM's own running + waiting from its /metrics); a decision of
  ``none`` with no plain replica free goes to the least loaded replica of any
  configuration (speculative decoding is lossless). The decision carries the replica's
  own k. A request with a ``logit_bias`` or a ``min_p`` goes to a plain replica only: vLLM
  refuses both under speculative decoding ("not yet supported"), so without a plain
  replica in the fleet it is refused (INVALID_ARGUMENT) before any replica is asked.
- **Failures**: a replica that fails (connection, timeout, 5xx, a broken stream) is taken
  out and probed until it is back; the request goes on on another replica, from the
  tokens already received (prompt + output so far), so no request is lost (over the
  in-flight bound when every other healthy replica is at it).
- **Learning**: vLLM's per-request speculation metrics, through the same policy update
  as Report (``router.fleet.learning``); plain replicas measure t_ar, the time per token
  without speculation, which prices the model drafters' drafting. So that t_ar exists
  and stays current when the policy never chooses ``none`` (speculation pays
  everywhere), a Generate the policy sent to a speculative configuration goes to a
  plain replica instead when no t_ar is measured yet or PLAIN_REFERENCE_EVERY
  speculative answers have been learnt since the last plain one (one request in 64).
  After a greedy request the fleet's other drafters are scored on
  its output, as in-process (counterfactual updates).
- **Capture**: with ``[capture]`` on, each finished request's prompt and the replica's
  output (the target's verified output) are stored as in-process (``router.capture``).
- **Reload**: the fleet file is read again while serving, and replicas added, removed or
  changed without a restart (``router.fleet.reload``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp

from drafters.detokenize import IncrementalDetokenizer, push_until_stop
from router.domain import GenerateInput, Sampling
from router.errors import (
    CutByStopError,
    GenerationFailedError,
    InvalidFieldError,
    InvalidRequestError,
    NotFoundError,
    OverloadedError,
    RequestFailsReplicasError,
    UnavailableError,
)
from router.fleet.client import (
    Delta,
    PromptScored,
    ReplicaBusyError,
    ReplicaFailedError,
    ReplicaRefusedError,
    StreamEnd,
    completion_body,
    with_prompt_scored,
)
from router.fleet.client import stream_completion as replica_stream
from router.fleet.config import FleetSpec, replica_api_keys, replica_tls
from router.fleet.learning import (
    Timing,
    engine_decode_time,
    engine_request_time,
    outcome_from_replica,
    request_steps,
    speculation_problem,
)
from router.fleet.reload import apply_settings, check_new_fleet, plan_change, watch_fleet_file
from router.fleet.replica import TOKENIZER_PROBE, Replica, watch
from router.policy.base import NONE_DRAFTER, DrafterHints
from router.service import (
    Components,
    GenerationResult,
    PromptScores,
    RouteBatch,
    RoutedRequest,
    RouterService,
    TokenChunk,
)
from router.settings import Settings

logger = logging.getLogger(__name__)

PLAIN_TIME_EWMA = 0.1  # weight of a new plain time per token in t_ar's running estimate
#: A plain reference request after this many learnt speculative answers (module doc).
PLAIN_REFERENCE_EVERY = 64


def generation_stats(
    drafted_per_step: Sequence[int],
    accepted_per_step: Sequence[int],
    timing: Timing,
    prompt_tokens: int,
    generated_tokens: int,
    finish_reason: str,
) -> Any:
    """The engine's ``GenerationStats`` for a replica's answer: vLLM's steps (drafted as
    asked: it has no per-step draft stopping), its decode time as the verify time (it does
    not split drafting from verifying), the router's measured wall time."""
    from drafters.stats import GenerationStats

    stats = GenerationStats(prompt_tokens=prompt_tokens, generated_tokens=generated_tokens)
    for drafted, accepted in zip(drafted_per_step, accepted_per_step, strict=True):
        stats.observe_step(
            requested=drafted,
            drafted=drafted,
            accepted=accepted,
            draft_time_s=0.0,
            verify_time_s=0.0,
        )
    stats.verify_time_s = timing.decode_time_s
    stats.wall_time_s = timing.wall_time_s
    stats.finish_reason = finish_reason
    return stats


def _checked_sampling(request: GenerateInput) -> None:
    """What the replicas cannot do: vLLM has no typical-p sampling (TGI's ``typical_p``),
    and dropping it would sample another distribution than asked; nor a per-step draft
    stopping rule (``force_stop_threshold`` was ignored), nor drafts from a predicted
    output (OpenAI's ``prediction``: the text would be the same without it, the speed
    the caller counts on not)."""
    sampling = request.route.sampling
    if sampling.do_sample and sampling.typical_p != 1.0:
        raise InvalidFieldError(
            "sampling.typical_p", "vLLM replicas do not implement typical-p sampling (1.0: off)"
        )
    if request.force_stop_threshold is not None:
        raise InvalidFieldError(
            "force_stop_threshold",
            "vLLM replicas have no per-step draft stopping rule (each drafts its own k)",
        )
    if request.prediction is not None:
        raise InvalidFieldError("prediction", "vLLM replicas do not draft from a predicted output")


def continued_sampling(sampling: Sampling, emitted: int) -> Sampling:
    """``sampling`` for a replica that goes on after ``emitted`` tokens of another, which it
    reads as prompt: ``min_tokens`` less those. A grammar cannot be taken up part-way
    (vLLM's structured output starts at the first token it generates, so the rest would
    not fit what came): such a request fails over before its first token only, and after
    it ends with an error instead of an answer that breaks its grammar. Presence and
    frequency penalties and bad words then count the new replica's tokens only (vLLM's
    count output tokens, not prompt tokens): the answer goes on, under penalties that
    forget what came before."""
    if emitted == 0:
        return sampling
    if sampling.structured_output is not None:
        raise GenerationFailedError(
            f"the request's replica failed after {emitted} tokens, and a request under "
            "structured output cannot go on on another replica (vLLM would start the "
            "grammar again after them)"
        )
    return replace(sampling, min_tokens=max(0, sampling.min_tokens - emitted))


def plain_only(sampling: Sampling) -> bool:
    """Whether only a replica without speculation can serve these parameters: vLLM (0.32)
    refuses ``logit_bias`` and ``min_p`` with speculative decoding."""
    return bool(sampling.logit_bias) or (sampling.do_sample and sampling.min_p > 0)


@dataclass
class _Progress:
    """One generation across its attempts: the tokens received so far (and each one's
    text, ``detokenizer``), and the last attempt's replica, timing and answer."""

    output_ids: list[int]
    texts: list[str]
    detokenizer: IncrementalDetokenizer
    stopped: bool = False  # the text reached a stop string
    scored_prompt: bool = False  # the prompt's logprobs were passed on (asked for)
    attempts: int = 0
    end: StreamEnd | None = None
    timing: Timing | None = None
    started: float = field(default_factory=time.perf_counter)  # the whole request's start


class FleetRouterService(RouterService):
    """RouterService whose generations run on a vLLM fleet (module doc)."""

    def __init__(
        self,
        settings: Settings,
        components: Components,
        store: Any,
        metrics: Any,
        fleet: FleetSpec,
        fleet_content: bytes = b"",
    ) -> None:
        super().__init__(settings, components, store, metrics)
        self.fleet = fleet
        self._fleet_content = fleet_content  # the file's content ``fleet`` was read from
        keys = replica_api_keys(fleet, source=f"fleet file {settings.fleet_file}")
        self._probe_ids = tuple(self.tokenizer.encode(TOKENIZER_PROBE, add_special_tokens=False))
        self.replicas = [
            Replica.from_spec(spec, fleet, keys[spec.name], self._probe_ids)
            for spec in fleet.replicas
        ]
        self.model_names = [fleet.model]
        self._special_ids = frozenset(int(i) for i in self.tokenizer.all_special_ids)
        self._session: aiohttp.ClientSession | None = None
        # Each replica's probe loop, by replica name; and the fleet file's reader.
        self._watchers: dict[str, asyncio.Task[None]] = {}
        self._reloader: asyncio.Task[None] | None = None
        self._cut: CutByStopError | None = None  # set when a stop's grace ran out
        self._reloads: Any = None  # specroute_fleet_reloads_total, once started
        self.plain_token_time_s: float | None = None
        self.speculative_since_plain = 0  # learnt speculative answers since the last plain

    def drafter_hints(self) -> DrafterHints:
        """As without a fleet, except that vLLM reports drafting and verifying as one
        step time, so the fleet's drafters are hinted no separate drafting cost: a prior,
        until the split of a model drafter's answers measures its cost
        (``router.fleet.learning``); and each drafter is served at its replicas' k only,
        so the policy prices and chooses it at that k."""
        hints = super().drafter_hints()
        offered = [d for d in self.fleet.drafters() if d != NONE_DRAFTER]
        no_cost = dict.fromkeys(offered, 0.0)
        return replace(
            hints,
            draft_cost_ratio={**hints.draft_cost_ratio, **no_cost},
            draft_length={**hints.draft_length, **{d: self.fleet.draft_length(d) for d in offered}},
        )

    # -- lifecycle (on the event loop) -------------------------------------------------
    async def start_fleet(self) -> None:
        """Open the HTTP client and start probing every replica; the first probes are
        awaited, so replicas that answer serve at once (the others are routed around)."""
        tls = replica_tls(self.fleet, f"fleet file {self.settings.fleet_file}")
        # An idle connection is dropped before vLLM's uvicorn (5 s keep-alive) closes it:
        # a POST on a connection the server has just closed fails, and aiohttp does not
        # retry a POST. vLLM sends the prompt's token ids back in one SSE line: a read
        # buffer of 4 MiB takes lines up to 8 MiB (about a million tokens).
        connector = aiohttp.TCPConnector(
            limit=0, ssl=tls if tls is not None else True, keepalive_timeout=4.0
        )
        self._session = aiohttp.ClientSession(connector=connector, read_bufsize=4 * 2**20)
        from router.fleet.metrics import FleetCollector, reloads_counter
        from router.fleet.replica import probe

        self.metrics.registry.register(FleetCollector(lambda: self.replicas))
        self._reloads = reloads_counter(self.metrics.registry)

        await asyncio.gather(
            *(probe(self._session, r, self.fleet.probe_timeout_s) for r in self.replicas)
        )
        down = [r.name for r in self.replicas if not r.healthy]
        if down:
            logger.warning("fleet: not serving yet (probed until they are): %s", down)
        logger.info("fleet: %s", [r.describe() for r in self.replicas])
        for replica in self.replicas:
            self._watch(replica)
        if self.fleet.reload_interval_s > 0 and self.settings.fleet_file is not None:
            self._reloader = asyncio.create_task(
                watch_fleet_file(
                    Path(self.settings.fleet_file),
                    self._fleet_content,
                    lambda: self.fleet.reload_interval_s,
                    self.reload_fleet,
                    self._reload_refused,
                )
            )

    def _watch(self, replica: Replica) -> None:
        """Start probing ``replica`` (``watch``), with the fleet's settings of the moment."""
        assert self._session is not None
        watcher = watch(self._session, replica, lambda: self.fleet)
        self._watchers[replica.name] = asyncio.create_task(watcher)

    async def aclose(self) -> None:
        tasks = [*self._watchers.values(), *([self._reloader] if self._reloader else [])]
        await _cancelled(tasks)
        if self._session is not None:
            await self._session.close()

    async def reload_fleet(self, new: FleetSpec) -> None:
        """Serve the fleet ``new`` in place of the current one (``router.fleet.reload``);
        ``FleetConfigError`` when it cannot be, nothing changed."""
        source = f"fleet file {self.settings.fleet_file}"
        keys = check_new_fleet(self.fleet, new, self.drafters.names(), source)
        change = plan_change(self.replicas, new, keys, self._probe_ids)
        apply_settings(change, new, keys)
        arms = {d: new.draft_length(d) for d in new.drafters()}
        rehint = arms != {d: self.fleet.draft_length(d) for d in self.fleet.drafters()}
        self.fleet, self.replicas = new, change.replicas
        removed = (self._watchers.pop(replica.name, None) for replica in change.removed)
        await _cancelled([watcher for watcher in removed if watcher is not None])
        for replica in change.added:
            self._watch(replica)
        if rehint:
            self.policy.hints_changed()
        if self._reloads is not None:
            self._reloads.labels(outcome="applied").inc()
        logger.info("%s reloaded: %s", source, change.summary())
        for replica in change.removed:
            if replica.in_flight:
                logger.info(
                    "replica %s: its %d request(s) in flight finish there",
                    replica.name,
                    replica.in_flight,
                )

    def _reload_refused(self, reason: str) -> None:
        logger.error("%s; the fleet stays as it was", reason)
        if self._reloads is not None:
            self._reloads.labels(outcome="refused").inc()

    # -- decisions ---------------------------------------------------------------------
    def eligible_drafters(self) -> list[str]:
        """The fleet's drafters with a replica free (``none`` is the policy's k = 0)."""
        live = set(self.drafters.eligible())
        free = {r.drafter for r in self.replicas if r.available}
        return [d for d in self.fleet.drafters() if d in free and d in live]

    def _decide_routes(self, requests: Sequence[Any], prepared: RouteBatch) -> RouteBatch:
        """Route in fleet mode: the policy's decisions, each placed on a replica (its URL
        in the answer, and the replica's own k in the decision); nothing is reserved, since
        the caller forwards the request itself."""
        prepared = super()._decide_routes(requests, prepared)
        for index, result in enumerate(prepared.results):
            if isinstance(result, RoutedRequest):
                plain = plain_only(requests[index].sampling)
                placed = self._place(result, frozenset(), plain_only=plain)
                if placed is not None:
                    prepared.results[index] = self._registered(placed[0])
        return prepared

    def _with_plain_reference(self, routed: RoutedRequest, request: GenerateInput) -> RoutedRequest:
        """``routed`` sent to a plain replica when t_ar is missing or stale (module doc,
        "Learning"); a request that is pinned, not learnt from, or already plain is left
        as it is, and so is any when no plain replica is free."""
        if (
            request.no_update
            or request.force_drafter
            or request.force_draft_length is not None
            or routed.decision.drafter == NONE_DRAFTER
        ):
            return routed
        current = self.plain_token_time_s is not None
        if current and self.speculative_since_plain < PLAIN_REFERENCE_EVERY:
            return routed
        if not any(r.available and r.drafter == NONE_DRAFTER for r in self.replicas):
            return routed
        from router.policy.base import Decision

        return replace(routed, decision=Decision(NONE_DRAFTER, 0, 1.0, True))

    def _place(
        self,
        routed: RoutedRequest,
        tried: frozenset[str],
        *,
        failover: bool = False,
        pinned: bool = False,
        plain_only: bool = False,
    ) -> tuple[RoutedRequest, Replica] | None:
        """The replica for ``routed`` (module doc, "Placement"), skipping ``tried``; None
        when no replica is free. A ``failover`` (the request's replica failed under it)
        goes over the in-flight bound when every other healthy replica is at it: the
        bound is ours (vLLM queues), and refusing would lose a request already started.
        A ``pinned`` drafter (``force_drafter``) has a replica of its own or none (it was
        served by the policy's next best configuration instead), unless in a failover.
        ``plain_only``: a replica without speculation or none (``plain_only()``)."""
        from router.policy.base import Decision

        healthy = [
            r
            for r in self.replicas
            if r.healthy and r.name not in tried and (not plain_only or r.drafter == NONE_DRAFTER)
        ]
        free = [r for r in healthy if not r.saturated] or (healthy if failover else [])
        if not free:
            return None
        decision = routed.decision
        if plain_only and decision.drafter != NONE_DRAFTER:
            decision = Decision(NONE_DRAFTER, 0, 1.0, decision.explored)
        same = [r for r in free if r.drafter == decision.drafter]
        if not same and pinned and not failover and decision.drafter != NONE_DRAFTER:
            return None
        if not same and decision.drafter != NONE_DRAFTER:
            # The chosen configuration has no replica free: the policy's next best.
            offered = list(dict.fromkeys(r.drafter for r in free if r.drafter != NONE_DRAFTER))
            decision, _ = self.policy.select(routed.context, offered)
            same = [r for r in free if r.drafter == decision.drafter]
        if not same:
            same = [r for r in free if r.drafter == NONE_DRAFTER] or free
        replica = min(same, key=lambda r: (r.load, r.served))
        placed = Decision(
            replica.drafter,
            replica.spec.draft_length,
            decision.expected_speedup if replica.drafter == decision.drafter else float("nan"),
            decision.explored,
        )
        return replace(routed, decision=placed, replica=replica.spec.url), replica

    def _registered(self, placed: RoutedRequest) -> RoutedRequest:
        """``placed`` with the registration of the drafter it was placed on (placement may
        change the policy's drafter), which its outcome is learnt for."""
        return replace(placed, drafter_serial=self.drafters.serial(placed.decision.drafter))

    def generation_problem(self) -> str | None:
        """Why no Generate can run now: the sidecar stopping, or no replica of the fleet
        serving (None otherwise)."""
        stopping = super().generation_problem()
        if stopping is not None or any(r.healthy for r in self.replicas):
            return stopping
        return str(self._unavailable())

    def cut_generations(self, grace_s: float) -> int:
        """Cut every replica stream still open when a stop's grace has run out (vLLM aborts
        a request whose connection closes); each of their requests fails with
        :class:`CutByStopError`, not retried on another replica."""
        self._cut = CutByStopError(grace_s)
        streams = [stream for replica in self.replicas for stream in replica.streams]
        for stream in streams:
            stream.cut("the sidecar is stopping")
        return len(streams)

    def _unavailable(
        self, busy: Sequence[str] = (), pinned: str = "", failures: Sequence[str] = ()
    ) -> Exception:
        """Why a request finds no replica. No replica serving is UNAVAILABLE, which
        clients retry, unless the request already failed on a replica it reached: it may
        be what makes them fail, so that stays INTERNAL (not retried)."""
        healthy = [r for r in self.replicas if r.healthy]
        if busy:
            return OverloadedError(f"every replica tried is busy: {'; '.join(busy)}")
        if pinned and pinned != NONE_DRAFTER and healthy:
            return OverloadedError(
                f"no replica of the pinned drafter {pinned!r} is free (force_drafter); "
                "retry later, or leave the choice to the policy"
            )
        if healthy:
            return OverloadedError(
                f"every serving replica is at its in-flight bound ({len(healthy)} replicas)"
            )
        reasons = "; ".join(f"{r.name}: {r.last_error or 'not probed yet'}" for r in self.replicas)
        if failures:
            return RequestFailsReplicasError(
                f"no replica of the fleet is serving ({reasons}) after the request failed on "
                f"{'; '.join(failures)}"
            )
        return UnavailableError(f"no replica of the fleet is serving ({reasons})")

    def _checked_plain(self, request: GenerateInput) -> bool:
        """Whether ``request`` needs a plain replica (``plain_only()``); refused when the
        fleet has none, or when it pins a speculative configuration."""
        if not plain_only(request.route.sampling):
            return False
        field = "sampling.logit_bias" if request.route.sampling.logit_bias else "sampling.min_p"
        name = field.removeprefix("sampling.")
        if not any(r.drafter == NONE_DRAFTER for r in self.replicas):
            raise InvalidFieldError(
                field,
                f"vLLM refuses {name} under speculative decoding and this fleet has no "
                'replica without it (speculative = "none")',
            )
        if request.force_drafter not in ("", NONE_DRAFTER):
            raise InvalidFieldError(
                field,
                f"vLLM refuses {name} under speculative decoding: it cannot run on "
                f"{request.force_drafter!r} (force_drafter)",
            )
        return True

    def _checked_force(self, request: GenerateInput) -> None:
        forced = request.force_drafter
        # "none" is always served: without a plain replica, by any (speculation is lossless).
        if forced and forced != NONE_DRAFTER and forced not in self.fleet.drafters():
            raise NotFoundError(
                f"no replica of the fleet runs drafter {forced!r}; fleet: {self.fleet.drafters()}"
            )
        k = request.force_draft_length
        if not k or forced == NONE_DRAFTER:
            return
        # A replica drafts at its own k: a k no replica (of the pinned drafter) runs at
        # cannot be served, and serving another would report and learn a k not asked for.
        served = {d: self.fleet.draft_length(d) for d in self.fleet.drafters() if d != NONE_DRAFTER}
        if not any(served[d] == k for d in ([forced] if forced else served)):
            whose = f"drafter {forced!r}" if forced else "the fleet"
            raise InvalidFieldError(
                "force_draft_length",
                f"{k}: no replica of {whose} drafts {k} tokens (a replica drafts at the k of "
                f"its fleet-file entry: {served})",
            )

    def _eligible_at(self, k: int | None) -> list[str]:
        """The drafters a ``force_draft_length`` of ``k`` leaves the policy: those whose
        replicas draft ``k`` tokens."""
        eligible = self.eligible_drafters()
        return eligible if not k else [d for d in eligible if self.fleet.draft_length(d) == k]

    # -- generation --------------------------------------------------------------------
    @property
    def max_concurrent_requests(self) -> int:
        """The replicas' in-flight bounds together: with every replica at its bound, a
        request is refused (the sidecar's own generation queue is not used)."""
        return sum(replica.max_in_flight for replica in self.replicas)

    @property
    def context_tokens(self) -> int | None:
        """The smallest context of the target's and the replicas' (vLLM's max_model_len,
        as their /v1/models reports it): a request that fits it fits whichever replica
        serves it, failovers included; vLLM would otherwise shorten its output without a
        word (its max_tokens cut to what the context leaves)."""
        known = [r.max_model_len for r in self.replicas if r.max_model_len is not None]
        if self._target_context is not None:
            known.append(self._target_context)
        return min(known, default=None)

    @property
    def ranks_prompt_tokens(self) -> bool:
        """No: the prompt's logprobs come from vLLM's echo, whose alternatives are the
        top ones only, not each token's rank in the vocabulary."""
        return False

    def free_generation_places(self) -> int:
        """The serving replicas' free places under their in-flight bounds now."""
        return sum(
            max(0, replica.max_in_flight - replica.in_flight)
            for replica in self.replicas
            if replica.healthy
        )

    async def generate(self, request: GenerateInput) -> AsyncIterator[Any]:
        """:meth:`_generate`, counted in ``specroute_generation_queue_depth`` (generations
        admitted and not finished) as the in-process engine's are."""
        self.metrics.queue_depth.inc()
        try:
            async with contextlib.aclosing(self._generate(request)) as items:
                async for item in items:
                    yield item
        finally:
            self.metrics.queue_depth.dec()

    async def _generate(self, request: GenerateInput) -> AsyncGenerator[Any, None]:
        """Yield the placed :class:`RoutedRequest` (once a replica has produced the first
        token, so a request refused or failed everywhere is a plain error), then
        :class:`TokenChunk` s, then the :class:`GenerationResult`."""
        self._checked_force(request)
        _checked_sampling(request)
        plain = self._checked_plain(request)
        routed = await self._route(
            request.route,
            force_drafter=NONE_DRAFTER if plain else request.force_drafter,
            force_k=request.force_draft_length,
        )
        request = self.fitted(request, routed.prompt_tokens)
        routed = self._with_plain_reference(routed, request)
        detokenizer = IncrementalDetokenizer(
            self.tokenizer, request.route.sampling.skip_special_tokens
        )
        progress = _Progress([], [], detokenizer)
        tried: set[str] = set()
        failures: list[str] = []
        failed_over = False  # a replica failed under it, reached or not
        busy: list[str] = []
        announced: RoutedRequest | None = None
        placed = routed
        while True:
            found = self._place(
                routed,
                frozenset(tried),
                failover=failed_over,
                pinned=bool(request.force_drafter or request.force_draft_length),
                plain_only=plain,
            )
            if found is None:
                raise self._unavailable(busy, request.force_drafter, failures)
            placed, replica = found
            placed = self._registered(placed)
            progress.attempts += 1
            replica.in_flight += 1
            try:
                attempt = self._attempt(placed, replica, request, progress)
                async with contextlib.aclosing(attempt) as items:
                    async for item in items:
                        if announced is None:
                            announced = placed
                            self._count_decision(placed)
                            yield placed
                        yield item
                replica.served_request()
                break
            except ReplicaBusyError as error:
                # Healthy and shedding load: not taken out, and no failure of the request.
                tried.add(replica.name)
                busy.append(f"{replica.name}: {error}")
                logger.info(
                    "request %s: replica %s is busy (%s)", routed.request_id, replica.name, error
                )
            except ReplicaFailedError as error:
                if self._cut is not None:
                    raise self._cut from error
                replica.failed_request(str(error), self.fleet.health_interval_s)
                tried.add(replica.name)
                failed_over = True
                if error.reached:
                    failures.append(f"{replica.name}: {error}")
                if len(failures) >= self.fleet.max_replica_failures:
                    logger.error(
                        "request %s failed on %d replicas; not retried further",
                        routed.request_id,
                        len(failures),
                    )
                    raise RequestFailsReplicasError(
                        f"the request failed on {len(failures)} replicas and is not retried "
                        f"further (it may be what makes them fail): {'; '.join(failures)}"
                    ) from error
                logger.warning(
                    "request %s: replica %s failed after %d tokens (%s); going on elsewhere",
                    routed.request_id,
                    replica.name,
                    len(progress.output_ids),
                    error,
                )
            finally:
                replica.in_flight -= 1
        if announced is None:  # the replica answered without a token (e.g. max_tokens 0)
            announced = placed
            self._count_decision(placed)
            yield placed
        result = self._result(placed, replica, request, progress)
        if not request.no_update:
            self._learn_from_replica(result, replica, progress)
            if request.route.sampling.greedy and result.output_ids:
                # The verified output is the target's greedy output whichever replica ran:
                # the fleet's other drafters are scored on it here (in-process drafters,
                # off the request path, within limits.counterfactual_budget_s).
                self._offload_counterfactuals(result)
        if self.capture is not None:
            # The replica's output is the target's verified output: kept for distillation
            # like an in-process one, off the event loop.
            self._learner.submit(self._capture, result)
        yield result

    async def _attempt(
        self,
        placed: RoutedRequest,
        replica: Replica,
        request: GenerateInput,
        progress: _Progress,
    ) -> AsyncGenerator[TokenChunk | PromptScores, None]:
        """One replica's stream, continuing from ``progress`` (its TokenChunks, and the
        prompt's scores first where asked for: vLLM's echo)."""
        assert self._session is not None, "start_fleet() was not awaited"
        remaining = request.route.max_new_tokens - len(progress.output_ids)
        body = completion_body(
            replica.spec.model,
            [*placed.prompt_ids, *progress.output_ids],
            remaining,
            continued_sampling(
                self.served_sampling(request.route.sampling), len(progress.output_ids)
            ),
            request.logprobs,
        )
        if request.prompt_logprobs is not None and not progress.scored_prompt:
            # Only before the first token: once output came the prompt was scored (vLLM's
            # echo comes with it) and a later attempt's prompt holds that output too.
            body = with_prompt_scored(body, request.prompt_logprobs)
        started = time.perf_counter()
        first: float | None = None
        received = 0
        # The attempt's number keeps the id unique per replica call: a retry may land where
        # an earlier attempt still runs, and vLLM without its request-id randomisation
        # (VLLM_DISABLE_REQUEST_ID_RANDOMIZATION, older versions) fails on duplicates.
        request_id = f"{placed.request_id}-{progress.attempts}"
        stream = replica_stream(
            self._session, replica, body, self.fleet.connect_timeout_s, request_id, request.trace
        )
        try:
            async with contextlib.aclosing(stream) as events:
                async for event in events:
                    if isinstance(event, StreamEnd):
                        progress.end = event
                        continue
                    if isinstance(event, PromptScored):
                        if not progress.scored_prompt:
                            progress.scored_prompt = True
                            yield self._prompt_scored(event, request.prompt_logprobs or 0)
                        continue
                    if request.logprobs is None:
                        event = replace(event, logprobs=None)  # asked for the prompt's only
                    elif body.get("echo") and event.logprobs is not None:
                        top = request.logprobs  # the echo's count may be larger
                        event = replace(
                            event, logprobs=tuple((lp, alt[:top]) for lp, alt in event.logprobs)
                        )
                    first = first if first is not None else time.perf_counter()
                    received += len(event.token_ids)
                    yield self._chunk(event, progress, request.route.sampling.stop)
                    if progress.stopped and progress.attempts > 1 and not event.finish_reason:
                        # A stop string begun on an earlier replica: this one never saw its
                        # start and would generate on, unseen, to max_tokens.
                        progress.end = StreamEnd("stop_sequence", {}, received)
                        break
        except ReplicaRefusedError as error:
            raise InvalidRequestError(
                f"replica {replica.name} refused the request: {error}"
            ) from error
        now = time.perf_counter()
        streamed = now - first if first is not None else 0.0
        metrics = progress.end.metrics if progress.end is not None else None
        decode = engine_decode_time(metrics, streamed)
        progress.timing = Timing(
            wall_time_s=now - started,
            decode_time_s=decode,
            generated_tokens=received,
            engine_time_s=engine_request_time(metrics, decode),
        )

    def _prompt_scored(self, scored: PromptScored, top: int) -> PromptScores:
        """vLLM's echoed prompt logprobs with the texts the sidecar gives tokens."""
        pairs = [(lp, alternatives[:top]) for lp, alternatives in scored.scored]
        return self.prompt_scores(scored.token_ids, pairs)

    def _chunk(self, delta: Delta, progress: _Progress, stops: Sequence[str]) -> TokenChunk:
        """The replica's tokens with each one's text, decoded here once as the in-process
        engine decodes (``drafters.engine``): vLLM sends a chunk's text (several tokens'
        once a draft is accepted, held back while it may be a stop string's start), not
        each token's. The text ends at a stop string's end, and the last token of a run
        that ends on its length or EOS releases a character left incomplete, as in-process;
        the generated text is these texts joined."""
        ids = delta.token_ids
        scored = delta.logprobs
        texts: list[str] = []
        if not progress.stopped:  # nothing after a stop string (vLLM ends there)
            texts, stopped = push_until_stop(progress.detokenizer, ids, (), stops)
            progress.stopped = stopped is not None
            if progress.stopped:
                # The tokens up to the one that ends the stop string, as in-process: after a
                # failover the replica never saw the string's start and went on past it.
                ids = ids[: len(texts)]
                scored = scored[: len(texts)] if scored is not None else None
        texts += [""] * (len(ids) - len(texts))
        if delta.finish_reason in ("length", "eos_token"):
            texts[-1] += progress.detokenizer.flush()
        text = "".join(texts)
        progress.output_ids.extend(ids)
        progress.texts.append(text)
        return TokenChunk(
            token_ids=ids,
            token_texts=tuple(texts),
            special=tuple(i in self._special_ids for i in ids),
            text=text,
            logprobs=self.token_texts.scored(ids, scored) if scored is not None else None,
        )

    def _result(
        self,
        placed: RoutedRequest,
        replica: Replica,
        request: GenerateInput,
        progress: _Progress,
    ) -> GenerationResult:
        end = progress.end or StreamEnd("length")
        timing = progress.timing or Timing(0.0, 0.0, 0)
        spec = end.metrics.get("speculative_decoding")
        # vLLM's metrics are the last replica's: its steps made the tokens it streamed (an
        # earlier replica's tokens are not steps of this one that drafted nothing).
        drafted, accepted = (
            request_steps(spec, timing.generated_tokens) if isinstance(spec, Mapping) else ([], [])
        )
        stats = generation_stats(
            drafted,
            accepted,
            timing,
            placed.prompt_tokens,
            len(progress.output_ids),
            end.finish_reason,
        )
        if progress.attempts > 1:
            # The tokens are every replica's, so is the time (the steps are the last one's):
            # tokens per second over the last attempt's time alone overstated it.
            stats.wall_time_s = time.perf_counter() - progress.started
            logger.info(
                "request %s served by %d replicas, %s last",
                placed.request_id,
                progress.attempts,
                replica.name,
            )
        self.metrics.generated_tokens.inc(stats.generated_tokens)
        self.metrics.generations.labels(finish_reason=stats.finish_reason).inc()
        self.metrics.generation_tokens_per_s.observe(stats.tokens_per_s)
        return GenerationResult(
            placed,
            tuple(progress.output_ids),
            "".join(progress.texts),
            stats,
            self.policy.version,
            request.route.sampling.seed,
        )

    def _learn_from_replica(
        self, result: GenerationResult, replica: Replica, progress: _Progress
    ) -> None:
        """The policy update from the last replica's answer (``router.fleet.learning``).
        Metrics that do not add up (more accepted than drafted tokens, a field that is not
        a number: another vLLM version's meaning, a bug) are not learnt from, and the
        answer is served as it is: they failed the request that had been generated whole
        (INTERNAL)."""
        if progress.timing is None or progress.end is None:
            return
        timing, metrics = progress.timing, progress.end.metrics
        k = replica.spec.draft_length
        if k == 0 and timing.token_time_s is not None:
            self._observe_plain(timing.token_time_s)
        elif k > 0:
            self.speculative_since_plain += 1
        try:
            replica.answered_as(speculation_problem(k, metrics))
            split_cost = self._draft_cost_unknown(replica.drafter)
            outcome = outcome_from_replica(k, metrics, timing, self.plain_token_time_s, split_cost)
        except (ValueError, TypeError) as error:
            replica.answered_as(f"its speculation metrics do not add up ({error}); not learnt from")
            return
        if outcome is None:
            logger.debug("request %s: nothing to learn yet", result.routed.request_id)
            return
        routed = result.routed
        if not self._still_registered(routed):
            return
        self.policy.update(routed.context, routed.decision, outcome)
        self._count_outcome(routed, outcome, "fleet")

    def _draft_cost_unknown(self, name: str) -> bool:
        """True when ``name``'s kind states no drafting cost (a model drafter), so its
        steps' time is split to measure it (``router.fleet.learning``)."""
        from drafters import draft_cost_hint

        try:
            return draft_cost_hint(self.drafters.get(name).drafter) is None
        except NotFoundError:
            return True

    def _observe_plain(self, token_time_s: float) -> None:
        self.speculative_since_plain = 0
        previous = self.plain_token_time_s
        self.plain_token_time_s = (
            token_time_s
            if previous is None
            else (1 - PLAIN_TIME_EWMA) * previous + PLAIN_TIME_EWMA * token_time_s
        )


async def start_fleet_service(
    settings: Settings, components: Components, store: Any, metrics: Any
) -> FleetRouterService:
    """The fleet-mode service, started: drafters and policy as in-process, then the fleet
    probed (``settings.fleet_file``)."""
    from router.fleet.config import check_fleet_drafters, fleet_from_bytes, read_fleet_file

    assert settings.fleet_file is not None
    content = read_fleet_file(settings.fleet_file)
    fleet = fleet_from_bytes(content, settings.fleet_file)
    service = FleetRouterService(settings, components, store, metrics, fleet, content)
    try:
        await asyncio.to_thread(service.start)
        check_fleet_drafters(fleet, service.drafters.names(), str(settings.fleet_file))
        await service.start_fleet()
    except BaseException:
        await service.close_after_failed_start()
        raise
    return service


async def _cancelled(tasks: Sequence[asyncio.Task[None]]) -> None:
    """Cancel ``tasks`` and wait until they have ended."""
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
