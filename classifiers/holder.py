"""Hot reload: keep one serving classifier, replace it only with one that validated."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from classifiers.api import ClassifierLoadError
from classifiers.runtime import OnnxTaskClassifier

logger = logging.getLogger(__name__)


class ClassifierHolder:
    """Holds the serving classifier; ``reload`` validates a directory, then swaps atomically.

    Readers take ``holder.current`` once per request (one attribute read, atomic in
    CPython) and keep using that object, so a swap never changes a request midway.
    """

    def __init__(self, initial: OnnxTaskClassifier) -> None:
        self._current = initial
        self._reload_lock = threading.Lock()

    @property
    def current(self) -> OnnxTaskClassifier:
        return self._current

    def reload(self, directory: Path | str) -> OnnxTaskClassifier:
        """Load and validate ``directory``; on success it serves, on failure the old one does.

        Raises ClassifierLoadError (with the reason) when the new classifier is refused.
        """
        with self._reload_lock:
            try:
                candidate = OnnxTaskClassifier.load(directory)
            except ClassifierLoadError:
                logger.warning(
                    "classifier reload from %s refused; keeping %s",
                    directory,
                    self._current.metadata.version,
                )
                raise
            previous = self._current
            self._current = candidate
            logger.info(
                "classifier %s -> %s (%s)",
                previous.metadata.version,
                candidate.metadata.version,
                directory,
            )
            return candidate
