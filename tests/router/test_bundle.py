"""Opening a model bundle: manifest paths, drafter order, the default directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from router.bundle import MANIFEST, BundleNotFoundError, ModelBundle, default_bundle_dir


def test_a_bundle_opens_from_its_manifest_generic_drafter_first(tmp_path: Path) -> None:
    manifest = {
        "scale": "custom",
        "tasks": ["math", "code"],
        "target": "target",
        "corpus": "corpus",
        "drafters": {"code": "drafters/code", "extra": "more/extra", "generic": "drafters/g"},
    }
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    bundle = ModelBundle.load(tmp_path)
    assert bundle.root == tmp_path.resolve()
    assert (bundle.scale, bundle.tasks) == ("custom", ("math", "code"))
    assert bundle.target_dir == tmp_path.resolve() / "target"
    assert bundle.corpus_dir == tmp_path.resolve() / "corpus"
    # The generic drafter, then task drafters in task order, then any other by name.
    assert list(bundle.drafter_dirs) == ["generic", "code", "extra"]
    assert bundle.drafter_dirs["extra"] == tmp_path.resolve() / "more" / "extra"


def test_loading_an_empty_directory_says_how_to_build(tmp_path: Path) -> None:
    with pytest.raises(BundleNotFoundError, match="specroute world build"):
        ModelBundle.load(tmp_path)


def test_default_bundle_dir_honours_specroute_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPECROUTE_HOME", str(tmp_path))
    assert default_bundle_dir("tiny") == tmp_path / "worlds" / "tiny"
    assert default_bundle_dir() == tmp_path / "worlds" / "default"
