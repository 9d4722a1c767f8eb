"""The one model loader: a local Hugging Face directory in, (model, tokenizer) out.

Used for the built-in world's tiny models and for real Qwen2.5 checkpoints alike:
offline only, safetensors only, ``trust_remote_code`` off. Precision is the caller's
choice (:func:`default_placement`): by default CUDA + bf16 when present, else CPU + fp32;
the sidecar's ``dtype`` setting picks ``auto``, ``bfloat16`` or ``float32``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

# huggingface_hub reads these when it is first imported: set them before transformers.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

logger = logging.getLogger(__name__)

SAFETENSORS_PATTERNS = ("*.safetensors",)
# What transformers loads from a directory: this file, else the shards its index names.
SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float32": torch.float32}
AUTO_DTYPE = "auto"
# CPU feature flags (Linux /proc/cpuinfo) that mean native bf16 arithmetic: x86's
# AVX512-BF16 and AMX-BF16 ("flags" line), aarch64's BF16 ("Features" line). torch's
# get_cpu_capability() only says "AVX512", which many CPUs without bf16 also report.
CPU_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
CPUINFO = Path("/proc/cpuinfo")


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
    # Where this model's weight digests are cached; drafters loaded for it use it too.
    digest_cache: WeightsDigestCache | None = None

    @property
    def device(self) -> torch.device:
        return self.placement.device

    @property
    def context_tokens(self) -> int | None:
        """The most tokens a sequence may have (``max_position_embeddings``), if known."""
        return _context_tokens(getattr(self.model.config, "max_position_embeddings", None))

    @property
    def dtype(self) -> torch.dtype:
        return self.placement.dtype

    @property
    def vocabulary_rows(self) -> int:
        """Rows of the output embedding: the ids a distribution over it covers."""
        return int(self.model.get_output_embeddings().weight.shape[0])


class TargetInfo(Protocol):
    """What the runtime reads of the target besides running it: where it is, its tokenizer,
    where and in which precision drafters for it run, its vocabulary's rows, and where
    weight digests are cached. :class:`LoadedModel` is one; :class:`TargetDescription`
    is one without the target's weights (fleet mode: vLLM replicas run the target)."""

    @property
    def path(self) -> Path: ...

    @property
    def tokenizer(self) -> Any: ...

    @property
    def placement(self) -> DevicePlacement: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def vocabulary_rows(self) -> int: ...

    @property
    def weights_digest(self) -> str: ...

    @property
    def digest_cache(self) -> WeightsDigestCache | None: ...

    @property
    def context_tokens(self) -> int | None: ...


@dataclass(frozen=True)
class TargetDescription:
    """A target known by its directory's tokenizer and config.json alone: no weights are
    read, so ``weights_digest`` is empty (see :func:`describe_target`)."""

    path: Path
    tokenizer: Any  # transformers.PreTrainedTokenizerBase
    placement: DevicePlacement
    vocabulary_rows: int
    digest_cache: WeightsDigestCache | None = None
    weights_digest: str = ""
    context_tokens: int | None = None  # config.json's max_position_embeddings

    @property
    def device(self) -> torch.device:
        return self.placement.device

    @property
    def dtype(self) -> torch.dtype:
        return self.placement.dtype


def cpu_flags(cpuinfo: Path = CPUINFO) -> frozenset[str]:
    """The CPU's feature flags as Linux reports them; empty where there is no cpuinfo."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86, aarch64
            return frozenset(value.split())
    return frozenset()


def cpu_supports_bf16(flags: Iterable[str]) -> bool:
    """Whether a CPU with these feature flags computes in bf16 natively."""
    return not CPU_BF16_FLAGS.isdisjoint(flags)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The precision a ``dtype`` setting names on ``device``: ``bfloat16``, ``float32``, or
    ``auto`` = bf16 on GPUs and CPUs that compute it natively (Ampere and later;
    :data:`CPU_BF16_FLAGS`), else fp32 (a T4 or V100 only emulates bf16)."""
    if name == AUTO_DTYPE:
        if device.type == "cuda":
            native = torch.cuda.is_bf16_supported(including_emulation=False)
        else:
            native = device.type == "cpu" and cpu_supports_bf16(cpu_flags())
        return torch.bfloat16 if native else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {[AUTO_DTYPE, *DTYPES]}, got {name!r}")
    return DTYPES[name]


def default_placement(device: str | None = None, dtype: str | None = None) -> DevicePlacement:
    """``device`` (default CUDA when available, else CPU) in precision ``dtype`` (see
    :func:`resolve_dtype`); without one, bf16 on CUDA and fp32 on CPU."""
    name = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"device {name!r}: {error}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        # torch's own check is an AssertionError deep inside the first .to(device).
        raise ValueError(f"device {name!r}: this torch ({torch.__version__}) sees no CUDA device")
    if dtype is None:
        return DevicePlacement(dev, torch.bfloat16 if dev.type == "cuda" else torch.float32)
    return DevicePlacement(device=dev, dtype=resolve_dtype(dtype, dev))


def resolve_under_roots(path: str | Path, roots: Sequence[str | Path]) -> Path:
    """Resolve ``path`` (symlinks included) and require it to lie under one of ``roots``;
    for a directory, every symlink inside it too (a weight file linked from elsewhere
    would otherwise be loaded from outside the roots)."""
    resolved = _resolved(path)
    resolved_roots = [Path(root).expanduser().resolve() for root in roots]
    _require_under(resolved, resolved_roots)
    if resolved.is_dir():
        for entry in sorted(resolved.rglob("*")):
            if entry.is_symlink():
                where = _resolved(entry)
                _require_under(where, resolved_roots, f"{entry} links to {where}, which")
    return resolved


def _own_tokenizer_files(directory: Path) -> dict[str, str | None]:
    """For each file ``tokenizer_config.json`` names (``tokenizer_file``, ``vocab_file``,
    ...), the directory's own file of that name (None where it has none). transformers
    reads a file the config names over the one it found in the directory, an absolute
    path, one with ``..``, or a relative one from the working directory: a directory under
    a model root could load its tokenizer from outside the roots. A config that is not
    JSON is left to the tokenizer's loader, which refuses it."""
    config = directory / "tokenizer_config.json"
    try:
        values = json.loads(config.read_text(encoding="utf-8")) if config.is_file() else {}
    except (OSError, ValueError):
        return {}
    if not isinstance(values, dict):
        return {}
    own: dict[str, str | None] = {}
    for key, value in values.items():
        if key.endswith("_file") and isinstance(value, str) and value:
            local = directory / Path(value).name
            own[key] = str(local) if local.is_file() else None
    return own


def _resolved(path: str | Path) -> Path:
    if "\x00" in str(path):
        raise ModelLoadError(f"{str(path)!r} is not a path: it holds a NUL character")
    try:
        return Path(path).expanduser().resolve()
    except (RuntimeError, OSError) as error:  # a symlink loop; a name the system refuses
        raise ModelLoadError(f"{str(path)!r} cannot be resolved: {error}") from None


def _require_under(resolved: Path, roots: Sequence[Path], subject: str = "") -> None:
    """``PathOutsideRootsError`` unless ``resolved`` is one of ``roots`` or under one."""
    if any(resolved == root or root in resolved.parents for root in roots):
        return
    allowed = ", ".join(str(root) for root in roots) or "(none configured)"
    raise PathOutsideRootsError(
        f"{subject or resolved} is outside the configured model roots: {allowed}"
    )


def _matching_files(directory: Path, patterns: Iterable[str]) -> list[Path]:
    return sorted({p for pattern in patterns for p in directory.glob(pattern) if p.is_file()})


def safetensors_files(directory: str | Path) -> list[Path]:
    """The directory's safetensors weight files; refuses pickle-only or empty directories."""
    path = Path(directory)
    if not path.is_dir():
        raise ModelLoadError(f"model directory {path} does not exist or is not a directory")
    if not (path / "config.json").is_file() and (path / "snapshots").is_dir():
        raise ModelLoadError(  # the folder `huggingface-cli download` names
            f"{path} is a Hugging Face cache folder: point at one of its snapshots "
            f"({path / 'snapshots'}/<revision>)"
        )
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} has no config.json: not a Hugging Face model directory")
    index = path / SAFE_WEIGHTS_INDEX_NAME
    if not (path / SAFE_WEIGHTS_NAME).is_file() and index.is_file():
        return _indexed_shards(path, index)
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


# safetensors' dtype names of floating tensors (loaded in the placement's dtype); any
# other tensor keeps its stored size.
FLOATING_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})
# safetensors' own bound on the JSON header that opens each file.
MAX_SAFETENSORS_HEADER = 100_000_000


def weights_bytes(files: Sequence[Path], dtype: torch.dtype) -> int:
    """The memory the tensors of ``files`` take once loaded with floating tensors in
    ``dtype``, read from each file's header (nothing else is read). ``ModelLoadError``
    for a file whose header is not a safetensors one."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    total = 0
    for path in files:
        for name, tensor in _safetensors_header(path).items():
            if name == "__metadata__":
                continue
            try:
                start, end = tensor["data_offsets"]
                count = 1
                for size in tensor["shape"]:
                    count *= int(size)
                floating = tensor["dtype"] in FLOATING_DTYPES
                total += count * itemsize if floating else int(end) - int(start)
            except (KeyError, TypeError, ValueError) as error:
                message = f"{path}: tensor {name!r} is described wrongly: {error}"
                raise ModelLoadError(message) from None
    return total


def _safetensors_header(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as file:
            length = int.from_bytes(file.read(8), "little")
            if not 0 < length <= MAX_SAFETENSORS_HEADER:
                raise ValueError(f"a header of {length} bytes")
            header = json.loads(file.read(length))
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"{path} is not a safetensors file: {error}") from None
    if not isinstance(header, dict):
        raise ModelLoadError(f"{path} is not a safetensors file: its header is not a table")
    return header


def _indexed_shards(directory: Path, index: Path) -> list[Path]:
    """The shards a sharded checkpoint's index names, each a file of ``directory`` itself:
    transformers joins the index's names onto the directory, so an absolute or ``../`` name
    would load weights from outside the model roots (and outside the digest)."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = sorted({str(name) for name in weight_map.values()})
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise ModelLoadError(f"{index} is not a safetensors index: {error}") from None
    if not names:
        raise ModelLoadError(f"{index} names no shard")
    shards = []
    for name in names:
        shard = directory / name
        if Path(name).name != name or name in (".", "..") or not shard.is_file():
            raise ModelLoadError(
                f"{index} names the shard {name!r}, which is not a file of {directory}"
            )
        shards.append(shard)
    return shards


def weights_digest(files: Sequence[Path]) -> str:
    """SHA-256 over the weight files' names and bytes (stable across copies)."""
    digest = hashlib.sha256()
    for file in sorted(files, key=lambda p: p.name):
        digest.update(file.name.encode())
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


FileStamp = tuple[str, int, int]  # (resolved path, size in bytes, mtime in ns)


def file_stamps(files: Sequence[Path]) -> list[FileStamp]:
    """Each file's (resolved path, size, mtime_ns), sorted by path."""
    stamps = []
    for file in files:
        resolved = Path(file).resolve()
        status = resolved.stat()
        stamps.append((str(resolved), status.st_size, status.st_mtime_ns))
    return sorted(stamps)


class WeightsDigestCache:
    """:func:`weights_digest` of a set of weight files, remembered in a small JSON file
    under the key of their paths and valid while every file keeps its (size, mtime_ns).

    Hashing reads every byte (about 155 MB/s here: ~100 s for a 15 GB checkpoint) at each
    start; a stat per file does not. A file rewritten in place changes its mtime, so it is
    hashed again. The file is replaced atomically; an unreadable one counts as empty.
    """

    FORMAT = 1

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()

    def digest(self, files: Sequence[Path]) -> str:
        stamps = file_stamps(files)  # before hashing: a file changed meanwhile misses later
        key = "\n".join(path for path, _, _ in stamps)
        with self._lock:
            cached = self._entries().get(key)
        if cached is not None and [tuple(s) for s in cached["files"]] == stamps:
            return str(cached["digest"])
        digest = weights_digest(files)
        with self._lock:
            entries = _still_there(self._entries())
            entries[key] = {"files": [list(s) for s in stamps], "digest": digest}
            try:
                self._write(entries)
            except OSError as error:  # a full disk: the digest holds, only the cache misses
                logger.warning("weight digest cache %s not written: %s", self.path, error)
        return digest

    def _entries(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict) or data.get("format") != self.FORMAT:
            return {}
        entries = data.get("entries")
        return entries if isinstance(entries, dict) else {}

    def _write(self, entries: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"format": self.FORMAT, "entries": entries}, indent=1)
        handle, temporary = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name)
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as out:
                out.write(text)
            os.replace(temporary, self.path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise


def _still_there(entries: dict[str, Any]) -> dict[str, Any]:
    """The cache entries whose files all still exist: the others (a drafter's directory
    deleted, as automatic distillation retires them) would stay in the file for good."""
    return {key: entry for key, entry in entries.items() if all(map(_exists, key.split("\n")))}


def _exists(path: str) -> bool:
    return bool(path) and os.path.exists(path)


def digest_weights(files: Sequence[Path], cache: WeightsDigestCache | None) -> str:
    """:func:`weights_digest` of ``files``, through ``cache`` when there is one."""
    return cache.digest(files) if cache is not None else weights_digest(files)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def load_tokenizer(directory: str | Path) -> Any:
    """Load a tokenizer from a local directory only: a name that is not one (a typo, or
    "Qwen/Qwen2.5-7B-Instruct") was taken for a Hugging Face repo id, and served from the
    Hub's cache, outside every model root, when it was there."""
    from transformers import AutoTokenizer

    path = Path(directory)
    if not path.is_dir():
        raise ModelLoadError(f"{directory}: no such directory (models load from local ones)")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ModelLoadError(
            f"{directory} has no tokenizer files ({', '.join(TOKENIZER_FILES)}): copy the "
            "target's tokenizer there (trainer checkpoints often leave it out)"
        )
    try:
        return AutoTokenizer.from_pretrained(
            str(directory),
            local_files_only=True,
            trust_remote_code=False,
            **_own_tokenizer_files(Path(directory)),
        )
    except Exception as exc:  # the tokenizers library raises a bare Exception for bad JSON
        raise ModelLoadError(f"cannot load a tokenizer from {directory}: {exc}") from exc


def load_model(
    directory: str | Path,
    *,
    placement: DevicePlacement | None = None,
    roots: Sequence[str | Path] | None = None,
    digest_cache: WeightsDigestCache | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer from a local safetensors directory.

    ``roots``, when given, restricts loading to directories under those paths;
    ``digest_cache``, when given, spares re-hashing weights that have not changed.
    Raises :class:`ModelLoadError` with a clear message for anything it refuses.
    """
    from transformers import AutoModelForCausalLM

    path = resolve_under_roots(directory, roots) if roots is not None else Path(directory)
    files = safetensors_files(path)
    where = placement or default_placement()
    tokenizer = load_tokenizer(path)
    try:
        loaded: Any = AutoModelForCausalLM.from_pretrained(
            str(path),
            local_files_only=True,
            trust_remote_code=False,
            use_safetensors=True,
            dtype=where.dtype,
            output_loading_info=True,
        )
    except Exception as exc:  # safetensors/transformers raise many types for corrupt files
        raise ModelLoadError(f"cannot load model weights from {path}: {exc}") from exc
    model, loading = loaded
    check_loading_info(path, loading)
    check_finite(path, model)
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
        weights_digest=digest_weights(files, digest_cache),
        digest_cache=digest_cache,
    )


def check_loading_info(path: Path, loading: Mapping[str, Any]) -> None:
    """Refuse weights that lack tensors the config needs: transformers fills them with
    random values and only warns (a tied model such as Qwen2.5-0.5B exported with
    ``tie_word_embeddings`` false and no ``lm_head.weight`` served noise, and a drafter
    like it passed the probe). Tensors the config does not use are logged."""
    missing = sorted(loading.get("missing_keys") or ())
    if missing:
        listed = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        hint = (
            " (config.json says the embeddings are not tied: check tie_word_embeddings)"
            if "lm_head.weight" in missing
            else ""
        )
        raise ModelLoadError(
            f"{path}: the weights lack {len(missing)} tensor(s) the config needs ({listed}); "
            f"loaded, they would be random{hint}"
        )
    unexpected = sorted(loading.get("unexpected_keys") or ())
    if unexpected:
        logger.warning(
            "%s: %d tensor(s) in the weights that the config does not use, ignored: %s",
            path,
            len(unexpected),
            ", ".join(unexpected[:3]),
        )


#: Elements ``all_finite`` tests at a time where a sum was not finite (a bounded temporary).
FINITE_CHECK_CHUNK = 1 << 24


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every element is finite. A NaN or an infinity carries into the sum, a
    reduction with no temporary and much quicker than testing each element (a checkpoint
    is checked at every load); a sum that is not finite is told apart from finite values
    whose sum overflowed by testing each element, in bounded chunks."""
    if bool(torch.isfinite(tensor.sum())):
        return True
    chunks = tensor.reshape(-1).split(FINITE_CHECK_CHUNK)
    return all(bool(torch.isfinite(chunk).all()) for chunk in chunks)


def check_finite(path: Path, model: Any) -> None:
    """Refuse weights holding NaN or an infinity, as read or once cast to the placement's
    dtype (a float32 value past bfloat16's range): such a model passes every other check,
    and a drafter of them failed each sampled request it drafted for (the row it sampled
    from was NaN) while a target's were noise."""
    for name, tensor in model.named_parameters():
        if tensor.is_floating_point() and not all_finite(tensor.detach()):
            raise ModelLoadError(
                f"{path}: tensor {name} holds NaN or infinite values in {tensor.dtype}: "
                "the weights are corrupt"
            )


def _context_tokens(value: Any) -> int | None:
    """A config's ``max_position_embeddings`` as a positive int, else None (unknown)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def describe_target(
    directory: str | Path,
    *,
    placement: DevicePlacement | None = None,
    digest_cache: WeightsDigestCache | None = None,
) -> TargetDescription:
    """The target in ``directory`` without its weights: its tokenizer, and its vocabulary's
    rows from config.json's ``vocab_size`` (the tokenizer's length without one). Weight
    files need not be there, nor readable."""
    path = Path(directory)
    tokenizer = load_tokenizer(path)
    rows, context = len(tokenizer), None
    config = path / "config.json"
    if config.is_file():
        try:
            values = json.loads(config.read_text(encoding="utf-8"))
            rows = int(values.get("vocab_size") or rows)
            context = _context_tokens(values.get("max_position_embeddings"))
        except (OSError, ValueError, AttributeError) as exc:
            raise ModelLoadError(f"cannot read {config}: {exc}") from exc
    where = placement or default_placement()
    logger.info("target %s described from its tokenizer (%d rows), weights not loaded", path, rows)
    return TargetDescription(
        path=path,
        tokenizer=tokenizer,
        placement=where,
        vocabulary_rows=rows,
        digest_cache=digest_cache,
        context_tokens=context,
    )
