"""The Route coalescer: batches form while the worker is busy, per-slot and whole-batch
errors, and which thread runs which stage."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import pytest

from router.coalescer import Coalescer, on_executor


@pytest.fixture()
def worker() -> Iterator[ThreadPoolExecutor]:
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="test-worker")
    yield executor
    executor.shutdown(wait=True)


def _double_or_refuse(items: Sequence[int]) -> list[int | BaseException]:
    return [ValueError(f"odd {i}") if i % 2 else 2 * i for i in items]


def _as_is(items: Sequence[int], results: list[int | BaseException]) -> list[int | BaseException]:
    return results


def test_calls_in_one_turn_share_a_batch_and_errors_stay_in_their_slot(
    worker: ThreadPoolExecutor,
) -> None:
    sizes: list[int] = []
    coalescer: Coalescer[int, list[int | BaseException], int] = Coalescer(
        on_executor(worker, _double_or_refuse), _as_is, on_batch=sizes.append
    )

    async def main() -> list[int | BaseException]:
        together = await asyncio.gather(
            *(coalescer.submit(i) for i in range(6)), return_exceptions=True
        )
        alone = await coalescer.submit(10)
        return [*together, alone]

    results = asyncio.run(main())
    assert sizes == [6, 1]
    assert results[0::2] == [0, 4, 8, 20]
    assert [str(r) for r in results[1:6:2]] == ["odd 1", "odd 3", "odd 5"]


def test_calls_ready_when_a_batch_ends_join_the_next_one() -> None:
    batches: list[list[int]] = []
    release: asyncio.Event | None = None

    async def work(items: list[int]) -> list[int | BaseException]:
        batches.append(list(items))
        if items == [1]:
            assert release is not None
            await release.wait()
        return list(items)

    coalescer: Coalescer[int, list[int | BaseException], int] = Coalescer(work, _as_is)

    async def main() -> list[int]:
        nonlocal release
        release = asyncio.Event()
        first = asyncio.ensure_future(coalescer.submit(1))
        await asyncio.sleep(0)
        await asyncio.sleep(0)  # the first batch waits for its release
        waiting = asyncio.ensure_future(coalescer.submit(2))
        await asyncio.sleep(0)  # 2 is pending
        release.set()  # the first batch ends in the next turn, where 3's task is ready too
        ready = asyncio.ensure_future(coalescer.submit(3))
        return await asyncio.gather(first, waiting, ready)

    assert asyncio.run(main()) == [1, 2, 3]
    assert batches == [[1], [2, 3]]


def test_calls_arriving_while_a_batch_is_worked_on_form_the_next_batch(
    worker: ThreadPoolExecutor,
) -> None:
    started, release = threading.Event(), threading.Event()
    sizes: list[int] = []

    def slow(items: Sequence[int]) -> list[int | BaseException]:
        started.set()
        release.wait(timeout=10)
        return [2 * i for i in items]

    coalescer: Coalescer[int, list[int | BaseException], int] = Coalescer(
        on_executor(worker, slow), _as_is, on_batch=sizes.append
    )

    async def main() -> list[int]:
        first = asyncio.ensure_future(coalescer.submit(1))
        await asyncio.to_thread(started.wait, 10)  # the first batch is on the worker
        later = [asyncio.ensure_future(coalescer.submit(i)) for i in range(2, 7)]
        for _ in range(5):
            await asyncio.sleep(0)  # plenty of loop turns: nothing starts while busy
        assert sizes == [1]
        release.set()
        return await asyncio.gather(first, *later)

    assert asyncio.run(main()) == [2, 4, 6, 8, 10, 12]
    assert sizes == [1, 5]


def test_work_runs_on_the_worker_and_commit_on_the_loop(worker: ThreadPoolExecutor) -> None:
    threads: dict[str, str] = {}

    def work(items: Sequence[int]) -> list[int]:
        threads["work"] = threading.current_thread().name
        return list(items)

    def commit(items: Sequence[int], done: list[int]) -> list[int | BaseException]:
        threads["commit"] = threading.current_thread().name
        return [i + 1 for i in done]

    coalescer: Coalescer[int, list[int], int] = Coalescer(on_executor(worker, work), commit)
    assert asyncio.run(coalescer.submit(41)) == 42
    assert threads["work"].startswith("test-worker")
    assert threads["commit"] == threading.main_thread().name


def test_max_batch_splits_and_a_failing_batch_fails_only_its_callers(
    worker: ThreadPoolExecutor,
) -> None:
    sizes: list[int] = []

    def run(items: Sequence[int]) -> list[int | BaseException]:
        if 99 in items:
            raise RuntimeError("boom")
        return list(items)

    coalescer: Coalescer[int, list[int | BaseException], int] = Coalescer(
        on_executor(worker, run), _as_is, max_batch=4, on_batch=sizes.append
    )

    async def main() -> list[int | BaseException]:
        return await asyncio.gather(
            *(coalescer.submit(i) for i in (1, 2, 3, 4, 5, 99)), return_exceptions=True
        )

    results = asyncio.run(main())
    assert sizes == [4, 2]
    assert results[:4] == [1, 2, 3, 4]
    assert all(isinstance(r, RuntimeError) for r in results[4:])
    with pytest.raises(ValueError):
        Coalescer(on_executor(worker, run), _as_is, max_batch=0)


def test_a_shut_down_worker_fails_calls_instead_of_hanging() -> None:
    executor = ThreadPoolExecutor(max_workers=1)
    executor.shutdown()
    coalescer: Coalescer[int, list[int | BaseException], int] = Coalescer(
        on_executor(executor, _double_or_refuse), _as_is
    )

    async def main() -> None:
        await asyncio.wait_for(coalescer.submit(2), timeout=5)

    with pytest.raises(RuntimeError, match="shutdown"):
        asyncio.run(main())


def test_a_cancelled_batch_cancels_its_callers_and_the_next_batch_is_worked_on() -> None:
    # A batch's work cancelled (the loop closing, say) cancels its callers' calls; the
    # coalescer is not left busy, so calls that come later are still worked on.
    cancelled: list[list[int]] = []

    async def work(items: list[int]) -> list[int | BaseException]:
        await asyncio.sleep(0)
        if not cancelled:  # the first batch only
            cancelled.append(items)
            raise asyncio.CancelledError
        return _double_or_refuse(items)

    coalescer: Coalescer[int, list[int | BaseException], int] = Coalescer(work, _as_is)

    async def main() -> tuple[list[int | BaseException], int]:
        first = await asyncio.gather(*(coalescer.submit(i) for i in (2, 4)), return_exceptions=True)
        return first, await asyncio.wait_for(coalescer.submit(6), timeout=5)

    first, later = asyncio.run(main())
    assert cancelled == [[2, 4]]
    assert all(isinstance(r, asyncio.CancelledError) for r in first)
    assert later == 12
