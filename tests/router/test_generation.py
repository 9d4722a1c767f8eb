"""The bounded generation queue (router/generation.py), on plain jobs."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from router.errors import CutByStopError, UnavailableError
from router.generation import Finished, GenerationQueue


def test_a_generation_cancelled_while_it_waits_never_runs_and_frees_its_slot() -> None:
    """A request cancelled while every worker was busy kept its slot until a worker took
    it up, and then ran its prefill for nobody (retries meanwhile got RESOURCE_EXHAUSTED)."""
    queue = GenerationQueue(workers=1, queue_size=1)
    release = threading.Event()
    started: list[str] = []

    def job(name: str) -> Any:
        def run(emit: Any, should_stop: Any) -> str:
            started.append(name)
            emit(name)
            while name == "long" and not release.is_set() and not should_stop():
                release.wait(0.01)
            return name

        return run

    async def scenario() -> None:
        running = queue.stream(queue.admit(), job("long"))
        assert await running.__anext__() == "long"  # the only worker is busy
        waiting = queue.stream(queue.admit(), job("queued"))
        pending = asyncio.ensure_future(waiting.__anext__())
        await asyncio.sleep(0.05)
        assert queue.depth == 2 and not pending.done()
        pending.cancel()  # the client hangs up while the request waits for a worker
        await asyncio.gather(pending, return_exceptions=True)
        await waiting.aclose()
        await asyncio.sleep(0.05)
        assert queue.depth == 1  # its slot is free at once
        release.set()
        rest = [item async for item in running]
        assert isinstance(rest[-1], Finished) and rest[-1].result == "long"
        await asyncio.sleep(0.05)
        assert queue.depth == 0

    asyncio.run(scenario())
    queue.shutdown()
    assert started == ["long"]  # the cancelled one never ran


def test_a_cut_ends_the_running_and_the_waiting_generations_with_its_error() -> None:
    """A stop whose grace ran out: the generation running stops between steps and the one
    waiting for a worker never runs; both consumers raise the cut's error after what was
    already emitted, and every slot is free."""
    queue = GenerationQueue(workers=1, queue_size=1)
    started: list[str] = []
    stopped: list[str] = []

    def job(name: str) -> Any:
        def run(emit: Any, should_stop: Any) -> str:
            started.append(name)
            emit(name)
            while not should_stop():
                threading.Event().wait(0.01)
            stopped.append(name)
            return name

        return run

    async def drain(stream: Any, into: list[Any]) -> BaseException | None:
        try:
            async for item in stream:
                into.append(item)
        except UnavailableError as error:
            return error
        return None

    async def scenario() -> None:
        running_items: list[Any] = []
        waiting_items: list[Any] = []
        running = asyncio.ensure_future(
            drain(queue.stream(queue.admit(), job("long")), running_items)
        )
        waiting = asyncio.ensure_future(
            drain(queue.stream(queue.admit(), job("queued")), waiting_items)
        )
        while not running_items:
            await asyncio.sleep(0.01)
        assert queue.cut(CutByStopError(2.0)) == 2
        errors = await asyncio.gather(running, waiting)
        assert [str(e) for e in errors] == [str(CutByStopError(2.0))] * 2
        assert running_items == ["long"] and waiting_items == []
        for _ in range(100):  # the worker's slot is freed once the job has returned
            if queue.depth == 0:
                break
            await asyncio.sleep(0.01)
        assert queue.depth == 0
        assert queue.cut(CutByStopError(2.0)) == 0  # nothing left to cut

    asyncio.run(scenario())
    queue.shutdown()
    assert started == ["long"] and stopped == ["long"]
