"""The loader's precision (the ``dtype`` setting's values) and its cache of weight digests."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from drafters.loader import (
    CPU_BF16_FLAGS,
    WeightsDigestCache,
    cpu_flags,
    cpu_supports_bf16,
    default_placement,
    load_model,
    resolve_dtype,
    safetensors_files,
    weights_digest,
)
from drafters.registry import create_drafter

from .conftest import TinyModels

X86_CPUINFO = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_tile\n\n"
ARM_CPUINFO = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"
OLD_X86_CPUINFO = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f\n"


@pytest.mark.parametrize(
    ("text", "native"), [(X86_CPUINFO, True), (ARM_CPUINFO, True), (OLD_X86_CPUINFO, False)]
)
def test_cpu_bf16_support_is_read_from_cpuinfo_flags(
    text: str, native: bool, tmp_path: Path
) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(text)
    assert cpu_supports_bf16(cpu_flags(cpuinfo)) is native
    assert cpu_flags(tmp_path / "absent") == frozenset()  # not Linux: no bf16 assumed


def test_auto_is_bf16_on_this_machine_exactly_when_its_cpu_has_bf16(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    native = any(flag in flags.split() for flag in CPU_BF16_FLAGS)
    expected = torch.bfloat16 if native else torch.float32
    assert resolve_dtype("auto", torch.device("cpu")) == expected
    # A GPU by what it computes natively: bf16 on Ampere and later, fp32 on a T4 or V100
    # (bf16 there is emulated; it was chosen on any CUDA device).
    asked: list[bool] = []
    natively = iter([True, False])  # an A100, then a T4

    def supported(including_emulation: bool = True) -> bool:
        asked.append(including_emulation)
        return next(natively)

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", supported)
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float32
    assert asked == [False, False]
    assert default_placement("cpu", "auto").dtype == expected
    assert default_placement("cpu").dtype == torch.float32  # no setting: fp32 on CPU
    with pytest.raises(ValueError, match="dtype must be one of"):
        resolve_dtype("float16", torch.device("cpu"))


@pytest.mark.parametrize(
    ("name", "dtype"), [("float32", torch.float32), ("bfloat16", torch.bfloat16)]
)
def test_an_explicit_dtype_reaches_the_target_and_its_drafters(
    name: str, dtype: torch.dtype, tiny_models: TinyModels
) -> None:
    target = load_model(tiny_models.target_dir, placement=default_placement("cpu", name))
    assert target.dtype == dtype
    assert {p.dtype for p in target.model.parameters()} == {dtype}
    drafter = create_drafter("model", name="close", target=target, path=tiny_models.close_dir)
    assert {p.dtype for p in drafter.model.parameters()} == {dtype}  # type: ignore[attr-defined]


def _same_size_and_time(file: Path, content: bytes) -> None:
    """Rewrite ``file`` with ``content`` of the same length, then put its mtime back."""
    before = file.stat()
    assert len(content) == before.st_size
    file.write_bytes(content)
    os.utime(file, ns=(before.st_atime_ns, before.st_mtime_ns))


def test_a_cached_digest_stands_while_size_and_mtime_do(tmp_path: Path) -> None:
    weights = tmp_path / "model" / "model.safetensors"
    weights.parent.mkdir()
    weights.write_bytes(b"first weights" * 1000)
    cache = WeightsDigestCache(tmp_path / "state" / "weights_digests.json")
    first = cache.digest([weights])
    assert first == weights_digest([weights])

    # Same size and mtime, other bytes: the cache answers without reading the file.
    _same_size_and_time(weights, b"other weights" * 1000)
    assert weights_digest([weights]) != first
    assert cache.digest([weights]) == first
    assert WeightsDigestCache(cache.path).digest([weights]) == first  # kept on disk

    # A new mtime: hashed again, and the new digest is what the cache keeps.
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    second = cache.digest([weights])
    assert second == weights_digest([weights]) != first
    _same_size_and_time(weights, b"first weights" * 1000)
    assert cache.digest([weights]) == second

    # A new size is a change too.
    weights.write_bytes(b"longer weights" * 1000)
    assert cache.digest([weights]) == weights_digest([weights])
    entries = json.loads(cache.path.read_text())["entries"]
    assert list(entries) == [str(weights.resolve())]
    assert not [p for p in cache.path.parent.iterdir() if p != cache.path]  # no temp left


def test_entries_of_files_gone_are_dropped_at_the_next_write(tmp_path: Path) -> None:
    """Every set of weights ever hashed stayed in the cache file for good; automatic
    distillation hashes a new drafter at each run and deletes the ones it retires."""
    import shutil

    cache = WeightsDigestCache(tmp_path / "weights_digests.json")
    paths = []
    for name in ("kept", "retired", "next"):
        weights = tmp_path / name / "model.safetensors"
        weights.parent.mkdir()
        weights.write_bytes(name.encode() * 100)
        paths.append(weights)
    cache.digest([paths[0]])
    cache.digest([paths[1]])
    shutil.rmtree(paths[1].parent)
    cache.digest([paths[2]])
    entries = json.loads(cache.path.read_text())["entries"]
    assert sorted(entries) == sorted(str(p.resolve()) for p in (paths[0], paths[2]))


def test_an_unreadable_cache_file_counts_as_empty(tmp_path: Path) -> None:
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"weights")
    cache = WeightsDigestCache(tmp_path / "weights_digests.json")
    cache.path.write_text("{not json")
    assert cache.digest([weights]) == weights_digest([weights])
    assert json.loads(cache.path.read_text())["format"] == WeightsDigestCache.FORMAT


def test_a_cache_that_cannot_be_written_still_gives_the_digest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk raised OSError from the cache's write: a registration was INTERNAL, and
    at a restart a model drafter not in the cache was not served."""
    import errno

    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"weights")
    cache = WeightsDigestCache(tmp_path / "weights_digests.json")

    def disk_full(entries: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache, "_write", disk_full)
    assert cache.digest([weights]) == weights_digest([weights])


def test_load_model_digests_through_the_cache(tiny_models: TinyModels, tmp_path: Path) -> None:
    cache = WeightsDigestCache(tmp_path / "weights_digests.json")
    loaded = load_model(tiny_models.target_dir, digest_cache=cache)
    files = safetensors_files(tiny_models.target_dir)
    assert loaded.weights_digest == weights_digest(files)
    assert loaded.digest_cache is cache
    entries = json.loads(cache.path.read_text())["entries"]
    assert [entry["digest"] for entry in entries.values()] == [loaded.weights_digest]
    drafter = create_drafter("model", name="close", target=loaded, path=tiny_models.close_dir)
    assert drafter.name == "close"
    assert len(json.loads(cache.path.read_text())["entries"]) == 2  # the drafter's too
