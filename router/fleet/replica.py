"""One replica's live state: health, in-flight requests, vLLM's own queue; and the loop
that probes it.

A replica starts out of service until its first health check passes. A request that
fails on it, or a failed health check, takes it out; it is probed every
``health_interval_s`` until ``GET /health`` answers 200 again. While healthy its
``/metrics`` are read every ``metrics_interval_s`` for ``vllm:num_requests_running`` and
``vllm:num_requests_waiting``.

Before a replica is brought back (at start, and after each failure) ``GET /v1/models``
must list the fleet file's model and accept the sidecar's API key, and ``POST /tokenize``
must read a probe text as the sidecar's target tokenizer does: a typo in ``model``, a
wrong key, or a replica serving a model of another vocabulary (which would turn the token
ids the sidecar sends into garbage, silently) keeps the replica out with the reason. A
server whose routes answer anything but 200 with the expected JSON (a missing route, another
error) is taken at its word, except a 401 or 403 on ``/v1/models``, which keeps it out.

A health check that fails also cuts the replica's streams that have sent nothing for as
long as the check waited (:meth:`Replica.cut_silent_streams`): a replica that hangs
(a stopped process, a wedged engine) still accepts connections, and its requests would
otherwise wait ``request_timeout_s`` before going on elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from router.fleet.config import FleetSpec, ReplicaSpec

logger = logging.getLogger(__name__)

# Read by the replica's tokenizer and the sidecar's before a replica serves: words, digits,
# punctuation, accents and an emoji, so that another vocabulary or normalisation shows.
TOKENIZER_PROBE = "specroute probe: Ünïcödé café, 12345 + 67 = ?\n\tdef f(x): return x 🙂"

# A Prometheus sample line: name, optional {labels}, value.
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")
RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"

# A replica whose requests fail in a row is held out for its health interval, doubled at
# each failure, at most 2**5 = 32 intervals (64 s at the default 2 s).
HOLD_DOUBLINGS = 5


class StreamCutError(Exception):
    """The replica's health check failed while this stream waited: the message says why."""


@dataclass(eq=False)
class OpenStream:
    """A completion request to the replica, from when it is sent until its stream is read
    to the end: when its last byte came, and the response once its headers have."""

    last_byte: float = field(default_factory=time.monotonic)
    response: aiohttp.ClientResponse | None = None
    cut_reason: str = ""
    _cut: asyncio.Event = field(default_factory=asyncio.Event)

    async def until_cut(self, call: Awaitable[aiohttp.ClientResponse]) -> aiohttp.ClientResponse:
        """``call``'s response, unless the stream is cut first (:class:`StreamCutError`;
        ``call`` is cancelled, or its response closed): the wait for its headers."""
        task = asyncio.ensure_future(call)
        cut = asyncio.ensure_future(self._cut.wait())
        try:
            await asyncio.wait((task, cut), return_when=asyncio.FIRST_COMPLETED)
        finally:
            cut.cancel()
            if not task.done():
                task.cancel()
                # Its outcome is not wanted; read it so that none is reported as lost.
                task.add_done_callback(lambda t: t.cancelled() or t.exception())
        if not task.done():
            raise StreamCutError(self.cut_reason)
        response = task.result()  # the call's own error, if it failed
        if self.cut_reason:  # cut as its headers came
            response.close()
            raise StreamCutError(self.cut_reason)
        return response

    def cut(self, reason: str) -> None:
        """End the stream with an error: the wait for its headers raises
        :class:`StreamCutError`, a read of its body ``aiohttp.ClientConnectionError``."""
        self.cut_reason = reason
        self._cut.set()
        if self.response is not None:
            self.response.close()


def queue_from_metrics(text: str) -> tuple[float, float]:
    """(running, waiting) summed over the samples of vLLM's two gauges in a scrape."""
    totals = {RUNNING: 0.0, WAITING: 0.0}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is not None and match.group(1) in totals:
            try:
                totals[match.group(1)] += float(match.group(3))
            except ValueError:
                continue
    return totals[RUNNING], totals[WAITING]


@dataclass
class Replica:
    """A replica and what the router knows of it now (touched on the event loop only)."""

    spec: ReplicaSpec
    max_in_flight: int
    timeout_s: float
    healthy: bool = False
    in_flight: int = 0
    running: float = 0.0  # vLLM's own count, from /metrics
    waiting: float = 0.0
    served: int = 0
    failures: int = 0
    last_error: str = ""
    # Sent on every call to the replica: its API key, if it has one (never shown).
    headers: dict[str, str] = field(default_factory=dict, repr=False)
    # TOKENIZER_PROBE's ids by the sidecar's target tokenizer (empty: not checked).
    probe_ids: tuple[int, ...] = ()
    # Completion requests sent and not yet read to the end.
    streams: set[OpenStream] = field(default_factory=set, repr=False)
    # Times a failed request took it out since it last served one, and (time.monotonic())
    # until when a health check that passes does not bring it back (``failed_request``).
    failed_in_a_row: int = 0
    held_until: float = 0.0
    # vLLM's --max-model-len, from its /v1/models (None: not reported).
    max_model_len: int | None = None
    # How its last answer contradicted the fleet file's configuration for it ("": it did
    # not; ``learning.speculation_problem``).
    mismatch: str = ""

    @classmethod
    def from_spec(
        cls,
        spec: ReplicaSpec,
        fleet: FleetSpec,
        api_key: str | None = None,
        probe_ids: tuple[int, ...] = (),
    ) -> Replica:
        return cls(
            spec=spec,
            max_in_flight=spec.max_in_flight or fleet.max_in_flight,
            timeout_s=spec.timeout_s or fleet.request_timeout_s,
            headers={"Authorization": f"Bearer {api_key}"} if api_key else {},
            probe_ids=probe_ids,
        )

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def drafter(self) -> str:
        return self.spec.speculative

    def key_hint(self) -> str:
        """What to do when the replica refuses the sidecar's API key (401/403)."""
        if self.headers:
            return "check the key in the variable api_key_env names"
        return "set api_key_env in the fleet file to the variable holding its key"

    @property
    def saturated(self) -> bool:
        return self.in_flight >= self.max_in_flight

    @property
    def available(self) -> bool:
        return self.healthy and not self.saturated

    @property
    def load(self) -> float:
        """Requests ahead of a new one: ours in flight, or vLLM's own running + waiting
        (which include ours and other clients'), whichever is larger; waiting ones count
        double, since they have not started."""
        return max(float(self.in_flight), self.running + 2.0 * self.waiting)

    def take_out(self, reason: str) -> None:
        if self.healthy:
            logger.warning("replica %s taken out: %s", self.name, reason)
        self.healthy = False
        self.failures += 1
        self.last_error = reason

    def failed_request(self, reason: str, interval_s: float) -> None:
        """Take it out for a request that failed on it, held out (health checks passing or
        not) for ``interval_s`` doubled at each failure in a row, at most
        2**``HOLD_DOUBLINGS`` intervals: a replica whose ``/health`` answers 200 while its
        requests fail (an engine that fails every request, an API server left up) was
        brought back at every health check, and a request failed on it each time. Only
        the failure that takes it out counts: the others in flight then (a crash fails them
        all) do not make the hold longer."""
        if self.healthy:
            self.failed_in_a_row += 1
            doublings = min(self.failed_in_a_row - 1, HOLD_DOUBLINGS)
            self.held_until = time.monotonic() + interval_s * 2**doublings
        self.take_out(reason)

    def answered_as(self, mismatch: str | None) -> None:
        """Keep how its last answer contradicted the fleet file (None: it did not), logged
        when it begins or changes, and when it ends."""
        mismatch = mismatch or ""
        if mismatch and mismatch != self.mismatch:
            logger.warning(
                "replica %s is not configured as the fleet file says: %s", self.name, mismatch
            )
        elif self.mismatch and not mismatch:
            logger.info("replica %s answers as the fleet file says again", self.name)
        self.mismatch = mismatch

    def served_request(self) -> None:
        self.served += 1
        self.failed_in_a_row = 0

    @property
    def held(self) -> bool:
        return time.monotonic() < self.held_until

    def cut_silent_streams(self, silent_s: float, reason: str) -> int:
        """Cut the streams that have sent nothing for ``silent_s`` (their requests go on on
        another replica); how many."""
        now = time.monotonic()
        silent = [s for s in self.streams if not s.cut_reason and now - s.last_byte >= silent_s]
        for stream in silent:
            stream.cut(
                f"{reason}, and the stream had sent nothing for {now - stream.last_byte:.1f} s"
            )
        return len(silent)

    def bring_back(self) -> None:
        if not self.healthy:
            logger.info("replica %s (%s) is serving", self.name, self.drafter)
        self.healthy = True

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name,
            "url": self.spec.url,
            "speculative": self.drafter,
            "k": self.spec.draft_length,
            "healthy": self.healthy,
            "in_flight": self.in_flight,
            "running": self.running,
            "waiting": self.waiting,
            "served": self.served,
            "failures": self.failures,
            "last_error": self.last_error,
            "mismatch": self.mismatch,
        }


class ProbeCallFailed(Exception):
    """A probe's call got no answer; the message names the call (``GET /v1/models
    failed: no answer within 3.0 s``)."""


@contextlib.asynccontextmanager
async def probe_call(
    session: aiohttp.ClientSession,
    replica: Replica,
    method: str,
    path: str,
    timeout: aiohttp.ClientTimeout,
    json: Any = None,
) -> AsyncIterator[aiohttp.ClientResponse]:
    """The replica's answer to ``method path`` (with its API key); no answer, or one cut
    off while it is read, is a ``ProbeCallFailed`` naming the call."""
    try:
        async with session.request(
            method, f"{replica.spec.url}{path}", json=json, headers=replica.headers, timeout=timeout
        ) as response:
            yield response
    except TimeoutError:
        silent = f"no answer within {timeout.total} s"
        raise ProbeCallFailed(f"{method} {path} failed: {silent}") from None
    except (aiohttp.ClientError, OSError) as error:
        raise ProbeCallFailed(f"{method} {path} failed: {type(error).__name__}: {error}") from None


async def probe(session: aiohttp.ClientSession, replica: Replica, timeout_s: float) -> None:
    """One health check: ``GET /health`` 200 brings the replica back (an out-of-service
    one once ``served_model_problem`` finds none), anything else takes it out and cuts
    its streams that have sent nothing for ``timeout_s`` (the check's own wait)."""
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    try:
        async with probe_call(session, replica, "GET", "/health", timeout) as response:
            status = response.status
        problem = f"GET /health answered {status}" if status != 200 else None
        if problem is None and not replica.healthy:
            problem = await served_model_problem(session, replica, timeout)
            if problem is not None and problem != replica.last_error:
                logger.error("replica %s cannot serve: %s", replica.name, problem)
    except ProbeCallFailed as error:
        problem = str(error)
    if problem is None:
        if not replica.held:
            replica.bring_back()
        return
    replica.take_out(problem)
    cut = replica.cut_silent_streams(timeout_s, f"its health check failed ({problem})")
    if cut:
        logger.warning(
            "replica %s: %d request(s) that had waited %.1f s or more for it go on elsewhere",
            replica.name,
            cut,
            timeout_s,
        )


async def served_model_problem(
    session: aiohttp.ClientSession, replica: Replica, timeout: aiohttp.ClientTimeout
) -> str | None:
    """Why the replica cannot serve the fleet's requests, from ``GET /v1/models`` (None:
    it can, or it has no such list to check): the API key refused, or the fleet file's
    model not among those it serves. The model's ``max_model_len`` there (vLLM's context,
    often set below the checkpoint's) is kept as the replica's."""
    async with probe_call(session, replica, "GET", "/v1/models", timeout) as response:
        if response.status in (401, 403):
            return (
                f"GET /v1/models answered {response.status}: it refused the sidecar's API "
                f"key ({replica.key_hint()})"
            )
        listed = await _json_answer(response)
    data = listed.get("data") if isinstance(listed, dict) else None
    if not isinstance(data, list):
        return None
    cards = {str(m.get("id")): m for m in data if isinstance(m, dict)}
    if replica.spec.model not in cards:
        return f"it serves {list(cards)}, not {replica.spec.model!r} (the fleet file's model)"
    length = cards[replica.spec.model].get("max_model_len")
    if isinstance(length, int) and not isinstance(length, bool) and length > 0:
        replica.max_model_len = length
    return await tokenizer_problem(session, replica, timeout) if replica.probe_ids else None


async def _json_answer(response: aiohttp.ClientResponse) -> Any:
    """The body of a 200 answer as JSON; None for any other status or a body not JSON."""
    if response.status != 200:
        return None
    try:
        return await response.json(content_type=None)
    except ValueError:
        return None


async def tokenizer_problem(
    session: aiohttp.ClientSession, replica: Replica, timeout: aiohttp.ClientTimeout
) -> str | None:
    """Whether the replica's ``POST /tokenize`` reads ``TOKENIZER_PROBE`` as the sidecar's
    target tokenizer does (None: it does, or it has no such route)."""
    body = {"model": replica.spec.model, "prompt": TOKENIZER_PROBE, "add_special_tokens": False}
    async with probe_call(session, replica, "POST", "/tokenize", timeout, json=body) as response:
        answer = await _json_answer(response)
    tokens = answer.get("tokens") if isinstance(answer, dict) else None
    if not isinstance(tokens, list) or tuple(tokens) == replica.probe_ids:
        return None
    return (
        f"its tokenizer is not the sidecar's target's (target_dir): a probe text is "
        f"{len(tokens)} tokens {tokens[:6]}... there, {len(replica.probe_ids)} tokens "
        f"{list(replica.probe_ids[:6])}... here"
    )


async def verify(session: aiohttp.ClientSession, replica: Replica, timeout_s: float) -> None:
    """Check a serving replica's model and tokenizer again (``served_model_problem``): one
    redeployed at its URL with another checkpoint between two health checks (a rolling
    update) answers ``/health`` all along, and would be sent token ids it reads as other
    text. A call that gets no answer is left to the health check."""
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    try:
        problem = await served_model_problem(session, replica, timeout)
    except ProbeCallFailed as error:
        logger.debug("replica %s: not verified: %s", replica.name, error)
        return
    if problem is not None and replica.healthy:
        logger.error("replica %s cannot serve: %s", replica.name, problem)
        replica.take_out(problem)


async def read_queue(session: aiohttp.ClientSession, replica: Replica, timeout_s: float) -> None:
    """vLLM's running and waiting counts from the replica's /metrics (kept on failure:
    health decides whether the replica serves)."""
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    try:
        async with probe_call(session, replica, "GET", "/metrics", timeout) as response:
            if response.status == 200:
                replica.running, replica.waiting = queue_from_metrics(await response.text())
    except ProbeCallFailed as error:
        logger.debug("replica %s: /metrics unreadable: %s", replica.name, error)


async def watch(
    session: aiohttp.ClientSession, replica: Replica, settings: Callable[[], FleetSpec]
) -> None:
    """Forever: probe health every ``health_interval_s``, read the queue of a healthy
    replica every ``metrics_interval_s`` and verify it every ``verify_interval_s``, as
    the fleet file ``settings()`` gives them now (it may be read again while serving)."""
    next_probe = 0.0
    next_verify = time.monotonic() + settings().verify_interval_s  # verified when brought in
    while True:
        fleet = settings()
        timeout_s = fleet.probe_timeout_s
        now = time.monotonic()
        if now >= next_probe:
            await probe(session, replica, timeout_s)
            next_probe = time.monotonic() + fleet.health_interval_s
        if replica.healthy and now >= next_verify:
            await verify(session, replica, timeout_s)
            next_verify = time.monotonic() + fleet.verify_interval_s
        if replica.healthy:
            await read_queue(session, replica, timeout_s)
        await asyncio.sleep(min(fleet.metrics_interval_s, fleet.health_interval_s))
