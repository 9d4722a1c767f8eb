"""The policy holder: a snapshot this build cannot restore is kept, not pruned away."""

from __future__ import annotations

from pathlib import Path

from router.policy_holder import UNRESTORED_SUFFIX, PolicyHolder
from router.store import SNAPSHOTS_KEPT, SidecarStore


def test_an_unrestorable_snapshot_is_kept_beside_the_fresh_policy(tmp_path: Path) -> None:
    """A snapshot of another format version (an upgrade, a downgrade) starts the policy
    from priors, as before; the snapshot was then pruned once SNAPSHOTS_KEPT newer ones
    had been saved, and the learned state was gone."""
    store = SidecarStore(tmp_path)
    holder = PolicyHolder(store, lambda: ["generic", "math"], lambda name: None)
    holder.start("thompson")
    learned = {**holder.snapshot().state, "version": 999}  # a format this build cannot read
    store.save_policy("thompson", 41, learned)

    assert holder.start("thompson") is None  # not restored: from priors
    for _ in range(SNAPSHOTS_KEPT + 1):
        holder.snapshot()
    kept = store.latest_policy("thompson" + UNRESTORED_SUFFIX)
    assert kept is not None and kept.version == 41 and kept.state == learned
    latest = store.latest_policy("thompson")
    assert latest is not None and latest.state.get("version") != 999
