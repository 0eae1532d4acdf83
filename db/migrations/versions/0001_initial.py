"""Initial schema: patients → studies → series → instances, predictions,
study and patient results, model versions, labels, training runs, hold-out,
backfill, SR dispatches, and the radiologists' views.

Revision ID: 0001
Revises:
Create Date: 2026-11-27

Migrations are frozen snapshots: they never import db.schema or db.views (the
view SQL is written out here), and every statement is portable to PostgreSQL
and SQLite. Timestamps are ``DateTime(timezone=True)``; db.schema maps them to
a UTC-normalising type, which changes nothing in the DDL.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


# Views for radiologists. Portable SQL only: window functions (SQLite >= 3.25),
# no booleans, no casts. "Latest" ties are broken by id so a view never shows
# two rows for one image, study, patient or label target.
_IMAGE_RESULTS = """
CREATE VIEW image_results AS
SELECT pa.patient_key,
       pa.patient_name,
       st.study_instance_uid,
       st.study_date,
       st.accession_number,
       se.series_instance_uid,
       i.sop_instance_uid,
       p.frame_index,
       p.label AS diagnosis,
       p.probability,
       p.model_version,
       p.created_at AS predicted_at
FROM (
    SELECT pr.instance_id, pr.frame_index, pr.label, pr.probability,
           pr.model_version, pr.created_at,
           ROW_NUMBER() OVER (
               PARTITION BY pr.instance_id, pr.frame_index
               ORDER BY pr.created_at DESC, pr.id DESC
           ) AS rn
    FROM predictions pr
) p
JOIN instances i ON i.id = p.instance_id
JOIN series se ON se.id = i.series_id
JOIN studies st ON st.id = i.study_id
JOIN patients pa ON pa.id = st.patient_id
WHERE p.rn = 1 AND i.state = 'predicted'
"""

_STUDY_RESULTS_LATEST = """
CREATE VIEW study_results_latest AS
SELECT pa.patient_key,
       pa.patient_name,
       st.study_instance_uid,
       st.study_date,
       st.accession_number,
       r.label AS diagnosis,
       r.probability,
       r.image_count,
       r.model_version,
       r.rule,
       r.revision,
       r.created_at
FROM study_results r
JOIN studies st ON st.id = r.study_id
JOIN patients pa ON pa.id = st.patient_id
WHERE r.revision = (
    SELECT MAX(r2.revision) FROM study_results r2 WHERE r2.study_id = r.study_id
)
"""

_PATIENT_RESULTS_LATEST = """
CREATE VIEW patient_results_latest AS
SELECT pa.patient_key,
       pa.patient_name,
       r.label AS diagnosis,
       r.probability,
       r.image_count,
       r.study_count,
       r.model_version,
       r.rule,
       r.revision,
       r.created_at
FROM patient_results r
JOIN patients pa ON pa.id = r.patient_id
WHERE r.revision = (
    SELECT MAX(r2.revision) FROM patient_results r2 WHERE r2.patient_id = r.patient_id
)
"""

# A study's own latest label wins over its patient's latest label: it is the
# more specific statement about the images of that study.
_STUDY_LABELS_LATEST = """
CREATE VIEW study_labels_latest AS
SELECT pa.patient_key,
       st.study_instance_uid,
       st.study_date,
       st.accession_number,
       CASE WHEN sl.id IS NOT NULL THEN sl.diagnosis ELSE pl.diagnosis END AS diagnosis,
       CASE WHEN sl.id IS NOT NULL THEN 'study' ELSE 'patient' END AS label_level,
       CASE WHEN sl.id IS NOT NULL THEN sl.labelled_by ELSE pl.labelled_by END AS labelled_by,
       CASE WHEN sl.id IS NOT NULL THEN sl.source ELSE pl.source END AS source,
       CASE WHEN sl.id IS NOT NULL THEN sl.note ELSE pl.note END AS note,
       CASE WHEN sl.id IS NOT NULL THEN sl.created_at ELSE pl.created_at END AS labelled_at
FROM studies st
JOIN patients pa ON pa.id = st.patient_id
LEFT JOIN (
    SELECT l.id, l.study_id, l.diagnosis, l.labelled_by, l.source, l.note, l.created_at,
           ROW_NUMBER() OVER (
               PARTITION BY l.study_id ORDER BY l.created_at DESC, l.id DESC
           ) AS rn
    FROM labels l
    WHERE l.study_id IS NOT NULL
) sl ON sl.study_id = st.id AND sl.rn = 1
LEFT JOIN (
    SELECT l.id, l.patient_id, l.diagnosis, l.labelled_by, l.source, l.note, l.created_at,
           ROW_NUMBER() OVER (
               PARTITION BY l.patient_id ORDER BY l.created_at DESC, l.id DESC
           ) AS rn
    FROM labels l
    WHERE l.patient_id IS NOT NULL
) pl ON pl.patient_id = pa.id AND pl.rn = 1
WHERE sl.id IS NOT NULL OR pl.id IS NOT NULL
"""

_VIEWS = (_IMAGE_RESULTS, _STUDY_RESULTS_LATEST, _PATIENT_RESULTS_LATEST, _STUDY_LABELS_LATEST)
_VIEW_NAMES = (
    "image_results",
    "study_results_latest",
    "patient_results_latest",
    "study_labels_latest",
)


def upgrade() -> None:
    """Upgrade the schema."""
    op.create_table(
        "backfill_items",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("source_aet", sa.Text(), nullable=False),
        sa.Column("study_instance_uid", sa.Text(), nullable=False),
        sa.Column("state", sa.Text(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("requested_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("received_count", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("expected_count", sa.Integer(), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_backfill_items")),
        sa.UniqueConstraint(
            "source_aet",
            "study_instance_uid",
            name=op.f("uq_backfill_items_source_aet_study_instance_uid"),
        ),
    )
    op.create_table(
        "model_versions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("version", sa.Text(), nullable=False),
        sa.Column("architecture", sa.Text(), nullable=False),
        sa.Column("classes", sa.JSON(), nullable=False),
        sa.Column("input_size", sa.Integer(), nullable=False),
        sa.Column("artifact_path", sa.Text(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("data_fingerprint", sa.Text(), nullable=True),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("status_reason", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("promoted_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "status IN ('candidate', 'active', 'retired', 'rejected')",
            name=op.f("ck_model_versions_status"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_model_versions")),
        sa.UniqueConstraint("version", name=op.f("uq_model_versions_version")),
    )
    op.create_index(
        "uq_model_versions_one_active",
        "model_versions",
        ["status"],
        unique=True,
        postgresql_where=sa.text("status = 'active'"),
        sqlite_where=sa.text("status = 'active'"),
    )
    op.create_table(
        "patients",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("patient_key", sa.Text(), nullable=False),
        sa.Column("patient_name", sa.Text(), nullable=True),
        sa.Column("birth_date", sa.Date(), nullable=True),
        sa.Column("sex", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finalised_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_patients")),
        sa.UniqueConstraint("patient_key", name=op.f("uq_patients_patient_key")),
    )
    op.create_table(
        "rejections",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sop_instance_uid", sa.Text(), nullable=True),
        sa.Column("calling_ae_title", sa.Text(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("dimse_status", sa.Integer(), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rejections")),
    )
    op.create_table(
        "training_runs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("outcome", sa.Text(), nullable=False),
        sa.Column("candidate_version", sa.Text(), nullable=True),
        sa.Column("parameters", sa.JSON(), nullable=False),
        sa.Column("data_fingerprint", sa.Text(), nullable=True),
        sa.Column("metrics", sa.JSON(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("duration_s", sa.Float(), nullable=True),
        sa.CheckConstraint(
            "outcome IN ('running', 'promoted', 'candidate', 'failed')",
            name=op.f("ck_training_runs_outcome"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_training_runs")),
    )
    op.create_index(
        "uq_training_runs_one_running",
        "training_runs",
        ["outcome"],
        unique=True,
        postgresql_where=sa.text("outcome = 'running'"),
        sqlite_where=sa.text("outcome = 'running'"),
    )
    op.create_table(
        "holdout",
        sa.Column("patient_id", sa.Integer(), nullable=False),
        sa.Column("in_holdout", sa.Boolean(), nullable=False),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["patient_id"],
            ["patients.id"],
            name=op.f("fk_holdout_patient_id_patients"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("patient_id", name=op.f("pk_holdout")),
    )
    op.create_table(
        "patient_results",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("patient_id", sa.Integer(), nullable=False),
        sa.Column("model_version", sa.Text(), nullable=False),
        sa.Column("rule", sa.Text(), nullable=False),
        sa.Column("label", sa.Text(), nullable=False),
        sa.Column("probability", sa.Float(), nullable=False),
        sa.Column("probabilities", sa.JSON(), nullable=False),
        sa.Column("image_count", sa.Integer(), nullable=False),
        sa.Column("study_count", sa.Integer(), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["patient_id"],
            ["patients.id"],
            name=op.f("fk_patient_results_patient_id_patients"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_patient_results")),
        sa.UniqueConstraint(
            "patient_id", "revision", name=op.f("uq_patient_results_patient_id_revision")
        ),
    )
    op.create_table(
        "studies",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_instance_uid", sa.Text(), nullable=False),
        sa.Column("patient_id", sa.Integer(), nullable=False),
        sa.Column("study_date", sa.Date(), nullable=True),
        sa.Column("accession_number", sa.Text(), nullable=True),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("first_received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_predicted_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finalised_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("needs_finalise", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("prediction_epoch", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.ForeignKeyConstraint(
            ["patient_id"],
            ["patients.id"],
            name=op.f("fk_studies_patient_id_patients"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_studies")),
        sa.UniqueConstraint("study_instance_uid", name=op.f("uq_studies_study_instance_uid")),
    )
    op.create_index(
        "ix_studies_needs_finalise_last_received_at",
        "studies",
        ["needs_finalise", "last_received_at"],
        unique=False,
    )
    op.create_index(op.f("ix_studies_patient_id"), "studies", ["patient_id"], unique=False)
    op.create_table(
        "labels",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=True),
        sa.Column("patient_id", sa.Integer(), nullable=True),
        sa.Column("diagnosis", sa.Text(), nullable=False),
        sa.Column("labelled_by", sa.Text(), nullable=False),
        sa.Column("source", sa.Text(), server_default=sa.text("'sql'"), nullable=False),
        sa.Column("note", sa.Text(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("CURRENT_TIMESTAMP"),
            nullable=False,
        ),
        sa.CheckConstraint(
            "(study_id IS NOT NULL AND patient_id IS NULL)"
            " OR (study_id IS NULL AND patient_id IS NOT NULL)",
            name=op.f("ck_labels_one_target"),
        ),
        sa.ForeignKeyConstraint(
            ["patient_id"],
            ["patients.id"],
            name=op.f("fk_labels_patient_id_patients"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["study_id"],
            ["studies.id"],
            name=op.f("fk_labels_study_id_studies"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_labels")),
    )
    op.create_index(op.f("ix_labels_patient_id"), "labels", ["patient_id"], unique=False)
    op.create_index(op.f("ix_labels_study_id"), "labels", ["study_id"], unique=False)
    op.create_table(
        "series",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("series_instance_uid", sa.Text(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("modality", sa.Text(), nullable=True),
        sa.Column("description", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["study_id"],
            ["studies.id"],
            name=op.f("fk_series_study_id_studies"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_series")),
        sa.UniqueConstraint("series_instance_uid", name=op.f("uq_series_series_instance_uid")),
    )
    op.create_index(op.f("ix_series_study_id"), "series", ["study_id"], unique=False)
    op.create_table(
        "study_results",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("model_version", sa.Text(), nullable=False),
        sa.Column("rule", sa.Text(), nullable=False),
        sa.Column("label", sa.Text(), nullable=False),
        sa.Column("probability", sa.Float(), nullable=False),
        sa.Column("probabilities", sa.JSON(), nullable=False),
        sa.Column("image_count", sa.Integer(), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["study_id"],
            ["studies.id"],
            name=op.f("fk_study_results_study_id_studies"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_study_results")),
        sa.UniqueConstraint(
            "study_id", "revision", name=op.f("uq_study_results_study_id_revision")
        ),
    )
    op.create_table(
        "instances",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sop_instance_uid", sa.Text(), nullable=False),
        sa.Column("series_id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("sop_class_uid", sa.Text(), nullable=False),
        sa.Column("transfer_syntax_uid", sa.Text(), nullable=True),
        sa.Column("number_of_frames", sa.Integer(), server_default=sa.text("1"), nullable=False),
        sa.Column("state", sa.Text(), server_default=sa.text("'received'"), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("spool_path", sa.Text(), nullable=False),
        sa.Column("sha256", sa.Text(), nullable=False),
        sa.Column("size_bytes", sa.Integer(), nullable=False),
        sa.Column("received_count", sa.Integer(), server_default=sa.text("1"), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("claim_token", sa.Text(), nullable=True),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.CheckConstraint(
            "state IN ('received', 'queued', 'processing', 'predicted', 'rejected', 'failed')",
            name=op.f("ck_instances_state"),
        ),
        sa.ForeignKeyConstraint(
            ["series_id"],
            ["series.id"],
            name=op.f("fk_instances_series_id_series"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["study_id"],
            ["studies.id"],
            name=op.f("fk_instances_study_id_studies"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_instances")),
        sa.UniqueConstraint("sop_instance_uid", name=op.f("uq_instances_sop_instance_uid")),
    )
    op.create_index(op.f("ix_instances_series_id"), "instances", ["series_id"], unique=False)
    op.create_index(
        "ix_instances_state_received_at", "instances", ["state", "received_at"], unique=False
    )
    op.create_index(op.f("ix_instances_study_id"), "instances", ["study_id"], unique=False)
    op.create_table(
        "sr_dispatches",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_result_id", sa.Integer(), nullable=False),
        sa.Column("destination", sa.Text(), nullable=False),
        sa.Column("sop_instance_uid", sa.Text(), nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("dimse_status", sa.Integer(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "status IN ('pending', 'sent', 'failed')", name=op.f("ck_sr_dispatches_status")
        ),
        sa.ForeignKeyConstraint(
            ["study_result_id"],
            ["study_results.id"],
            name=op.f("fk_sr_dispatches_study_result_id_study_results"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sr_dispatches")),
    )
    op.create_index(
        op.f("ix_sr_dispatches_study_result_id"), "sr_dispatches", ["study_result_id"], unique=False
    )
    # The unique key (instance_id, ...) doubles as the index for lookups by instance.
    op.create_table(
        "predictions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("instance_id", sa.Integer(), nullable=False),
        sa.Column("frame_index", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("model_version", sa.Text(), nullable=False),
        sa.Column("label", sa.Text(), nullable=False),
        sa.Column("probability", sa.Float(), nullable=False),
        sa.Column("probabilities", sa.JSON(), nullable=False),
        sa.Column("latency_ms", sa.Float(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["instance_id"],
            ["instances.id"],
            name=op.f("fk_predictions_instance_id_instances"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_predictions")),
        sa.UniqueConstraint(
            "instance_id",
            "frame_index",
            "model_version",
            name=op.f("uq_predictions_instance_id_frame_index_model_version"),
        ),
    )

    for statement in _VIEWS:
        op.execute(statement)


def downgrade() -> None:
    """Downgrade the schema."""
    for name in reversed(_VIEW_NAMES):
        op.execute(f"DROP VIEW IF EXISTS {name}")
    op.drop_table("predictions")
    op.drop_index(op.f("ix_sr_dispatches_study_result_id"), table_name="sr_dispatches")
    op.drop_table("sr_dispatches")
    op.drop_index(op.f("ix_instances_study_id"), table_name="instances")
    op.drop_index("ix_instances_state_received_at", table_name="instances")
    op.drop_index(op.f("ix_instances_series_id"), table_name="instances")
    op.drop_table("instances")
    op.drop_table("study_results")
    op.drop_index(op.f("ix_series_study_id"), table_name="series")
    op.drop_table("series")
    op.drop_index(op.f("ix_labels_study_id"), table_name="labels")
    op.drop_index(op.f("ix_labels_patient_id"), table_name="labels")
    op.drop_table("labels")
    op.drop_index(op.f("ix_studies_patient_id"), table_name="studies")
    op.drop_index("ix_studies_needs_finalise_last_received_at", table_name="studies")
    op.drop_table("studies")
    op.drop_table("patient_results")
    op.drop_table("holdout")
    op.drop_index(
        "uq_training_runs_one_running",
        table_name="training_runs",
        postgresql_where=sa.text("outcome = 'running'"),
        sqlite_where=sa.text("outcome = 'running'"),
    )
    op.drop_table("training_runs")
    op.drop_table("rejections")
    op.drop_table("patients")
    op.drop_index(
        "uq_model_versions_one_active",
        table_name="model_versions",
        postgresql_where=sa.text("status = 'active'"),
        sqlite_where=sa.text("status = 'active'"),
    )
    op.drop_table("model_versions")
    op.drop_table("backfill_items")
