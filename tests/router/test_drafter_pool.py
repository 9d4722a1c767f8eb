"""The drafter pool's restore: stored drafters pass registration's checks again at start."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from router.bundle import ModelBundle


def test_restore_rechecks_roots_and_options_and_keeps_what_it_refuses(
    tiny_world: ModelBundle, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from drafters.loader import default_placement, describe_target
    from router.drafter_pool import DrafterPool
    from router.store import DrafterRecord, SidecarStore

    target = describe_target(tiny_world.target_dir, placement=default_placement("cpu"))
    store = SidecarStore(tmp_path / "state")
    generic_dir = str(tiny_world.drafter_dirs["generic"])
    store.add_drafter(DrafterRecord(name="outside", kind="model", path=generic_dir))
    store.add_drafter(DrafterRecord(name="misspelt", kind="ngram", options={"maxn": "4"}))
    store.add_drafter(DrafterRecord(name="lookup4", kind="ngram", options={"max_n": "4"}))

    # The roots were narrowed since "outside" was registered: it is not loaded.
    narrowed = tmp_path / "models"
    narrowed.mkdir()
    pool = DrafterPool(target, None, store, [narrowed])
    with caplog.at_level(logging.WARNING, logger="router.drafter_pool"):
        assert pool.restore() == ["lookup4"]
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("outside not served" in m and "root" in m for m in warned), warned
    assert any("misspelt not served" in m and "'maxn'" in m for m in warned), warned
    assert pool.names() == ["lookup4"]
    # Refused is not forgotten: the records stay for a start whose settings allow them,
    # and are listed with the reason (ListDrafters' unavailable).
    assert sorted(r.name for r in store.drafters()) == ["lookup4", "misspelt", "outside"]
    unserved = {record.name: why for record, why in pool.unserved()}
    assert set(unserved) == {"outside", "misspelt"} and "'maxn'" in unserved["misspelt"]
    # The operator can remove one (it was NOT_FOUND: not loaded), and register the name
    # again (it was ALREADY_EXISTS: stored).
    assert pool.remove("misspelt").name == "misspelt"
    assert sorted(r.name for r in store.drafters()) == ["lookup4", "outside"]
    assert [record.name for record, _ in pool.unserved()] == ["outside"]

    # With the bundle's directory among the roots again, the model drafter comes back.
    widened = DrafterPool(target, None, store, [tiny_world.root])
    assert sorted(widened.restore()) == ["lookup4", "outside"]


def test_restore_refuses_a_model_drafter_whose_weights_changed_since_registration(
    tiny_world: ModelBundle, tmp_path: Path
) -> None:
    """A stored model drafter's weights replaced in place (another training run written
    over them, or a damaged copy that still parses) were served under the old record,
    with what the policy learnt of the old weights. Now it is not served, the reason
    names the change, and its record stays for the operator to remove."""
    import shutil

    from drafters.loader import (
        default_placement,
        describe_target,
        safetensors_files,
        weights_digest,
    )
    from router.drafter_pool import DrafterPool
    from router.store import DrafterRecord, SidecarStore

    target = describe_target(tiny_world.target_dir, placement=default_placement("cpu"))
    root = tmp_path / "models"
    copy = root / "generic"
    shutil.copytree(tiny_world.drafter_dirs["generic"], copy)
    store = SidecarStore(tmp_path / "state")
    digest = weights_digest(safetensors_files(copy))
    store.add_drafter(DrafterRecord("mine", "model", str(copy), weights_digest=digest))
    assert DrafterPool(target, None, store, [root]).restore() == ["mine"]

    # Another drafter's (valid) weights written over the registered ones.
    other = safetensors_files(tiny_world.drafter_dirs["math"])
    assert [f.name for f in other] == [f.name for f in safetensors_files(copy)]
    for file in other:
        shutil.copyfile(file, copy / file.name)
    pool = DrafterPool(target, None, store, [root])
    assert pool.restore() == []
    ((record, why),) = pool.unserved()
    assert record.name == "mine" and "changed since it was registered" in why, why
    assert [r.name for r in store.drafters()] == ["mine"]


def test_a_stored_drafter_a_built_in_shadows_is_listed_and_removable(
    tiny_world: ModelBundle, tmp_path: Path
) -> None:
    """A registered drafter whose name a built-in took since (drafter_dirs, the bundle) was
    skipped unseen at start: not listed as unavailable, and RemoveDrafter found the
    built-in and refused, so its stored record could never go."""
    from drafters.loader import default_placement, describe_target
    from router.drafter_pool import DrafterPool
    from router.store import DrafterRecord, SidecarStore

    target = describe_target(tiny_world.target_dir, placement=default_placement("cpu"))
    store = SidecarStore(tmp_path / "state")
    store.add_drafter(DrafterRecord(name="ngram", kind="ngram", options={"max_n": "4"}))
    pool = DrafterPool(target, None, store, [tiny_world.root])
    pool.add_builtin(DrafterRecord(name="ngram", kind="ngram", builtin=True))
    assert pool.restore() == []
    (shadowed, why), *others = pool.unserved()
    assert shadowed.name == "ngram" and "built-in" in why and not others
    assert pool.remove("ngram").options == {"max_n": "4"}  # the stored one
    assert store.drafters() == [] and pool.unserved() == []
    assert pool.get("ngram").record.builtin  # the built-in still serves
