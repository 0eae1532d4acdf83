"""Accounts for the web page, and the evidence map stored with a prediction.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03

``web_users``: who may sign in to ``thyrocad web``, with a salted password hash
(never the password) and a role, ``reader`` (view) or ``labeller`` (view and label).
A user is disabled, never deleted, so the audit trail's names keep meaning.

``evidence_maps``: the Grad-CAM map of one prediction, an 8-bit grey PNG at the grid of
the convolutional layer it weighs, covering the model's input; computed by the worker
with the model version and preprocessing of that prediction. One per prediction; it
goes when the prediction goes.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade the schema."""
    op.create_table(
        "web_users",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("username", sa.Text(), nullable=False),
        sa.Column("password_hash", sa.Text(), nullable=False),
        sa.Column("role", sa.Text(), nullable=False),
        sa.Column("disabled", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_login_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("role IN ('reader', 'labeller')", name=op.f("ck_web_users_role")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_web_users")),
        sa.UniqueConstraint("username", name=op.f("uq_web_users_username")),
    )
    op.create_table(
        "evidence_maps",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("prediction_id", sa.Integer(), nullable=False),
        sa.Column("method", sa.Text(), nullable=False),
        sa.Column("layer", sa.Text(), nullable=False),
        sa.Column("png", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["prediction_id"],
            ["predictions.id"],
            name=op.f("fk_evidence_maps_prediction_id_predictions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_evidence_maps")),
        sa.UniqueConstraint("prediction_id", name=op.f("uq_evidence_maps_prediction_id")),
    )


def downgrade() -> None:
    """Downgrade the schema."""
    op.drop_table("evidence_maps")
    op.drop_table("web_users")
