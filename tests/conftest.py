"""Shared fixtures: small, deterministic, built in seconds, reused for the session."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Spinning OpenMP workers make torch 5-10x slower on shared cores; must precede torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from router.bundle import ModelBundle


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> ModelBundle:
    """The built-in world at tiny scale (corpus, tokenizer, target, 8 drafters), built once."""
    from benchmarks.world.build import build_world

    root: Path = tmp_path_factory.mktemp("worlds") / "tiny"
    return build_world(root, "tiny", progress=False)
