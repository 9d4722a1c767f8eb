"""Task classifier: scikit-learn training -> ONNX export -> onnxruntime serving.

Also cluster discovery for unlabeled prompts, an out-of-distribution flag, centroid
similarity for cold-start priors, and validated hot reload.
"""

from classifiers.api import Classification, ClassifierLoadError, TaskClassifier
from classifiers.holder import ClassifierHolder
from classifiers.metadata import ClassifierMetadata
from classifiers.runtime import OnnxTaskClassifier
from classifiers.train import TrainedClassifier, train_classifier
from classifiers.world import ensure_world_classifier

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
