"""The relational schema of thyrocad as typed SQLAlchemy 2 ORM classes.

These classes describe the tables for the repository functions and for tests;
the database itself is only ever created and changed by the Alembic migrations
in ``db/migrations`` (a test checks that both agree). ORM objects never leave
``db``: the repository turns them into the frozen dataclasses of
``db.records``.

Portability: the same schema runs on PostgreSQL and SQLite, so it uses
``JSON`` (not ``JSONB``), ``TEXT`` for strings, CHECK constraints instead of
native enums, and :class:`UTCDateTime` for every timestamp.

Patient key: the DICOM PatientID, or ``"UNKNOWN:<study instance uid>"`` when
the PatientID is empty (see :func:`patient_key_for`). An empty key shared by
every anonymous study would merge unrelated people into one "patient" and
corrupt patient-level results and the patient-level hold-out; a synthetic key
per study keeps each anonymous study its own patient.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    Date,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Text,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

#: Prefix of the synthetic patient key given to studies whose PatientID is empty.
UNKNOWN_PATIENT_PREFIX = "UNKNOWN:"

INSTANCE_STATES: tuple[str, ...] = (
    "received",
    "queued",
    "processing",
    "predicted",
    "rejected",
    "failed",
)
MODEL_STATUSES: tuple[str, ...] = ("candidate", "active", "retired", "rejected")
TRAINING_OUTCOMES: tuple[str, ...] = ("running", "promoted", "candidate", "failed")
SR_DISPATCH_STATUSES: tuple[str, ...] = ("pending", "sent", "failed")
AUDIT_OUTCOMES: tuple[str, ...] = ("success", "refused", "failure")
WEB_ROLES: tuple[str, ...] = ("reader", "labeller")


def patient_key_for(patient_id: str | None, study_instance_uid: str) -> str:
    """Return the patient key stored for a DICOM PatientID (see the module docstring)."""
    cleaned = (patient_id or "").strip()
    return cleaned if cleaned else f"{UNKNOWN_PATIENT_PREFIX}{study_instance_uid}"


def _in_list(column: str, values: tuple[str, ...]) -> str:
    quoted = ", ".join(f"'{value}'" for value in values)
    return f"{column} IN ({quoted})"


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware timestamp stored in UTC on every backend.

    PostgreSQL keeps ``timestamptz``; SQLite has no time zones and SQLAlchemy
    would silently drop ``tzinfo``, so values are converted to UTC before they
    are written (keeping string comparisons on SQLite correct) and read back as
    aware UTC datetimes. Naive datetimes are refused: their meaning is a guess.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError("naive datetime given to the database; use an aware datetime")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


# Named constraints let Alembic's SQLite batch mode find and alter them later.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    """Declarative base with portable type mappings and a naming convention."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {
        datetime: UTCDateTime(),
        date: Date(),
        str: Text(),
        dict[str, Any]: JSON(),
        dict[str, float]: JSON(),
        list[str]: JSON(),
    }


class Patient(Base):
    """A patient, keyed by DICOM PatientID (or a synthetic key, see the module)."""

    __tablename__ = "patients"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_key: Mapped[str] = mapped_column(unique=True)
    patient_name: Mapped[str | None]
    birth_date: Mapped[date | None]
    sex: Mapped[str | None]
    created_at: Mapped[datetime]
    # When a patient-level result was last computed; written first by
    # save_patient_result so that concurrent finalisers serialise on this row.
    finalised_at: Mapped[datetime | None]


class Study(Base):
    """A DICOM study. ``needs_finalise`` is set by a new prediction and cleared
    when the study result is recomputed; ``prediction_epoch`` counts predictions
    so a finaliser can tell whether one arrived while it was aggregating."""

    __tablename__ = "studies"
    __table_args__ = (
        Index("ix_studies_needs_finalise_last_received_at", "needs_finalise", "last_received_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(unique=True)
    patient_id: Mapped[int] = mapped_column(
        ForeignKey("patients.id", ondelete="CASCADE"), index=True
    )
    # Indexed for the web page's worklist filtered by date (migration 0006).
    study_date: Mapped[date | None] = mapped_column(index=True)
    accession_number: Mapped[str | None]
    description: Mapped[str | None]
    first_received_at: Mapped[datetime]
    last_received_at: Mapped[datetime]
    last_predicted_at: Mapped[datetime | None]
    finalised_at: Mapped[datetime | None]
    needs_finalise: Mapped[bool] = mapped_column(Boolean, server_default=false(), default=False)
    prediction_epoch: Mapped[int] = mapped_column(Integer, server_default=text("0"), default=0)


class Series(Base):
    """A DICOM series inside a study."""

    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(unique=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    modality: Mapped[str | None]
    description: Mapped[str | None]


class Instance(Base):
    """One received SOP instance (an image or a cine loop) and its processing state."""

    __tablename__ = "instances"
    __table_args__ = (
        CheckConstraint(_in_list("state", INSTANCE_STATES), name="state"),
        # Serves the claim query (state filter, oldest first) and counts by state.
        Index("ix_instances_state_received_at", "state", "received_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(unique=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    sop_class_uid: Mapped[str]
    transfer_syntax_uid: Mapped[str | None]
    number_of_frames: Mapped[int] = mapped_column(Integer, server_default=text("1"), default=1)
    state: Mapped[str] = mapped_column(server_default=text("'received'"), default="received")
    reason: Mapped[str | None]
    spool_path: Mapped[str]
    sha256: Mapped[str]
    size_bytes: Mapped[int] = mapped_column(Integer)
    received_count: Mapped[int] = mapped_column(Integer, server_default=text("1"), default=1)
    received_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    claimed_at: Mapped[datetime | None]
    claim_token: Mapped[str | None]
    # The worker process holding the claim (node name and pool slot, stable across its
    # restarts), so that a restarted worker gives back what it held before.
    claimed_by: Mapped[str | None]
    attempts: Mapped[int] = mapped_column(Integer, server_default=text("0"), default=0)


class Rejection(Base):
    """An instance refused at C-STORE, with its reason; never patient data."""

    __tablename__ = "rejections"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str | None]
    # The study the refused instance belonged to, when its header named one: a study
    # whose every image was refused still gets a result saying so. No foreign key, so
    # that SQLite adds the column in place.
    study_id: Mapped[int | None] = mapped_column(Integer, index=True)
    calling_ae_title: Mapped[str]
    reason: Mapped[str]
    dimse_status: Mapped[int] = mapped_column(Integer)
    received_at: Mapped[datetime]


class Prediction(Base):
    """One model output for one frame of one instance under one model version.

    The unique constraint (instance, frame, version) is the upsert key and,
    as it starts with ``instance_id``, also the index for lookups by instance.
    """

    __tablename__ = "predictions"
    __table_args__ = (UniqueConstraint("instance_id", "frame_index", "model_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id", ondelete="CASCADE"))
    frame_index: Mapped[int] = mapped_column(Integer, server_default=text("0"), default=0)
    model_version: Mapped[str]
    label: Mapped[str]
    probability: Mapped[float] = mapped_column(Float)
    probabilities: Mapped[dict[str, float]]
    latency_ms: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime]


class StudyResultRow(Base):
    """One revision of the aggregated result of a study; old revisions are kept.

    A study none of whose images could be used (every one rejected or failed) gets a
    result with no finding: ``label`` and ``probability`` NULL, ``image_count`` 0 and
    ``reason`` saying why; ``reason`` is NULL on every result with a finding.
    """

    __tablename__ = "study_results"
    __table_args__ = (UniqueConstraint("study_id", "revision"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"))
    model_version: Mapped[str]
    rule: Mapped[str]
    label: Mapped[str | None]
    probability: Mapped[float | None] = mapped_column(Float)
    probabilities: Mapped[dict[str, float]]
    image_count: Mapped[int] = mapped_column(Integer)
    revision: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime]
    reason: Mapped[str | None]


class PatientResultRow(Base):
    """One revision of the aggregated result of a patient over all their studies."""

    __tablename__ = "patient_results"
    __table_args__ = (UniqueConstraint("patient_id", "revision"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_id: Mapped[int] = mapped_column(ForeignKey("patients.id", ondelete="CASCADE"))
    model_version: Mapped[str]
    rule: Mapped[str]
    label: Mapped[str]
    probability: Mapped[float] = mapped_column(Float)
    probabilities: Mapped[dict[str, float]]
    image_count: Mapped[int] = mapped_column(Integer)
    study_count: Mapped[int] = mapped_column(Integer)
    revision: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime]


class ModelVersion(Base):
    """The pipeline's mirror of a model registry entry; at most one is active."""

    __tablename__ = "model_versions"
    __table_args__ = (
        CheckConstraint(_in_list("status", MODEL_STATUSES), name="status"),
        # A partial unique index: any number of candidates/retired rows, one active.
        Index(
            "uq_model_versions_one_active",
            "status",
            unique=True,
            postgresql_where=text("status = 'active'"),
            sqlite_where=text("status = 'active'"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[str] = mapped_column(unique=True)
    architecture: Mapped[str]
    classes: Mapped[list[str]]
    input_size: Mapped[int] = mapped_column(Integer)
    artifact_path: Mapped[str]
    metrics: Mapped[dict[str, Any]]
    data_fingerprint: Mapped[str | None]
    status: Mapped[str]
    status_reason: Mapped[str | None]
    created_at: Mapped[datetime]
    promoted_at: Mapped[datetime | None]


class Label(Base):
    """Ground truth for a study or a patient. A changed label is a new row: the
    latest wins, history is kept. Defaults let radiologists insert by plain SQL."""

    __tablename__ = "labels"
    __table_args__ = (
        CheckConstraint(
            "(study_id IS NOT NULL AND patient_id IS NULL)"
            " OR (study_id IS NULL AND patient_id IS NOT NULL)",
            name="one_target",
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int | None] = mapped_column(
        ForeignKey("studies.id", ondelete="CASCADE"), index=True
    )
    patient_id: Mapped[int | None] = mapped_column(
        ForeignKey("patients.id", ondelete="CASCADE"), index=True
    )
    diagnosis: Mapped[str]
    labelled_by: Mapped[str]
    source: Mapped[str] = mapped_column(server_default=text("'sql'"))
    note: Mapped[str | None]
    created_at: Mapped[datetime] = mapped_column(server_default=text("CURRENT_TIMESTAMP"))


class TrainingRun(Base):
    """One refit attempt. The partial unique index allows a single 'running' row,
    so two training workers (or a double trigger) cannot refit at once."""

    __tablename__ = "training_runs"
    __table_args__ = (
        CheckConstraint(_in_list("outcome", TRAINING_OUTCOMES), name="outcome"),
        Index(
            "uq_training_runs_one_running",
            "outcome",
            unique=True,
            postgresql_where=text("outcome = 'running'"),
            sqlite_where=text("outcome = 'running'"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    started_at: Mapped[datetime]
    finished_at: Mapped[datetime | None]
    outcome: Mapped[str]
    candidate_version: Mapped[str | None]
    parameters: Mapped[dict[str, Any]]
    data_fingerprint: Mapped[str | None]
    metrics: Mapped[dict[str, Any] | None]
    reason: Mapped[str | None]
    duration_s: Mapped[float | None] = mapped_column(Float)


class Holdout(Base):
    """Hold-out membership, decided once per patient and never changed."""

    __tablename__ = "holdout"

    patient_id: Mapped[int] = mapped_column(
        ForeignKey("patients.id", ondelete="CASCADE"), primary_key=True
    )
    in_holdout: Mapped[bool] = mapped_column(Boolean)
    decided_at: Mapped[datetime]


class BackfillItem(Base):
    """One study asked for from an archive (C-MOVE), and how far it got."""

    __tablename__ = "backfill_items"
    # No CHECK on state yet: the backfill's states belong to its own issue.
    __table_args__ = (UniqueConstraint("source_aet", "study_instance_uid"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    source_aet: Mapped[str]
    study_instance_uid: Mapped[str]
    state: Mapped[str]
    reason: Mapped[str | None]
    requested_at: Mapped[datetime | None]
    received_count: Mapped[int] = mapped_column(Integer, server_default=text("0"), default=0)
    expected_count: Mapped[int | None] = mapped_column(Integer)
    updated_at: Mapped[datetime]


class SrDispatch(Base):
    """A DICOM Structured Report of a study result sent (or to be sent) to a PACS."""

    __tablename__ = "sr_dispatches"
    __table_args__ = (CheckConstraint(_in_list("status", SR_DISPATCH_STATUSES), name="status"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_result_id: Mapped[int] = mapped_column(
        ForeignKey("study_results.id", ondelete="CASCADE"), index=True
    )
    destination: Mapped[str]
    sop_instance_uid: Mapped[str]
    status: Mapped[str]
    dimse_status: Mapped[int | None] = mapped_column(Integer)
    reason: Mapped[str | None]
    sent_at: Mapped[datetime | None]


class AuditEventRow(Base):
    """Who did what, when: one append-only row per audited action.

    ``details`` holds counts, AE titles, addresses, versions and row ids, never a
    patient's name or id (nor a DICOM UID that leads to one). The migration makes the
    table refuse UPDATE, DELETE and TRUNCATE on PostgreSQL, and UPDATE and DELETE on
    SQLite, whoever asks.
    """

    __tablename__ = "audit_events"
    __table_args__ = (
        CheckConstraint(_in_list("outcome", AUDIT_OUTCOMES), name="outcome"),
        # Serves "thyrocad audit --kind K --since T".
        Index("ix_audit_events_kind_at", "kind", "at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(index=True)
    kind: Mapped[str]
    actor: Mapped[str]
    outcome: Mapped[str]
    details: Mapped[dict[str, Any]]


class WebUser(Base):
    """Someone who may sign in to the web page. Disabled, never deleted: the audit
    trail names users, and those names must keep meaning someone."""

    __tablename__ = "web_users"
    __table_args__ = (CheckConstraint(_in_list("role", WEB_ROLES), name="role"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(unique=True)
    password_hash: Mapped[str]  # argon2id, salted; never the password
    role: Mapped[str]
    disabled: Mapped[bool] = mapped_column(Boolean, server_default=false(), default=False)
    created_at: Mapped[datetime]
    last_login_at: Mapped[datetime | None]


class EvidenceMap(Base):
    """The class-activation map of one prediction: an 8-bit grey PNG at the grid of the
    convolutional layer it weighs (14 x 14 for VGG-19 at 224), covering the whole model
    input (the cropped, resized image the model saw; ``pacs.pixels`` makes it again),
    255 at the map's peak. Computed by the worker with the prediction's own model
    version and preprocessing; the web page scales it up over the image."""

    __tablename__ = "evidence_maps"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    prediction_id: Mapped[int] = mapped_column(
        ForeignKey("predictions.id", ondelete="CASCADE"), unique=True
    )
    method: Mapped[str]  # "grad-cam"
    layer: Mapped[str]  # the convolutional layer whose activations it weighs
    png: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime]
