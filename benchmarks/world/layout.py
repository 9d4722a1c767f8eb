"""Where a built world lives on disk and how to open one.

```
<root>/manifest.json              scale, seed, build-config hash, tasks, relative paths, stats
<root>/corpus/{train,validation,test}.jsonl   one Example per line
<root>/target/                    Qwen2ForCausalLM (safetensors) + tokenizer
<root>/drafters/generic/          generic drafter + tokenizer + finetune_sample.jsonl
<root>/drafters/<task>/           one distilled drafter per task (same files)
```
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.world.corpus import SPLITS, Example

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class WorldNotBuiltError(FileNotFoundError):
    """The directory holds no (complete) built world."""


def specroute_home() -> Path:
    """``$SPECROUTE_HOME``, default ``~/.cache/specroute``."""
    return Path(os.environ.get("SPECROUTE_HOME", Path.home() / ".cache" / "specroute"))


def default_world_dir(scale: str = "default") -> Path:
    """``$SPECROUTE_HOME/worlds/<scale>``."""
    return specroute_home() / "worlds" / scale


def read_manifest(root: Path) -> dict[str, Any] | None:
    """The manifest of a world directory, or None when there is none."""
    path = root / MANIFEST
    if not path.is_file():
        return None
    manifest: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return manifest


def _drafter_order(tasks: list[str]) -> Any:
    """Sort key: the generic drafter first, then the task drafters in task order."""
    rank = {name: i for i, name in enumerate(["generic", *tasks])}
    return lambda name: (rank.get(name, len(rank)), name)


@dataclass(frozen=True)
class World:
    """A built world: corpus, target and drafters, all under ``root``."""

    root: Path
    scale: str
    tasks: tuple[str, ...]
    target_dir: Path
    drafter_dirs: dict[str, Path]
    corpus_dir: Path
    manifest: dict[str, Any]

    @classmethod
    def load(cls, root: Path | str) -> World:
        """Open a built world (raises ``WorldNotBuiltError`` if ``root`` holds none)."""
        root = Path(root).expanduser().resolve()
        manifest = read_manifest(root)
        if manifest is None:
            raise WorldNotBuiltError(
                f"no world at {root} (no {MANIFEST}); build one with `specroute world build`"
            )
        return cls(
            root=root,
            scale=str(manifest["scale"]),
            tasks=tuple(manifest["tasks"]),
            target_dir=root / manifest["target"],
            drafter_dirs={
                name: root / manifest["drafters"][name]
                for name in sorted(manifest["drafters"], key=_drafter_order(manifest["tasks"]))
            },
            corpus_dir=root / manifest["corpus"],
            manifest=manifest,
        )

    def examples(self, split: str) -> list[Example]:
        """The examples of one split (``train``, ``validation`` or ``test``)."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose from {SPLITS}")
        path = self.corpus_dir / f"{split}.jsonl"
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
