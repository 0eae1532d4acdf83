"""The evidence of a batch: Grad-CAM maps of the positive class, stored with its predictions.

Computed on the very tensors the classifier just predicted, with the same Keras model
(so the same version and the preprocessing inside it), on the last convolutional
block its architecture names (``ArchSpec.evidence_layer``). A map that cannot be
computed never costs its prediction: the prediction is stored without one, the failure
is logged with the prediction ids and counted (``thyrocad_evidence_failures_total``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from sqlalchemy.orm import Session

from thyrocad.db.records import PredictionRecord
from thyrocad.db.repository.evidence import store_evidence
from thyrocad.db.repository.predictions import PredictionKey

if TYPE_CHECKING:
    from thyrocad.models.classifier import Classifier

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchEvidence:
    """One PNG per image of a batch (None where it failed), and why the first one failed."""

    method: str
    layer: str
    pngs: tuple[bytes | None, ...]
    seconds: float
    error: Exception | None = None


def compute_evidence(
    classifier: Classifier, pixels: np.ndarray, positive_class: str
) -> BatchEvidence:
    """Grad-CAM of ``positive_class`` for uint8 ``pixels`` (N, S, S), as PNGs at the grid.

    Never raises for a failure of the computation itself: it comes back as ``error``
    with no PNG for the images it concerns.
    """
    # Imported here: only an inference worker that computes evidence needs Keras for it.
    from thyrocad.models.architectures import get_spec
    from thyrocad.models.gradcam import METHOD, evidence_png, grad_cam

    started = time.perf_counter()
    layer = ""
    try:
        layer = get_spec(classifier.architecture).evidence_layer
        maps = grad_cam(
            classifier.model,
            pixels,
            layer,
            classifier.classes.index(positive_class),
            batch_size=classifier.max_batch,
        )
    except Exception as exc:  # evidence is optional; the caller logs and counts it
        return BatchEvidence(
            METHOD, layer, (None,) * len(pixels), time.perf_counter() - started, exc
        )
    pngs: list[bytes | None] = []
    error: Exception | None = None
    for cam in maps:
        try:
            pngs.append(evidence_png(cam))
        except Exception as exc:  # one bad map (NaN) costs that image's map only
            pngs.append(None)
            error = error or exc
    return BatchEvidence(METHOD, layer, tuple(pngs), time.perf_counter() - started, error)


def store_batch_evidence(
    session: Session,
    evidence: BatchEvidence,
    records: Sequence[PredictionRecord],
    stored: dict[PredictionKey, int],
) -> list[int]:
    """Store each stored prediction's map in ``session``; return the ids left without one.

    ``records`` are in the order of the batch's images; ``stored`` is what
    ``save_predictions_with_ids`` returned (predictions another worker owns are absent
    and get nothing here).
    """
    missing: list[int] = []
    for record, png in zip(records, evidence.pngs, strict=True):
        prediction_id = stored.get((record.instance_id, record.frame_index, record.model_version))
        if prediction_id is None:
            continue
        if png is None:
            missing.append(prediction_id)
            continue
        store_evidence(
            session, prediction_id, method=evidence.method, layer=evidence.layer, png=png
        )
    return missing


def log_missing(evidence: BatchEvidence, missing: Sequence[int], model_version: str) -> None:
    """One warning for the predictions of a batch stored without their map (ids, no PHI)."""
    if not missing:
        return
    error = evidence.error
    reason = f"{type(error).__name__}: {error}"[:300] if error is not None else "unknown"
    logger.warning(
        "%d predictions stored without their evidence map (%s); prediction ids %s",
        len(missing),
        reason,
        list(missing),
        extra={
            "prediction_ids": list(missing),
            "model_version": model_version,
            "evidence_layer": evidence.layer,
        },
        exc_info=error,
    )
