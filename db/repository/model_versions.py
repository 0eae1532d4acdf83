"""The model registry: registering versions, promoting one to active,
retiring or rejecting others, and listing them.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select, text, update
from sqlalchemy.orm import Session

from thyrocad.db.errors import RepositoryError
from thyrocad.db.records import ModelVersionRecord
from thyrocad.db.repository._common import _insert, _is_postgresql, _no_sync, _now
from thyrocad.db.repository.audit import (
    MODEL_PROMOTED,
    MODEL_ROLLED_BACK,
    MODEL_STATUS,
    default_actor,
    record_audit_event,
)
from thyrocad.db.schema import MODEL_STATUSES, ModelVersion


def _model_record(row: ModelVersion) -> ModelVersionRecord:
    return ModelVersionRecord(
        version=row.version,
        architecture=row.architecture,
        classes=tuple(row.classes),
        input_size=row.input_size,
        artifact_path=row.artifact_path,
        status=row.status,
        metrics=dict(row.metrics),
        data_fingerprint=row.data_fingerprint,
        status_reason=row.status_reason,
        created_at=row.created_at,
        promoted_at=row.promoted_at,
    )


def _model_row(session: Session, version: str) -> ModelVersion:
    # populate_existing: the bulk UPDATEs here bypass the identity map.
    row = session.execute(
        select(ModelVersion)
        .where(ModelVersion.version == version)
        .execution_options(populate_existing=True)
    ).scalar_one_or_none()
    if row is None:
        raise RepositoryError(f"unknown model version {version!r}; register it first")
    return row


def upsert_model_version(
    session: Session, rec: ModelVersionRecord, now: datetime | None = None
) -> ModelVersionRecord:
    """Register a model version, or refresh the metadata of a known one.

    The status of a known version is left alone (it changes only through
    ``set_active_model`` and ``set_model_status``); a new version gets
    ``rec.status``, which may not be ``active`` — promote with
    ``set_active_model`` so that the previous active version is retired.
    """
    if rec.status not in MODEL_STATUSES:
        raise RepositoryError(f"unknown model status {rec.status!r}")
    if rec.status == "active":
        raise RepositoryError("register the version first, then promote it with set_active_model")
    now = _now(now)
    ins = _insert(session, ModelVersion)
    metadata = {
        "architecture": rec.architecture,
        "classes": list(rec.classes),
        "input_size": rec.input_size,
        "artifact_path": rec.artifact_path,
        "metrics": dict(rec.metrics),
        "data_fingerprint": rec.data_fingerprint,
    }
    session.execute(
        ins.values(
            version=rec.version,
            status=rec.status,
            status_reason=rec.status_reason,
            created_at=rec.created_at or now,
            promoted_at=None,
            **metadata,
        ).on_conflict_do_update(
            index_elements=[ModelVersion.version],
            set_={name: getattr(ins.excluded, name) for name in metadata},
        )
    )
    session.flush()
    return _model_record(_model_row(session, rec.version))


def set_active_model(
    session: Session,
    version: str,
    now: datetime | None = None,
    *,
    actor: str | None = None,
    rollback: bool = False,
) -> ModelVersionRecord:
    """Make ``version`` the one active model; the previous active one becomes ``retired``.

    Raises ``RepositoryError`` for an unknown version. A no-op if already active,
    audited either way (``model_promoted``, or ``model_rolled_back`` with
    ``rollback``) as done by ``actor`` (default: this process's OS user).
    """
    now = _now(now)
    if _is_postgresql(session):
        # Promotions are rare; a table lock makes two concurrent ones queue up
        # instead of one failing on the one-active index.
        session.execute(text("LOCK TABLE model_versions IN SHARE ROW EXCLUSIVE MODE"))
    target = _model_row(session, version)
    previous = session.execute(
        select(ModelVersion.version).where(ModelVersion.status == "active")
    ).scalar_one_or_none()
    record_audit_event(
        session,
        MODEL_ROLLED_BACK if rollback else MODEL_PROMOTED,
        actor=actor or default_actor(),
        details={"version": version, "previous": previous, "changed": previous != version},
        now=now,
    )
    if target.status != "active":
        # Retire first: the partial unique index allows one active row at any moment.
        session.execute(
            update(ModelVersion)
            .where(ModelVersion.status == "active")
            .values(status="retired", status_reason=f"replaced by {version}")
            .execution_options(**_no_sync())
        )
        session.execute(
            update(ModelVersion)
            .where(ModelVersion.version == version)
            .values(status="active", status_reason=None, promoted_at=now)
            .execution_options(**_no_sync())
        )
    return _model_record(_model_row(session, version))


def set_model_status(
    session: Session,
    version: str,
    status: str,
    reason: str | None = None,
    *,
    actor: str | None = None,
) -> ModelVersionRecord:
    """Set a version to ``candidate``, ``retired`` or ``rejected`` with a reason.

    Use ``set_active_model`` to activate. Raises ``RepositoryError`` for an
    unknown version or status. Audited (``model_status``) as done by ``actor``
    (default: this process's OS user).
    """
    if status not in MODEL_STATUSES or status == "active":
        raise RepositoryError(f"status must be one of candidate, retired, rejected; got {status!r}")
    _model_row(session, version)
    record_audit_event(
        session,
        MODEL_STATUS,
        actor=actor or default_actor(),
        details={"version": version, "status": status, "reason": reason},
    )
    session.execute(
        update(ModelVersion)
        .where(ModelVersion.version == version)
        .values(status=status, status_reason=reason)
        .execution_options(**_no_sync())
    )
    return _model_record(_model_row(session, version))


def active_model(session: Session) -> ModelVersionRecord | None:
    """The active model version, or None if none is active."""
    row = session.execute(
        select(ModelVersion).where(ModelVersion.status == "active")
    ).scalar_one_or_none()
    return None if row is None else _model_record(row)


def list_model_versions(session: Session) -> list[ModelVersionRecord]:
    """Every registered model version, oldest first."""
    rows = session.execute(
        select(ModelVersion).order_by(ModelVersion.created_at, ModelVersion.id)
    ).scalars()
    return [_model_record(row) for row in rows]
