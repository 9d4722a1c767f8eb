"""Session fixtures: one small classifier trained on synthetic prompts, saved once."""

from __future__ import annotations

from pathlib import Path

import pytest

from classifiers.runtime import OnnxTaskClassifier
from classifiers.text import LabeledPrompt
from classifiers.train import CandidateConfig, TrainedClassifier, train_classifier
from tests.classifiers.synthetic import synthetic_prompts

# Two candidates keep training to a couple of seconds while still exercising selection.
FAST_GRID = (
    CandidateConfig(max_features=2000, dropout_copies=1, keep_probability=0.5),
    CandidateConfig(max_ngram=1, max_features=2000, dropout_copies=1, keep_probability=0.5),
)


@pytest.fixture(scope="session")
def train_prompts() -> list[LabeledPrompt]:
    return synthetic_prompts(400, seed=0)


@pytest.fixture(scope="session")
def validation_prompts() -> list[LabeledPrompt]:
    return synthetic_prompts(80, seed=1)


@pytest.fixture(scope="session")
def test_prompts() -> list[LabeledPrompt]:
    return synthetic_prompts(120, seed=2)


@pytest.fixture(scope="session")
def trained(
    train_prompts: list[LabeledPrompt], validation_prompts: list[LabeledPrompt]
) -> TrainedClassifier:
    return train_classifier(train_prompts, validation_prompts, seed=0, grid=FAST_GRID)


@pytest.fixture(scope="session")
def classifier_dir(trained: TrainedClassifier, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return trained.save(tmp_path_factory.mktemp("classifier"))


@pytest.fixture(scope="session")
def classifier(classifier_dir: Path) -> OnnxTaskClassifier:
    return OnnxTaskClassifier.load(classifier_dir)
