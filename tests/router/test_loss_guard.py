"""The loss guard over gRPC: a Generate whose drafts do not pay stops drafting part-way,
its output unchanged; the metric counts it; the setting turns it off."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator

import pytest

from router.components import Components
from router.pb import router_pb2 as pb
from router.settings import LossGuardSettings
from tests.router.conftest import COMPLETION_PROMPT, ServingWorld, SidecarThread, greedy_reference

# A guard that trips as soon as it has 8 observations unless nearly every draft is kept:
# the barely trained tiny world's drafters never are.
EAGER = LossGuardSettings(break_even=0.95, confidence=0.5)
MAX_NEW = 40


def _sidecar(
    serving_world: ServingWorld,
    components: Components,
    tmp_path_factory: pytest.TempPathFactory,
    guard: LossGuardSettings,
) -> Iterator[SidecarThread]:
    settings = serving_world.settings(tmp_path_factory.mktemp("state"), loss_guard=guard)
    running = SidecarThread(settings, components)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def eager(
    serving_world: ServingWorld, components: Components, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SidecarThread]:
    yield from _sidecar(serving_world, components, tmp_path_factory, EAGER)


@pytest.fixture(scope="module")
def unguarded(
    serving_world: ServingWorld, components: Components, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SidecarThread]:
    off = LossGuardSettings(enabled=False, break_even=0.95, confidence=0.5)
    yield from _sidecar(serving_world, components, tmp_path_factory, off)


def _generate(sidecar: SidecarThread) -> tuple[list[int], pb.GenerationStats]:
    chunks = list(
        sidecar.stub.Generate(
            pb.GenerateRequest(
                text=COMPLETION_PROMPT,
                max_new_tokens=MAX_NEW,
                force_drafter="generic",
                force_draft_length=4,
            ),
            timeout=120,
        )
    )
    return [t.id for c in chunks for t in c.tokens], chunks[-1].stats


def _trips(sidecar: SidecarThread) -> float:
    text = urllib.request.urlopen(sidecar.metrics_url, timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith('specroute_loss_guard_trips_total{drafter="generic"}'):
            return float(line.split()[-1])
    return 0.0


def test_a_guarded_generate_stops_drafting_and_keeps_the_output(eager: SidecarThread) -> None:
    expected, _ = greedy_reference(eager, COMPLETION_PROMPT, MAX_NEW)
    ids, stats = _generate(eager)
    assert ids == expected
    drafted = list(stats.drafted_per_step)
    first_plain = drafted.index(0)
    assert drafted[0] > 0 and 2 <= first_plain < len(drafted) - 2
    assert not any(drafted[first_plain:])
    assert _trips(eager) == 1.0


def test_the_setting_turns_the_guard_off(unguarded: SidecarThread) -> None:
    expected, _ = greedy_reference(unguarded, COMPLETION_PROMPT, MAX_NEW)
    ids, stats = _generate(unguarded)
    assert ids == expected
    # Every step drafts (the last may be capped by max_new_tokens).
    assert all(d > 0 for d in list(stats.drafted_per_step)[:-1])
    assert _trips(unguarded) == 0.0
