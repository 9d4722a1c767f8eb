"""The classifier's public types: a classification, the classifier protocol and its errors."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from classifiers.metadata import ClassifierMetadata


@dataclass(frozen=True)
class Classification:
    """One prompt's task cluster, the classifier's probability for it, and the OOD flag.

    ``out_of_distribution`` is raised when the prompt is unlike every cluster; the router
    reports it with the decision (``RouteDecision.out_of_distribution``) and routes by
    ``cluster`` all the same: the policy's per-cluster losses limit what a wrong cluster
    costs.
    """

    cluster: str
    probability: float
    out_of_distribution: bool


class ClassifierLoadError(Exception):
    """A classifier directory is missing, corrupt or inconsistent with its metadata."""


@runtime_checkable
class TaskClassifier(Protocol):
    """Maps prompts to task clusters; implemented by :class:`OnnxTaskClassifier`."""

    @property
    def labels(self) -> tuple[str, ...]:
        """Cluster names, in the order of the model's probability columns."""
        ...

    @property
    def metadata(self) -> ClassifierMetadata:
        """What ``classifier.json`` says about the model."""
        ...

    def classify(self, text: str) -> Classification:
        """Classify one prompt text."""
        ...

    def classify_batch(self, texts: Sequence[str]) -> list[Classification]:
        """Classify several prompt texts in one call."""
        ...

    def classify_messages(self, messages: Sequence[Mapping[str, str]]) -> Classification:
        """Classify a chat: the system prompt plus the last user turn."""
        ...

    def similarity(self, texts: Sequence[str]) -> dict[str, float]:
        """Cosine between a text sample and each cluster's centroid, in feature space."""
        ...
