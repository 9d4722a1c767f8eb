"""Prompt format: counts of lines, digits and ASCII punctuation, and distance to a cluster's.

Two tasks can share vocabulary and differ only in format (retrieval QA and summaries of
the same documents), so both discovery and the out-of-distribution flag look at format
as well as words. A format vector is ``log(1 + count)`` of: lines, ASCII digits and each
ASCII punctuation mark. A cluster's format profile is the mean and spread of its training
prompts' standardised vectors; a prompt's format distance to a cluster is the norm of
``(z - mean) / (spread + SPREAD_FLOOR)``, ``z`` being its standardised vector
(``(v - corpus mean) / (corpus std + SCALE_FLOOR)``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict

PUNCTUATION = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"
_DIGITS = str.maketrans("", "", "0123456789")
# A mark constant within a cluster (every retrieval prompt has exactly three "[") would
# otherwise make any deviation infinitely far; 0.5 standard deviations is the floor.
SPREAD_FLOOR = 0.5
# Standardisation divides by the corpus-wide standard deviation plus this (log-count
# units): a mark every training prompt carries once would otherwise have a zero scale.
SCALE_FLOOR = 0.25


def format_counts(text: str) -> list[int]:
    """Lines, ASCII digits, then each ASCII punctuation mark (C-level counting: fast)."""
    counts = [text.count("\n") + 1, len(text) - len(text.translate(_DIGITS))]
    counts.extend(text.count(mark) for mark in PUNCTUATION)
    return counts


def format_vector(text: str) -> list[float]:
    """``log(1 + count)`` of :func:`format_counts`."""
    return [math.log1p(count) for count in format_counts(text)]


def format_matrix(texts: Sequence[str]) -> np.ndarray:
    """Format vectors of ``texts`` as rows, [N, F]."""
    return np.array([format_vector(text) for text in texts], dtype=np.float64).reshape(
        len(texts), len(PUNCTUATION) + 2
    )


class FormatProfile(BaseModel):
    """Standardisation and per-cluster format mean and spread (clusters in label order)."""

    model_config = ConfigDict(frozen=True)

    center: list[float]
    scale: list[float]
    means: list[list[float]]
    spreads: list[list[float]]

    @classmethod
    def fit(
        cls, texts: Sequence[str], labels: Sequence[str], order: Sequence[str]
    ) -> FormatProfile:
        """Profile of labelled training prompts; ``order`` is the classifier's label order."""
        vectors = format_matrix(texts)
        center, scale = vectors.mean(axis=0), vectors.std(axis=0) + SCALE_FLOOR
        standard = (vectors - center) / scale
        label_array = np.asarray(labels)
        means = [standard[label_array == label].mean(axis=0).tolist() for label in order]
        spreads = [standard[label_array == label].std(axis=0).tolist() for label in order]
        return cls(center=center.tolist(), scale=scale.tolist(), means=means, spreads=spreads)

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(center, scale, means, spreads + floor) as arrays, for the runtime."""
        return (
            np.asarray(self.center),
            np.asarray(self.scale),
            np.asarray(self.means),
            np.asarray(self.spreads) + SPREAD_FLOOR,
        )

    def distances(self, texts: Sequence[str], clusters: Sequence[int]) -> np.ndarray:
        """Format distance of each text to the cluster it was assigned, [N]."""
        center, scale, means, spreads = self.arrays()
        standard = (format_matrix(texts) - center) / scale
        index = np.asarray(clusters, dtype=np.int64)
        return np.asarray(np.linalg.norm((standard - means[index]) / spreads[index], axis=1))
