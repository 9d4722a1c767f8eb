"""The event-loop-turn coalescer behind Route: batching, per-slot errors, whole-batch errors."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from router.coalescer import Coalescer


def _double_or_refuse(items: Sequence[int]) -> list[int | BaseException]:
    return [ValueError(f"odd {i}") if i % 2 else 2 * i for i in items]


def test_calls_in_one_turn_share_a_batch_and_errors_stay_in_their_slot() -> None:
    sizes: list[int] = []
    coalescer: Coalescer[int, int] = Coalescer(_double_or_refuse, on_batch=sizes.append)

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


def test_max_batch_splits_and_a_failing_batch_fails_only_its_callers() -> None:
    sizes: list[int] = []

    def run(items: Sequence[int]) -> list[int | BaseException]:
        if 99 in items:
            raise RuntimeError("boom")
        return list(items)

    coalescer: Coalescer[int, int] = Coalescer(run, max_batch=4, on_batch=sizes.append)

    async def main() -> list[int | BaseException]:
        return await asyncio.gather(
            *(coalescer.submit(i) for i in (1, 2, 3, 4, 5, 99)), return_exceptions=True
        )

    results = asyncio.run(main())
    assert sizes == [4, 2]
    assert results[:4] == [1, 2, 3, 4]
    assert all(isinstance(r, RuntimeError) for r in results[4:])
    with pytest.raises(ValueError):
        Coalescer(run, max_batch=0)


def test_back_to_back_calls_wait_for_each_other_and_lone_calls_do_not() -> None:
    sizes: list[int] = []

    async def staggered(coalescer: Coalescer[int, int], count: int) -> None:
        async def late(i: int) -> int:
            for _ in range(i):  # each call arrives one event-loop turn after the previous
                await asyncio.sleep(0)
            return await coalescer.submit(i)

        await asyncio.gather(*(late(i) for i in range(count)))

    async def main() -> None:
        busy: Coalescer[int, int] = Coalescer(
            _double_or_refuse_even, wait_turns=20, busy_gap_s=1.0, on_batch=sizes.append
        )
        await busy.submit(0)  # the first call has no gap yet: flushed at once
        await staggered(busy, 8)
        idle: Coalescer[int, int] = Coalescer(
            _double_or_refuse_even, wait_turns=20, busy_gap_s=0.0, on_batch=sizes.append
        )
        await staggered(idle, 8)

    asyncio.run(main())
    assert sizes[0] == 1
    busy_sizes, idle_sizes = sizes[1 : len(sizes) - 8], sizes[len(sizes) - 8 :]
    assert max(busy_sizes) >= 4  # staggered arrivals met in a batch
    assert idle_sizes == [1] * 8  # light load: never held back


def _double_or_refuse_even(items: Sequence[int]) -> list[int | BaseException]:
    return [2 * i for i in items]
