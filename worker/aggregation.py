"""Study and patient results, recomputed from stored predictions (never incremented).

A late image simply makes the next finalisation produce a new revision; an
unchanged study returns its latest revision, so running this twice is harmless.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sqlalchemy.orm import Session

from thyrocad.db import repository
from thyrocad.db.records import NO_USABLE_IMAGES, ImagePrediction, ResultRecord
from thyrocad.models.aggregation import combine
from thyrocad.worker.context import WorkerContext

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Finalised:
    study: ResultRecord
    patient: ResultRecord | None


def _combine(
    images: Sequence[ImagePrediction], classes: Sequence[str], rule: str, positive: str
) -> tuple[str, float, dict[str, float]]:
    matrix = np.array(
        [[img.probabilities.get(c, 0.0) for c in classes] for img in images], dtype=np.float64
    )
    combined = combine(matrix, rule=rule, positive_index=list(classes).index(positive))
    probs = {c: float(p) for c, p in zip(classes, combined, strict=True)}
    return classes[int(np.argmax(combined))], probs[positive], probs


def finalise_study(ctx: WorkerContext, study_id: int, now: dt.datetime) -> Finalised | None:
    """Recompute one study's result and its patient's result from stored predictions,
    in a transaction of its own."""
    with ctx.sessions.begin() as session:
        return _finalise(session, ctx, study_id, now)


def _finalise(
    session: Session, ctx: WorkerContext, study_id: int, now: dt.datetime
) -> Finalised | None:
    """``finalise_study`` in the caller's transaction."""
    rule, positive = ctx.settings.aggregation_rule, ctx.settings.positive_class
    preds = repository.study_predictions(session, study_id)
    if preds.model_version is None:
        return None
    if not preds.images:
        if not repository.has_no_usable_image(session, study_id):
            return None  # e.g. predicted under another version: rescoring's business
        unusable = repository.save_study_result(
            session,
            study_id=study_id,
            model_version=preds.model_version,
            rule=rule,
            label=None,
            probability=None,
            probabilities={},
            image_count=0,
            now=now,
            epoch=preds.epoch,
            reason=NO_USABLE_IMAGES,
        )
        return Finalised(study=unusable, patient=None)
    classes = list(preds.images[0].probabilities)
    label, prob, probs = _combine(preds.images, classes, rule, positive)
    study = repository.save_study_result(
        session,
        study_id=study_id,
        model_version=preds.model_version,
        rule=rule,
        label=label,
        probability=prob,
        probabilities=probs,
        image_count=len(preds.images),
        now=now,
        epoch=preds.epoch,
    )
    patient_preds = repository.patient_predictions(session, preds.patient_id, preds.model_version)
    patient = None
    if patient_preds.images:
        label, prob, probs = _combine(patient_preds.images, classes, rule, positive)
        patient = repository.save_patient_result(
            session,
            patient_id=preds.patient_id,
            model_version=preds.model_version,
            rule=rule,
            label=label,
            probability=prob,
            probabilities=probs,
            image_count=len(patient_preds.images),
            study_count=patient_preds.study_count,
            now=now,
        )
    return Finalised(study=study, patient=patient)


def finalise_due(ctx: WorkerContext, now: dt.datetime | None = None) -> list[Finalised]:
    """Finalise every study idle for at least the configured time."""
    now = now or dt.datetime.now(dt.UTC)
    done = []
    # One connection for the pass (a pooled checkout pings the server first), one
    # transaction per study, as finalise_study.
    with ctx.engine.connect() as connection, ctx.sessions(bind=connection) as session:
        due = repository.studies_to_finalise(session, ctx.settings.study_idle_seconds, now)
        session.rollback()  # ends the read, so that each study is a transaction of its own
        for study_id in due:
            with session.begin():
                result = _finalise(session, ctx, study_id, now)
            if result is not None:
                done.append(result)
                ctx.observe("study_result", {"study": result.study})
    reportable = [f.study for f in done if f.study.has_finding]
    if reportable and ctx.settings.sr_destination:
        from thyrocad.worker.report_queue import queue_reports  # the SR hook; imports highdicom

        queue_reports(ctx, reportable)
    return done
