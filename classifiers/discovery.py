"""Discover task clusters in unlabeled prompts: TF-IDF -> SVD -> k-means, named by top terms.

Prompts of one task come in a few wordings (templates), and plain k-means on TF-IDF
finds the wordings rather than the tasks. So discovery runs in stages:

1. over-cluster: k-means with ``micro_clusters`` clusters on unit SVD rows of TF-IDF
   (each micro-cluster is then nearly one wording of one task);
2. merge: average-linkage agglomeration of the micro-clusters on the similarity
   ``S = w * cos(content profiles) + (1 - w) * cos(mean profiles)``, where a content
   profile is the mean TF-IDF row with the terms present in at least ``content_df`` of
   the micro-cluster's prompts zeroed (those terms are its template), so wordings of
   one task meet through what they talk about;
3. ...but two tasks can talk about the same things in different formats (retrieval QA
   and summarisation over the same documents), so ``S`` is multiplied by a format
   kernel ``exp(-(d / s)^2)``, where ``d`` is the distance between the micro-clusters'
   mean format vectors (standardised log counts of lines, digits and each ASCII
   punctuation mark) and ``s`` the root mean within-micro-cluster spread of those
   vectors: wordings of one task differ in format by less than a prompt's own spread.

With ``k="auto"`` the number of clusters maximises the silhouette of that merge (on the
precomputed distances ``1 - S`` between micro-clusters) over ``k_range``.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import sparse
from sklearn.cluster import AgglomerativeClustering, KMeans
from sklearn.decomposition import TruncatedSVD
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.metrics import adjusted_rand_score, silhouette_score
from sklearn.preprocessing import normalize

from classifiers.formats import format_matrix
from classifiers.text import TOKEN_PATTERN

logger = logging.getLogger(__name__)


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


def _micro_clusters(rows: np.ndarray, count: int, seed: int) -> np.ndarray:
    return np.asarray(KMeans(n_clusters=count, n_init=4, random_state=seed).fit_predict(rows))


def _profile_similarity(
    features: sparse.csr_matrix, micro: np.ndarray, count: int, content_df: float, weight: float
) -> np.ndarray:
    """Similarity between micro-clusters from their content and mean TF-IDF profiles."""
    present = (features > 0).astype(np.float32)
    content, mean = [], []
    for cluster in range(count):
        inside = micro == cluster
        document_frequency = np.asarray(present[inside].mean(axis=0)).ravel()
        profile = np.asarray(features[inside].mean(axis=0)).ravel()
        template_free = np.where(document_frequency < content_df, profile, 0.0)
        content.append(template_free / (np.linalg.norm(template_free) + 1e-12))
        mean.append(profile / (np.linalg.norm(profile) + 1e-12))
    content_rows, mean_rows = np.vstack(content), np.vstack(mean)
    similarity = weight * (content_rows @ content_rows.T) + (1 - weight) * (mean_rows @ mean_rows.T)
    np.fill_diagonal(similarity, 1.0)
    return np.clip(similarity, 0.0, 1.0)


def _format_kernel(texts: Sequence[str], micro: np.ndarray, count: int) -> np.ndarray:
    """``exp(-(d / s)^2)`` between micro-clusters' mean standardised format vectors."""
    vectors = format_matrix(texts)
    vectors = (vectors - vectors.mean(axis=0)) / (vectors.std(axis=0) + 1e-9)
    means = np.vstack([vectors[micro == cluster].mean(axis=0) for cluster in range(count)])
    spread = math.sqrt(
        float(np.mean([vectors[micro == c].var(axis=0).sum() for c in range(count)]))
    )
    distance = np.sqrt(((means[:, None, :] - means[None, :, :]) ** 2).sum(axis=-1))
    return np.asarray(np.exp(-((distance / max(spread, 1e-9)) ** 2)))


def _merge(similarity: np.ndarray, k: int) -> np.ndarray:
    agglomeration = AgglomerativeClustering(n_clusters=k, metric="precomputed", linkage="average")
    return np.asarray(agglomeration.fit_predict(1.0 - similarity))


def _silhouette(similarity: np.ndarray, merged: np.ndarray) -> float:
    if not 2 <= len(set(merged.tolist())) < len(merged):
        return -1.0
    return float(silhouette_score(1.0 - similarity, merged, metric="precomputed"))


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
        order = np.argsort(-(inside - outside), kind="stable")
        # Name clusters by words: punctuation tokens ("[", "|") make unreadable names.
        words = [str(term) for term in vocabulary[order] if re.search(r"[a-z0-9]", str(term))]
        terms.append(tuple(words[:count]))
    return terms


def discover_clusters(
    texts: Sequence[str],
    k: int | str = "auto",
    *,
    seed: int = 0,
    k_range: range = range(2, 13),
    components: int = 100,
    micro_clusters: int = 20,
    content_df: float = 0.3,
    content_weight: float = 0.6,
    term_count: int = 5,
    use_format: bool = True,
) -> DiscoveredClusters:
    """Cluster prompts without labels; ``k`` is an int or ``"auto"`` (best silhouette)."""
    if len(texts) < 3:
        raise ValueError("cluster discovery needs at least 3 prompts")
    rows, vectorizer, _ = _embed(texts, components, seed)
    features = vectorizer.transform(list(texts))
    fixed_k = None if k == "auto" else int(k)
    if fixed_k is not None and not 2 <= fixed_k < len(texts):
        raise ValueError(f"--clusters must be in [2, {len(texts) - 1}], got {fixed_k}")
    count = min(len(texts) - 1, max(micro_clusters, 2 * (fixed_k or 0)))
    micro = _micro_clusters(rows, count, seed)
    count = int(micro.max()) + 1
    similarity = _profile_similarity(features, micro, count, content_df, content_weight)
    if use_format:
        similarity = similarity * _format_kernel(texts, micro, count)
        np.fill_diagonal(similarity, 1.0)
    candidates = [fixed_k] if fixed_k is not None else [c for c in k_range if c < count]
    if not candidates:
        raise ValueError("no k in k_range fits this many prompts")
    merges = {candidate: _merge(similarity, candidate) for candidate in candidates}
    silhouettes = {c: _silhouette(similarity, merged) for c, merged in merges.items()}
    for candidate, value in silhouettes.items():
        logger.info("k=%d silhouette %.4f", candidate, value)
    chosen_k = max(candidates, key=lambda c: (silhouettes[c], -c))
    chosen = merges[chosen_k][micro]
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
