"""Reading a drafter's fine-tuning sample (the similarity prior's input) at start."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from router.bundle import FINETUNE_SAMPLE_FILE, read_finetune_sample
from router.components import distinct_paths


def test_a_damaged_sample_line_is_skipped_and_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A line that was not JSON stopped the sidecar's start (a JSONDecodeError naming no
    file), and one that was JSON but no object a traceback (AttributeError)."""
    lines = [
        json.dumps("a plain string"),
        "not json {",
        json.dumps({"text": "an object with text"}),
        json.dumps([1, 2]),
        "",
        json.dumps({"prompt": "an object with a prompt"}),
        "[" * 100_000,
    ]
    (tmp_path / FINETUNE_SAMPLE_FILE).write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING, logger="router.components"):
        sample = read_finetune_sample(tmp_path)
    assert sample == ("a plain string", "an object with text", "an object with a prompt")
    skipped = [r.getMessage() for r in caplog.records]
    assert [m.split(" skipped")[0].rsplit(":", 1)[1] for m in skipped] == ["2", "4", "7"]


def test_an_unreadable_sample_gives_none(tmp_path: Path) -> None:
    (tmp_path / FINETUNE_SAMPLE_FILE).write_bytes(b"\xff\xfe not utf-8")
    assert read_finetune_sample(tmp_path) == ()
    assert read_finetune_sample(tmp_path / "absent") == ()


def test_a_model_root_named_twice_is_kept_once(tmp_path: Path) -> None:
    """The world's directory is a model root of its own; listed in ``model_roots`` as well
    (another spelling of it included), every PERMISSION_DENIED message named it twice."""
    world, other = tmp_path / "world", tmp_path / "models"
    world.mkdir()
    other.mkdir()
    roots = [world, other, tmp_path / "models" / ".." / "world"]
    assert distinct_paths(roots) == (world, other)


def test_a_configured_drafter_named_after_no_cluster_is_said() -> None:
    """A typo ("coder" for "code") served the drafter for every cluster without a word."""
    from router.components import cluster_name_warnings

    tasks = ["chat", "code", "math"]
    (line,) = cluster_name_warnings(["coder", "code", "generic"], tasks)
    assert line.startswith("drafter_dirs.coder is named after no cluster (did you mean 'code'?)")
    assert cluster_name_warnings(["qwen-0.5b"], tasks)[0].count("did you mean") == 0
