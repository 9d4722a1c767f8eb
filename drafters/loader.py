"""The one model loader: a local Hugging Face directory in, (model, tokenizer) out.

Used for the built-in world's tiny models and for real Qwen2.5 checkpoints alike:
offline only, safetensors only, ``trust_remote_code`` off, CUDA + bf16 when present,
else CPU + fp32.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# huggingface_hub reads these when it is first imported: set them before transformers.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

logger = logging.getLogger(__name__)

SAFETENSORS_PATTERNS = ("*.safetensors",)
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


class ModelLoadError(ValueError):
    """A model directory cannot be loaded (missing, outside the roots, unsafe, corrupt)."""


class PathOutsideRootsError(ModelLoadError):
    """A path resolves outside every configured model root."""


@dataclass(frozen=True)
class DevicePlacement:
    """Where a model runs and in which precision."""

    device: torch.device
    dtype: torch.dtype


@dataclass(frozen=True)
class LoadedModel:
    """A causal LM with its tokenizer, ready for inference."""

    model: Any  # transformers.PreTrainedModel
    tokenizer: Any  # transformers.PreTrainedTokenizerBase
    path: Path
    placement: DevicePlacement
    parameter_count: int
    weights_digest: str

    @property
    def device(self) -> torch.device:
        return self.placement.device

    @property
    def dtype(self) -> torch.dtype:
        return self.placement.dtype


def default_placement(device: str | None = None) -> DevicePlacement:
    """CUDA + bf16 when available (or asked for), else CPU + fp32."""
    name = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    return DevicePlacement(device=dev, dtype=dtype)


def resolve_under_roots(path: str | Path, roots: Sequence[str | Path]) -> Path:
    """Resolve ``path`` (symlinks included) and require it to lie under one of ``roots``."""
    resolved = Path(path).expanduser().resolve()
    for root in roots:
        root_resolved = Path(root).expanduser().resolve()
        if resolved == root_resolved or root_resolved in resolved.parents:
            return resolved
    allowed = ", ".join(str(Path(r).expanduser().resolve()) for r in roots) or "(none configured)"
    raise PathOutsideRootsError(f"{resolved} is outside the configured model roots: {allowed}")


def _matching_files(directory: Path, patterns: Iterable[str]) -> list[Path]:
    return sorted({p for pattern in patterns for p in directory.glob(pattern) if p.is_file()})


def safetensors_files(directory: str | Path) -> list[Path]:
    """The directory's safetensors weight files; refuses pickle-only or empty directories."""
    path = Path(directory)
    if not path.is_dir():
        raise ModelLoadError(f"model directory {path} does not exist or is not a directory")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} has no config.json: not a Hugging Face model directory")
    weights = _matching_files(path, SAFETENSORS_PATTERNS)
    if weights:
        return weights
    pickles = _matching_files(path, PICKLE_PATTERNS)
    if pickles:
        names = ", ".join(p.name for p in pickles)
        raise ModelLoadError(
            f"{path} has only pickle weights ({names}); specroute loads safetensors only. "
            "Convert with `model.save_pretrained(dir, safe_serialization=True)`."
        )
    raise ModelLoadError(f"{path} has no *.safetensors weight files")


def weights_digest(files: Sequence[Path]) -> str:
    """SHA-256 over the weight files' names and bytes (stable across copies)."""
    digest = hashlib.sha256()
    for file in sorted(files, key=lambda p: p.name):
        digest.update(file.name.encode())
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def load_tokenizer(directory: str | Path) -> Any:
    """Load a tokenizer from a local directory only."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(
            str(directory), local_files_only=True, trust_remote_code=False
        )
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load a tokenizer from {directory}: {exc}") from exc


def load_model(
    directory: str | Path,
    *,
    placement: DevicePlacement | None = None,
    roots: Sequence[str | Path] | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer from a local safetensors directory.

    ``roots``, when given, restricts loading to directories under those paths.
    Raises :class:`ModelLoadError` with a clear message for anything it refuses.
    """
    from transformers import AutoModelForCausalLM

    path = resolve_under_roots(directory, roots) if roots is not None else Path(directory)
    files = safetensors_files(path)
    where = placement or default_placement()
    tokenizer = load_tokenizer(path)
    try:
        model: Any = AutoModelForCausalLM.from_pretrained(
            str(path),
            local_files_only=True,
            trust_remote_code=False,
            use_safetensors=True,
            dtype=where.dtype,
        )
    except Exception as exc:  # safetensors/transformers raise many types for corrupt files
        raise ModelLoadError(f"cannot load model weights from {path}: {exc}") from exc
    model.to(where.device)
    model.eval()
    count = sum(p.numel() for p in model.parameters())
    logger.info(
        "loaded %s (%.2fM parameters) on %s/%s", path, count / 1e6, where.device, where.dtype
    )
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        path=path,
        placement=where,
        parameter_count=count,
        weights_digest=weights_digest(files),
    )
