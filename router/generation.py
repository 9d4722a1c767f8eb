"""The bounded generation queue: engine runs in worker threads, streamed into asyncio.

Admission is counted, not queued without bound: at most ``workers + queue_size``
generations are admitted (running or waiting); one more is refused with
:class:`OverloadedError` (RESOURCE_EXHAUSTED / HTTP 429). A slot is released when its
worker thread finishes, so a cancelled request frees its slot only once the engine has
actually stopped (it polls ``should_stop`` between steps); one cancelled while it waits
for a worker never runs and frees its slot at once. A stop whose grace runs out
:meth:`~GenerationQueue.cut` s every generation admitted: each stream ends with the error
it is given (an HTTP stream's last event says so), not cut off without a word.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from router.errors import GenerationFailedError, OverloadedError, SidecarError

logger = logging.getLogger(__name__)

T = TypeVar("T")

Emit = Callable[[Any], None]
ShouldStop = Callable[[], bool]
Job = Callable[[Emit, ShouldStop], T]


@dataclass(frozen=True)
class Finished(Generic[T]):
    """The last item of a worker stream: the job's return value."""

    result: T


@dataclass(frozen=True)
class _Failed:
    error: BaseException


class GenerationQueue:
    """Admission control plus a thread pool for blocking engine runs."""

    def __init__(
        self,
        workers: int,
        queue_size: int,
        on_depth: Callable[[int], None] | None = None,
    ) -> None:
        self.capacity = workers + queue_size
        self._lock = threading.Lock()
        self._admitted = 0
        self._on_depth = on_depth
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="generate")
        # The streams being consumed, on the event loop's thread only: what ``cut`` ends.
        self._streams: dict[threading.Event, asyncio.Queue[Any]] = {}

    @property
    def depth(self) -> int:
        """Generations admitted and not finished."""
        return self._admitted

    def admit(self) -> Slot:
        """Take a slot, or raise :class:`OverloadedError` when all are taken."""
        with self._lock:
            if self._admitted >= self.capacity:
                raise OverloadedError(
                    f"the generation queue is full ({self.capacity} admitted); retry later"
                )
            self._admitted += 1
            depth = self._admitted
        self._report(depth)
        return Slot(self)

    def _release(self) -> None:
        with self._lock:
            self._admitted -= 1
            depth = self._admitted
        self._report(depth)

    def _report(self, depth: int) -> None:
        if self._on_depth is not None:
            self._on_depth(depth)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    def cut(self, error: SidecarError) -> int:
        """End every stream being consumed with ``error``: its job stops between steps (one
        still waiting for a worker never runs) and its consumer raises ``error`` next.
        Called on the event loop; returns how many streams it ended."""
        for stop, items in self._streams.items():
            stop.set()
            items.put_nowait(_Failed(error))
        return len(self._streams)

    async def stream(self, slot: Slot, job: Job[Any]) -> AsyncIterator[Any]:
        """Run ``job(emit, should_stop)`` in a worker and yield what it emits.

        The final item is :class:`Finished` carrying the job's return value. Leaving the
        iteration early (client cancelled) makes ``should_stop()`` true for the job, and a
        job still waiting for a worker never runs: its slot is free at once.
        """
        loop = asyncio.get_running_loop()
        items: asyncio.Queue[Any] = asyncio.Queue()
        stop = threading.Event()

        def emit(item: Any) -> None:
            try:
                loop.call_soon_threadsafe(items.put_nowait, item)
            except RuntimeError:  # the loop is gone: nobody listens any more
                stop.set()

        def run() -> None:
            if stop.is_set():  # left while it waited for a worker
                return
            try:
                emit(Finished(job(emit, stop.is_set)))
            except BaseException as error:  # handed to the consumer, re-raised there
                emit(_Failed(error))

        waiting = self._executor.submit(run)
        slot.release_when_done(asyncio.wrap_future(waiting, loop=loop))
        self._streams[stop] = items
        try:
            while True:
                item = await items.get()
                if isinstance(item, _Failed):
                    raise _as_sidecar_error(item.error)
                if isinstance(item, Finished):
                    # The engine is done: the slot is free before the caller hears so,
                    # so a back-to-back request is admitted.
                    slot.release()
                    yield item
                    return
                yield item
        finally:
            self._streams.pop(stop, None)
            stop.set()
            # Still queued (no worker free): it never starts, and its slot is released
            # now, not after a prefill for nobody. A running job stops between steps.
            waiting.cancel()


class Slot:
    """One admitted generation; released exactly once."""

    def __init__(self, queue: GenerationQueue) -> None:
        self._queue = queue
        self._released = False
        self._handed_off = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._queue._release()

    def release_when_done(self, future: asyncio.Future[Any]) -> None:
        self._handed_off = True
        future.add_done_callback(lambda _: self.release())

    def release_unless_handed_off(self) -> None:
        """Release now unless a worker owns the slot (then it is released when it ends)."""
        if not self._handed_off:
            self.release()


def _as_sidecar_error(error: BaseException) -> BaseException:
    if isinstance(error, SidecarError):
        return error
    logger.exception("generation failed", exc_info=error)
    return GenerationFailedError(f"generation failed: {type(error).__name__}: {error}")
