"""The Route coalescer: batches form while a batch is out, per-slot and whole-batch
errors, work done in the call or handed off."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from router.coalescer import Coalescer


async def _double_or_refuse(items: list[int]) -> list[int | BaseException]:
    """Work done in the call (as the in-process prompt reader does): no await."""
    return [ValueError(f"odd {i}") if i % 2 else 2 * i for i in items]


def _as_is(items: Sequence[int], results: list[int | BaseException]) -> list[int | BaseException]:
    return results


def test_calls_in_one_turn_share_a_batch_and_errors_stay_in_their_slot() -> None:
    sizes: list[int] = []
    coalescer: Coalescer[int, list[int | BaseException], int] = Coalescer(
        _double_or_refuse, _as_is, on_batch=sizes.append
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
        return list(await asyncio.gather(first, waiting, ready))

    assert asyncio.run(main()) == [1, 2, 3]
    assert batches == [[1], [2, 3]]


def test_calls_arriving_while_a_batch_is_out_form_the_next_batch() -> None:
    sizes: list[int] = []
    started: asyncio.Event | None = None
    release: asyncio.Event | None = None

    async def handed_off(items: list[int]) -> list[int | BaseException]:
        # Work handed off (as to the prompt reader's child): the loop runs meanwhile.
        assert started is not None and release is not None
        started.set()
        await release.wait()
        return [2 * i for i in items]

    coalescer: Coalescer[int, list[int | BaseException], int] = Coalescer(
        handed_off, _as_is, on_batch=sizes.append
    )

    async def main() -> list[int]:
        nonlocal started, release
        started, release = asyncio.Event(), asyncio.Event()
        first = asyncio.ensure_future(coalescer.submit(1))
        await started.wait()  # the first batch is out
        later = [asyncio.ensure_future(coalescer.submit(i)) for i in range(2, 7)]
        for _ in range(5):
            await asyncio.sleep(0)  # plenty of loop turns: nothing starts while busy
        assert sizes == [1]
        release.set()
        return await asyncio.gather(first, *later)

    assert asyncio.run(main()) == [2, 4, 6, 8, 10, 12]
    assert sizes == [1, 5]


def test_commit_gets_what_work_made_of_the_batch() -> None:
    async def work(items: list[int]) -> list[int]:
        return [10 * i for i in items]

    def commit(items: Sequence[int], worked: list[int]) -> list[int | BaseException]:
        return [item + value for item, value in zip(items, worked, strict=True)]

    coalescer: Coalescer[int, list[int], int] = Coalescer(work, commit)

    async def main() -> list[int]:
        return await asyncio.gather(*(coalescer.submit(i) for i in (1, 2)))

    assert asyncio.run(main()) == [11, 22]


def test_max_batch_splits_and_a_failing_batch_fails_only_its_callers() -> None:
    sizes: list[int] = []

    async def run(items: list[int]) -> list[int | BaseException]:
        if 99 in items:
            raise RuntimeError("boom")
        return list(items)

    coalescer: Coalescer[int, list[int | BaseException], int] = Coalescer(
        run, _as_is, max_batch=4, on_batch=sizes.append
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
        Coalescer(run, _as_is, max_batch=0)


def test_a_result_count_that_does_not_match_the_batch_fails_it() -> None:
    def commit(items: Sequence[int], worked: list[int | BaseException]) -> list[int]:
        return [1]  # one result for a batch of two

    coalescer: Coalescer[int, list[int | BaseException], int] = Coalescer(_double_or_refuse, commit)

    async def main() -> list[int | BaseException]:
        return await asyncio.gather(*(coalescer.submit(i) for i in (2, 4)), return_exceptions=True)

    results = asyncio.run(main())
    assert all(isinstance(r, RuntimeError) and "gave 1 results" in str(r) for r in results)


def test_a_cancelled_batch_cancels_its_callers_and_the_next_batch_is_worked_on() -> None:
    # A batch's work cancelled (the loop closing, say) cancels its callers' calls; the
    # coalescer is not left busy, so calls that come later are still worked on.
    cancelled: list[list[int]] = []

    async def work(items: list[int]) -> list[int | BaseException]:
        await asyncio.sleep(0)
        if not cancelled:  # the first batch only
            cancelled.append(items)
            raise asyncio.CancelledError
        return await _double_or_refuse(items)

    coalescer: Coalescer[int, list[int | BaseException], int] = Coalescer(work, _as_is)

    async def main() -> tuple[list[int | BaseException], int]:
        first = await asyncio.gather(*(coalescer.submit(i) for i in (2, 4)), return_exceptions=True)
        return first, await asyncio.wait_for(coalescer.submit(6), timeout=5)

    first, later = asyncio.run(main())
    assert cancelled == [[2, 4]]
    assert all(isinstance(r, asyncio.CancelledError) for r in first)
    assert later == 12
