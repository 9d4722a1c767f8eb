"""Cluster discovery on synthetic prompts with labels hidden."""

from __future__ import annotations

import pytest

from classifiers.discovery import discover_clusters
from tests.classifiers.synthetic import VOCABULARY, synthetic_prompts


@pytest.fixture(scope="module")
def prompts():
    return synthetic_prompts(400, seed=11)


def test_auto_finds_the_tasks(prompts) -> None:
    found = discover_clusters([p.text for p in prompts], "auto", seed=0)
    assert found.k == 4
    assert found.adjusted_rand_index([p.task for p in prompts]) >= 0.9
    assert max(found.silhouette_by_k, key=found.silhouette_by_k.__getitem__) == 4


def test_clusters_are_named_by_their_top_terms(prompts) -> None:
    found = discover_clusters([p.text for p in prompts], 4, seed=0)
    assert len(set(found.names)) == 4
    for cluster, terms in enumerate(found.top_terms):
        members = [p.task for p, a in zip(prompts, found.assignments, strict=True) if a == cluster]
        majority = max(set(members), key=members.count)
        assert terms[0].split()[0] in VOCABULARY[majority]
        assert found.names[cluster].startswith(f"c{cluster}-")


def test_fixed_k_and_bad_inputs(prompts) -> None:
    texts = [p.text for p in prompts]
    assert discover_clusters(texts, 3, seed=0).k == 3
    assert (
        discover_clusters(texts, 3, seed=0).assignments
        == discover_clusters(texts, 3, seed=0).assignments
    )
    with pytest.raises(ValueError, match="at least 3"):
        discover_clusters(["a", "b"])
    with pytest.raises(ValueError, match="--clusters"):
        discover_clusters(texts, 1)
