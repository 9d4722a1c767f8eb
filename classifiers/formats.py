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

from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict

PUNCTUATION = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"
# A mark constant within a cluster (every retrieval prompt has exactly three "[") would
# otherwise make any deviation infinitely far; 0.5 standard deviations is the floor.
SPREAD_FLOOR = 0.5
# Standardisation divides by the corpus-wide standard deviation plus this (log-count
# units): a mark every training prompt carries once would otherwise have a zero scale.
SCALE_FLOOR = 0.25
_FEATURES = len(PUNCTUATION) + 2  # lines, ASCII digits, each mark


def _feature_of_byte() -> tuple[bytes, bytes]:
    """A ``bytes.translate`` table from each counted byte to its format feature (newline:
    0, an ASCII digit: 1, then each mark in order), and the bytes that count for none."""
    table = bytearray(range(256))
    table[ord("\n")] = 0
    for digit in b"0123456789":
        table[digit] = 1
    for feature, mark in enumerate(PUNCTUATION.encode("ascii"), start=2):
        table[mark] = feature
    counted = b"\n0123456789" + PUNCTUATION.encode("ascii")
    return bytes(table), bytes(sorted(set(range(256)) - set(counted)))


_FEATURE_OF_BYTE, _UNCOUNTED_BYTES = _feature_of_byte()


def format_count_matrix(texts: Sequence[str]) -> np.ndarray:
    """Lines, ASCII digits, then each ASCII punctuation mark, per text: int64 [N, F].

    Each text's UTF-8 bytes, after a newline (so its newlines are its lines), become one
    feature index per counted byte by ``bytes.translate``; one ``bincount`` over the
    batch, offset by F per row, counts them. Every counted character is ASCII, and no
    byte of a multi-byte UTF-8 character is below 0x80, so byte counts equal character
    counts.
    """
    features = [
        (b"\n" + text.encode("utf-8", "surrogatepass")).translate(
            _FEATURE_OF_BYTE, _UNCOUNTED_BYTES
        )
        for text in texts
    ]
    row_offsets = np.arange(0, len(features) * _FEATURES, _FEATURES).repeat(
        [len(row) for row in features]
    )
    bins = row_offsets + np.frombuffer(b"".join(features), dtype=np.uint8)
    return np.bincount(bins, minlength=len(features) * _FEATURES).reshape(-1, _FEATURES)


def format_matrix(texts: Sequence[str]) -> np.ndarray:
    """Format vectors (``log(1 + count)``) of ``texts`` as rows, [N, F]."""
    return np.log1p(format_count_matrix(texts))  # int64 counts: float64 logs


class FormatDistance:
    """Distance of format vectors to their clusters, with the standardisation folded in:
    ``(((v - center) / scale) - mean_c) / spread_c = v * slope_c - offset_c``."""

    def __init__(self, arrays: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]) -> None:
        center, scale, means, spreads = arrays
        self._slope = 1.0 / (scale * spreads)
        self._offset = (center / scale + means) / spreads

    def __call__(self, vectors: np.ndarray, clusters: np.ndarray) -> np.ndarray:
        """Distance of each row of ``vectors`` to its cluster, [N]."""
        gap = vectors * self._slope.take(clusters, axis=0) - self._offset.take(clusters, axis=0)
        distance: np.ndarray = np.sqrt(np.einsum("ij,ij->i", gap, gap))
        return distance


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
        index = np.asarray(clusters, dtype=np.intp)
        return FormatDistance(self.arrays())(format_matrix(texts), index)
