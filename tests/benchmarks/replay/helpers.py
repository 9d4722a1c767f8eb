"""Hand-made request results for metric and report tests."""

from __future__ import annotations

from benchmarks.replay.metrics import RequestResult


def result(
    index: int,
    task: str,
    wall: float,
    tokens: int = 10,
    *,
    drafter: str = "none",
    k: int = 0,
    steps: int | None = None,
    drafted: int = 0,
    accepted: int = 0,
    output: tuple[int, ...] = (1, 2, 3),
    greedy: bool = True,
    request_id: str | None = None,
) -> RequestResult:
    return RequestResult(
        index=index,
        request_id=request_id or f"r{index}",
        task=task,
        cluster=task,
        drafter=drafter,
        draft_length=k,
        explored=False,
        greedy=greedy,
        prompt_tokens=5,
        generated_tokens=tokens,
        steps=tokens if steps is None else steps,
        drafted=drafted,
        accepted=accepted,
        wall_time_s=wall,
        output_ids=output,
    )
