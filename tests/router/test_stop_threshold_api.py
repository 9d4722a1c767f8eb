"""A decision's stop threshold over gRPC: pinned with force_stop_threshold, echoed in the
RouteDecision, applied by the engine (drafts end early, the output stays the target's),
and refused with INVALID_ARGUMENT when it is not a number in [0, 1)."""

from __future__ import annotations

import math
from collections.abc import Iterator

import grpc
import pytest

from router.components import Components
from router.pb import router_pb2 as pb
from router.policy.base import Decision, Outcome
from router.settings import LossGuardSettings
from tests.router.conftest import COMPLETION_PROMPT, ServingWorld, SidecarThread, greedy_reference

MAX_NEW = 24
K = 12


@pytest.fixture(scope="module")
def sidecar(
    serving_world: ServingWorld, components: Components, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SidecarThread]:
    """The shared sidecar's settings without the loss guard: with drafts a stop rule keeps
    short, the guard may stop drafting part-way (by the request's timings), which is its
    job but not what these tests count."""
    settings = serving_world.settings(
        tmp_path_factory.mktemp("state"), loss_guard=LossGuardSettings(enabled=False)
    )
    running = SidecarThread(settings, components)
    yield running
    running.stop()


def _generate(sidecar: SidecarThread, **fields: object) -> list[pb.GenerateChunk]:
    request = pb.GenerateRequest(
        text=COMPLETION_PROMPT,
        max_new_tokens=MAX_NEW,
        force_drafter="generic",
        force_draft_length=K,
        no_update=True,
        **fields,  # type: ignore[arg-type]
    )
    return list(sidecar.stub.Generate(request, timeout=120))


@pytest.mark.parametrize(
    "threshold", [math.nan, math.inf, -0.25, 1.0, 3.0], ids=["nan", "inf", "neg", "one", "big"]
)
def test_a_forced_threshold_outside_0_1_is_invalid_argument(
    sidecar: SidecarThread, threshold: float
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        _generate(sidecar, force_stop_threshold=threshold)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "force_stop_threshold" in (caught.value.details() or "")
    # The server keeps serving.
    assert _generate(sidecar)[-1].stats.generated_tokens > 0


def test_a_forced_threshold_is_echoed_and_shortens_drafts_losslessly(
    sidecar: SidecarThread,
) -> None:
    expected, _ = greedy_reference(sidecar, COMPLETION_PROMPT, MAX_NEW)
    plain = _generate(sidecar)
    assert plain[0].decision.stop_threshold == 0.0
    stopped = _generate(sidecar, force_stop_threshold=0.99)
    assert stopped[0].decision.stop_threshold == pytest.approx(0.99)
    for chunks in (plain, stopped):
        assert [t.id for c in chunks[1:] for t in c.tokens] == expected
    plain_drafted = list(plain[-1].stats.drafted_per_step)
    stopped_drafted = list(stopped[-1].stats.drafted_per_step)
    # A 0.99 threshold stops the built-in drafter early on most steps (its first draft is
    # always made), so it drafts fewer tokens per step than the fixed k.
    assert all(1 <= d <= K for d in stopped_drafted[:-1])
    assert plain[-1].stats.stopped_steps == 0 < stopped[-1].stats.stopped_steps
    assert sum(stopped_drafted) / len(stopped_drafted) < sum(plain_drafted) / len(plain_drafted)


def test_a_decision_refuses_a_threshold_outside_0_1() -> None:
    for threshold in (math.nan, -0.1, 1.0):
        with pytest.raises(ValueError, match="stop threshold"):
            Decision("generic", 4, stop_threshold=threshold)
    assert Decision("generic", 4, stop_threshold=0.5).stop_threshold == 0.5


def test_an_outcome_counts_stopped_steps_within_its_steps() -> None:
    outcome = Outcome.from_steps(
        [3, 1, 2], [3, 1, 0], draft_time_s=0.1, verify_time_s=0.2, stopped_steps=2
    )
    assert outcome.stopped_steps == 2
    # A fully accepted draft the rule shortened is no failure: the likelihood reads drafts.
    assert outcome.acceptance_counts(3) == (4, 1)
    with pytest.raises(ValueError, match="stopped_steps"):
        Outcome.from_steps([3], [1], draft_time_s=0.1, verify_time_s=0.2, stopped_steps=2)
