"""Coalescing concurrent calls into one batch.

Tokenizing and classifying many Route calls in one call each (one Rust and one
onnxruntime entry, one GIL hand-off) costs far less than doing it per request. grpc.aio
hands calls to the event loop one at a time, so calls only meet if one waits: when calls
arrive back to back (the EWMA of the gap between them is below ``busy_gap_s``) a call
waits up to ``wait_turns`` event-loop turns for others to join; under light load it is
flushed on the next turn, so a lone call's latency does not change.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

logger = logging.getLogger(__name__)

In = TypeVar("In")
Out = TypeVar("Out")


class Coalescer(Generic[In, Out]):
    """``await submit(item)`` runs ``run_batch`` on the items gathered with it (module doc).

    ``run_batch`` returns one result per item, in order; an exception in a slot is raised
    to that item's caller only. If ``run_batch`` itself raises, every caller of the batch
    gets the exception. ``on_batch`` (optional) is told each batch's size.
    """

    def __init__(
        self,
        run_batch: Callable[[Sequence[In]], Sequence[Out | BaseException]],
        *,
        max_batch: int = 256,
        wait_turns: int = 0,
        busy_gap_s: float = 5e-4,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self._run_batch = run_batch
        self._max_batch = max_batch
        self._wait_turns = wait_turns
        self._on_batch = on_batch
        self._pending: list[tuple[In, asyncio.Future[Out]]] = []
        self._scheduled = False
        self._busy_gap_s = busy_gap_s
        self._gap_s = float("inf")  # EWMA of the time between submit() calls
        self._last_submit: float | None = None
        self._flusher: asyncio.Task[None] | None = None

    async def submit(self, item: In) -> Out:
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._last_submit is not None:
            # Clipped, so a long idle spell is forgotten within a few dozen busy calls.
            gap = min(now - self._last_submit, 10 * self._busy_gap_s)
            self._gap_s = gap if self._gap_s == float("inf") else 0.9 * self._gap_s + 0.1 * gap
        self._last_submit = now
        future: asyncio.Future[Out] = loop.create_future()
        self._pending.append((item, future))
        if len(self._pending) >= self._max_batch:
            self._flush()
        elif not self._scheduled:
            self._scheduled = True
            if self._wait_turns and self._gap_s < self._busy_gap_s:
                # Calls arrive back to back: hold this one a few turns so others join.
                self._flusher = loop.create_task(self._flush_later())
            else:
                loop.call_soon(self._flush)  # light load: a call is not held back
        return await future

    async def _flush_later(self) -> None:
        for _ in range(self._wait_turns):
            await asyncio.sleep(0)
        self._flush()

    def _flush(self) -> None:
        self._scheduled = False
        batch, self._pending = self._pending, []
        if not batch:
            return
        if self._on_batch is not None:
            self._on_batch(len(batch))
        try:
            results: Sequence[Out | BaseException] = self._run_batch([item for item, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"batch of {len(batch)} gave {len(results)} results")
        except Exception as error:  # the whole batch failed: every caller hears why
            logger.exception("batch of %d failed", len(batch))
            results = [error] * len(batch)
        for (_, future), result in zip(batch, results, strict=True):
            if future.done():  # the caller was cancelled meanwhile
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)
