"""Training, ONNX export parity with scikit-learn, metadata, reproducibility."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from classifiers.metadata import CENTROIDS_FILE, METADATA_FILE, MODEL_FILE, ClassifierMetadata
from classifiers.runtime import OnnxTaskClassifier
from classifiers.text import LabeledPrompt
from classifiers.train import EDGE_PROBES, TrainedClassifier, train_classifier
from tests.classifiers.conftest import FAST_GRID
from tests.classifiers.synthetic import UNRELATED_TEXTS

ODD_TEXTS = (
    "",
    "   \n\t ",
    "Ünïcödé ÉCLAIR naïve café — 東京 😀🚀 translate french",
    "def f(x): return x ** 2  # python | pipe | [brackets] {braces}",
    "ΣΊΣΥΦΟΣ İstanbul ǅ Kelvin K sign",
    "solve " * 20000,  # 120 KB
)


def test_onnx_matches_sklearn_on_every_test_prompt(
    trained: TrainedClassifier,
    classifier: OnnxTaskClassifier,
    test_prompts: list[LabeledPrompt],
) -> None:
    texts = [p.text for p in test_prompts] + list(ODD_TEXTS) + list(UNRELATED_TEXTS)
    onnx_probabilities = classifier.scores(texts).probabilities
    sklearn_probabilities = trained.pipeline.predict_proba(texts)
    assert onnx_probabilities.shape == sklearn_probabilities.shape
    assert float(np.abs(onnx_probabilities - sklearn_probabilities).max()) < 1e-5


def test_graph_cosines_match_numpy_centroids(
    trained: TrainedClassifier, classifier: OnnxTaskClassifier, test_prompts: list[LabeledPrompt]
) -> None:
    texts = [p.text for p in test_prompts]
    expected = trained.pipeline.features(texts) @ trained.centroids.T
    got = classifier.scores(texts).centroid_cosine
    assert float(np.abs(got - np.asarray(expected)).max()) < 1e-5


def test_held_out_accuracy(
    classifier: OnnxTaskClassifier, test_prompts: list[LabeledPrompt]
) -> None:
    results = classifier.classify_batch([p.text for p in test_prompts])
    accuracy = np.mean([r.cluster == p.task for r, p in zip(results, test_prompts, strict=True)])
    assert accuracy >= 0.95


def test_directory_holds_model_centroids_and_metadata(
    classifier_dir: Path, trained: TrainedClassifier
) -> None:
    metadata = ClassifierMetadata.read(classifier_dir)
    assert metadata.labels == ["code", "math", "summarize", "translate"]
    assert (
        metadata.model_sha256
        == hashlib.sha256((classifier_dir / MODEL_FILE).read_bytes()).hexdigest()
    )
    assert metadata.version == metadata.model_sha256[:12]
    assert len(metadata.training_data_hash) == 64
    assert metadata.validation.accuracy >= 0.95
    assert 0.0 < metadata.ood.min_probability < 1.0
    assert metadata.created_at.endswith("+00:00")
    assert {p.text for p in metadata.probes} >= set(EDGE_PROBES)
    centroids = np.load(classifier_dir / CENTROIDS_FILE)
    assert centroids.shape == (4, metadata.vocabulary_size)
    np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1.0, rtol=1e-5)
    assert (classifier_dir / METADATA_FILE).is_file()


def test_training_is_reproducible_from_a_seed(
    trained: TrainedClassifier,
    train_prompts: list[LabeledPrompt],
    validation_prompts: list[LabeledPrompt],
) -> None:
    again = train_classifier(train_prompts, validation_prompts, seed=0, grid=FAST_GRID)
    assert again.onnx_bytes == trained.onnx_bytes
    assert again.metadata.model_sha256 == trained.metadata.model_sha256
    assert again.metadata.training_data_hash == trained.metadata.training_data_hash
    assert again.metadata.ood == trained.metadata.ood
    other_seed = train_classifier(train_prompts, validation_prompts, seed=1, grid=FAST_GRID[:1])
    assert other_seed.metadata.training_data_hash != trained.metadata.training_data_hash


def test_training_refuses_unlabeled_or_single_task_data() -> None:
    with pytest.raises(ValueError, match="needs a task"):
        train_classifier([LabeledPrompt("a b", None), LabeledPrompt("c d", "x")])
    with pytest.raises(ValueError, match="two tasks"):
        train_classifier([LabeledPrompt(f"text {i}", "only") for i in range(10)])


def test_parity_when_max_features_cuts_words_out_of_bigrams() -> None:
    from classifiers.train import CandidateConfig, _vectorizer

    # Every n-gram of a phrase is equally frequent, so the max_features cut falls on ties
    # and keeps bigrams without their words; onnxruntime would then never count them.
    phrases = {"x": "inspection sticker renew office", "y": "ocean wave surf board"}
    prompts = [
        LabeledPrompt(f"{phrase} {i % 3}", task)
        for i in range(30)
        for task, phrase in phrases.items()
    ]
    small = CandidateConfig(max_features=9, dropout_copies=0)
    raw = _vectorizer(small).fit([p.text for p in prompts]).vocabulary_
    assert any(w not in raw for term in raw for w in term.split(" ") if " " in term)
    trained = train_classifier(prompts, None, seed=0, grid=[small])
    vocabulary = trained.pipeline.vectorizer.vocabulary_
    assert all(w in vocabulary for term in vocabulary for w in term.split(" "))
    classifier = OnnxTaskClassifier.from_bytes(trained.onnx_bytes, trained.metadata)
    texts = ["inspection sticker", "the ocean wave", "renew office board", "surf inspection"]
    gap = np.abs(classifier.scores(texts).probabilities - trained.pipeline.predict_proba(texts))
    assert float(gap.max()) < 1e-5
