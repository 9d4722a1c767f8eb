"""Cluster discovery on synthetic prompts with labels hidden."""

from __future__ import annotations

import random

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


def _shared_content_prompts(count: int, seed: int) -> tuple[list[str], list[str]]:
    """Retrieval QA and summaries over the same documents: same words, different format."""
    rng = random.Random(seed)
    words = [*VOCABULARY["math"], *VOCABULARY["code"], *VOCABULARY["translate"]]
    documents = [" ".join(rng.choices(words, k=rng.randint(6, 12))) for _ in range(60)]
    retrieval = (
        "Answer the question using only the retrieved passages.",
        "Reply from these search results and nothing else.",
    )
    summary = (
        "Summarize this section in one sentence:",
        "Condense the text below into a few words:",
        "Give a short summary of this passage:",
    )
    texts, tasks = [], []
    for index in range(count):
        if index % 2:
            sections = rng.sample(documents, 3)
            title = sections[rng.randrange(3)].split()[0]
            listed = "\n".join(f"[{n}] {s}" for n, s in enumerate(sections, 1))
            intro = rng.choice(retrieval)
            texts.append(f'{intro}\n{listed}\n\nQuestion: what does "{title}" say?')
            tasks.append("rag")
        else:
            texts.append(f"{rng.choice(summary)}\n\n{rng.choice(documents)}")
            tasks.append("summarization")
    return texts, tasks


def test_format_separates_tasks_that_share_content() -> None:
    texts, tasks = _shared_content_prompts(300, seed=5)
    # Content alone splits by topic (ARI ~0); the format kernel splits by task.
    with_format = discover_clusters(texts, 2, seed=0)
    content_only = discover_clusters(texts, 2, seed=0, use_format=False)
    assert with_format.adjusted_rand_index(tasks) >= 0.6
    assert content_only.adjusted_rand_index(tasks) < 0.1
