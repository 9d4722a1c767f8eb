"""The loss guard over gRPC: a Generate whose drafts do not pay stops drafting part-way,
its output unchanged; the policy learns which steps asked for no draft; the metric counts it;
the setting turns it off."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from router.components import Components
from router.pb import router_pb2 as pb
from router.settings import LossGuardSettings
from tests.router.conftest import (
    ADMIN,
    COMPLETION_PROMPT,
    ServingWorld,
    SidecarThread,
    greedy_reference,
)

GUARD = LossGuardSettings()
MAX_NEW = 60
FAR = "far"


@pytest.fixture(scope="module")
def far_dir(serving_world: ServingWorld, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The world's generic drafter with fresh random weights: the tiny target (which
    repeats one token) rejects its drafts, as a real target rejects an unrelated drafter."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = serving_world.world.drafter_dirs["generic"]
    destination = serving_world.extra_root / "far-for-the-loss-guard"
    model = AutoModelForCausalLM.from_pretrained(source)
    torch.manual_seed(7)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.5)
    model.save_pretrained(destination, safe_serialization=True)
    AutoTokenizer.from_pretrained(source).save_pretrained(destination)
    return destination


def _sidecar(
    serving_world: ServingWorld,
    components: Components,
    tmp_path_factory: pytest.TempPathFactory,
    far_dir: Path,
    guard: LossGuardSettings,
) -> Iterator[SidecarThread]:
    settings = serving_world.settings(tmp_path_factory.mktemp("state"), loss_guard=guard)
    running = SidecarThread(settings, components)
    request = pb.RegisterDrafterRequest(name=FAR, kind="model", path=str(far_dir))
    running.stub.RegisterDrafter(request, metadata=ADMIN)
    yield running
    running.stub.RemoveDrafter(pb.RemoveDrafterRequest(name=FAR), metadata=ADMIN)
    running.stop()


@pytest.fixture(scope="module")
def guarded(
    serving_world: ServingWorld,
    components: Components,
    tmp_path_factory: pytest.TempPathFactory,
    far_dir: Path,
) -> Iterator[SidecarThread]:
    yield from _sidecar(serving_world, components, tmp_path_factory, far_dir, GUARD)


@pytest.fixture(scope="module")
def unguarded(
    serving_world: ServingWorld,
    components: Components,
    tmp_path_factory: pytest.TempPathFactory,
    far_dir: Path,
) -> Iterator[SidecarThread]:
    off = LossGuardSettings(enabled=False)
    yield from _sidecar(serving_world, components, tmp_path_factory, far_dir, off)


def _generate(sidecar: SidecarThread) -> tuple[list[int], pb.GenerationStats]:
    chunks = list(
        sidecar.stub.Generate(
            pb.GenerateRequest(
                text=COMPLETION_PROMPT,
                max_new_tokens=MAX_NEW,
                force_drafter=FAR,
                force_draft_length=4,
            ),
            timeout=120,
        )
    )
    return [t.id for c in chunks for t in c.tokens], chunks[-1].stats


def _trips(sidecar: SidecarThread) -> float:
    """Guarded Generates that stopped drafting (to="0")."""
    text = urllib.request.urlopen(sidecar.metrics_url, timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith('specroute_loss_guard_trips_total{drafter="far",to="0"}'):
            return float(line.split()[-1])
    return 0.0


class _Learnt:
    """A learning log (``router.policy_holder.LearningLog``) keeping each outcome the
    sidecar's policy learns from."""

    def __init__(self) -> None:
        self.outcomes: list[Any] = []

    def outcome(self, context: Any, decision: Any, outcome: Any) -> None:
        self.outcomes.append(outcome)

    def counterfactual(self, *args: Any) -> None:
        return None

    def cursor(self) -> dict[str, Any]:
        return {}

    def restore(self, cursor: Any, policy: Any) -> None:
        return None

    def drafter_added(self, policy: Any, name: str) -> None:
        return None

    def drafter_not_served(self, name: str) -> None:
        return None


def test_a_guarded_generate_stops_drafting_and_keeps_the_output(guarded: SidecarThread) -> None:
    expected, _ = greedy_reference(guarded, COMPLETION_PROMPT, MAX_NEW)
    learnt = _Learnt()
    guarded.service.policy.attach_log(learnt)
    try:
        ids, stats = _generate(guarded)
    finally:
        guarded.service.policy._log = None
    assert ids == expected
    drafted = list(stats.drafted_per_step)
    first_plain = drafted.index(0)
    assert drafted[0] > 0 and 2 <= first_plain < len(drafted) - 2
    assert not any(drafted[first_plain:])
    assert _trips(guarded) == 1.0
    # The policy learns that the steps after the trip asked for no draft: counted as
    # failures of the drafter they would wrongly make it look far worse still.
    (outcome,) = learnt.outcomes
    assert list(outcome.drafted_per_step) == drafted
    requested = list(outcome.requested_per_step)
    assert len(requested) == len(drafted)  # empty would mean: every step asked for k
    assert all(r > 0 for r in requested[:first_plain]) and not any(requested[first_plain:])


def test_the_setting_turns_the_guard_off(unguarded: SidecarThread) -> None:
    expected, _ = greedy_reference(unguarded, COMPLETION_PROMPT, MAX_NEW)
    ids, stats = _generate(unguarded)
    assert ids == expected
    # Every step drafts (the last may be capped by max_new_tokens).
    assert all(d > 0 for d in list(stats.drafted_per_step)[:-1])
    assert _trips(unguarded) == 0.0


def test_a_sampled_runs_guard_prices_drafts_at_a_fixed_cost(sidecar: SidecarThread) -> None:
    """A sampled run's guard reads no timing (its schedule decides the draws, and the run
    must be repeatable from its seed): a model drafter at the fixed default, a lookup at
    its kind's hint (free); a greedy run's guard reads the request's own timings."""
    from router.domain import Sampling
    from router.service import SAMPLED_DRAFT_COST

    service = sidecar.service
    model, lookup = service.drafters.get("generic").drafter, service.drafters.get("ngram").drafter
    sampled, greedy = Sampling(do_sample=True), Sampling()
    assert service._loss_guard(4, sampled, model).draft_cost_ratio == SAMPLED_DRAFT_COST
    assert service._loss_guard(4, sampled, lookup).draft_cost_ratio == 0.0
    assert service._loss_guard(4, greedy, model).draft_cost_ratio is None


def test_only_a_greedy_runs_guard_prices_plain_decoding_at_the_policys_measure(
    sidecar: SidecarThread,
) -> None:
    """A greedy run's guard takes the serving policy's (q, s); a sampled run's stays at
    q = 1 (its schedule must follow its seed, not the machine), and so does a guard under
    a policy that measures no q."""
    from router.domain import Sampling

    service = sidecar.service
    model = service.drafters.get("generic").drafter
    sidecar.stub.SetPolicy(pb.SetPolicyRequest(policy="thompson", reset_state=True), metadata=ADMIN)
    service.policy._policy.costs_.plain_.add(0.6)
    greedy = service._loss_guard(4, Sampling(), model)
    assert (greedy.plain_step_ratio, greedy.plain_step_slope) == (0.6, 0.05)
    sampled = service._loss_guard(4, Sampling(do_sample=True), model)
    assert (sampled.plain_step_ratio, sampled.plain_step_slope) == (1.0, None)
    sidecar.stub.SetPolicy(pb.SetPolicyRequest(policy="fixed", reset_state=True), metadata=ADMIN)
    assert service._loss_guard(4, Sampling(), model).plain_step_ratio == 1.0
