"""Task classifier: scikit-learn training -> ONNX export -> onnxruntime serving.

Also cluster discovery for unlabeled prompts, an out-of-distribution flag, centroid
similarity for cold-start priors, and validated hot reload. Public names load lazily
(PEP 562), so importing the package (as ``specroute --help`` does) pulls in neither
scikit-learn nor onnxruntime.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from classifiers.api import Classification, ClassifierLoadError, TaskClassifier
    from classifiers.holder import ClassifierHolder
    from classifiers.metadata import ClassifierMetadata
    from classifiers.runtime import OnnxTaskClassifier
    from classifiers.train import TrainedClassifier, train_classifier
    from classifiers.world import ensure_world_classifier

# Public name -> module that defines it.
_EXPORTS: dict[str, str] = {
    "Classification": "classifiers.api",
    "ClassifierLoadError": "classifiers.api",
    "TaskClassifier": "classifiers.api",
    "ClassifierHolder": "classifiers.holder",
    "ClassifierMetadata": "classifiers.metadata",
    "OnnxTaskClassifier": "classifiers.runtime",
    "TrainedClassifier": "classifiers.train",
    "train_classifier": "classifiers.train",
    "ensure_world_classifier": "classifiers.world",
}

__all__ = [
    "Classification",
    "ClassifierHolder",
    "ClassifierLoadError",
    "ClassifierMetadata",
    "OnnxTaskClassifier",
    "TaskClassifier",
    "TrainedClassifier",
    "ensure_world_classifier",
    "train_classifier",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'classifiers' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
