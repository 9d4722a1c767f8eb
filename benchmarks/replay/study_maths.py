"""The study's analyses as pure functions: similarity, correlation, spread, lengths, mix."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from benchmarks.replay.metrics import RequestResult, aggregate, group_by_task

SPREAD_KEYS: tuple[str, ...] = (
    "mean_speedup",
    "min_speedup",
    "max_speedup",
    "max_over_min",
    "cv",
    "jain",
)


@dataclass(frozen=True)
class Correlation:
    """Pearson and Spearman correlation of paired values, with the number of points."""

    n: int
    pearson_r: float | None
    pearson_p: float | None
    spearman_rho: float | None
    spearman_p: float | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _clean(value: float) -> float | None:
    return round(float(value), 6) if math.isfinite(value) else None


def correlation(xs: Sequence[float], ys: Sequence[float]) -> Correlation:
    """Pearson r and Spearman rho with two-sided p-values (None when undefined)."""
    from scipy import stats

    if len(xs) != len(ys):
        raise ValueError("correlation needs paired values")
    n = len(xs)
    if n < 3 or np.std(xs) == 0 or np.std(ys) == 0:
        return Correlation(n, None, None, None, None)
    pearson = stats.pearsonr(xs, ys)
    spearman = stats.spearmanr(xs, ys)
    return Correlation(
        n,
        _clean(pearson.statistic),
        _clean(pearson.pvalue),
        _clean(spearman.statistic),
        _clean(spearman.pvalue),
    )


def centroid_similarity(
    samples: Mapping[str, Sequence[str]], task_texts: Mapping[str, Sequence[str]]
) -> dict[str, dict[str, float]]:
    """Cosine similarity between TF-IDF centroids: each drafter's sample vs each task's texts.

    One vectoriser (word 1-2 grams, sublinear tf) is fitted on all texts; a group's centroid
    is the mean of its L2-normalised rows, and similarity = cos(centroid_d, centroid_t).
    """
    from sklearn.feature_extraction.text import TfidfVectorizer

    groups = {f"d:{k}": list(v) for k, v in samples.items() if v}
    groups.update({f"t:{k}": list(v) for k, v in task_texts.items() if v})
    corpus = [text for texts in groups.values() for text in texts]
    vectoriser = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1)
    matrix = vectoriser.fit_transform(corpus)
    centroids: dict[str, np.ndarray] = {}
    start = 0
    for key, texts in groups.items():
        centroid = np.asarray(matrix[start : start + len(texts)].mean(axis=0)).ravel()
        centroids[key] = centroid / (np.linalg.norm(centroid) or 1.0)
        start += len(texts)
    return {
        drafter: {
            task: round(float(centroids[f"d:{drafter}"] @ centroids[f"t:{task}"]), 6)
            for task in task_texts
            if f"t:{task}" in centroids
        }
        for drafter in samples
        if f"d:{drafter}" in centroids
    }


def paired_points(
    similarity: Mapping[str, Mapping[str, float]], speedup: Mapping[str, Mapping[str, float]]
) -> list[tuple[str, str, float, float]]:
    """(drafter, task, similarity, speed-up) for every pair measured in both tables."""
    return [
        (drafter, task, sims[task], speedup[drafter][task])
        for drafter, sims in similarity.items()
        if drafter in speedup
        for task in sims
        if task in speedup[drafter]
    ]


def spread_table(
    report: Mapping[str, Any], policies: Sequence[str]
) -> dict[str, dict[str, float | None]]:
    """The evenness figures of the given policies in a replay report."""
    return {
        label: {key: report["policies"][label].get(key) for key in SPREAD_KEYS}
        for label in policies
        if label in report["policies"]
    }


def length_distribution(results: Sequence[RequestResult]) -> dict[str, dict[str, float]]:
    """Per task: mean, median, 90th percentile and max of generated tokens."""
    table: dict[str, dict[str, float]] = {}
    for task, group in group_by_task(results).items():
        lengths = np.array([r.generated_tokens for r in group], dtype=float)
        table[task] = {
            "requests": float(len(group)),
            "mean": round(float(lengths.mean()), 2),
            "p50": float(np.percentile(lengths, 50)),
            "p90": float(np.percentile(lengths, 90)),
            "max": float(lengths.max()),
        }
    return table


def mix_adjusted_tokens_per_s(
    single: Mapping[str, Sequence[RequestResult]], mixed: Sequence[RequestResult]
) -> float:
    """Tokens/s the mixed trace would get at the single-task traces' per-task rates.

    expected time = sum_t tokens_mixed(t) / tps_single(t); result = total tokens / that time,
    so the comparison with the mixed trace's measured tokens/s holds the task mix fixed.
    """
    time_s = 0.0
    tokens = 0
    for task, group in group_by_task(mixed).items():
        if task not in single:
            continue
        rate = aggregate(list(single[task])).tokens_per_s
        produced = aggregate(group).generated_tokens
        if rate > 0:
            time_s += produced / rate
            tokens += produced
    return tokens / time_s if time_s > 0 else 0.0
