"""Train the task classifier: TF-IDF n-grams + logistic regression, chosen by validation.

The chosen pipeline is exported with :mod:`classifiers.export`; the centroids (mean
L2-normalised TF-IDF row per cluster, renormalised) and the out-of-distribution
threshold are computed in that same feature space and stored with the model.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from scipy import sparse
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression

from classifiers.export import build_classifier_graph
from classifiers.formats import FormatProfile
from classifiers.metadata import (
    CENTROIDS_FILE,
    METADATA_FILE,
    MODEL_FILE,
    TRAINER_VERSION,
    ClassifierMetadata,
    OodThresholds,
    ProbePrompt,
    ValidationMetrics,
)
from classifiers.text import TOKEN_PATTERN, LabeledPrompt, training_data_hash

logger = logging.getLogger(__name__)

# Probes checked on every load: odd inputs as well as ordinary ones.
EDGE_PROBES: tuple[str, ...] = ("", "Ünïcödé ✓ 😀 naïve café", "print(x) 42 + 17 = ?")


@dataclass(frozen=True)
class CandidateConfig:
    """One point of the model-selection grid.

    ``dropout_copies`` extra copies of each training prompt keep each word with
    probability ``keep_probability``: the model cannot lean on a template phrase alone,
    which is what makes it hold up on prompts worded differently from training. The
    validation split shares the training wording, so it cannot measure that robustness:
    the dropout strength is a fixed prior, not a selected hyperparameter.
    ``class_weight="balanced"`` stops a task with few prompts (80 vs 1400 in the world
    corpus) from losing every close call to the big ones.
    """

    max_ngram: int = 2
    max_features: int | None = 8000
    min_df: int = 1
    inverse_regularization: float = 10.0
    dropout_copies: int = 4
    keep_probability: float = 0.25
    class_weight: str | None = "balanced"


# Simplest first (strongest regularisation, then fewer n-grams): selection takes the
# first candidate within one standard error of the best validation score.
DEFAULT_GRID: tuple[CandidateConfig, ...] = (
    CandidateConfig(max_ngram=1, max_features=8000, inverse_regularization=1.0),
    CandidateConfig(max_ngram=2, max_features=8000, inverse_regularization=1.0),
    CandidateConfig(max_ngram=2, max_features=8000, inverse_regularization=3.0),
    CandidateConfig(max_ngram=2, max_features=8000, inverse_regularization=10.0),
)
# Perturbed validation: this many word-dropout copies of each validation prompt.
OOD_CALIBRATIONS: tuple[str, ...] = ("validation-word-dropout", "validation")
VALIDATION_DROPOUT_COPIES = 3
# Share of the OOD false-flag budget given to the low-probability rule (the rest goes to
# the format-distance rule); chosen with the leave-one-task-out protocol of bench.py.
OOD_PROBABILITY_SHARE = 0.2
VALIDATION_KEEP_PROBABILITY = 0.5


@dataclass(frozen=True)
class FittedPipeline:
    """A fitted vectorizer + logistic regression, with the labels in column order."""

    config: CandidateConfig
    vectorizer: TfidfVectorizer
    model: LogisticRegression

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(str(label) for label in self.model.classes_)

    def features(self, texts: Sequence[str]) -> sparse.csr_matrix:
        """L2-normalised TF-IDF rows."""
        return self.vectorizer.transform(list(texts))

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        """scikit-learn's probabilities, the reference the ONNX graph must match."""
        return np.asarray(self.model.predict_proba(self.features(texts)))


@dataclass(frozen=True)
class TrainedClassifier:
    """The chosen pipeline, its centroids, its ONNX bytes and its metadata."""

    pipeline: FittedPipeline
    centroids: np.ndarray  # [K, V], unit rows
    onnx_bytes: bytes
    metadata: ClassifierMetadata
    candidate_accuracy: dict[str, float] = field(default_factory=dict)

    def save(self, directory: Path) -> Path:
        """Write classifier.onnx, centroids.npy and classifier.json (each replaced atomically)."""
        directory.mkdir(parents=True, exist_ok=True)
        _atomic_write(directory / MODEL_FILE, self.onnx_bytes)
        centroid_path = directory / CENTROIDS_FILE
        with (directory / (CENTROIDS_FILE + ".tmp")).open("wb") as handle:
            np.save(handle, self.centroids.astype(np.float32))
        os.replace(directory / (CENTROIDS_FILE + ".tmp"), centroid_path)
        # The metadata goes last: a reader that sees the new json sees the new model.
        _atomic_write(
            directory / METADATA_FILE, (self.metadata.model_dump_json(indent=2) + "\n").encode()
        )
        return directory


def _atomic_write(path: Path, payload: bytes) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_bytes(payload)
    os.replace(temporary, path)


def word_dropout(
    prompts: Sequence[LabeledPrompt], copies: int, keep_probability: float, seed: int
) -> list[LabeledPrompt]:
    """``copies`` perturbed versions of each prompt, each word kept with ``keep_probability``."""
    rng = random.Random(seed)
    perturbed = []
    for prompt in prompts:
        words = prompt.text.split()
        for _ in range(copies):
            kept = [word for word in words if rng.random() < keep_probability]
            perturbed.append(LabeledPrompt(" ".join(kept), prompt.task))
    return perturbed


def _vectorizer(config: CandidateConfig, vocabulary: list[str] | None = None) -> TfidfVectorizer:
    return TfidfVectorizer(
        token_pattern=TOKEN_PATTERN,
        lowercase=True,
        ngram_range=(1, config.max_ngram),
        max_features=None if vocabulary is not None else config.max_features,
        min_df=1 if vocabulary is not None else config.min_df,
        vocabulary=vocabulary,
        # sublinear_tf is not used: skl2onnx maps it to log(x + 1), sklearn to log(x) + 1.
        sublinear_tf=False,
        dtype=np.float32,
    )


def _closed_vocabulary(selected: Mapping[str, int]) -> list[str]:
    """The selected n-grams plus every word inside them, sorted.

    onnxruntime's TfIdfVectorizer never counts an n-gram whose words are not unigrams
    of its pool (checked: "inspection sticker" was dropped when "sticker" had been cut
    by ``max_features``), so the exported vocabulary must be closed under its words.
    """
    terms = set(selected)
    for term in selected:
        terms.update(term.split(" "))
    return sorted(terms)


def fit_pipeline(
    config: CandidateConfig, prompts: Sequence[LabeledPrompt], seed: int
) -> FittedPipeline:
    """Fit one candidate on prompts plus their word-dropout copies (deterministic per seed)."""
    augmented = [
        *prompts,
        *word_dropout(prompts, config.dropout_copies, config.keep_probability, seed),
    ]
    texts = [p.text for p in augmented]
    labels = [str(p.task) for p in augmented]
    selection = _vectorizer(config).fit(texts)
    vectorizer = _vectorizer(config, vocabulary=_closed_vocabulary(selection.vocabulary_))
    features = vectorizer.fit_transform(list(texts))
    model = LogisticRegression(
        C=config.inverse_regularization,
        class_weight=config.class_weight,
        max_iter=2000,
        random_state=seed,
        # scikit-learn's default; 1e-6 took 1.5x as long on the built-in world's corpus
        # and chose the same candidate with the same accuracies (benchmarks/classifier/HISTORY.md).
        tol=1e-4,
    )
    model.fit(features, list(labels))
    return FittedPipeline(config=config, vectorizer=vectorizer, model=model)


def cluster_centroids(
    pipeline: FittedPipeline, texts: Sequence[str], labels: Sequence[str]
) -> np.ndarray:
    """Unit-norm mean feature row per cluster, in the pipeline's label order."""
    features = pipeline.features(texts)
    label_array = np.asarray(labels)
    rows = []
    for label in pipeline.labels:
        mean = np.asarray(features[label_array == label].mean(axis=0)).ravel()
        norm = float(np.linalg.norm(mean))
        rows.append(mean / norm if norm > 0 else mean)
    return np.vstack(rows).astype(np.float64)


def accuracy_by_task(
    truth: Sequence[str], predicted: Sequence[str]
) -> tuple[float, dict[str, float]]:
    """Overall accuracy and accuracy per true task."""
    truth_array, predicted_array = np.asarray(truth), np.asarray(predicted)
    per_task = {
        str(task): float(np.mean(predicted_array[truth_array == task] == task))
        for task in sorted(set(truth))
    }
    return float(np.mean(truth_array == predicted_array)), per_task


def calibrate_ood(
    calibration_probabilities: np.ndarray,
    calibration_format_distance: np.ndarray,
    validation_probabilities: np.ndarray,
    validation_format_distance: np.ndarray,
    false_flag_rate: float,
    calibration: str,
    profile: FormatProfile,
    probability_share: float = OOD_PROBABILITY_SHARE,
) -> OodThresholds:
    """Thresholds from in-distribution prompts: the budget split between the two rules.

    ``min_probability`` is the ``share * rate`` quantile of the top probability and
    ``max_format_distance`` the ``1 - (1 - share) * rate`` quantile of the format distance
    to the predicted cluster, so at most ``rate`` of the calibration prompts are flagged.
    """
    probability_rate = false_flag_rate * probability_share
    threshold = float(
        np.quantile(calibration_probabilities.max(axis=1), probability_rate, method="lower")
    )
    max_distance = float(
        np.quantile(
            calibration_format_distance, 1 - (false_flag_rate - probability_rate), method="higher"
        )
    )

    def flagged(probabilities: np.ndarray, distance: np.ndarray) -> float:
        return float(np.mean((probabilities.max(axis=1) < threshold) | (distance > max_distance)))

    return OodThresholds(
        min_probability=threshold,
        false_flag_rate=false_flag_rate,
        calibration=calibration,
        calibration_false_flags=flagged(calibration_probabilities, calibration_format_distance),
        validation_false_flags=flagged(validation_probabilities, validation_format_distance),
        probability_share=probability_share,
        max_format_distance=max_distance,
        format_profile=profile,
    )


def split_validation(
    prompts: Sequence[LabeledPrompt], fraction: float, seed: int
) -> tuple[list[LabeledPrompt], list[LabeledPrompt]]:
    """Deterministic stratified split when no validation set is given."""
    by_task: dict[str | None, list[LabeledPrompt]] = {}
    for prompt in prompts:
        by_task.setdefault(prompt.task, []).append(prompt)
    rng = random.Random(seed)
    train: list[LabeledPrompt] = []
    validation: list[LabeledPrompt] = []
    for task in sorted(by_task, key=str):
        items = list(by_task[task])
        rng.shuffle(items)
        cut = max(1, round(len(items) * fraction)) if len(items) > 1 else 0
        validation.extend(items[:cut])
        train.extend(items[cut:])
    return train, validation


def _probes(pipeline: FittedPipeline, validation_texts: Sequence[str]) -> list[ProbePrompt]:
    texts = [*validation_texts[:8], *EDGE_PROBES]
    probabilities = pipeline.predict_proba(texts)
    return [
        ProbePrompt(text=text, probabilities=[float(p) for p in row])
        for text, row in zip(texts, probabilities, strict=True)
    ]


def _accuracy(pipeline: FittedPipeline, prompts: Sequence[LabeledPrompt]) -> float:
    predicted = pipeline.model.predict(pipeline.features([p.text for p in prompts]))
    return accuracy_by_task([str(p.task) for p in prompts], list(predicted))[0]


def _select(
    grid: Sequence[CandidateConfig],
    train: Sequence[LabeledPrompt],
    validation: Sequence[LabeledPrompt],
    seed: int,
) -> tuple[FittedPipeline, dict[str, float]]:
    """Fit every candidate; keep the simplest one within one standard error of the best.

    The score is the mean of plain and perturbed validation accuracy: the validation split
    shares the training wording, so plain accuracy saturates, and its word-dropout copies
    stand in for rewording. Candidates come simplest first (strongest regularisation);
    the one-standard-error rule (Hastie et al., ESL 7.10) takes the first whose score is
    within sqrt(p (1 - p) / n) of the best score p, n being the prompts scored.
    """
    perturbed = word_dropout(
        validation, VALIDATION_DROPOUT_COPIES, VALIDATION_KEEP_PROBABILITY, seed + 1
    )
    fitted: list[tuple[float, FittedPipeline]] = []
    report: dict[str, float] = {}
    for config in grid:
        pipeline = fit_pipeline(config, train, seed)
        score = (_accuracy(pipeline, validation) + _accuracy(pipeline, perturbed)) / 2
        report[str(asdict(config))] = score
        logger.info("candidate %s: validation score %.4f", asdict(config), score)
        fitted.append((score, pipeline))
    best = max(score for score, _ in fitted)
    standard_error = math.sqrt(best * (1 - best) / (len(validation) + len(perturbed)))
    chosen = next(p for score, p in fitted if score >= best - standard_error - 1e-12)
    return chosen, report


def train_classifier(
    train: Sequence[LabeledPrompt],
    validation: Sequence[LabeledPrompt] | None = None,
    *,
    seed: int = 0,
    grid: Sequence[CandidateConfig] = DEFAULT_GRID,
    false_flag_rate: float = 0.05,
    ood_calibration: str = "validation-word-dropout",
    cluster_terms: Mapping[str, list[str]] | None = None,
    discovery: dict[str, object] | None = None,
) -> TrainedClassifier:
    """Choose, fit and export a classifier from labeled prompts (every prompt needs a task)."""
    if any(p.task is None for p in train) or (
        validation and any(p.task is None for p in validation)
    ):
        raise ValueError("every training prompt needs a task; use discovery for unlabeled data")
    if ood_calibration not in OOD_CALIBRATIONS:
        raise ValueError(f"ood_calibration must be one of {OOD_CALIBRATIONS}")
    if validation is None or not validation:
        train, validation = split_validation(train, 0.15, seed)
    if len({p.task for p in train}) < 2:
        raise ValueError("training needs at least two tasks")
    if not validation:  # scikit-learn's "Found array with 0 sample(s)" said nothing of it
        raise ValueError(
            "nothing to validate on: give some task at least 2 prompts (15% of each task's "
            "prompts are held out, none of a task with one), or a validation set"
        )
    pipeline, candidate_accuracy = _select(grid, train, validation, seed)
    train_texts = [p.text for p in train]
    centroids = cluster_centroids(pipeline, train_texts, [str(p.task) for p in train])
    model = build_classifier_graph(
        pipeline.vectorizer, pipeline.model.coef_, pipeline.model.intercept_, centroids
    )
    onnx_bytes = model.SerializeToString()
    validation_texts = [p.text for p in validation]
    validation_features = pipeline.features(validation_texts)
    predicted = pipeline.model.predict(validation_features)
    accuracy, per_task = accuracy_by_task([str(p.task) for p in validation], list(predicted))
    perturbed = word_dropout(
        validation, VALIDATION_DROPOUT_COPIES, VALIDATION_KEEP_PROBABILITY, seed + 1
    )
    profile = FormatProfile.fit(train_texts, [str(p.task) for p in train], pipeline.labels)
    validation_probabilities = pipeline.predict_proba(validation_texts)
    validation_distance = profile.distances(
        validation_texts, validation_probabilities.argmax(axis=1)
    )
    calibration_prompts = {"validation": validation, "validation-word-dropout": perturbed}
    calibration_texts = [p.text for p in calibration_prompts[ood_calibration]]
    calibration_probabilities = pipeline.predict_proba(calibration_texts)
    calibration_distance = profile.distances(
        calibration_texts, calibration_probabilities.argmax(axis=1)
    )
    model_sha256 = hashlib.sha256(onnx_bytes).hexdigest()
    created = datetime.now(UTC).replace(microsecond=0)
    metadata = ClassifierMetadata(
        version=model_sha256[:12],
        labels=list(pipeline.labels),
        cluster_terms={k: list(v) for k, v in (cluster_terms or {}).items()},
        training_data_hash=training_data_hash([*train, *validation], seed, TRAINER_VERSION),
        model_sha256=model_sha256,
        seed=seed,
        hyperparameters={**asdict(pipeline.config), "trainer_version": TRAINER_VERSION},
        vocabulary_size=len(pipeline.vectorizer.vocabulary_),
        validation=ValidationMetrics(
            accuracy=accuracy, per_task=per_task, examples=len(validation)
        ),
        ood=calibrate_ood(
            calibration_probabilities,
            calibration_distance,
            validation_probabilities,
            validation_distance,
            false_flag_rate,
            ood_calibration,
            profile,
        ),
        probes=_probes(pipeline, validation_texts),
        train_examples=len(train),
        created_at=created.isoformat(timespec="seconds"),
        created_unix=created.timestamp(),
        discovery=discovery,
    )
    logger.info(
        "chose %s: validation accuracy %.4f, vocabulary %d",
        asdict(pipeline.config),
        accuracy,
        metadata.vocabulary_size,
    )
    return TrainedClassifier(
        pipeline=pipeline,
        centroids=centroids,
        onnx_bytes=onnx_bytes,
        metadata=metadata,
        candidate_accuracy=candidate_accuracy,
    )
