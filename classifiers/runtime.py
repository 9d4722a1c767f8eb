"""Serve a trained classifier with onnxruntime: prompt -> (cluster, probability, OOD flag)."""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from pydantic import ValidationError

from classifiers.api import Classification, ClassifierLoadError
from classifiers.formats import FormatDistance, format_matrix
from classifiers.graph import CENTROID_COSINE, INPUT_NAME, PROBABILITIES, open_session
from classifiers.metadata import FORMAT_VERSION, MODEL_FILE, ClassifierMetadata
from classifiers.text import classifier_text, prompt_from_messages

logger = logging.getLogger(__name__)

_OUTPUTS = [PROBABILITIES, CENTROID_COSINE]
#: Texts longer than this are scored in a run of their own (``OnnxTaskClassifier.scores``).
LONG_TEXT_CHARS = 4096


@dataclass(frozen=True)
class RawScores:
    """The graph's outputs for a batch: probabilities and nearest-centroid cosines, [N, K]."""

    probabilities: np.ndarray
    centroid_cosine: np.ndarray


class OnnxTaskClassifier:
    """The task classifier as an onnxruntime session plus its ``classifier.json``.

    Build it with :meth:`load` (from a directory) or :meth:`from_bytes`; both check the
    graph against the metadata (labels, output shapes, probe probabilities) first.
    """

    def __init__(
        self, session: ort.InferenceSession, metadata: ClassifierMetadata, source: str
    ) -> None:
        self._session = session
        self._metadata = metadata
        self._labels = tuple(metadata.labels)
        self._source = source
        ood = metadata.ood
        self._min_cosine = ood.min_centroid_cosine
        self._min_probability = ood.min_probability
        # Without a format profile, no format distance is too far.
        self._format_distance: FormatDistance | None = None
        self._max_format_distance = math.inf
        if ood.format_profile is not None and ood.max_format_distance is not None:
            self._format_distance = FormatDistance(ood.format_profile.arrays())
            self._max_format_distance = ood.max_format_distance

    @classmethod
    def load(cls, directory: Path | str) -> OnnxTaskClassifier:
        """Open ``directory/classifier.onnx`` + ``classifier.json``; raise ClassifierLoadError."""
        directory = Path(directory)
        if not directory.is_dir():
            raise ClassifierLoadError(f"{directory}: not a classifier directory")
        try:
            metadata = ClassifierMetadata.read(directory)
        except FileNotFoundError as error:
            raise ClassifierLoadError(f"{directory}: classifier.json is missing") from error
        except (ValidationError, ValueError, OSError) as error:
            raise ClassifierLoadError(
                f"{directory}: classifier.json is invalid: {_first_problem(error)}"
            ) from error
        try:
            model_bytes = (directory / MODEL_FILE).read_bytes()
        except OSError as error:
            raise ClassifierLoadError(f"{directory}: cannot read {MODEL_FILE}: {error}") from error
        return cls.from_bytes(model_bytes, metadata, source=str(directory))

    @classmethod
    def from_bytes(
        cls, model_bytes: bytes, metadata: ClassifierMetadata, source: str = "<memory>"
    ) -> OnnxTaskClassifier:
        """Open a serialized graph with its metadata, validating one against the other."""
        if metadata.format_version != FORMAT_VERSION:
            raise ClassifierLoadError(
                f"{source}: classifier format {metadata.format_version}, "
                f"this build reads {FORMAT_VERSION}"
            )
        digest = hashlib.sha256(model_bytes).hexdigest()
        if digest != metadata.model_sha256:
            raise ClassifierLoadError(
                f"{source}: {MODEL_FILE} digest {digest[:12]} does not match "
                f"classifier.json ({metadata.model_sha256[:12]}): file corrupt or mismatched"
            )
        try:
            session = open_session(model_bytes)
        except Exception as error:  # onnxruntime raises its own Fail/InvalidGraph types
            raise ClassifierLoadError(
                f"{source}: onnxruntime cannot open the graph: {error}"
            ) from error
        try:
            classifier = cls(session, metadata, source)
            classifier._validate()
        except (ValueError, IndexError, TypeError) as error:  # numbers of the wrong shape
            raise ClassifierLoadError(
                f"{source}: classifier.json is inconsistent: {error}"
            ) from error
        return classifier

    def _validate(self) -> None:
        """Labels present, output shapes match, probes reproduce the stored probabilities."""
        if len(self._labels) < 2 or len(set(self._labels)) != len(self._labels):
            raise ClassifierLoadError(f"{self._source}: labels must be >= 2 distinct names")
        output_names = {output.name for output in self._session.get_outputs()}
        if not set(_OUTPUTS) <= output_names:
            raise ClassifierLoadError(f"{self._source}: graph lacks outputs {_OUTPUTS}")
        if not self._metadata.probes:
            raise ClassifierLoadError(f"{self._source}: classifier.json has no probe prompts")
        try:
            scores = self.scores([probe.text for probe in self._metadata.probes])
        except Exception as error:
            raise ClassifierLoadError(
                f"{self._source}: graph fails on probe prompts: {error}"
            ) from error
        expected = np.array([probe.probabilities for probe in self._metadata.probes])
        if scores.probabilities.shape[1] != len(self._labels) or (
            scores.probabilities.shape != expected.shape
        ):
            raise ClassifierLoadError(
                f"{self._source}: graph gives {scores.probabilities.shape[1]} probabilities, "
                f"classifier.json lists {len(self._labels)} labels"
            )
        gap = float(np.abs(scores.probabilities - expected).max())
        if not gap <= self._metadata.probe_tolerance:  # NaN is a difference too
            raise ClassifierLoadError(
                f"{self._source}: probe probabilities differ from classifier.json by {gap:.2e}"
            )
        self._validate_format_profile()
        # The whole decision, out-of-distribution flag included, on every probe.
        self._decide([probe.text for probe in self._metadata.probes], scores)

    def _validate_format_profile(self) -> None:
        """A format profile has one row per label, each as wide as a format vector: a
        trimmed one loaded, then failed every prompt of a cluster past its rows."""
        profile = self._metadata.ood.format_profile
        if profile is None:
            return
        width = format_matrix(["x"]).shape[1]
        widths = {len(profile.center), len(profile.scale)}
        widths |= {len(row) for row in (*profile.means, *profile.spreads)}
        rows = {len(profile.means), len(profile.spreads)}
        if rows != {len(self._labels)} or widths != {width}:
            raise ClassifierLoadError(
                f"{self._source}: classifier.json's format profile has {sorted(rows)} rows of "
                f"{sorted(widths)} values; the classifier needs {len(self._labels)} rows "
                f"(one per label) of {width}"
            )

    @property
    def labels(self) -> tuple[str, ...]:
        return self._labels

    @property
    def metadata(self) -> ClassifierMetadata:
        return self._metadata

    @property
    def fingerprint(self) -> str:
        """sha256 of the graph's digest and the whole classifier.json: it changes when the
        graph or any threshold, profile or label does (the graph's digest alone stays the
        same when only the out-of-distribution calibration was redone)."""
        text = self._metadata.model_sha256 + self._metadata.model_dump_json()
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    @property
    def source(self) -> str:
        """Where this classifier was loaded from."""
        return self._source

    def scores(self, texts: Sequence[str]) -> RawScores:
        """Run the graph on a batch of texts."""
        if isinstance(texts, str):
            raise TypeError("scores() takes a sequence of texts, not one string")
        for text in texts:
            if not isinstance(text, str):
                raise TypeError(f"prompt text must be str, got {type(text).__name__}")
        long = [i for i, text in enumerate(texts) if len(text) > LONG_TEXT_CHARS]
        if not long or len(long) == len(texts) == 1:
            return self._run(texts)
        # The graph's tokenizer pads every row to the longest: one 100k-character prompt
        # in a Route batch of 64 took 216 ms instead of 1.2 + 13 ms. Long texts run alone.
        kept = set(long)
        short = [i for i in range(len(texts)) if i not in kept]
        runs = [(short, self._run([texts[i] for i in short]))] if short else []
        runs += [([i], self._run([texts[i]])) for i in long]
        probabilities = np.empty((len(texts), len(self._labels)), dtype=np.float32)
        cosine = np.empty_like(probabilities)
        for rows, scored in runs:
            probabilities[rows] = scored.probabilities
            cosine[rows] = scored.centroid_cosine
        return RawScores(probabilities=probabilities, centroid_cosine=cosine)

    def _run(self, texts: Sequence[str]) -> RawScores:
        """The graph on ``texts`` as one batch."""
        batch = np.array(texts, dtype=object).reshape(-1, 1)
        if batch.shape[0] == 0:
            empty = np.zeros((0, len(self._labels)), dtype=np.float32)
            return RawScores(empty, empty)
        probabilities, cosine = self._session.run(_OUTPUTS, {INPUT_NAME: batch})
        return RawScores(probabilities=probabilities, centroid_cosine=cosine)

    def _decide(self, texts: Sequence[str], scores: RawScores) -> list[Classification]:
        """Label, probability and out-of-distribution flag of each scored text (a lone
        prompt is a batch of one)."""
        best = scores.probabilities.argmax(axis=1)
        # The per-text values come back as Python floats (float64, as the thresholds are)
        # and are compared as each Classification is built: on a batch of one, a NumPy
        # comparison costs more than the Python one, and the floats are needed anyway.
        probability = scores.probabilities.max(axis=1).tolist()
        cosine = scores.centroid_cosine.max(axis=1).tolist()
        distance = self._format_distances(texts, best)
        return [
            Classification(
                self._labels[label],
                p,
                p < self._min_probability or c < self._min_cosine or d > self._max_format_distance,
            )
            for label, p, c, d in zip(best.tolist(), probability, cosine, distance, strict=True)
        ]

    def _format_distances(self, texts: Sequence[str], clusters: np.ndarray) -> list[float]:
        """Each text's format distance to its cluster (0 without a format profile)."""
        if self._format_distance is None:
            return [0.0] * len(texts)
        distances: list[float] = self._format_distance(format_matrix(texts), clusters).tolist()
        return distances

    def classify(self, text: str) -> Classification:
        if not isinstance(text, str):
            raise TypeError(f"prompt text must be str, got {type(text).__name__}")
        return self.classify_batch([text])[0]

    def classify_batch(self, texts: Sequence[str]) -> list[Classification]:
        """Classify prompt texts as the classifier reads them (:func:`classifier_text`: a
        text in Qwen's chat format by its messages)."""
        read = _readable(texts)
        return self._decide(read, self.scores(read))

    def classify_messages(self, messages: Sequence[Mapping[str, str]]) -> Classification:
        return self.classify(prompt_from_messages(messages))

    def similarity(self, texts: Sequence[str]) -> dict[str, float]:
        """Mean cosine between each text and each cluster centroid (empty sample: zeros).

        Cosines are in the classifier's own TF-IDF space (the graph's ``centroid_cosine``),
        so a drafter's fine-tuning sample is compared with clusters exactly as prompts are.
        """
        # A fine-tuning sample is read from a file, unchecked: a lone surrogate in it made
        # the graph's input unencodable (UnicodeEncodeError on a drafter's registration).
        sample = [t.encode("utf-8", "replace").decode("utf-8") for t in _readable(texts)]
        scores = self.scores(sample)
        if scores.centroid_cosine.shape[0] == 0:
            return dict.fromkeys(self._labels, 0.0)
        means = scores.centroid_cosine.astype(np.float64).mean(axis=0)
        return {label: float(value) for label, value in zip(self._labels, means, strict=True)}


def _readable(texts: Sequence[str]) -> list[str]:
    """The texts as the classifier reads them; a non-string is left for scores() to refuse."""
    if isinstance(texts, str):
        raise TypeError("expected a sequence of texts, not one string")
    return [classifier_text(t) if isinstance(t, str) else t for t in texts]


def _first_problem(error: Exception) -> str:
    """One line for what is wrong: a ValidationError's first error, with the field and how
    many more there are (pydantic's own message ran to 37 lines), else the error."""
    if not isinstance(error, ValidationError):
        return str(error)
    errors = error.errors()
    first = errors[0]
    where = ".".join(str(part) for part in first["loc"]) or "the file"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {first['msg']}{more}"
