"""Evidence maps: the class-activation map stored with a prediction, one per prediction."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from thyrocad.db.errors import RepositoryError
from thyrocad.db.records import EvidenceRecord
from thyrocad.db.repository._common import _insert, _now
from thyrocad.db.schema import EvidenceMap

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_CHUNK = 500  # ids per IN (...) list


def store_evidence(
    session: Session,
    prediction_id: int,
    *,
    method: str,
    layer: str,
    png: bytes,
    now: datetime | None = None,
) -> int:
    """Store the evidence map of prediction ``prediction_id``; return the map's row id.

    Upserts on the prediction: a prediction predicted again gets its new map in the
    same row. Never commits. Raises RepositoryError for an empty method or layer or
    bytes that are not a PNG; an unknown prediction fails at the foreign key.
    """
    if not method or not layer:
        raise RepositoryError("an evidence map needs its method and layer")
    if not bytes(png).startswith(_PNG_SIGNATURE):
        raise RepositoryError(f"the evidence map of prediction {prediction_id} is not a PNG")
    now = _now(now)
    ins = _insert(session, EvidenceMap)
    statement = (
        ins.values(
            prediction_id=int(prediction_id),
            method=method,
            layer=layer,
            png=bytes(png),
            created_at=now,
        )
        .on_conflict_do_update(
            index_elements=[EvidenceMap.prediction_id],
            set_={
                "method": ins.excluded.method,
                "layer": ins.excluded.layer,
                "png": ins.excluded.png,
                "created_at": ins.excluded.created_at,
            },
        )
        .returning(EvidenceMap.id)
    )
    return int(session.execute(statement).scalar_one())


def evidence_for(session: Session, prediction_ids: Iterable[int]) -> dict[int, EvidenceRecord]:
    """The evidence maps of the given predictions, by prediction id (those without one
    are left out)."""
    ids = sorted({int(i) for i in prediction_ids})
    found: dict[int, EvidenceRecord] = {}
    for start in range(0, len(ids), _CHUNK):
        rows = session.execute(
            select(EvidenceMap).where(EvidenceMap.prediction_id.in_(ids[start : start + _CHUNK]))
        ).scalars()
        for row in rows:
            found[row.prediction_id] = EvidenceRecord(
                prediction_id=row.prediction_id,
                method=row.method,
                layer=row.layer,
                png=bytes(row.png),
            )
    return found
