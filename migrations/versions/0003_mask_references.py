"""Masks: statement-level reference checks instead of three per-row foreign keys.

The foreign keys of ``masks`` (project, image, model version) cost half the server time of a bulk
write, one check per row and key. They become triggers that check each statement's rows once and
cascade deletes from the parents (:mod:`seemly.db.mask_references`); the rule each key enforced is
unchanged. Measurements: docs/benchmarks.md, "Database writes".

SQLite (the demo) cannot drop a constraint: the table is rebuilt (batch mode). Dropping the old
table runs its ``ON DELETE SET NULL`` on ``corrections.predicted_mask_id`` (SQLite deletes the rows
of a dropped table while foreign keys are on), so those links are saved and restored around it.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from seemly.db import mask_references

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FOREIGN_KEYS = (
    ("fk_masks_project_id_projects", "project_id", "projects"),
    ("fk_masks_image_id_images", "image_id", "images"),
    ("fk_masks_model_version_id_model_versions", "model_version_id", "model_versions"),
)


def _sqlite_rebuild(drop: bool) -> None:
    op.execute(
        "CREATE TEMP TABLE seemly_kept_predictions AS "
        "SELECT id, predicted_mask_id FROM corrections WHERE predicted_mask_id IS NOT NULL"
    )
    with op.batch_alter_table("masks", recreate="always") as batch:
        for name, column, parent in FOREIGN_KEYS:
            if drop:
                batch.drop_constraint(name, type_="foreignkey")
            else:
                batch.create_foreign_key(name, parent, [column], ["id"], ondelete="CASCADE")
    op.execute(
        "UPDATE corrections SET predicted_mask_id = (SELECT k.predicted_mask_id FROM seemly_kept_predictions k "
        "WHERE k.id = corrections.id) WHERE id IN (SELECT id FROM seemly_kept_predictions)"
    )
    op.execute("DROP TABLE seemly_kept_predictions")


def upgrade() -> None:
    conn = op.get_bind()
    if conn.dialect.name == "sqlite":
        _sqlite_rebuild(drop=True)
    else:
        for name, _, _ in FOREIGN_KEYS:
            op.drop_constraint(name, "masks", type_="foreignkey")
    mask_references.install(conn)


def downgrade() -> None:
    conn = op.get_bind()
    mask_references.uninstall(conn)
    if conn.dialect.name == "sqlite":
        _sqlite_rebuild(drop=False)
    else:
        for name, column, parent in FOREIGN_KEYS:
            op.create_foreign_key(name, "masks", parent, [column], ["id"], ondelete="CASCADE")
