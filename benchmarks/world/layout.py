"""The builder's side of a model bundle: writing its corpus and manifest, reading its examples.

Opening a bundle (paths, tasks, the default directory) is :mod:`router.bundle`'s; this
module adds what only the built-in world's builder and benchmarks need: the corpus as
:class:`~benchmarks.world.corpus.Example` records (``<root>/corpus/<split>.jsonl``, one per
line) and the manifest writer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks.world.corpus import SPLITS, Example
from router.bundle import MANIFEST

FORMAT_VERSION = 1


def read_examples(corpus_dir: Path, split: str) -> list[Example]:
    """The examples of one split (``train``, ``validation`` or ``test``) of a bundle's corpus
    (its ``corpus_dir``)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {SPLITS}")
    path = Path(corpus_dir) / f"{split}.jsonl"
    with path.open(encoding="utf-8") as handle:
        return [Example.from_dict(json.loads(line)) for line in handle if line.strip()]


def write_examples(path: Path, examples: list[Example]) -> None:
    """One Example per line as JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for example in examples:
            handle.write(example.to_json() + "\n")


def write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    """Write ``manifest.json`` (the last file a build writes)."""
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", "utf-8")
