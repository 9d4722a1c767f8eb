"""Coalescing calls that arrive in the same event-loop turn into one batch.

Under concurrent load many Route calls are ready at once; tokenizing and classifying them
in one call each (one Rust and one onnxruntime entry, one GIL hand-off) costs far less
than doing it per request. A lone call waits one loop turn (``call_soon``), nothing more.
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
    """``await submit(item)`` runs ``run_batch`` on every item submitted in the same turn.

    ``run_batch`` returns one result per item, in order; an exception in a slot is raised
    to that item's caller only. If ``run_batch`` itself raises, every caller of the batch
    gets the exception. ``on_batch`` (optional) is told each batch's size.
    """

    def __init__(
        self,
        run_batch: Callable[[Sequence[In]], Sequence[Out | BaseException]],
        *,
        max_batch: int = 256,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self._run_batch = run_batch
        self._max_batch = max_batch
        self._on_batch = on_batch
        self._pending: list[tuple[In, asyncio.Future[Out]]] = []
        self._scheduled = False

    async def submit(self, item: In) -> Out:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Out] = loop.create_future()
        self._pending.append((item, future))
        if len(self._pending) >= self._max_batch:
            self._flush()
        elif not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        return await future

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
