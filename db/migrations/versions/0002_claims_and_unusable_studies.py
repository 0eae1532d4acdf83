"""Claims name the worker that holds them; a study with no usable image gets a result.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28

``instances.claimed_by`` names the worker process (node and pool slot) holding a
claim, so a restarted worker gives its earlier claims back at once instead of
waiting for their lease. ``study_results`` may now carry no finding (``label`` and
``probability`` NULL) with a ``reason``; ``study_results_latest`` gains that
``reason`` as its last column. A frozen snapshot, like 0001.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

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
       r.created_at{reason}
FROM study_results r
JOIN studies st ON st.id = r.study_id
JOIN patients pa ON pa.id = st.patient_id
WHERE r.revision = (
    SELECT MAX(r2.revision) FROM study_results r2 WHERE r2.study_id = r.study_id
)
"""


def upgrade() -> None:
    """Upgrade the schema."""
    op.add_column("instances", sa.Column("claimed_by", sa.Text(), nullable=True))
    # SQLite rebuilds the table in batch mode; a view naming it must not exist meanwhile.
    op.execute("DROP VIEW IF EXISTS study_results_latest")
    with op.batch_alter_table("study_results") as batch:
        batch.alter_column("label", existing_type=sa.Text(), nullable=True)
        batch.alter_column("probability", existing_type=sa.Float(), nullable=True)
        batch.add_column(sa.Column("reason", sa.Text(), nullable=True))
    op.execute(_STUDY_RESULTS_LATEST.format(reason=",\n       r.reason"))


def downgrade() -> None:
    """Downgrade the schema (results without a finding are dropped)."""
    op.execute("DROP VIEW IF EXISTS study_results_latest")
    op.execute("DELETE FROM study_results WHERE label IS NULL OR probability IS NULL")
    with op.batch_alter_table("study_results") as batch:
        batch.drop_column("reason")
        batch.alter_column("probability", existing_type=sa.Float(), nullable=False)
        batch.alter_column("label", existing_type=sa.Text(), nullable=False)
    op.execute(_STUDY_RESULTS_LATEST.format(reason=""))
    # Not batch mode: a rebuilt instances table would break the views that name it
    # (both backends drop a column natively; SQLite since 3.35).
    op.execute("ALTER TABLE instances DROP COLUMN claimed_by")
