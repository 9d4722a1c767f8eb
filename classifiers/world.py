"""A model bundle's classifier: trained from the bundle's corpus on first use, then cached."""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
from pathlib import Path

from classifiers.api import ClassifierLoadError
from classifiers.metadata import TRAINER_VERSION, ClassifierMetadata
from classifiers.runtime import OnnxTaskClassifier
from classifiers.text import LabeledPrompt, read_labeled_jsonl, training_data_hash

logger = logging.getLogger(__name__)

CLASSIFIER_DIRNAME = "classifier"


def read_corpus_split(corpus_dir: Path, split: str) -> list[LabeledPrompt]:
    """One split (``<corpus_dir>/<split>.jsonl``) as labeled prompts (system prompt + last
    user turn)."""
    path = Path(corpus_dir) / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the corpus has no {split} split; build the world first")
    return read_labeled_jsonl(path)


def _cached_is_current(directory: Path, data_hash: str) -> bool:
    try:
        metadata = ClassifierMetadata.read(directory)
    except (OSError, ValueError):
        return False
    if metadata.training_data_hash != data_hash:
        return False
    try:
        OnnxTaskClassifier.load(directory)
    except ClassifierLoadError as error:
        logger.warning("cached classifier %s is unusable (%s); retraining", directory, error)
        return False
    return True


def _install(staging: Path, target: Path) -> None:
    """Move a finished classifier directory into place (old one moved aside, then removed)."""
    retired = target.with_name(f"{target.name}.old-{os.getpid()}")
    if target.exists():
        os.replace(target, retired)
    os.replace(staging, target)
    shutil.rmtree(retired, ignore_errors=True)


def ensure_world_classifier(world_dir: Path, corpus_dir: Path, seed: int = 0) -> Path:
    """Return ``<world_dir>/classifier``, training it from the train and validation splits in
    ``corpus_dir`` (a bundle's ``corpus_dir``) if missing or stale.

    The cache key is the hash of the training and validation prompts, the seed and the
    trainer version (``training_data_hash`` in classifier.json). A file lock serialises
    concurrent callers; the new directory is built aside and moved into place.
    """
    world_dir = Path(world_dir)
    target = world_dir / CLASSIFIER_DIRNAME
    train = read_corpus_split(corpus_dir, "train")
    validation = read_corpus_split(corpus_dir, "validation")
    data_hash = training_data_hash([*train, *validation], seed, TRAINER_VERSION)
    if _cached_is_current(target, data_hash):
        return target
    with (world_dir / ".classifier.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _cached_is_current(target, data_hash):
            return target
        from classifiers.train import train_classifier  # scikit-learn: only to train

        logger.info("training the world classifier into %s", target)
        trained = train_classifier(train, validation, seed=seed)
        staging = world_dir / f"{CLASSIFIER_DIRNAME}.tmp-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        trained.save(staging)
        _install(staging, target)
    return target
