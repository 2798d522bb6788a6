"""Initial schema: projects, images, model versions, prompt history, jobs, masks, corrections.

See ``seemly/db/models.py`` for what each table is for and which unique key makes which write
idempotent. This revision is self-contained (it does not import the models), so later changes to
the models cannot change what it creates.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# JSONB on Postgres, JSON elsewhere; 64-bit ids that still auto-increment on SQLite.
JSON = sa.JSON(none_as_null=True).with_variant(postgresql.JSONB(none_as_null=True), "postgresql")
BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TIMESTAMP = sa.DateTime(timezone=True)


def _id(big: bool = False) -> sa.Column:
    return sa.Column("id", BIG_ID if big else sa.Integer(), nullable=False)


def _now(name: str) -> sa.Column:
    return sa.Column(name, TIMESTAMP, server_default=sa.func.now(), nullable=False)


def _fk(column: str, target: str, ondelete: str, table: str) -> sa.ForeignKeyConstraint:
    target_table = target.split(".")[0]
    return sa.ForeignKeyConstraint(
        [column], [target], name=op.f(f"fk_{table}_{column}_{target_table}"), ondelete=ondelete
    )


def _one_of(table: str, constraint: str, column: str, values: Sequence[str]) -> sa.CheckConstraint:
    """The VARCHAR + CHECK form of an enum (no native Postgres enum type to migrate later)."""
    allowed = ", ".join(f"'{v}'" for v in values)
    return sa.CheckConstraint(f"{column} IN ({allowed})", name=op.f(f"ck_{table}_{constraint}"))


JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
ITEM_STATUSES = ("pending", "done", "skipped", "failed")
MASK_SOURCES = ("interactive", "bucket", "annotation", "correction")
TRAINING_REASONS = ("count", "interval", "button")


def upgrade() -> None:
    # --- projects and images ------------------------------------------------------------------
    op.create_table(
        "projects",
        _id(),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("ls_project_id", sa.BigInteger(), nullable=True),
        sa.Column("labels", JSON, server_default=sa.text("'[]'"), nullable=False),
        sa.Column("settings", JSON, server_default=sa.text("'{}'"), nullable=False),
        _now("created_at"),
        _now("updated_at"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_projects")),
        sa.UniqueConstraint("name", name=op.f("uq_projects_name")),
        sa.UniqueConstraint("ls_project_id", name=op.f("uq_projects_ls_project_id")),
    )
    op.create_table(
        "images",
        _id(big=True),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        _now("created_at"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_images")),
        sa.UniqueConstraint("sha256", name=op.f("uq_images_sha256")),
        sa.CheckConstraint("length(sha256) = 64", name=op.f("ck_images_sha256_hex")),
        sa.CheckConstraint("width > 0 AND height > 0", name=op.f("ck_images_positive_size")),
    )
    op.create_table(
        "image_uris",
        _id(big=True),
        sa.Column("image_id", BIG_ID, nullable=False),
        sa.Column("uri", sa.String(2048), nullable=False),
        _now("created_at"),
        _now("last_seen_at"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_image_uris")),
        _fk("image_id", "images.id", "CASCADE", "image_uris"),
        sa.UniqueConstraint("uri", name=op.f("uq_image_uris_uri")),
    )
    op.create_index(op.f("ix_image_uris_image_id"), "image_uris", ["image_id"])

    # --- model versions -----------------------------------------------------------------------
    op.create_table(
        "model_versions",
        _id(),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("engine", sa.String(50), nullable=False),
        sa.Column("project_id", sa.Integer(), nullable=True),
        sa.Column("parent_id", sa.Integer(), nullable=True),
        sa.Column("metrics", JSON, server_default=sa.text("'{}'"), nullable=False),
        sa.Column("artifact_uri", sa.String(2048), nullable=True),
        sa.Column("promoted", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("promoted_at", TIMESTAMP, nullable=True),
        sa.Column("decision", JSON, nullable=True),
        _now("created_at"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_model_versions")),
        _fk("project_id", "projects.id", "CASCADE", "model_versions"),
        _fk("parent_id", "model_versions.id", "SET NULL", "model_versions"),
        sa.UniqueConstraint("project_id", "name", name=op.f("uq_model_versions_project_id_name")),
    )
    op.create_index(op.f("ix_model_versions_parent_id"), "model_versions", ["parent_id"])
    op.create_index(
        op.f("ix_model_versions_project_id_promoted_at"), "model_versions", ["project_id", "promoted_at"]
    )
    # Global versions (project_id NULL) need their own unique index: NULLs never conflict.
    op.create_index(
        op.f("uq_model_versions_global_name"),
        "model_versions",
        ["name"],
        unique=True,
        postgresql_where=sa.text("project_id IS NULL"),
        sqlite_where=sa.text("project_id IS NULL"),
    )

    # --- interactive history ------------------------------------------------------------------
    op.create_table(
        "prompt_sessions",
        _id(big=True),
        sa.Column("session_key", sa.String(64), nullable=False),
        sa.Column("project_id", sa.Integer(), nullable=False),
        sa.Column("image_id", BIG_ID, nullable=False),
        sa.Column("annotator", sa.String(255), nullable=True),
        sa.Column("ls_task_id", sa.BigInteger(), nullable=True),
        sa.Column("model_version_id", sa.Integer(), nullable=True),
        _now("started_at"),
        _now("updated_at"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_prompt_sessions")),
        _fk("project_id", "projects.id", "CASCADE", "prompt_sessions"),
        _fk("image_id", "images.id", "CASCADE", "prompt_sessions"),
        _fk("model_version_id", "model_versions.id", "SET NULL", "prompt_sessions"),
        sa.UniqueConstraint("session_key", name=op.f("uq_prompt_sessions_session_key")),
    )
    op.create_index(op.f("ix_prompt_sessions_image_id"), "prompt_sessions", ["image_id"])
    op.create_index(
        op.f("ix_prompt_sessions_project_id_ls_task_id"), "prompt_sessions", ["project_id", "ls_task_id"]
    )
    op.create_table(
        "prompt_rounds",
        _id(big=True),
        sa.Column("session_id", BIG_ID, nullable=False),
        sa.Column("round_index", sa.Integer(), nullable=False),
        sa.Column("prompts", JSON, nullable=False),
        sa.Column("rle", JSON, nullable=True),
        sa.Column("score", sa.Float(), nullable=True),
        sa.Column("latency_ms", sa.Float(), nullable=True),
        sa.Column("model_version_id", sa.Integer(), nullable=True),
        _now("created_at"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_prompt_rounds")),
        _fk("session_id", "prompt_sessions.id", "CASCADE", "prompt_rounds"),
        _fk("model_version_id", "model_versions.id", "SET NULL", "prompt_rounds"),
        sa.UniqueConstraint(
            "session_id", "round_index", name=op.f("uq_prompt_rounds_session_id_round_index")
        ),
        sa.CheckConstraint("round_index >= 0", name=op.f("ck_prompt_rounds_round_index_non_negative")),
    )

    # --- jobs ---------------------------------------------------------------------------------
    op.create_table(
        "jobs",
        _id(),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("status", sa.String(16), server_default="queued", nullable=False),
        sa.Column("project_id", sa.Integer(), nullable=True),
        sa.Column("params", JSON, server_default=sa.text("'{}'"), nullable=False),
        sa.Column("items_total", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("items_done", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("items_skipped", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("items_failed", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("masks_written", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("errors", JSON, server_default=sa.text("'[]'"), nullable=False),
        sa.Column("runner", sa.String(255), nullable=True),
        _now("created_at"),
        sa.Column("started_at", TIMESTAMP, nullable=True),
        sa.Column("finished_at", TIMESTAMP, nullable=True),
        sa.Column("heartbeat_at", TIMESTAMP, nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_jobs")),
        _fk("project_id", "projects.id", "CASCADE", "jobs"),
        _one_of("jobs", "job_status", "status", JOB_STATUSES),
    )
    op.create_index(op.f("ix_jobs_status"), "jobs", ["status"])
    op.create_index(op.f("ix_jobs_project_id_kind"), "jobs", ["project_id", "kind"])
    op.create_table(
        "job_items",
        _id(big=True),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("item_key", sa.String(2048), nullable=False),
        sa.Column("image_id", BIG_ID, nullable=True),
        sa.Column("status", sa.String(16), server_default="pending", nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("mask_count", sa.Integer(), server_default="0", nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        _now("updated_at"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_job_items")),
        _fk("job_id", "jobs.id", "CASCADE", "job_items"),
        _fk("image_id", "images.id", "SET NULL", "job_items"),
        sa.UniqueConstraint("job_id", "item_key", name=op.f("uq_job_items_job_id_item_key")),
        _one_of("job_items", "item_status", "status", ITEM_STATUSES),
    )
    op.create_index(op.f("ix_job_items_job_id_status"), "job_items", ["job_id", "status"])

    # --- masks and corrections ----------------------------------------------------------------
    op.create_table(
        "masks",
        _id(big=True),
        sa.Column("project_id", sa.Integer(), nullable=False),
        sa.Column("image_id", BIG_ID, nullable=False),
        sa.Column("model_version_id", sa.Integer(), nullable=True),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("label", sa.String(200), server_default="", nullable=False),
        sa.Column("ordinal", sa.Integer(), server_default="0", nullable=False),
        sa.Column("rle", JSON, nullable=False),
        sa.Column("bbox", JSON, nullable=True),
        sa.Column("area", sa.Integer(), nullable=False),
        sa.Column("score", sa.Float(), nullable=True),
        sa.Column("job_id", sa.Integer(), nullable=True),  # provenance, not a foreign key (hot path)
        sa.Column("ls_task_id", sa.BigInteger(), nullable=True),
        sa.Column("ls_annotation_id", sa.BigInteger(), nullable=True),
        _now("created_at"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_masks")),
        _fk("project_id", "projects.id", "CASCADE", "masks"),
        _fk("image_id", "images.id", "CASCADE", "masks"),
        _fk("model_version_id", "model_versions.id", "CASCADE", "masks"),
        _one_of("masks", "mask_source", "source", MASK_SOURCES),
        sa.CheckConstraint(
            "model_version_id IS NOT NULL OR source IN ('annotation', 'correction')",
            name=op.f("ck_masks_model_output_has_version"),
        ),
        sa.CheckConstraint("ordinal >= 0", name=op.f("ck_masks_ordinal_non_negative")),
    )
    # Exactly-once bucket output: replaying an image's write by the same version inserts nothing.
    op.create_index(
        op.f("uq_masks_bucket_output"),
        "masks",
        ["project_id", "image_id", "model_version_id", "label", "ordinal"],
        unique=True,
        postgresql_where=sa.text("source = 'bucket'"),
        sqlite_where=sa.text("source = 'bucket'"),
    )
    # A re-imported Label Studio annotation is a no-op.
    op.create_index(
        op.f("uq_masks_annotation"),
        "masks",
        ["project_id", "ls_annotation_id", "source", "label", "ordinal"],
        unique=True,
        postgresql_where=sa.text("ls_annotation_id IS NOT NULL"),
        sqlite_where=sa.text("ls_annotation_id IS NOT NULL"),
    )
    # Partial where most rows would be NULL: bulk bucket writes then update only four indexes.
    op.create_index(op.f("ix_masks_image_id"), "masks", ["image_id"])
    op.create_index(
        op.f("ix_masks_project_id_ls_task_id"),
        "masks",
        ["project_id", "ls_task_id"],
        postgresql_where=sa.text("ls_task_id IS NOT NULL"),
        sqlite_where=sa.text("ls_task_id IS NOT NULL"),
    )
    op.create_index(
        op.f("ix_masks_job_id"),
        "masks",
        ["job_id"],
        postgresql_where=sa.text("job_id IS NOT NULL"),
        sqlite_where=sa.text("job_id IS NOT NULL"),
    )

    op.create_table(
        "corrections",
        _id(big=True),
        sa.Column("project_id", sa.Integer(), nullable=False),
        sa.Column("image_id", BIG_ID, nullable=False),
        sa.Column("ls_task_id", sa.BigInteger(), nullable=False),
        sa.Column("ls_annotation_id", sa.BigInteger(), nullable=False),
        sa.Column("ls_region_id", sa.String(64), server_default="", nullable=False),
        sa.Column("label", sa.String(200), server_default="", nullable=False),
        sa.Column("predicted_mask_id", BIG_ID, nullable=True),
        sa.Column("predicted_rle", JSON, nullable=True),
        sa.Column("model_version_id", sa.Integer(), nullable=True),
        sa.Column("submitted_rle", JSON, nullable=False),
        sa.Column("iou", sa.Float(), nullable=True),
        sa.Column("annotator", sa.String(255), nullable=True),
        _now("created_at"),
        _now("updated_at"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_corrections")),
        _fk("project_id", "projects.id", "CASCADE", "corrections"),
        _fk("image_id", "images.id", "CASCADE", "corrections"),
        _fk("predicted_mask_id", "masks.id", "SET NULL", "corrections"),
        _fk("model_version_id", "model_versions.id", "SET NULL", "corrections"),
        sa.UniqueConstraint(
            "project_id",
            "ls_annotation_id",
            "ls_region_id",
            name=op.f("uq_corrections_project_id_annotation_region"),
        ),
    )
    op.create_index(op.f("ix_corrections_project_id_id"), "corrections", ["project_id", "id"])
    op.create_index(op.f("ix_corrections_model_version_id"), "corrections", ["model_version_id"])
    op.create_index(op.f("ix_corrections_image_id"), "corrections", ["image_id"])

    op.create_table(
        "training_requests",
        _id(),
        sa.Column("project_id", sa.Integer(), nullable=False),
        sa.Column("reason", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), server_default="queued", nullable=False),
        sa.Column("requested_by", sa.String(255), nullable=True),
        sa.Column("corrections_upto", sa.BigInteger(), nullable=True),
        sa.Column("job_id", sa.Integer(), nullable=True),
        sa.Column("model_version_id", sa.Integer(), nullable=True),
        _now("created_at"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_training_requests")),
        _fk("project_id", "projects.id", "CASCADE", "training_requests"),
        _fk("job_id", "jobs.id", "SET NULL", "training_requests"),
        _fk("model_version_id", "model_versions.id", "SET NULL", "training_requests"),
        _one_of("training_requests", "training_reason", "reason", TRAINING_REASONS),
        _one_of("training_requests", "job_status", "status", JOB_STATUSES),
    )
    op.create_index(
        op.f("ix_training_requests_project_id_status"), "training_requests", ["project_id", "status"]
    )


def downgrade() -> None:
    # Dropping a table drops its indexes and constraints; children go before their parents.
    for table in (
        "training_requests",
        "corrections",
        "masks",
        "job_items",
        "jobs",
        "prompt_rounds",
        "prompt_sessions",
        "model_versions",
        "image_uris",
        "images",
        "projects",
    ):
        op.drop_table(table)
