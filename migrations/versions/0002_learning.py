"""The learning loop: one active training per project, and the active-learning uncertainty table.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON(none_as_null=True).with_variant(postgresql.JSONB(none_as_null=True), "postgresql")
BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TIMESTAMP = sa.DateTime(timezone=True)
ACTIVE_TRAINING = "kind = 'train' AND status IN ('queued', 'running')"


def upgrade() -> None:
    op.create_index(
        op.f("uq_jobs_one_active_training"),
        "jobs",
        ["project_id"],
        unique=True,
        postgresql_where=sa.text(ACTIVE_TRAINING),
        sqlite_where=sa.text(ACTIVE_TRAINING),
    )
    op.create_table(
        "uncertainty",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("project_id", sa.Integer(), nullable=False),
        sa.Column("image_id", BIG_ID, nullable=False),
        sa.Column("model_version_id", sa.Integer(), nullable=True),
        sa.Column("ls_task_id", sa.BigInteger(), nullable=True),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("components", JSON, server_default=sa.text("'{}'"), nullable=False),
        sa.Column("computed_at", TIMESTAMP, server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_uncertainty")),
        sa.ForeignKeyConstraint(
            ["project_id"],
            ["projects.id"],
            name=op.f("fk_uncertainty_project_id_projects"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["image_id"], ["images.id"], name=op.f("fk_uncertainty_image_id_images"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["model_version_id"],
            ["model_versions.id"],
            name=op.f("fk_uncertainty_model_version_id_model_versions"),
            ondelete="SET NULL",
        ),
        sa.UniqueConstraint("project_id", "image_id", name=op.f("uq_uncertainty_project_id_image_id")),
    )
    op.create_index(op.f("ix_uncertainty_project_id_score"), "uncertainty", ["project_id", "score"])


def downgrade() -> None:
    op.drop_table("uncertainty")
    op.drop_index(op.f("uq_jobs_one_active_training"), table_name="jobs")
