"""A refusal names its study, so a study whose every image was refused gets a result.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03

``rejections.study_id`` points at the study a refused instance's header named (NULL
when it named none, or not validly). A plain indexed column, no foreign key, so that
SQLite adds it in place (a batch rebuild would drop the views that name the table).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade the schema."""
    op.add_column("rejections", sa.Column("study_id", sa.Integer(), nullable=True))
    op.create_index(op.f("ix_rejections_study_id"), "rejections", ["study_id"])


def downgrade() -> None:
    """Downgrade the schema."""
    op.drop_index(op.f("ix_rejections_study_id"), table_name="rejections")
    op.execute("ALTER TABLE rejections DROP COLUMN study_id")
