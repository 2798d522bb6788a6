"""Referential integrity of ``masks`` without per-row foreign-key triggers.

Why: ``masks`` is the table that grows with a bucket, and a Postgres foreign key checks every
inserted row on its own (an SPI query with a ``FOR KEY SHARE`` lock per row and per key). Its three
keys (project, image, model version) were half the server time of a bulk write
(docs/benchmarks.md, "Database writes"). A batch references a handful of projects and versions and
at most one image per few rows, so the same guarantee is given here once per *statement*:

* ``masks_check_references`` (``AFTER INSERT`` / ``AFTER UPDATE … FOR EACH STATEMENT``, transition
  table ``new_masks``) collects the distinct ids of the rows the statement wrote, locks the
  referenced rows ``FOR KEY SHARE`` (exactly the lock a foreign-key check takes, so a concurrent
  ``DELETE`` of a parent waits for this transaction, and a parent deleted first is seen as gone),
  and raises ``foreign_key_violation`` naming the first missing id. Rows skipped by
  ``ON CONFLICT DO NOTHING`` are not in the transition table, so an idempotent re-run checks nothing.
* ``masks_cascade_delete`` (``AFTER DELETE … FOR EACH STATEMENT`` on ``projects``, ``images`` and
  ``model_versions``, transition table ``old_rows``) deletes their masks, as ``ON DELETE CASCADE``
  did; ``BEFORE TRUNCATE`` on them deletes the masks a truncate would orphan.

SQLite (the demo database) has no statement triggers or transition tables: row triggers give the
same rules there. :func:`install` is run by migration ``0003`` and by ``metadata.create_all`` (an
``after_create`` hook on ``masks`` in :mod:`seemly.db.models`). Changing the SQL below needs a new
migration revision that re-runs :func:`install`.
"""

from __future__ import annotations

from sqlalchemy import Connection

#: (parent table, mask column, name in messages, SQL type of the id)
PARENTS: tuple[tuple[str, str, str, str], ...] = (
    ("projects", "project_id", "project", "int"),
    ("images", "image_id", "image", "bigint"),
    ("model_versions", "model_version_id", "model version", "int"),
)


def _postgres_check_function() -> str:
    declare = "\n".join(f"  {column}s {kind}[];" for _, column, _, kind in PARENTS)
    collect = ", ".join(
        f"array_agg(DISTINCT {column}) FILTER (WHERE {column} IS NOT NULL)" for _, column, _, _ in PARENTS
    )
    into = ", ".join(f"{column}s" for _, column, _, _ in PARENTS)
    checks = "\n".join(
        f"""
  IF {column}s IS NOT NULL THEN
    SELECT count(*) INTO found FROM (
      SELECT 1 FROM {table} WHERE id = ANY({column}s) ORDER BY id FOR KEY SHARE
    ) locked;
    IF found < cardinality({column}s) THEN
      SELECT min(wanted) INTO missing FROM unnest({column}s) AS wanted
        WHERE NOT EXISTS (SELECT 1 FROM {table} WHERE id = wanted);
      RAISE foreign_key_violation USING
        MESSAGE = 'masks reference {noun} ' || missing || ', which does not exist',
        HINT = 'write the {table} row first (a mask needs its project, image and model version)';
    END IF;
  END IF;"""
        for table, column, noun, _ in PARENTS
    )
    return f"""
CREATE OR REPLACE FUNCTION masks_check_references() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
{declare}
  found bigint;
  missing bigint;
BEGIN
  SELECT {collect} INTO {into} FROM new_masks;
{checks}
  RETURN NULL;
END
$$"""


_POSTGRES_CASCADE_FUNCTION = """
CREATE OR REPLACE FUNCTION masks_cascade_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF TG_OP = 'TRUNCATE' THEN
    IF TG_TABLE_NAME = 'model_versions' THEN
      DELETE FROM masks WHERE model_version_id IS NOT NULL;
    ELSE
      DELETE FROM masks;
    END IF;
  ELSIF TG_TABLE_NAME = 'projects' THEN
    DELETE FROM masks WHERE project_id IN (SELECT id FROM old_rows);
  ELSIF TG_TABLE_NAME = 'images' THEN
    DELETE FROM masks WHERE image_id IN (SELECT id FROM old_rows);
  ELSE
    DELETE FROM masks WHERE model_version_id IN (SELECT id FROM old_rows);
  END IF;
  RETURN NULL;
END
$$"""


def _postgres_statements() -> list[str]:
    statements = [_postgres_check_function(), _POSTGRES_CASCADE_FUNCTION]
    for event in ("INSERT", "UPDATE"):
        name = f"masks_check_references_{event.lower()}"
        statements += [
            f"DROP TRIGGER IF EXISTS {name} ON masks",
            f"CREATE TRIGGER {name} AFTER {event} ON masks REFERENCING NEW TABLE AS new_masks "
            "FOR EACH STATEMENT EXECUTE FUNCTION masks_check_references()",
        ]
    for table, _, _, _ in PARENTS:
        statements += [
            f"DROP TRIGGER IF EXISTS masks_cascade_delete ON {table}",
            f"CREATE TRIGGER masks_cascade_delete AFTER DELETE ON {table} REFERENCING OLD TABLE AS old_rows "
            "FOR EACH STATEMENT EXECUTE FUNCTION masks_cascade_delete()",
            f"DROP TRIGGER IF EXISTS masks_cascade_truncate ON {table}",
            f"CREATE TRIGGER masks_cascade_truncate BEFORE TRUNCATE ON {table} "
            "FOR EACH STATEMENT EXECUTE FUNCTION masks_cascade_delete()",
        ]
    return statements


def _sqlite_statements() -> list[str]:
    checks = "\n".join(
        f"  SELECT RAISE(ABORT, 'masks reference a missing {noun} (no such {table}.id)') "
        f"WHERE NEW.{column} IS NOT NULL AND NOT EXISTS (SELECT 1 FROM {table} WHERE id = NEW.{column});"
        for table, column, noun, _ in PARENTS
    )
    columns = ", ".join(column for _, column, _, _ in PARENTS)
    statements = [
        f"CREATE TRIGGER IF NOT EXISTS masks_check_references_insert BEFORE INSERT ON masks BEGIN\n{checks}\nEND",
        f"CREATE TRIGGER IF NOT EXISTS masks_check_references_update BEFORE UPDATE OF {columns} ON masks "
        f"BEGIN\n{checks}\nEND",
    ]
    statements += [
        f"CREATE TRIGGER IF NOT EXISTS masks_cascade_delete_{table} AFTER DELETE ON {table} "
        f"BEGIN DELETE FROM masks WHERE {column} = OLD.id; END"
        for table, column, _, _ in PARENTS
    ]
    return statements


def install(conn: Connection) -> None:
    """Create (or replace) the triggers on this connection's database; idempotent."""
    dialect = conn.dialect.name
    if dialect == "postgresql":
        statements = _postgres_statements()
    elif dialect == "sqlite":
        statements = _sqlite_statements()
    else:
        raise NotImplementedError(f"seemly supports Postgres and SQLite, not {dialect!r}")
    for statement in statements:
        conn.exec_driver_sql(statement)


def uninstall(conn: Connection) -> None:
    """Drop the triggers (and, on Postgres, their functions)."""
    if conn.dialect.name == "postgresql":
        for event in ("insert", "update"):
            conn.exec_driver_sql(f"DROP TRIGGER IF EXISTS masks_check_references_{event} ON masks")
        for table, _, _, _ in PARENTS:
            conn.exec_driver_sql(f"DROP TRIGGER IF EXISTS masks_cascade_delete ON {table}")
            conn.exec_driver_sql(f"DROP TRIGGER IF EXISTS masks_cascade_truncate ON {table}")
        conn.exec_driver_sql("DROP FUNCTION IF EXISTS masks_check_references()")
        conn.exec_driver_sql("DROP FUNCTION IF EXISTS masks_cascade_delete()")
    else:
        for event in ("insert", "update"):
            conn.exec_driver_sql(f"DROP TRIGGER IF EXISTS masks_check_references_{event}")
        for table, _, _, _ in PARENTS:
            conn.exec_driver_sql(f"DROP TRIGGER IF EXISTS masks_cascade_delete_{table}")


__all__ = ["PARENTS", "install", "uninstall"]
