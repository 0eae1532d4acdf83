"""The active classifier of one worker process, reloaded when a new version is promoted.

Keras/TensorFlow are imported only when a model is first needed, so processes
that only aggregate or maintain never pay for them.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from thyrocad.db.records import ModelVersionRecord

if TYPE_CHECKING:
    from thyrocad.models.classifier import Classifier

logger = logging.getLogger(__name__)


class NoActiveModel(RuntimeError):
    """No model version is active: instances wait until one is promoted."""


class ModelHolder:
    """Caches one loaded :class:`Classifier`; :meth:`get` swaps it on promotion."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._classifier: Classifier | None = None

    @property
    def version(self) -> str | None:
        return self._classifier.version if self._classifier else None

    def get(self, active: ModelVersionRecord | None) -> Classifier:
        """The classifier for ``active`` (the database's active version), loading it if new."""
        if active is None:
            raise NoActiveModel(
                "no active model version: promote one with 'thyrocad models promote'"
            )
        with self._lock:
            if self._classifier is None or self._classifier.version != active.version:
                self._classifier = load_version(active)
                logger.info("model loaded", extra={"model_version": active.version})
            return self._classifier


def load_version(active: ModelVersionRecord) -> Classifier:
    """Load a registry version from the artifact path the database recorded."""
    from thyrocad.models.registry import Registry

    artifact = Path(active.artifact_path)
    registry = Registry(artifact.parent.parent)
    return registry.load(active.version)
