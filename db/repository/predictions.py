"""Predictions of a claimed (or rescored) instance, stored once per instance, frame
and model version, and the instance marked ``predicted``.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import ColumnElement, delete, select, update
from sqlalchemy.orm import Session

from thyrocad.db.records import PredictionRecord
from thyrocad.db.repository._common import _UNCLAIMED, _insert, _no_sync, _now
from thyrocad.db.schema import EvidenceMap, Instance, Prediction, Study

# (instance id, frame index, model version): a prediction's natural key.
PredictionKey = tuple[int, int, str]


def save_predictions(
    session: Session,
    predictions: Sequence[PredictionRecord],
    token: str | None,
    now: datetime | None = None,
) -> int:
    """Store predictions, mark their instances ``predicted``; return predictions stored.

    What :func:`save_predictions_with_ids` does, counting what it returns.
    """
    return len(save_predictions_with_ids(session, predictions, token, now))


def save_predictions_with_ids(
    session: Session,
    predictions: Sequence[PredictionRecord],
    token: str | None,
    now: datetime | None = None,
) -> dict[PredictionKey, int]:
    """Store predictions, mark their instances ``predicted``; return the stored ones'
    row ids by (instance id, frame index, model version). A stored prediction loses the
    evidence map of an earlier computation (see ``store_evidence``).

    With ``token``, an instance counts only while this worker still holds its
    claim (state ``processing``, same token); predictions for any other
    instance are skipped — another worker owns it now, or its bytes were
    replaced. With ``token=None`` (a rescore) every given instance counts.

    Give all frames of an instance in one call: each (instance, model version)
    pair written here ends up with exactly the given frames (upsert on
    instance, frame and version; frames no longer given are removed), so a
    re-run writes the same rows, never new ones. The studies of the applied
    instances are marked ``needs_finalise``.
    """
    if not predictions:
        return {}
    now = _now(now)
    instance_ids = sorted({p.instance_id for p in predictions})
    conditions: list[ColumnElement[bool]] = [Instance.id.in_(instance_ids)]
    if token is not None:
        conditions += [Instance.state == "processing", Instance.claim_token == token]
    study_ids = sorted(
        session.execute(select(Instance.study_id).where(*conditions).distinct()).scalars()
    )
    if not study_ids:
        return {}
    # Studies are written before instances, the order register_instance locks
    # them in, so the two can never deadlock on PostgreSQL. The epoch tells a
    # finaliser reading this study right now that its result is already stale.
    # Marking a study whose instance turns out to be owned by someone else
    # only costs an extra (idempotent) finalisation.
    session.execute(
        update(Study)
        .where(Study.id.in_(study_ids))
        .values(
            needs_finalise=True,
            last_predicted_at=now,
            prediction_epoch=Study.prediction_epoch + 1,
        )
        .execution_options(**_no_sync())
    )
    # The claim is checked again under the instance rows' locks.
    applied = session.execute(
        update(Instance)
        .where(*conditions)
        .values(state="predicted", reason=None, updated_at=now, **_UNCLAIMED)
        .returning(Instance.id)
        .execution_options(**_no_sync())
    ).all()
    owned = {row.id for row in applied}
    # One row per key: PostgreSQL refuses an upsert that touches a row twice.
    unique = {(p.instance_id, p.frame_index, p.model_version): p for p in predictions}
    kept = [p for p in unique.values() if p.instance_id in owned]
    if not kept:
        return {}

    frames: dict[tuple[int, str], set[int]] = {}
    for p in kept:
        frames.setdefault((p.instance_id, p.model_version), set()).add(p.frame_index)
    for (instance_id, version), indexes in frames.items():
        session.execute(
            delete(Prediction)
            .where(
                Prediction.instance_id == instance_id,
                Prediction.model_version == version,
                Prediction.frame_index.not_in(indexes),
            )
            .execution_options(**_no_sync())
        )

    ins = _insert(session, Prediction)
    stored = session.execute(
        ins.values(
            [
                {
                    "instance_id": p.instance_id,
                    "frame_index": p.frame_index,
                    "model_version": p.model_version,
                    "label": p.label,
                    "probability": float(p.probability),
                    "probabilities": {k: float(v) for k, v in p.probabilities.items()},
                    "latency_ms": p.latency_ms,
                    "created_at": now,
                }
                for p in kept
            ]
        )
        .on_conflict_do_update(
            index_elements=[
                Prediction.instance_id,
                Prediction.frame_index,
                Prediction.model_version,
            ],
            set_={
                "label": ins.excluded.label,
                "probability": ins.excluded.probability,
                "probabilities": ins.excluded.probabilities,
                "latency_ms": ins.excluded.latency_ms,
                "created_at": ins.excluded.created_at,
            },
        )
        .returning(
            Prediction.id, Prediction.instance_id, Prediction.frame_index, Prediction.model_version
        )
    ).all()
    ids = {(row.instance_id, row.frame_index, row.model_version): row.id for row in stored}
    # A prediction written again (its instance's bytes may have been replaced) keeps its
    # row but not the evidence of its previous computation; the caller stores the new
    # map in this same transaction (``repository.evidence.store_evidence``).
    session.execute(
        delete(EvidenceMap)
        .where(EvidenceMap.prediction_id.in_(sorted(ids.values())))
        .execution_options(**_no_sync())
    )
    return ids
