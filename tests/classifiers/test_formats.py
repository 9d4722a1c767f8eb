"""Format counts: the batched byte count equals per-character counting on any text."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from classifiers.formats import PUNCTUATION, FormatProfile, format_count_matrix, format_matrix


def _reference_counts(text: str) -> list[int]:
    """The definition, character by character: lines, ASCII digits, each ASCII mark."""
    digits = sum(1 for ch in text if ch in "0123456789")
    return [text.count("\n") + 1, digits, *(text.count(mark) for mark in PUNCTUATION)]


def test_counts_known_text() -> None:
    counts = format_count_matrix(["a, b.\n12 + 3 = 15!", ""])
    assert counts.shape == (2, len(PUNCTUATION) + 2)
    assert counts[0, :2].tolist() == [2, 5]
    marks = dict(zip(PUNCTUATION, counts[0, 2:].tolist(), strict=True))
    assert {m: n for m, n in marks.items() if n} == {",": 1, ".": 1, "+": 1, "=": 1, "!": 1}
    assert counts[1].tolist() == [1] + [0] * (len(PUNCTUATION) + 1)


def test_non_ascii_digits_and_multibyte_characters_are_not_counted() -> None:
    # Arabic-Indic and full-width digits are not ASCII digits; emoji and CJK carry no marks.
    counts = format_count_matrix(["٣٤ ３ 日本語。😀 «é»"])
    assert counts[0].tolist() == [1] + [0] * (len(PUNCTUATION) + 1)


@given(st.lists(st.text(max_size=60), max_size=8))
def test_batch_equals_the_per_character_definition(texts: list[str]) -> None:
    counts = format_count_matrix(texts)
    assert counts.shape == (len(texts), len(PUNCTUATION) + 2)
    assert counts.tolist() == [_reference_counts(text) for text in texts]


def test_distances_are_zero_at_a_cluster_mean_and_grow_away_from_it() -> None:
    texts = ["x = 1, y = 2.", "a = 3, b = 4.", "no marks at all"]
    profile = FormatProfile.fit(texts, ["eq", "eq", "plain"], ["eq", "plain"])
    distances = profile.distances(texts, [0, 0, 1])
    assert distances[2] == 0.0  # alone in its cluster: it is the mean
    assert np.all(profile.distances(texts[2:], [0]) > distances[:2].max())
    assert np.allclose(np.log1p(format_count_matrix(texts)), format_matrix(texts))
