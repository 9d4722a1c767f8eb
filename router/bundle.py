"""A model bundle on disk: the target, its drafters and the corpus their classifier learns from.

This is what ``specroute serve`` opens (``world_dir`` in the settings); the built-in world
that ``specroute world build`` writes is one bundle. Layout, every path relative to ``root``
and named in the manifest (written last, so a bundle without one is incomplete)::

    <root>/manifest.json          scale, seed, build-config hash, tasks, relative paths, stats
    <root>/corpus/                {train,validation,test}.jsonl (the classifier's training data)
    <root>/target/                Qwen2ForCausalLM (safetensors) + tokenizer
    <root>/drafters/generic/      generic drafter + tokenizer + finetune_sample.jsonl
    <root>/drafters/<task>/       one distilled drafter per task (same files)

Reading a bundle needs none of the code that builds one.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
# A drafter directory's prompts of its fine-tuning data (JSON lines), for its prior.
FINETUNE_SAMPLE_FILE = "finetune_sample.jsonl"
FINETUNE_SAMPLE_SIZE = 64
GENERIC_DRAFTER = "generic"


class BundleNotFoundError(FileNotFoundError):
    """The directory holds no (complete) model bundle: it has no manifest."""


class InvalidBundleError(BundleNotFoundError):
    """The directory's manifest cannot be read as a bundle's (not JSON, a key missing)."""


def specroute_home() -> Path:
    """``$SPECROUTE_HOME``, default ``~/.cache/specroute``: state and built worlds live here."""
    return Path(os.environ.get("SPECROUTE_HOME", "~/.cache/specroute")).expanduser()


def default_bundle_dir(scale: str = "default") -> Path:
    """Where the built-in world of ``scale`` lives: ``$SPECROUTE_HOME/worlds/<scale>``."""
    return specroute_home() / "worlds" / scale


def read_manifest(root: Path) -> dict[str, Any] | None:
    """The manifest of a bundle directory, or None when there is none."""
    path = root / MANIFEST
    try:
        if not path.is_file():  # a directory this user cannot search raises (EACCES)
            return None
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as error:
        raise InvalidBundleError(f"{path} cannot be read: {error}") from None
    if not isinstance(manifest, dict):
        raise InvalidBundleError(f"{path} is not a JSON object")
    return manifest


def _drafter_order(tasks: Sequence[str]) -> Callable[[str], tuple[int, str]]:
    """Sort key: the generic drafter first, then the task drafters in task order."""
    rank = {name: i for i, name in enumerate([GENERIC_DRAFTER, *tasks])}
    return lambda name: (rank.get(name, len(rank)), name)


def _inside(root: Path, entry: Any) -> Path:
    """``root / entry`` for a manifest entry naming a directory of the bundle: an absolute
    path or one with ".." loaded models from outside the bundle, the only model root its
    built-in models are checked against."""
    path = Path(entry)
    if path.is_absolute() or ".." in path.parts:
        raise InvalidBundleError(
            f"{root / MANIFEST} names {str(entry)!r}: a bundle's entries are paths inside it"
        )
    return root / path


@dataclass(frozen=True)
class ModelBundle:
    """A built bundle: target, drafters and corpus, all under ``root``."""

    root: Path
    scale: str
    tasks: tuple[str, ...]
    target_dir: Path
    drafter_dirs: dict[str, Path]
    corpus_dir: Path
    manifest: dict[str, Any]

    @classmethod
    def load(cls, root: Path | str) -> ModelBundle:
        """Open a built bundle (raises ``BundleNotFoundError`` if ``root`` holds none)."""
        root = Path(root).expanduser().resolve()
        manifest = read_manifest(root)
        if manifest is None and root.is_file():  # "no world at" it, build one: not the fix
            raise BundleNotFoundError(f"{root} is a file, not a world directory")
        if manifest is None:
            raise BundleNotFoundError(
                f"no world at {root} (no {MANIFEST}); build one with `specroute world build`"
            )
        try:
            tasks = tuple(str(task) for task in manifest["tasks"])
            drafters = manifest["drafters"]
            return cls(
                root=root,
                scale=str(manifest["scale"]),
                tasks=tasks,
                target_dir=_inside(root, manifest["target"]),
                drafter_dirs={
                    str(name): _inside(root, drafters[name])
                    for name in sorted(drafters, key=_drafter_order(tasks))
                },
                corpus_dir=_inside(root, manifest["corpus"]),
                manifest=manifest,
            )
        except KeyError as error:
            raise InvalidBundleError(f"{root / MANIFEST} has no {error} entry") from None
        except (TypeError, AttributeError) as error:
            raise InvalidBundleError(
                f"{root / MANIFEST} is not a bundle manifest: {error}"
            ) from None


def read_finetune_sample(drafter_dir: Path, limit: int = FINETUNE_SAMPLE_SIZE) -> tuple[str, ...]:
    """Texts from a drafter's ``finetune_sample.jsonl`` (strings or objects with "text" or
    "prompt"). The sample only informs the drafter's prior: a line that is neither is
    skipped with a warning naming it, and a file that cannot be read gives no sample."""
    path = drafter_dir / FINETUNE_SAMPLE_FILE
    return read_sample_file(path, limit) if path.is_file() else ()


def read_sample_file(path: Path, limit: int = FINETUNE_SAMPLE_SIZE) -> tuple[str, ...]:
    """Texts of a sample file as ``read_finetune_sample`` reads one (JSON lines)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        logger.warning("%s not read, no similarity prior from it: %s", path, error)
        return ()
    return sample_texts(lines, str(path), limit)


def sample_texts(lines: Sequence[str], where: str, limit: int) -> tuple[str, ...]:
    """The texts of sample ``lines`` (JSON strings, or objects with "text" or "prompt"), at
    most ``limit``; a line that is neither is skipped with a warning naming ``where``."""
    texts: list[str] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        text = _sample_text(line)
        if text is None:
            logger.warning("%s:%d skipped: not a JSON string or object with text", where, number)
        elif text:
            texts.append(text)
        if len(texts) >= limit:
            break
    return tuple(texts)


def _sample_text(line: str) -> str | None:
    """The text of one sample line; None when the line is not a sample."""
    try:
        value = json.loads(line)
    except (ValueError, RecursionError):
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return str(value.get("text") or value.get("prompt") or "")
    return None
