"""``classifier.json``: what a trained classifier directory says about itself (pydantic)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from classifiers.formats import FormatProfile

FORMAT_VERSION = 1
MODEL_FILE = "classifier.onnx"
METADATA_FILE = "classifier.json"
CENTROIDS_FILE = "centroids.npy"
# The training recipe's version, part of the training-data hash: a cached classifier
# trained by another recipe is trained anew. 4: format-distance OOD rule; 5: lbfgs
# tolerance 1e-4.
TRAINER_VERSION = "5"


class OodThresholds(BaseModel):
    """Out-of-distribution rule: flag a prompt whose top probability is below a threshold,
    or which shares no feature with any cluster (nearest-centroid cosine below a floor).

    ``min_probability`` is the ``false_flag_rate`` quantile of the top probability over the
    calibration prompts: the validation split's word-dropout copies by default (a stand-in
    for rewording; plain validation prompts share the training wording and would put the
    threshold far too high for reworded traffic).

    With a ``format_profile``, a prompt is also flagged when its format distance to the
    cluster it was assigned exceeds ``max_format_distance`` (a task unseen in training can
    share a known task's words but not its format). The false-flag budget is then split:
    ``probability_share`` of it to the probability rule, the rest to the format rule, each
    a quantile of the same calibration prompts.
    """

    # NaN or a threshold out of its range (a damaged or hand-edited file) turned the flag
    # off without a word: refused with the file.
    model_config = ConfigDict(frozen=True, allow_inf_nan=False)

    min_probability: float = Field(ge=0.0, le=1.0)
    min_centroid_cosine: float = Field(default=1e-6, ge=-1.0, le=1.0)
    false_flag_rate: float
    calibration: str
    calibration_false_flags: float
    validation_false_flags: float
    probability_share: float = 1.0
    max_format_distance: float | None = Field(default=None, ge=0.0)
    format_profile: FormatProfile | None = None


class ProbePrompt(BaseModel):
    """A prompt and the probabilities scikit-learn gave it: checked again on every load."""

    model_config = ConfigDict(frozen=True, allow_inf_nan=False)

    text: str
    probabilities: list[float]


class ValidationMetrics(BaseModel):
    """Accuracy of the chosen model on the validation split."""

    model_config = ConfigDict(frozen=True)

    accuracy: float
    per_task: dict[str, float]
    examples: int


class ClassifierMetadata(BaseModel):
    """Everything ``classifier.json`` holds next to ``classifier.onnx``."""

    model_config = ConfigDict(frozen=True)

    format_version: int = FORMAT_VERSION
    version: str = Field(description="short id of this model: the ONNX file's digest prefix")
    labels: list[str]
    cluster_terms: dict[str, list[str]] = Field(default_factory=dict)
    training_data_hash: str
    model_sha256: str
    seed: int
    hyperparameters: dict[str, str | int | float | None]
    vocabulary_size: int
    validation: ValidationMetrics
    ood: OodThresholds
    centroids_file: str = CENTROIDS_FILE
    centroids_in_graph_output: str = "centroid_cosine"
    probes: list[ProbePrompt]
    # At most 1e-3: a file that allows more would let any graph pass its probes.
    probe_tolerance: float = Field(default=1e-5, gt=0.0, le=1e-3, allow_inf_nan=False)
    train_examples: int
    created_at: str
    created_unix: float = 0.0
    discovery: dict[str, object] | None = None

    def write(self, directory: Path) -> Path:
        """Write ``classifier.json`` into ``directory``."""
        path = directory / METADATA_FILE
        path.write_text(self.model_dump_json(indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def read(cls, directory: Path) -> ClassifierMetadata:
        """Parse ``classifier.json`` (raises pydantic's ValidationError or OSError)."""
        return cls.model_validate_json((directory / METADATA_FILE).read_text(encoding="utf-8"))
