"""Hot reload: validate, then swap; refuse corrupt or inconsistent directories."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest

from classifiers import ClassifierHolder, ClassifierLoadError, OnnxTaskClassifier
from classifiers.train import train_classifier
from tests.classifiers.conftest import FAST_GRID
from tests.classifiers.synthetic import synthetic_prompts


@pytest.fixture
def holder(classifier_dir: Path) -> ClassifierHolder:
    return ClassifierHolder(OnnxTaskClassifier.load(classifier_dir))


@pytest.fixture
def candidate_dir(classifier_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "candidate"
    shutil.copytree(classifier_dir, copy)
    return copy


def _assert_still_serving(holder: ClassifierHolder, version: str) -> None:
    assert holder.current.metadata.version == version
    assert holder.current.classify("solve the prime number equation").cluster == "math"


def test_corrupt_onnx_is_refused_and_old_keeps_serving(
    holder: ClassifierHolder, candidate_dir: Path
) -> None:
    version = holder.current.metadata.version
    model = candidate_dir / "classifier.onnx"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    with pytest.raises(ClassifierLoadError, match="corrupt or mismatched"):
        holder.reload(candidate_dir)
    _assert_still_serving(holder, version)


def test_garbage_onnx_with_matching_digest_is_refused(
    holder: ClassifierHolder, candidate_dir: Path
) -> None:
    import hashlib

    version = holder.current.metadata.version
    garbage = b"not an onnx graph" * 10
    (candidate_dir / "classifier.onnx").write_bytes(garbage)
    meta = json.loads((candidate_dir / "classifier.json").read_text())
    meta["model_sha256"] = hashlib.sha256(garbage).hexdigest()
    (candidate_dir / "classifier.json").write_text(json.dumps(meta))
    with pytest.raises(ClassifierLoadError, match="onnxruntime cannot open"):
        holder.reload(candidate_dir)
    _assert_still_serving(holder, version)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda text: text[: len(text) // 2], "classifier.json is invalid"),
        # One line: the first field and how many more (pydantic's message ran to 37 lines).
        (
            lambda text: "{}",
            r"classifier.json is invalid: [a-z_]+: Field required \(and \d+ more\)$",
        ),
        (lambda text: text.replace('"format_version": 1', '"format_version": 99'), "format 99"),
    ],
)
def test_corrupt_metadata_is_refused(
    holder: ClassifierHolder, candidate_dir: Path, edit, message: str
) -> None:
    version = holder.current.metadata.version
    path = candidate_dir / "classifier.json"
    path.write_text(edit(path.read_text()))
    with pytest.raises(ClassifierLoadError, match=message):
        holder.reload(candidate_dir)
    _assert_still_serving(holder, version)


def test_labels_inconsistent_with_graph_are_refused(
    holder: ClassifierHolder, candidate_dir: Path
) -> None:
    path = candidate_dir / "classifier.json"
    meta = json.loads(path.read_text())
    meta["labels"] = meta["labels"][:3]
    path.write_text(json.dumps(meta))
    with pytest.raises(ClassifierLoadError, match="lists 3 labels"):
        holder.reload(candidate_dir)
    meta["labels"] = ["a", "a", "b", "c"]
    path.write_text(json.dumps(meta))
    with pytest.raises(ClassifierLoadError, match="distinct"):
        holder.reload(candidate_dir)


def test_probe_mismatch_is_refused(holder: ClassifierHolder, candidate_dir: Path) -> None:
    path = candidate_dir / "classifier.json"
    meta = json.loads(path.read_text())
    meta["probes"][0]["probabilities"] = [0.25, 0.25, 0.25, 0.25]
    path.write_text(json.dumps(meta))
    with pytest.raises(ClassifierLoadError, match="probe probabilities differ"):
        holder.reload(candidate_dir)


def _edited(meta: dict, where: str) -> dict:
    ood = meta["ood"]
    if where == "NaN thresholds":  # json.dumps writes NaN, which Python's reader takes
        ood.update(min_probability=float("nan"), max_format_distance=float("nan"))
    elif where == "NaN probe":
        meta["probes"][0]["probabilities"][0] = float("nan")
    elif where == "a tolerance that passes anything":
        meta["probe_tolerance"] = 10.0
    elif where == "trimmed format profile":
        ood["format_profile"]["means"] = ood["format_profile"]["means"][:1]
    elif where == "ragged format profile":
        ood["format_profile"]["spreads"][0] = ood["format_profile"]["spreads"][0][:2]
    else:  # a probe with too few probabilities
        meta["probes"][0]["probabilities"] = meta["probes"][0]["probabilities"][:2]
    return meta


@pytest.mark.parametrize(
    "where",
    [
        "trimmed format profile",
        "ragged format profile",
        "short probe",
        "NaN thresholds",
        "NaN probe",
        "a tolerance that passes anything",
    ],
)
def test_metadata_of_the_wrong_shape_is_refused(
    holder: ClassifierHolder, candidate_dir: Path, where: str
) -> None:
    """A format profile with fewer rows than labels loaded, then every prompt of a cluster
    past its rows failed (IndexError: INTERNAL on every Route batch); ragged numbers
    escaped the load as ValueError (INTERNAL on ReloadClassifier). NaN thresholds, a NaN
    probe or a huge probe tolerance loaded and turned the OOD flag or the probe check
    off without a word."""
    version = holder.current.metadata.version
    path = candidate_dir / "classifier.json"
    meta = json.loads(path.read_text())
    assert meta["ood"]["format_profile"] is not None
    path.write_text(json.dumps(_edited(meta, where)))
    with pytest.raises(ClassifierLoadError):
        holder.reload(candidate_dir)
    _assert_still_serving(holder, version)


def test_valid_reload_swaps_while_readers_keep_working(
    holder: ClassifierHolder, tmp_path: Path
) -> None:
    tasks = ("math", "code", "translate")
    new = train_classifier(
        synthetic_prompts(150, seed=3, tasks=tasks),
        synthetic_prompts(30, seed=4, tasks=tasks),
        seed=0,
        grid=FAST_GRID[:1],
    ).save(tmp_path / "new")
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            try:
                holder.current.classify("python function return list")
            except BaseException as error:  # the test fails on any
                errors.append(error)

    thread = threading.Thread(target=reader)
    thread.start()
    swapped = holder.reload(new)
    stop.set()
    thread.join()
    assert errors == []
    assert holder.current is swapped
    assert holder.current.labels == ("code", "math", "translate")
