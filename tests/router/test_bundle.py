"""Opening a model bundle: manifest paths, drafter order, the default directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from router.bundle import (
    MANIFEST,
    BundleNotFoundError,
    InvalidBundleError,
    ModelBundle,
    default_bundle_dir,
)


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


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("garbage{", "cannot be read"),
        ("[1, 2]", "not a JSON object"),
        ('{"scale": "x", "tasks": [], "target": "t", "corpus": "c"}', "no 'drafters' entry"),
        ('{"scale": "x", "tasks": 3, "target": "t", "corpus": "c", "drafters": {}}', "not a"),
        # Entries outside the bundle: its models were loaded from anywhere, unchecked.
        (
            '{"scale": "x", "tasks": [], "target": "/opt/other", "corpus": "c", "drafters": {}}',
            "paths inside it",
        ),
        (
            '{"scale": "x", "tasks": [], "target": "t", "corpus": "c",'
            ' "drafters": {"generic": "../elsewhere/d"}}',
            "paths inside it",
        ),
    ],
)
def test_a_damaged_manifest_is_named_not_a_traceback(tmp_path: Path, text: str, says: str) -> None:
    """JSONDecodeError, KeyError or TypeError reached `specroute serve` as a traceback; the
    CLI answers a BundleNotFoundError in one line (exit status 2)."""
    (tmp_path / MANIFEST).write_text(text)
    with pytest.raises(InvalidBundleError, match=says) as refused:
        ModelBundle.load(tmp_path)
    assert isinstance(refused.value, BundleNotFoundError)
    assert str(tmp_path / MANIFEST) in str(refused.value)


def test_a_world_directory_this_user_cannot_search_is_named_not_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A world inside a directory the user may not enter: Path.is_file raised
    PermissionError, a traceback from `specroute serve`. (Root enters any directory, so
    the refusal is simulated.)"""

    def refused(self: Path) -> bool:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "is_file", refused)
    with pytest.raises(InvalidBundleError, match=r"cannot be read: .*Permission denied"):
        ModelBundle.load(tmp_path)


def test_a_file_given_as_a_world_says_so(tmp_path: Path) -> None:
    """It said "no world at <file>; build one with `specroute world build`"."""
    a_file = tmp_path / "world.tar"
    a_file.write_text("")
    with pytest.raises(BundleNotFoundError, match="is a file, not a world directory"):
        ModelBundle.load(a_file)
