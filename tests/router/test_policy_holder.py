"""The policy holder: a snapshot this build cannot restore is kept, not pruned away, and
the policy starts from its priors."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from router.policy.base import NONE_DRAFTER, Context, Decision, IncompatibleStateError
from router.policy.registry import make_policy
from router.policy_holder import LOG_CURSOR_KEY, UNRESTORED_SUFFIX, PolicyHolder
from router.store import SNAPSHOTS_KEPT, SidecarStore
from tests.router.policy.helpers import geometric_outcome


def test_an_unrestorable_snapshot_is_kept_beside_the_fresh_policy(tmp_path: Path) -> None:
    """A snapshot of another format version (an upgrade, a downgrade) starts the policy
    from priors, as before; the snapshot was then pruned once SNAPSHOTS_KEPT newer ones
    had been saved, and the learned state was gone."""
    store = SidecarStore(tmp_path)
    holder = PolicyHolder(store, lambda: ["generic", "math"], lambda name: None)
    holder.start("thompson")
    learned = {**holder.snapshot().state, "version": 999}  # a format this build cannot read
    store.save_policy("thompson", 41, learned)

    holder = PolicyHolder(store, lambda: ["generic", "math"], lambda name: None)  # a restart
    assert holder.start("thompson") is None  # not restored: from priors
    for _ in range(SNAPSHOTS_KEPT + 1):
        holder.snapshot()
    kept = store.latest_policy("thompson" + UNRESTORED_SUFFIX)
    assert kept is not None and kept.version == 41 and kept.state == learned
    latest = store.latest_policy("thompson")
    assert latest is not None and latest.state.get("version") != 999


def test_a_start_without_pooling_keeps_the_pooled_cursor(tmp_path: Path) -> None:
    """A start with pooling off took snapshots without the cursor of the outcomes the
    state holds; turned on again, pooling replayed the whole retained stream into it,
    this replica's own outcomes included: counted twice."""
    store = SidecarStore(tmp_path)
    holder = PolicyHolder(store, lambda: ["generic", "math"], lambda name: None)
    holder.start("thompson")
    cursor = {"applied": {"a-1": 7, "b-1": 3}}
    store.save_policy("thompson", 5, {**holder.snapshot().state, LOG_CURSOR_KEY: cursor})

    without_pooling = PolicyHolder(store, lambda: ["generic", "math"], lambda name: None)
    assert without_pooling.start("thompson") is not None  # restored, no log attached
    assert without_pooling.snapshot().state[LOG_CURSOR_KEY] == cursor


DAMAGED: dict[str, tuple[str, dict[str, Any]]] = {
    "thompson contexts": ("thompson", {"contexts": "not a list of contexts"}),
    "thompson costs": ("thompson", {"costs": {"draft_ratios": 5}}),
    "thompson rng": ("thompson", {"rng": {"bit_generator": "NoSuchGenerator"}}),
    "ucb contexts": ("ucb", {"contexts": [[1, 2]]}),
    "static contexts": ("static", {"contexts": [{"cluster": None}]}),
}


@pytest.mark.parametrize("case", sorted(DAMAGED))
def test_a_damaged_snapshot_starts_the_policy_from_priors_and_is_kept(
    tmp_path: Path, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A snapshot of this build's format whose contents do not load (a bug in the build
    that saved it, a hand edit) failed SetPolicy, and the sidecar's start, with an
    unexpected error. It now starts the policy from its priors (not from what the failed
    load left half-applied) and is kept as <policy>.unrestored."""
    name, damage = DAMAGED[case]
    store = SidecarStore(tmp_path)
    holder = PolicyHolder(store, lambda: ["generic", "math"], lambda drafter: None)
    holder.start(name)
    cursor = {"applied": {"replica-a": 12}}
    damaged = {**holder.snapshot().state, **damage, LOG_CURSOR_KEY: cursor}
    with pytest.raises(Exception) as raised:  # the policy itself refuses it...
        make_policy(name, ["generic", "math"]).load_state_dict(damaged)
    assert not isinstance(raised.value, IncompatibleStateError)
    store.save_policy(name, 7, damaged)

    holder = PolicyHolder(store, lambda: ["generic", "math"], lambda drafter: None)  # restart
    with caplog.at_level(logging.ERROR, logger="router.policy_holder"):
        assert holder.start(name) is None  # ...and the holder serves from priors
    assert "starting from priors" in caplog.text
    kept = store.latest_policy(name + UNRESTORED_SUFFIX)
    assert kept is not None and kept.version == 7 and kept.state == damaged
    fresh = holder.snapshot().state
    assert fresh["updates"] == 0 and fresh["contexts"] == []
    decision, _ = holder.select(Context("math", 0), ["generic", "math"])
    assert decision.drafter in {"generic", "math", NONE_DRAFTER}
    # A pooled log resumes from nothing: the cursor described the state not restored.
    log = CursorLog()
    holder.attach_log(log)
    assert log.restored == [None]


class CursorLog:
    """A learning log that records the cursor it is resumed from."""

    def __init__(self) -> None:
        self.restored: list[Mapping[str, Any] | None] = []

    def outcome(self, context: Any, decision: Any, outcome: Any) -> None:
        pass

    def counterfactual(
        self,
        context: Any,
        drafter: str,
        accepted_per_step: Sequence[int],
        draft_length: int,
        drafted_per_step: Sequence[int] | None = None,
    ) -> None:
        pass

    def cursor(self) -> dict[str, Any]:
        return {}

    def restore(self, cursor: Mapping[str, Any] | None, policy: Any) -> None:
        self.restored.append(cursor)

    def drafter_added(self, policy: Any, name: str) -> None:
        pass

    def drafter_not_served(self, name: str) -> None:
        pass


def test_setting_the_serving_policy_again_keeps_what_it_learnt_since_its_last_snapshot(
    tmp_path: Path,
) -> None:
    """SetPolicy to the policy already served (a new configuration) restored the last
    periodic snapshot, not the state being served: what it learnt since (up to
    snapshot_interval_s of traffic) was gone, and the next snapshot made it final."""
    store = SidecarStore(tmp_path)
    holder = PolicyHolder(store, lambda: ["generic", "math"], lambda drafter: None)
    holder.start("thompson")
    holder.snapshot()  # the periodic snapshot, before the traffic below
    context, rng = Context("math", 0), np.random.default_rng(0)
    for _ in range(5):
        decision, _ = holder.select(context, ["generic", "math"])
        holder.update(context, decision, geometric_outcome(rng, decision, 0.6, tokens=20))
    learnt = holder.state()[1]
    assert learnt == 5

    holder.start("thompson", {"gamma": 0.98})
    assert holder.state()[1] == learnt
    latest = store.latest_policy("thompson")
    assert latest is not None and latest.version == learnt


def test_a_reset_is_saved_as_it_is_made(tmp_path: Path) -> None:
    """SetPolicy with reset_state started the policy from its priors but saved only the
    state it replaced: a crash before the next periodic snapshot restored what the
    operator had reset. A first switch to a policy never saved is saved at once too."""
    store = SidecarStore(tmp_path)
    holder = PolicyHolder(store, lambda: ["generic", "math"], lambda drafter: None)
    holder.start("thompson")
    context, rng = Context("math", 0), np.random.default_rng(0)
    for _ in range(5):
        decision, _ = holder.select(context, ["generic", "math"])
        holder.update(context, decision, geometric_outcome(rng, decision, 0.6, tokens=20))
    holder.snapshot()

    holder.start("thompson", restore=False)  # --reset
    restarted = PolicyHolder(store, lambda: ["generic", "math"], lambda drafter: None)
    restored = restarted.start("thompson")  # a restart before any periodic snapshot
    assert restored is not None and restored.version == 0
    assert restarted.state()[1] == 0

    holder.start("ucb")  # never saved before
    latest = store.latest_policy("ucb")
    assert latest is not None and latest.version == 0


def test_a_snapshot_read_before_a_newer_one_is_never_saved_after_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The periodic snapshot read the state under the lock and saved it after: a save
    begun meanwhile (the final snapshot, a policy switch) could land first, and the
    older state, saved last, was the one restored."""
    import threading

    store = SidecarStore(tmp_path)
    holder = PolicyHolder(store, lambda: ["generic", "math"], lambda drafter: None)
    holder.start("thompson")
    context, rng = Context("math", 0), np.random.default_rng(0)
    save, reading, go_on = store.save_policy, threading.Event(), threading.Event()

    def slow_first_save(*args: Any) -> Any:
        if not reading.is_set():  # the periodic snapshot: read, then held before its save
            reading.set()
            go_on.wait(10)
        return save(*args)

    monkeypatch.setattr(store, "save_policy", slow_first_save)
    periodic = threading.Thread(target=holder.snapshot)
    periodic.start()
    assert reading.wait(10)
    for _ in range(3):  # traffic, then the final snapshot, while the periodic one waits
        decision, _ = holder.select(context, ["generic", "math"])
        holder.update(context, decision, geometric_outcome(rng, decision, 0.6, tokens=20))
    final = threading.Thread(target=holder.snapshot)
    final.start()
    final.join(0.5)
    go_on.set()
    periodic.join(10)
    final.join(10)
    latest = store.latest_policy("thompson")
    assert latest is not None and latest.version == holder.state()[1] == 3


def test_a_drafter_registered_while_the_policy_is_switched_is_in_the_new_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A SetPolicy makes the new policy outside the lock: a drafter registered meanwhile
    joined the old policy only, and the new one never chose it until a restart."""
    store = SidecarStore(tmp_path)
    live = ["generic", "math"]
    holder = PolicyHolder(store, lambda: list(live), lambda drafter: None)
    holder.start("thompson")
    make = holder._make

    def make_then_register(name: str, hinted: Any) -> Any:
        made = make(name, hinted)
        live.append("late")  # a registration lands between the make and the swap
        holder.add_drafter("late", None)
        return made

    monkeypatch.setattr(holder, "_make", make_then_register)
    holder.start("ucb", restore=False)
    assert "late" in holder.state()[2]["drafters"]


def test_a_drafter_not_served_at_one_start_keeps_what_the_policy_learnt_of_it(
    tmp_path: Path,
) -> None:
    """A stored drafter a start did not serve (a late mount, files moved) had its arms
    removed from the restored policy, and the next snapshot made that final: served again,
    it started from its prior. Its arms are kept, and it is never chosen meanwhile."""
    store = SidecarStore(tmp_path)
    first = PolicyHolder(store, lambda: ["generic", "math"], lambda drafter: None)
    first.start("thompson")
    context, rng = Context("math", 0), np.random.default_rng(0)
    for _ in range(20):
        decision, _ = first.select(context, ["math"])
        first.update(context, decision, geometric_outcome(rng, decision, 0.9, tokens=20))
    learnt = {a.drafter: (a.alpha, a.beta) for c in first.describe()[2] for a in c.arms}
    first.snapshot()

    unserved = PolicyHolder(store, lambda: ["generic"], lambda drafter: None, kept=lambda: ["math"])
    unserved.start("thompson")
    for _ in range(10):
        decision, _ = unserved.select(context, ["generic"])
        assert decision.drafter != "math"
    unserved.snapshot()

    served = PolicyHolder(store, lambda: ["generic", "math"], lambda drafter: None)
    served.start("thompson")
    arms = {a.drafter: (a.alpha, a.beta) for c in served.describe()[2] for a in c.arms}
    assert arms["math"] == learnt["math"]


def _arms_of(holder: PolicyHolder, drafter: str) -> list[list[float]]:
    """``drafter``'s (alpha, beta, alpha0, beta0, decisions, residual) in every context."""
    return [context["arms"][drafter] for context in holder.state()[2]["contexts"]]


def test_a_drafter_registered_again_after_the_snapshot_starts_from_its_prior(
    tmp_path: Path,
) -> None:
    """Remove a registered drafter, register a new one under the same name, then crash
    before the next periodic snapshot: the restart restored the snapshot, in which the
    name's arms were the old drafter's, and the new drafter inherited what the old one had
    learnt. Arms of a drafter registered after the snapshot are now left out of it."""
    import time

    store = SidecarStore(tmp_path)
    live, registered = ["generic", "spare"], {"spare": time.time()}
    holder = PolicyHolder(
        store, lambda: list(live), lambda drafter: None, registered=lambda: dict(registered)
    )
    holder.start("thompson")
    context, rng = Context("math", 0), np.random.default_rng(0)
    for drafter in ("spare", "generic") * 10:
        decision = Decision(drafter, 4)
        holder.update(context, decision, geometric_outcome(rng, decision, 0.9, tokens=30))
    learnt = {name: _arms_of(holder, name) for name in ("generic", "spare")}
    assert learnt["spare"][0][4] == 10  # ten decisions learnt for the first "spare"
    holder.snapshot()

    holder.remove_drafter("spare")  # RemoveDrafter, then RegisterDrafter again
    time.sleep(0.01)
    registered["spare"] = time.time()
    holder.add_drafter("spare", None)
    fresh = _arms_of(holder, "spare")
    assert fresh[0][4] == 0

    restarted = PolicyHolder(  # a crash: no final snapshot
        store, lambda: list(live), lambda drafter: None, registered=lambda: dict(registered)
    )
    assert restarted.start("thompson") is not None
    assert _arms_of(restarted, "spare") == fresh  # the new drafter's prior, nothing inherited
    assert _arms_of(restarted, "generic") == learnt["generic"]  # the rest is restored

    registered["spare"] = 0.0  # a drafter registered before the snapshot keeps its arms
    again = PolicyHolder(
        store, lambda: list(live), lambda drafter: None, registered=lambda: dict(registered)
    )
    again.start("thompson")
    assert _arms_of(again, "spare") == learnt["spare"]
