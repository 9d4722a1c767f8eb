"""The simulator's ground truth: true acceptance per (cluster, length bucket, drafter), true costs.

Defaults come from the built-in world's measured acceptance matrix when
``<world>/eval.json`` exists (``acceptance``: drafter -> task -> per-token acceptance at
k = 4, greedy), else from ``BUILTIN_ACCEPTANCE`` below, which has the same shape (seven
tasks; ``generic`` plus one fine-tuned drafter per task) and Spec-Bench-like structure:
a fine-tuned drafter beats the generic one on its own task, the n-gram drafter is strong
where outputs copy the prompt (summarization, RAG) and useless on translation.

Added on top of either source, so every scenario can show each behaviour:
- ``ngram`` (model-free, cost ~1% of a target step) when the matrix lacks it;
- a ``creative`` cluster where no drafter pays for itself (Spec-Bench's creative writing
  slows down to 0.88x): the best arm there is k = 0;
- a second length bucket (prompts of 64..255 tokens): n-gram +0.06 (more to copy),
  model drafters -0.02 (except on ``creative``, which has nothing to copy).

True costs, in units of the target's plain time per token t_ar: a model drafter costs
its decode step over the target's (``decode_step_ms`` in eval.json) per drafted token,
else ``MODEL_DRAFT_COST`` (0.15, t_ar = 10 ms); ``ngram`` 0.01; a verify step of k tokens
costs ``1 + VERIFY_SLOPE * k`` (0.08: on a CPU, scoring k + 1 positions is not free).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from router.policy.base import MAX_DRAFT_LENGTH
from router.policy.speedup import cost_gain, speedup_table

logger = logging.getLogger(__name__)

TASKS: tuple[str, ...] = ("chat", "translation", "summarization", "qa", "math", "rag", "code")
CREATIVE = "creative"
NGRAM = "ngram"
T_AR = 0.010
MODEL_DRAFT_COST = 0.15
NGRAM_DRAFT_COST = 0.01
VERIFY_SLOPE = 0.08
K_MAX = 8
#: The n-gram drafter's largest k (thompson's ``copy_k_max``: it is a copy drafter).
NGRAM_K_MAX = 16
#: Mean length of a repeated stretch the n-gram drafter copies (``with_copy_ngram``).
COPY_RUN_MEAN = 20.0

_GENERIC = {
    "chat": 0.42,
    "translation": 0.30,
    "summarization": 0.50,
    "qa": 0.48,
    "math": 0.55,
    "rag": 0.52,
    "code": 0.50,
}
_OWN_TASK = {
    "chat": 0.58,
    "translation": 0.62,
    "summarization": 0.66,
    "qa": 0.64,
    "math": 0.72,
    "rag": 0.68,
    "code": 0.74,
}
_NGRAM = {
    "chat": 0.08,
    "translation": 0.04,
    "summarization": 0.55,
    "qa": 0.18,
    "math": 0.12,
    "rag": 0.62,
    "code": 0.25,
}
#: Creative writing: every drafter is below its cost ratio.
_CREATIVE = {"generic": 0.10, NGRAM: 0.02}
_CREATIVE_TASK_DRAFTER = 0.07


def _builtin_acceptance() -> dict[str, dict[str, float]]:
    """drafter -> task -> acceptance: generic, one fine-tuned drafter per task (off-task: -0.08)."""
    table = {"generic": dict(_GENERIC)}
    for own in TASKS:
        table[own] = {
            task: _OWN_TASK[task] if task == own else max(0.05, _GENERIC[task] - 0.08)
            for task in TASKS
        }
    return table


BUILTIN_ACCEPTANCE: Mapping[str, Mapping[str, float]] = _builtin_acceptance()


@dataclass(frozen=True)
class GroundTruth:
    """True parameters of a simulated deployment (arrays indexed [cluster, bucket, drafter])."""

    clusters: tuple[str, ...]
    drafters: tuple[str, ...]
    acceptance: np.ndarray  # [C, B, D]
    draft_cost: np.ndarray  # [D], per drafted token, in units of t_ar
    cluster_weights: np.ndarray  # [C], request mix
    long_prompt_share: np.ndarray  # [C], share of requests in length bucket 1
    mean_tokens: np.ndarray  # [C], mean generated tokens
    similarity: Mapping[str, Mapping[str, float]]  # drafter -> cluster -> similarity
    source: str
    t_ar: float = T_AR
    verify_slope: float = VERIFY_SLOPE
    # [C, B]: when set, the n-gram drafter is a copy drafter (``with_copy_ngram``): a
    # lookup matches with ``copy_match``; a match is a repeated stretch of R tokens (R
    # geometric, mean COPY_RUN_MEAN) with the n-gram's acceptance as probability, else
    # rejected at once; an unmatched lookup drafts nothing.
    copy_match: np.ndarray | None = None

    def gain(self) -> np.ndarray:
        """t_ar / (k t_draft + t_verify(k)) per drafter and k <= MAX_DRAFT_LENGTH, true costs."""
        lengths = np.arange(MAX_DRAFT_LENGTH + 1)
        return cost_gain(1.0, self.draft_cost, 1.0 + self.verify_slope * lengths)

    def speedups(self) -> np.ndarray:
        """True S(a, k): [C, B, D, MAX_DRAFT_LENGTH + 1] (any k a policy may pick); the
        n-gram drafter's by its runs when ``copy_match`` is set (``copy_run_speedups``)."""
        table = speedup_table(self.acceptance, self.gain())
        if self.copy_match is not None and NGRAM in self.drafters:
            j = self.drafters.index(NGRAM)
            table[..., j, :] = self.copy_run_speedups(self.copy_match, self.acceptance[..., j])
        return table

    def copy_run_speedups(self, match: np.ndarray, keep: np.ndarray) -> np.ndarray:
        """S(k), k = 0..MAX_DRAFT_LENGTH, of a copy drafter whose lookups match with p,
        a match being a repeated stretch with probability q (R geometric, mean M: P(R >= i)
        = rho^(i - 1), rho = 1 - 1 / M) and rejected at once otherwise. Per lookup:
        1 + p q M tokens; a stretch takes 1 + E[floor(R / (k + 1))] = 1 + rho^k /
        (1 - rho^(k + 1)) steps, each drafting k; so steps(k) = 1 + p q rho^k / (1 -
        rho^(k + 1)), drafted(k) = p k (1 + q rho^k / (1 - rho^(k + 1)))."""
        j = self.drafters.index(NGRAM)
        rho = 1.0 - 1.0 / COPY_RUN_MEAN
        k = np.arange(MAX_DRAFT_LENGTH + 1)
        extra = rho**k / (1.0 - rho ** (k + 1))  # E[floor(R / (k + 1))] of a stretch
        p, q = match[..., None], keep[..., None]
        tokens = 1.0 + p * q * COPY_RUN_MEAN
        steps = 1.0 + p * q * extra
        drafted = p * k * (1.0 + q * extra)
        table = tokens / (steps + drafted * (self.draft_cost[j] + self.verify_slope))
        table[..., 0] = 1.0
        return table

    def oracle_arms(self, present: Sequence[str]) -> dict[tuple[int, int], tuple[str, int]]:
        """Best (drafter, k) per (cluster, bucket) among the ``present`` drafters, k up to
        K_MAX (NGRAM_K_MAX for the n-gram drafter)."""
        table = self.speedups()[..., : NGRAM_K_MAX + 1]
        mask = np.array([d in present for d in self.drafters])
        table = np.where(mask[None, None, :, None], table, -np.inf)
        longest = np.array([NGRAM_K_MAX if d == NGRAM else K_MAX for d in self.drafters])
        table = np.where(np.arange(NGRAM_K_MAX + 1) <= longest[:, None], table, -np.inf)
        table[..., 0] = 1.0
        arms = {}
        width = NGRAM_K_MAX + 1
        for c in range(len(self.clusters)):
            for b in range(self.acceptance.shape[1]):
                d, k = divmod(int(np.argmax(table[c, b])), width)
                arms[(c, b)] = ("none", 0) if k == 0 else (self.drafters[d], k)
        return arms

    def with_copy_ngram(self, match: float) -> GroundTruth:
        """A copy where the n-gram drafter drafts copies (``copy_match``): a lookup matches
        with probability ``match``; a match is a repeated stretch with the n-gram's
        acceptance as probability (``copy_run_speedups``)."""
        shape = self.acceptance.shape[:2]
        return replace(self, copy_match=np.full(shape, float(match)))

    def with_acceptance(self, cluster: str, drafter: str, delta: float) -> GroundTruth:
        """A copy where ``drafter``'s acceptance on ``cluster`` moved by ``delta`` (drift)."""
        acceptance = self.acceptance.copy()
        c, d = self.clusters.index(cluster), self.drafters.index(drafter)
        acceptance[c, :, d] = np.clip(acceptance[c, :, d] + delta, 0.01, 0.95)
        return replace(self, acceptance=acceptance)


def _similarities(
    drafters: Sequence[str], clusters: Sequence[str], rng: np.random.Generator
) -> dict[str, dict[str, float]]:
    """Fine-tuning-sample similarity: 0.85 to its own task, 0.3-0.55 elsewhere."""
    return {
        d: {c: 0.85 if c == d else float(rng.uniform(0.30, 0.55)) for c in clusters}
        for d in drafters
        if d in clusters
    }


def ground_truth_from_matrix(
    matrix: Mapping[str, Mapping[str, float]],
    source: str,
    step_ms: Mapping[str, Any] | None = None,
) -> GroundTruth:
    """Build the ground truth from a drafter -> task -> acceptance matrix.

    ``step_ms`` is eval.json's ``decode_step_ms`` (``target`` and ``drafters``: name -> ms);
    when given, each model drafter's cost ratio is its step time over the target's.
    """
    tasks = sorted({t for row in matrix.values() for t in row}, key=_task_order)
    drafters = [d for d in matrix if d != NGRAM] + [NGRAM]
    clusters = (*tasks, CREATIVE)
    base = np.zeros((len(clusters), len(drafters)))
    for j, d in enumerate(drafters):
        for i, c in enumerate(tasks):
            row = matrix.get(d, _NGRAM if d == NGRAM else {})
            base[i, j] = float(row.get(c, _NGRAM.get(c, 0.1) if d == NGRAM else 0.1))
        base[-1, j] = _CREATIVE.get(d, _CREATIVE_TASK_DRAFTER)
    is_ngram = np.array([d == NGRAM for d in drafters])
    long_delta = np.where(is_ngram, 0.06, -0.02)[None, :] * np.ones((len(clusters), 1))
    long_delta[-1] = 0.0
    acceptance = np.clip(np.stack([base, base + long_delta], axis=1), 0.01, 0.95)
    weights = np.full(len(clusters), 1.0 / len(clusters))
    share = {"rag": 0.8, "summarization": 0.8, "qa": 0.4, "code": 0.5, "chat": 0.3}
    tokens = {"chat": 120, "translation": 60, "summarization": 90, "qa": 40, "math": 150}
    tokens |= {"rag": 80, "code": 160, CREATIVE: 200}
    draft_cost = np.where(is_ngram, NGRAM_DRAFT_COST, MODEL_DRAFT_COST)
    t_ar = T_AR
    if step_ms and float(step_ms.get("target") or 0) > 0:
        t_ar = float(step_ms["target"]) / 1000.0
        measured = step_ms.get("drafters") or {}
        draft_cost = np.array(
            [
                float(measured[d]) / float(step_ms["target"]) if d in measured else cost
                for d, cost in zip(drafters, draft_cost, strict=True)
            ]
        )
    return GroundTruth(
        clusters=clusters,
        drafters=tuple(drafters),
        acceptance=acceptance,
        draft_cost=draft_cost,
        cluster_weights=weights,
        long_prompt_share=np.array([share.get(c, 0.2) for c in clusters]),
        mean_tokens=np.array([float(tokens.get(c, 100)) for c in clusters]),
        similarity=_similarities(drafters, clusters, np.random.default_rng(7)),
        source=source,
        t_ar=t_ar,
    )


def _task_order(task: str) -> tuple[int, str]:
    return (TASKS.index(task) if task in TASKS else len(TASKS), task)


def default_ground_truth(world_dir: Path | None) -> GroundTruth:
    """The world's measured matrix from ``<world_dir>/eval.json`` if present, else built-in."""
    path = world_dir / "eval.json" if world_dir is not None else None
    if path is not None and path.is_file():
        try:
            evaluation = json.loads(path.read_text())
            return ground_truth_from_matrix(
                evaluation["acceptance"], f"measured ({path})", evaluation.get("decode_step_ms")
            )
        except (KeyError, TypeError, ValueError) as error:
            logger.warning("ignoring %s (%s); using the built-in table", path, error)
    return ground_truth_from_matrix(BUILTIN_ACCEPTANCE, "built-in table")


def random_ground_truth(n_drafters: int, clusters: Sequence[str], seed: int) -> GroundTruth:
    """Many drafters: acceptance U(0.15, 0.8) per (cluster, drafter), cost U(0.03, 0.2)."""
    rng = np.random.default_rng(seed)
    drafters = tuple(f"drafter{i}" for i in range(n_drafters))
    base = rng.uniform(0.15, 0.80, size=(len(clusters), n_drafters))
    long_delta = rng.uniform(-0.05, 0.05, size=(len(clusters), n_drafters))
    acceptance = np.clip(np.stack([base, base + long_delta], axis=1), 0.01, 0.95)
    return GroundTruth(
        clusters=tuple(clusters),
        drafters=drafters,
        acceptance=acceptance,
        draft_cost=rng.uniform(0.03, 0.20, size=n_drafters),
        cluster_weights=np.full(len(clusters), 1.0 / len(clusters)),
        long_prompt_share=np.full(len(clusters), 0.5),
        mean_tokens=np.full(len(clusters), 100.0),
        similarity={},
        source=f"random ({n_drafters} drafters, seed {seed})",
    )
