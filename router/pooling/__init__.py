"""Replicas that pool what they learn, and their drafter registry, through Redis.

``start_pooling(settings, service, metrics)`` (``router.server``) returns None when
``pooling.enabled`` is false; otherwise it attaches the outcome log to the policy holder,
replays the retained history (drafters first, then outcomes) and returns the
:class:`Pooling` whose ``run()`` task keeps both streams flowing. The design and the
ordering effects of discounting: docs/pooling.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from router.domain import DrafterSpec
from router.metrics import SidecarMetrics
from router.pooling.entries import EntrySigner
from router.pooling.link import Backoff, RedisLink, redis_errors
from router.pooling.outcomes import OutcomePool
from router.pooling.registry import SharedRegistry, UnavailableDrafter
from router.pooling.streams import StreamReader, StreamWriter
from router.settings import PoolingSettings, Settings
from router.store import DrafterRecord

logger = logging.getLogger(__name__)

__all__ = ["Pooling", "UnavailableDrafter", "pooling_refusal", "replica_identity", "start_pooling"]


def pooling_refusal(settings: Settings) -> str | None:
    """Why these settings must not start (one line), or None."""
    pooling = settings.pooling
    if pooling.enabled and (pooling.secret is None or not pooling.secret.get_secret_value()):
        return (
            "pooling.enabled is true but pooling.secret is not set: every shared entry is "
            "signed with it (set SPECROUTE_POOLING__SECRET or [pooling] secret)"
        )
    return None


def replica_identity(pooling: PoolingSettings) -> str:
    """This process start's identity: the configured name (default: the host name), the
    pid and a random suffix. A restart is a new writer for deduplication; what the
    restored snapshot already holds is in its saved cursor, not in the name."""
    name = pooling.replica_id or socket.gethostname()
    return f"{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


@dataclass
class Pooling:
    """A replica's two shared streams: outcomes and drafter registrations."""

    identity: str
    link: RedisLink
    outcomes: OutcomePool
    registry: SharedRegistry

    def drafter_registered(self, spec: DrafterSpec, record: DrafterRecord) -> None:
        self.registry.registered(spec, record.identity)

    def drafter_removed(self, name: str) -> None:
        self.registry.removed(name)

    def unavailable_drafters(self) -> list[UnavailableDrafter]:
        return self.registry.unavailable()

    async def catch_up(self) -> None:
        """Apply the retained history: registrations first (outcomes name drafters)."""
        drafters = await self.registry.catch_up()
        outcomes = await self.outcomes.catch_up()
        logger.info(
            "pooling: replayed %d registry and %d outcome entries (%d applied)",
            drafters,
            outcomes,
            self.outcomes.applied,
        )

    async def run(self) -> None:
        """Publish and read both streams until cancelled (then flush once, and close)."""
        loops = {
            "outcome writer": self.outcomes.run_writer,
            "outcome reader": self.outcomes.run_reader,
            "registry writer": self.registry.run_writer,
            "registry reader": self.registry.run_reader,
        }
        tasks = [
            asyncio.create_task(supervised(name, loop, Backoff(self.link.reconnect_max_s)))
            for name, loop in loops.items()
        ]
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                # One cancel each: the gather's, when this run was cancelled, reached them
                # all, and ends as soon as one loop has; a second cancel then cut the
                # outcome writer's last flush short, unlogged (its entries lost).
                if not task.cancelling():
                    task.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.gather(*tasks, return_exceptions=True)
            with contextlib.suppress(*redis_errors()):
                await self.link.close()


async def supervised(name: str, loop: Callable[[], Awaitable[None]], backoff: Backoff) -> None:
    """Run ``loop`` until cancelled. An error its own handling lets through (a bug) is
    logged with its traceback and the loop starts again after ``backoff``: one failing loop
    stopped all four, unseen until shutdown, with the connected gauge still at 1."""
    while True:
        try:
            await loop()
            return
        except asyncio.CancelledError:
            raise
        except Exception:
            task = asyncio.current_task()
            if task is not None and task.cancelling():  # stopping: never started again
                logger.exception("pooling: the %s loop failed while it stopped", name)
                raise asyncio.CancelledError from None
            logger.exception("pooling: the %s loop failed; it starts again", name)
            await asyncio.sleep(backoff.next_delay())


def build_pooling(settings: Settings, service: Any, metrics: SidecarMetrics) -> Pooling:
    """The pooling parts of one replica, not yet attached or running."""
    config = settings.pooling
    assert config.secret is not None
    signer = EntrySigner(config.secret.get_secret_value().encode())
    link = RedisLink(config, metrics)
    identity = replica_identity(config)
    outcome_writer = StreamWriter(
        link,
        signer,
        config.outcome_stream,
        config.retention,
        config.buffer_size,
        on_published=metrics.pooled_published.inc,
        on_dropped=metrics.pooled_dropped.inc,
        on_depth=metrics.pooled_buffered.set,
    )
    loading: set[str] = set()  # registrations loading here: their outcomes wait
    outcomes = OutcomePool(
        identity,
        service.policy,
        outcome_writer,
        StreamReader(link, config.outcome_stream),
        signer,
        metrics,
        loading,
        service.drafters.identity,
    )
    registry_writer = StreamWriter(
        link, signer, config.registry_stream, config.retention, config.buffer_size
    )
    registry = SharedRegistry(
        identity,
        service,
        registry_writer,
        StreamReader(link, config.registry_stream),
        signer,
        metrics,
        loading,
    )
    return Pooling(identity, link, outcomes, registry)


async def start_pooling(
    settings: Settings, service: Any, metrics: SidecarMetrics
) -> Pooling | None:
    """None when pooling is off; else a replica caught up with the retained history (or,
    when Redis does not answer within ``replay_timeout_s``, one that serves at once and
    catches up when Redis returns: its readers start from the first retained entry)."""
    if not settings.pooling.enabled:
        return None
    refusal = pooling_refusal(settings)
    if refusal is not None:
        raise ValueError(refusal)
    pooling = build_pooling(settings, service, metrics)
    service.policy.attach_log(pooling.outcomes)
    logger.info("pooling through %s as replica %s", pooling.link.where, pooling.identity)
    if not await _catch_up_retrying(pooling, settings.pooling.replay_timeout_s):
        logger.warning(
            "pooling: the shared history was not read from Redis at %s within %.1f s; "
            "serving on local state and catching up when it can",
            pooling.link.where,
            settings.pooling.replay_timeout_s,
        )
    return pooling


async def _catch_up_retrying(pooling: Pooling, timeout_s: float) -> bool:
    """Catch up, retrying with backoff: True once done, False when ``timeout_s`` has
    passed. The loop keeps its own deadline and bounds each attempt by what is left, so
    the bound does not rest on cancelling this loop, which catches Redis errors: a
    cancellation turned into one inside a client call would be retried for good. (A
    start-up against a Redis that refused the password once hung past the test's 300 s,
    cause not pinned down; before, the whole loop ran under one ``wait_for``.)"""
    from router.pooling.link import Backoff

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    backoff = Backoff(pooling.link.reconnect_max_s)
    while True:
        try:
            await asyncio.wait_for(pooling.catch_up(), max(0.0, deadline - loop.time()))
            return True
        except redis_errors() as error:  # OSError covers wait_for's own TimeoutError
            if not (isinstance(error, TimeoutError) and loop.time() >= deadline):
                pooling.link.failed(error, reading=True)
        left = deadline - loop.time()
        if left <= 0:
            return False
        await asyncio.sleep(min(backoff.next_delay(), left))
