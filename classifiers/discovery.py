"""Discover task clusters in unlabeled prompts: TF-IDF -> SVD -> k-means, named by top terms.

With ``k="auto"`` the number of clusters is the one with the highest silhouette score
(cosine, on the SVD rows) over ``k_range``; the silhouette is computed on a fixed
random subsample since it costs O(n^2).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.cluster import KMeans
from sklearn.decomposition import TruncatedSVD
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.metrics import adjusted_rand_score, silhouette_score
from sklearn.preprocessing import normalize

from classifiers.text import TOKEN_PATTERN

logger = logging.getLogger(__name__)

SILHOUETTE_SAMPLE = 2000


@dataclass(frozen=True)
class DiscoveredClusters:
    """Cluster id per prompt, a name and top terms per cluster, and how k was chosen."""

    assignments: tuple[int, ...]
    names: tuple[str, ...]
    top_terms: tuple[tuple[str, ...], ...]
    silhouette_by_k: dict[int, float]

    @property
    def k(self) -> int:
        return len(self.names)

    def labels(self) -> list[str]:
        """Cluster name per prompt (what the classifier is trained on)."""
        return [self.names[cluster] for cluster in self.assignments]

    def adjusted_rand_index(self, true_tasks: Sequence[str]) -> float:
        """How well the clusters line up with known tasks (1 = identical partition)."""
        return float(adjusted_rand_score(list(true_tasks), list(self.assignments)))


def _embed(
    texts: Sequence[str], components: int, seed: int
) -> tuple[np.ndarray, TfidfVectorizer, TruncatedSVD]:
    """Unit-norm SVD rows of sublinear TF-IDF (discovery only: this space is never exported)."""
    vectorizer = TfidfVectorizer(
        token_pattern=TOKEN_PATTERN,
        ngram_range=(1, 2),
        min_df=2,
        max_df=0.9,
        sublinear_tf=True,
        max_features=50000,
        dtype=np.float32,
    )
    features = vectorizer.fit_transform(list(texts))
    components = max(2, min(components, features.shape[1] - 1, features.shape[0] - 1))
    svd = TruncatedSVD(n_components=components, random_state=seed)
    rows = normalize(svd.fit_transform(features))
    return rows, vectorizer, svd


def _cluster(rows: np.ndarray, k: int, seed: int) -> np.ndarray:
    return np.asarray(KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(rows))


def _silhouette(rows: np.ndarray, assignments: np.ndarray, seed: int) -> float:
    if len(set(assignments.tolist())) < 2:
        return -1.0
    sample = min(SILHOUETTE_SAMPLE, rows.shape[0])
    return float(
        silhouette_score(rows, assignments, metric="cosine", sample_size=sample, random_state=seed)
    )


def _slug(term: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", term.lower()).strip("_")


def _top_terms(
    texts: Sequence[str], assignments: np.ndarray, k: int, vectorizer: TfidfVectorizer, count: int
) -> list[tuple[str, ...]]:
    """Terms whose mean TF-IDF in the cluster most exceeds their mean elsewhere."""
    features = vectorizer.transform(list(texts))
    vocabulary = np.array(vectorizer.get_feature_names_out())
    terms = []
    for cluster in range(k):
        inside = np.asarray(features[assignments == cluster].mean(axis=0)).ravel()
        outside = np.asarray(features[assignments != cluster].mean(axis=0)).ravel()
        order = np.argsort(-(inside - outside), kind="stable")[:count]
        terms.append(tuple(str(term) for term in vocabulary[order]))
    return terms


def discover_clusters(
    texts: Sequence[str],
    k: int | str = "auto",
    *,
    seed: int = 0,
    k_range: range = range(2, 13),
    components: int = 100,
    term_count: int = 5,
) -> DiscoveredClusters:
    """Cluster prompts without labels; ``k`` is an int or ``"auto"`` (best silhouette)."""
    if len(texts) < 3:
        raise ValueError("cluster discovery needs at least 3 prompts")
    rows, vectorizer, _ = _embed(texts, components, seed)
    silhouettes: dict[int, float] = {}
    if k == "auto":
        best: tuple[float, int, np.ndarray] | None = None
        for candidate in k_range:
            if candidate >= rows.shape[0]:
                break
            assignments = _cluster(rows, candidate, seed)
            silhouettes[candidate] = _silhouette(rows, assignments, seed)
            logger.info("k=%d silhouette %.4f", candidate, silhouettes[candidate])
            if best is None or silhouettes[candidate] > best[0]:
                best = (silhouettes[candidate], candidate, assignments)
        if best is None:
            raise ValueError("no k in k_range fits this many prompts")
        _, chosen_k, chosen = best
    else:
        chosen_k = int(k)
        if not 2 <= chosen_k < rows.shape[0]:
            raise ValueError(f"--clusters must be in [2, {rows.shape[0] - 1}], got {chosen_k}")
        chosen = _cluster(rows, chosen_k, seed)
        silhouettes[chosen_k] = _silhouette(rows, chosen, seed)
    top_terms = _top_terms(texts, chosen, chosen_k, vectorizer, term_count)
    names = tuple(
        f"c{cluster}-" + "-".join(_slug(term) for term in terms[:2])
        for cluster, terms in enumerate(top_terms)
    )
    return DiscoveredClusters(
        assignments=tuple(int(a) for a in chosen),
        names=names,
        top_terms=tuple(top_terms),
        silhouette_by_k=silhouettes,
    )
