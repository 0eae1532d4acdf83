"""An index on the study date, for the web page's worklist filtered by date.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04

The worklist lists the latest result of each study, newest first, walking
``study_results`` by id. A narrow date range (the studies of one day) matches few of
them, and without an index the walk reads most of the table to fill a page:
``bench/bench_worklist.py`` at 100,000 studies measured a one-day page at 25-66 ms
without it and 7 ms with it, on a shared two-core machine.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade the schema."""
    op.create_index(op.f("ix_studies_study_date"), "studies", ["study_date"])


def downgrade() -> None:
    """Downgrade the schema."""
    op.drop_index(op.f("ix_studies_study_date"), table_name="studies")
