"""A model drafter's draft split into its lead and its further forwards
(``Proposal.further_time_s``), on a stub forward whose first call of a step costs 3 s of a
fake clock and each further call 1 s."""

from __future__ import annotations

import types

import pytest
import torch

from drafters import model_drafter
from drafters.model_drafter import ModelDraftSession
from drafters.sampling import SamplingConfig

VOCAB = 8


class _StubForward:
    """Logits that put the next token at ``token``; advances ``now`` by the call's cost."""

    def __init__(self, costs: list[float], token: int = 5) -> None:
        self.costs = costs
        self.token = token
        self.now = 0.0

    def __call__(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        self.now += self.costs.pop(0)
        logits = torch.zeros(VOCAB)
        logits[self.token] = 1.0
        return logits


class _StopAtSecond:
    """A stop rule that ends every draft at its second position."""

    active = True

    def stops(self, probs: torch.Tensor) -> bool:
        return True


def _session(
    monkeypatch: pytest.MonkeyPatch, forward: _StubForward, stop_ids: frozenset[int] = frozenset()
) -> ModelDraftSession:
    session = ModelDraftSession(None, torch.device("cpu"), prompt_length=4, stop_ids=stop_ids)
    session._forward = forward  # type: ignore[assignment]
    monkeypatch.setattr(
        model_drafter, "time", types.SimpleNamespace(perf_counter=lambda: forward.now)
    )
    return session


def test_the_further_forwards_are_timed_apart_from_the_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    forward = _StubForward([3.0, 1.0, 1.0, 1.0])
    proposal = _session(monkeypatch, forward).propose([1, 2, 3, 4], 4, SamplingConfig(), None)
    assert proposal.length == 4
    assert (proposal.further_time_s, proposal.further_forwards) == (3.0, 3)


def test_a_stopped_draft_counts_the_forward_its_rule_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """The forward whose distribution stopped the draft ran, though it drafted nothing:
    it is a further forward, so the time per forward is not inflated by it."""
    forward = _StubForward([3.0, 1.0])
    session = _session(monkeypatch, forward)
    proposal = session.propose([1, 2, 3, 4], 4, SamplingConfig(), None, _StopAtSecond())  # type: ignore[arg-type]
    assert proposal.length == 1 and proposal.stopped
    assert (proposal.further_time_s, proposal.further_forwards) == (1.0, 1)


def test_a_draft_ended_by_a_stop_token_at_once_is_all_lead(monkeypatch: pytest.MonkeyPatch) -> None:
    forward = _StubForward([3.0])
    proposal = _session(monkeypatch, forward, frozenset({5})).propose(
        [1, 2, 3, 4], 4, SamplingConfig(), None
    )
    assert proposal.length == 1
    assert (proposal.further_time_s, proposal.further_forwards) == (0.0, 0)
