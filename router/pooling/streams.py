"""A stream writer (bounded buffer, publish loop) and a stream reader (catch-up, then a
blocking read loop): the two halves every shared stream of a replica uses."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from router.pooling.entries import EntrySigner
from router.pooling.link import READ_BLOCK_MS, Backoff, RedisLink, redis_errors

logger = logging.getLogger(__name__)

PUBLISH_BATCH = 256
READ_BATCH = 1000
LAST_FLUSH_S = 1.0  # the last flush at a stop


class StreamWriter:
    """Payloads appended from any thread, published in order by one asyncio task.

    While Redis is unreachable payloads wait in a buffer of ``capacity``; when it is full
    the oldest is dropped (``on_dropped``). A batch that fails is published again whole,
    so an entry may reach the stream twice: readers apply each (replica, seq) once.
    """

    def __init__(
        self,
        link: RedisLink,
        signer: EntrySigner,
        stream: str,
        retention: int,
        capacity: int,
        *,
        on_published: Callable[[int], None] = lambda count: None,
        on_dropped: Callable[[], None] = lambda: None,
        on_depth: Callable[[int], None] = lambda depth: None,
    ) -> None:
        self._link = link
        self._signer = signer
        self._stream = stream
        self._retention = retention
        self._capacity = capacity
        self._on_published = on_published
        self._on_dropped = on_dropped
        self._on_depth = on_depth
        self._lock = threading.Lock()
        self._buffer: deque[Mapping[str, Any]] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self.published = 0
        self.dropped = 0

    @property
    def pending(self) -> int:
        return len(self._buffer)

    def append(self, payload: Mapping[str, Any]) -> None:
        """Queue ``payload`` (any thread; never blocks on Redis)."""
        with self._lock:
            if len(self._buffer) >= self._capacity:
                self._buffer.popleft()
                self.dropped += 1
                self._on_dropped()
            self._buffer.append(payload)
            depth = len(self._buffer)
        self._on_depth(depth)
        if self._loop is not None and self._wake is not None:
            # The loop may be gone at shutdown; the payload stays buffered, the update
            # that recorded it must not fail for that.
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._wake.set)

    async def run(self) -> None:
        """Publish until cancelled; a cancel first tries one last flush."""
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        backoff = Backoff(self._link.reconnect_max_s)
        try:
            while True:
                self._wake.clear()
                if not self._buffer:
                    await self._wake.wait()
                    continue
                if await self.publish_once():
                    backoff.reset()
                else:
                    await asyncio.sleep(backoff.next_delay())
        except asyncio.CancelledError:
            if self._buffer:
                await self._last_flush()
            raise

    async def _last_flush(self) -> None:
        """At a cancel, publish what is buffered within ``LAST_FLUSH_S``; what Redis does
        not take in time is lost to the other replicas (as at a SIGKILL), and the cancel
        goes on whatever happens: a flush that timed out raised out of the cancel's
        handler, the supervisor took it for a bug and started the loop again, and the
        sidecar's stop waited on it for good."""
        try:
            await asyncio.wait_for(self.flush(), timeout=LAST_FLUSH_S)
            problem = "Redis did not take them"  # flush stops at the first refusal
        except redis_errors() as error:  # wait_for's TimeoutError is an OSError
            problem = str(error) or type(error).__name__
        if self._buffer:
            logger.warning(
                "pooling: %d entries of %s not published at the stop (%s)",
                len(self._buffer),
                self._stream,
                problem,
            )

    async def flush(self) -> None:
        while self._buffer and await self.publish_once():
            pass

    async def publish_once(self) -> bool:
        """Publish the oldest batch; False when Redis refused (the batch stays)."""
        with self._lock:
            batch = [self._buffer[i] for i in range(min(PUBLISH_BATCH, len(self._buffer)))]
        try:
            async with self._link.client.pipeline(transaction=False) as pipe:
                for payload in batch:
                    pipe.xadd(
                        self._stream,
                        self._signer.fields(payload),  # type: ignore[arg-type]
                        maxlen=self._retention,
                        approximate=True,
                    )
                await pipe.execute()
        except redis_errors() as error:
            self._link.failed(error)
            return False
        self._link.succeeded(wrote=True)
        with self._lock:
            for _ in batch:
                self._buffer.popleft()
            depth = len(self._buffer)
        self.published += len(batch)
        self._on_published(len(batch))
        self._on_depth(depth)
        return True


EntryHandler = Callable[[str, Mapping[Any, Any]], None]


class StreamReader:
    """Reads a stream from its first retained entry on: ``catch_up`` until the end, then
    ``run`` blocks for new entries. ``last_id`` is the last entry handed on."""

    def __init__(self, link: RedisLink, stream: str) -> None:
        self._link = link
        self._stream = stream
        self.last_id = "0-0"

    async def read_batch(self, block_ms: int | None) -> list[tuple[str, Mapping[Any, Any]]]:
        reply = await self._link.client.xread(
            {self._stream: self.last_id}, count=READ_BATCH, block=block_ms
        )
        self._link.succeeded()
        entries: list[tuple[str, Mapping[Any, Any]]] = []
        for _, items in reply or ():
            for entry_id, fields in items:
                key = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
                entries.append((key, fields))
        return entries

    async def catch_up(self, handle: Callable[[list[tuple[str, Mapping[Any, Any]]]], Any]) -> int:
        """Hand on every retained entry after ``last_id`` (batches), until none is left."""
        seen = 0
        while True:
            entries = await self.read_batch(None)
            if not entries:
                return seen
            await _maybe_await(handle(entries))
            self.last_id = entries[-1][0]
            seen += len(entries)

    async def rewind_if_recreated(self) -> bool:
        """After Redis was away: when the stream is gone, or its newest id is below
        ``last_id``, it was lost and is written anew (a Redis restarted without its data,
        its clock behind the old one's), and entries written since would sort below
        ``last_id`` and never be read: read it from the start again (each outcome is
        applied once, by writer and seq). True when it rewound."""
        from redis.exceptions import ResponseError

        try:
            info = await self._link.client.xinfo_stream(self._stream)
            newest = info["last-generated-id"]
            newest = newest.decode() if isinstance(newest, bytes) else str(newest)
        except ResponseError:  # no such key: nothing written since it was lost
            newest = "0-0"
        if _stream_id(newest) >= _stream_id(self.last_id):
            return False
        logger.warning(
            "pooling: stream %s restarts below the last entry read (%s < %s); read from its start",
            self._stream,
            newest,
            self.last_id,
        )
        self.last_id = "0-0"
        return True

    async def run(
        self,
        handle: Callable[[list[tuple[str, Mapping[Any, Any]]]], Any],
        rewound: Callable[[], Any] | None = None,
    ) -> None:
        """Block for new entries and hand them on, until cancelled; reconnect with backoff
        (and, after a failure, ``rewind_if_recreated``, then ``rewound`` if it did)."""
        backoff = Backoff(self._link.reconnect_max_s)
        recovering = False
        while True:
            try:
                if recovering:
                    if await self.rewind_if_recreated() and rewound is not None:
                        await _maybe_await(rewound())
                    recovering = False
                entries = await self.read_batch(READ_BLOCK_MS)
            except redis_errors() as error:
                self._link.failed(error, reading=True)
                recovering = True
                await asyncio.sleep(backoff.next_delay())
                continue
            backoff.reset()
            if entries:
                await _maybe_await(handle(entries))
                self.last_id = entries[-1][0]


def _stream_id(entry_id: str) -> tuple[int, int]:
    """A Redis stream id (``<ms>-<seq>``) as a comparable pair."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


async def _maybe_await(value: Any) -> None:
    if asyncio.iscoroutine(value):
        await value
