"""The active classifier of one worker process, reloaded when a new version is promoted.

Keras/TensorFlow are imported only when a model is first needed, so processes
that only aggregate or maintain never pay for them. The first load also prepares
the backend for the worker's device (``worker.device.configure``); every loaded
classifier then predicts in batches of the device's size, in mixed precision where
the device report says so.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from thyrocad.db.records import ModelVersionRecord
from thyrocad.settings import Settings
from thyrocad.worker.device import Device, DeviceReport, configure

if TYPE_CHECKING:
    from thyrocad.models.classifier import Classifier

logger = logging.getLogger(__name__)


class NoActiveModel(RuntimeError):
    """No model version is active: instances wait until one is promoted."""


class ModelHolder:
    """Caches one loaded :class:`Classifier`; :meth:`get` swaps it on promotion.

    ``settings`` (with ``device``) decide the batch size and precision of what it loads;
    without them, a CPU worker's defaults (float32, the classifier's own batch).
    """

    def __init__(self, device: Device | None = None, settings: Settings | None = None) -> None:
        self._lock = threading.Lock()
        self._classifier: Classifier | None = None
        self.device = device or Device()
        self._settings = settings
        self.report: DeviceReport | None = None

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
                classifier = load_version(active, self._prepare_device())
                self._classifier = classifier
                logger.info(
                    "model loaded",
                    extra={
                        "model_version": active.version,
                        "device": self.device.name,
                        "precision": classifier.precision,
                        "max_batch": classifier.max_batch,
                    },
                )
            return self._classifier

    def _prepare_device(self) -> DeviceReport | None:
        if self._settings is None:
            return None
        if self.report is None:
            self.report = configure(self.device, self._settings)
        return self.report


def load_version(active: ModelVersionRecord, report: DeviceReport | None = None) -> Classifier:
    """Load a registry version from the artifact path the database recorded, set up for
    the device ``report`` describes (None: as the registry loads it)."""
    from thyrocad.models.registry import Registry

    artifact = Path(active.artifact_path)
    registry = Registry(artifact.parent.parent)
    classifier = registry.load(active.version)
    if report is not None:
        classifier.max_batch = report.batch_max
        if report.mixed_precision:
            classifier.use_mixed_precision()
    return classifier
