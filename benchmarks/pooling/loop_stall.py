"""How long applying pooled outcomes holds the event loop: on the loop against in a thread.

    python -m benchmarks.pooling.loop_stall [--entries 5000] [--rounds 2]

A replica that catches up (a start, Redis back after an outage) applies the retained
outcomes of the other replicas in batches of ``READ_BATCH`` (1,000). This applies
``--entries`` signed outcomes to a ``thompson`` policy holder both ways, one after the
other in one process, while a ticker task sleeping 1 ms measures the longest gap between
its turns: how long a Route or a Generate chunk would wait. No Redis is involved.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks import module_parser
from router.metrics import create_metrics
from router.policy_holder import PolicyHolder
from router.pooling.entries import EntrySigner, Origin, SharedOutcome, outcome_payload
from router.pooling.link import RedisLink
from router.pooling.outcomes import OutcomePool
from router.pooling.streams import READ_BATCH, StreamReader, StreamWriter
from router.settings import PoolingSettings
from router.store import SidecarStore

SIGNER = EntrySigner(b"loop-stall")


def _pool(state_dir: Path) -> OutcomePool:
    """An outcome pool over a thompson holder of two drafters (Redis never reached)."""
    holder = PolicyHolder(SidecarStore(state_dir), lambda: ["generic", "math"], lambda _: None)
    holder.start("thompson")
    metrics = create_metrics()
    link = RedisLink(PoolingSettings(redis_url="redis://127.0.0.1:1/0"), metrics)  # type: ignore[arg-type]
    writer = StreamWriter(link, SIGNER, "outcomes", 100, 8)
    pool = OutcomePool("here", holder, writer, StreamReader(link, "outcomes"), SIGNER, metrics)
    holder.attach_log(pool)
    return pool


def _entries(count: int, writer: str) -> list[tuple[str, Any]]:
    entries = []
    for seq in range(1, count + 1):
        outcome = SharedOutcome(
            Origin(writer, seq), "outcome", "math", 0, "generic", 4, (4, 4, 4), (4, 2, 4), 13
        )
        entries.append((f"{seq}-0", SIGNER.fields(outcome_payload(outcome))))
    return entries


async def _longest_stall(pool: OutcomePool, entries: Sequence[Any], off_loop: bool) -> float:
    """Milliseconds of the longest gap between a 1 ms ticker's turns while ``entries``
    are applied in reader batches."""
    gaps: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    ticking = asyncio.create_task(ticker())
    await asyncio.sleep(0.05)
    for start in range(0, len(entries), READ_BATCH):
        batch = list(entries[start : start + READ_BATCH])
        if off_loop:
            await asyncio.to_thread(pool.handle, batch)
        else:
            pool.handle(batch)
            await asyncio.sleep(0)
    done.set()
    await ticking
    return max(gaps) * 1e3


def main(argv: Sequence[str] | None = None) -> None:
    parser = module_parser(__doc__)
    parser.add_argument("--entries", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    for round_ in range(args.rounds):
        for off_loop in (False, True):
            with tempfile.TemporaryDirectory(prefix="loop-stall-") as state_dir:
                pool = _pool(Path(state_dir))
                entries = _entries(args.entries, f"other-{round_}-{off_loop}")
                stall = asyncio.run(_longest_stall(pool, entries, off_loop))
                where = "in a thread" if off_loop else "on the loop"
                print(
                    f"round {round_ + 1}: {args.entries} outcomes applied {where}: "
                    f"longest event-loop stall {stall:.1f} ms"
                )


if __name__ == "__main__":
    main()
