"""What the repository modules share: instance state groups, the clock,
dialect-aware INSERTs, bulk-statement options and the result record builder.

Private to ``db.repository``; the state groups are re-exported there.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from thyrocad.db.errors import RepositoryError
from thyrocad.db.records import ResultRecord
from thyrocad.db.schema import PatientResultRow, StudyResultRow

# Instances a worker may still pick up; 'processing' joins them when its lease ends.
PENDING_STATES: tuple[str, ...] = ("received", "queued")


# Not yet settled: a study with one of these is not finalised yet.
UNSETTLED_STATES: tuple[str, ...] = ("received", "queued", "processing")

# What a row holds once no worker has it.
_UNCLAIMED: dict[str, Any] = {"claim_token": None, "claimed_at": None, "claimed_by": None}


def _now(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be timezone-aware")
    return now


def _insert(session: Session, table: Any) -> Any:
    """The dialect's own INSERT, which has ``on_conflict_do_*``."""
    return _insert_for(session.get_bind().dialect.name, table)


def _insert_for(dialect: str, table: Any) -> Any:
    if dialect == "postgresql":
        return postgresql.insert(table)
    if dialect == "sqlite":
        return sqlite.insert(table)
    raise RepositoryError(f"unsupported database backend {dialect!r}")


def _is_postgresql(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def _no_sync() -> dict[str, Any]:
    # Bulk statements: no ORM objects of these rows live in the session.
    return {"synchronize_session": False}


def _result_record(
    row: StudyResultRow | PatientResultRow,
    level: str,
    key: str,
    patient_key: str,
    study_count: int | None,
) -> ResultRecord:
    row_reason = row.reason if isinstance(row, StudyResultRow) else None
    return ResultRecord(
        id=row.id,
        level="study" if level == "study" else "patient",
        key=key,
        patient_key=patient_key,
        model_version=row.model_version,
        rule=row.rule,
        label=row.label if row.label is not None else (row_reason or ""),
        probability=row.probability if row.probability is not None else math.nan,
        probabilities=dict(row.probabilities),
        image_count=row.image_count,
        revision=row.revision,
        created_at=row.created_at,
        study_count=study_count,
        reason=row_reason,
    )
