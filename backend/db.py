"""The few database look-ups and upserts the backend shares (Postgres in production, SQLite in the demo).

Each helper takes a :class:`~sqlalchemy.Connection` inside the caller's transaction and is
idempotent (``INSERT … ON CONFLICT DO NOTHING`` then ``SELECT``), so concurrent backend workers and
retried background batches never create duplicates.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, Table, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.sql.dml import Insert

from seemly.db.models import ModelVersion, Project


def insert(conn: Connection, table: Table) -> Insert:
    """``INSERT`` in a dialect with ``ON CONFLICT`` (Postgres and SQLite share the syntax)."""
    if conn.dialect.name == "postgresql":
        return postgresql.insert(table)
    if conn.dialect.name == "sqlite":
        return sqlite.insert(table)
    raise NotImplementedError(f"seemly supports Postgres and SQLite, not {conn.dialect.name!r}")


def project_name(ls_project_id: int) -> str:
    return f"label-studio-{ls_project_id}"


def find_project(conn: Connection, ls_project_id: int) -> tuple[int, dict[str, Any]] | None:
    row = conn.execute(
        select(Project.id, Project.settings).where(Project.ls_project_id == ls_project_id)
    ).first()
    return (int(row[0]), dict(row[1] or {})) if row else None


def ensure_project(conn: Connection, ls_project_id: int) -> int:
    """The ``projects.id`` of a Label Studio project, creating the row on first sight."""
    found = find_project(conn, ls_project_id)
    if found is not None:
        return found[0]
    table = Project.__table__
    for name in (project_name(ls_project_id), f"{project_name(ls_project_id)}-{ls_project_id:x}"):
        conn.execute(
            insert(conn, table).values(name=name, ls_project_id=ls_project_id).on_conflict_do_nothing()
        )
        found = find_project(conn, ls_project_id)
        if found is not None:
            return found[0]
    raise RuntimeError(f"cannot create a projects row for Label Studio project {ls_project_id}")


def ensure_model_version(conn: Connection, name: str, engine: str) -> int:
    """The id of the global (project-less) model version ``name``, created on first use."""
    query = select(ModelVersion.id).where(ModelVersion.name == name, ModelVersion.project_id.is_(None))
    found = conn.execute(query).scalar()
    if found is not None:
        return int(found)
    statement = insert(conn, ModelVersion.__table__).values(name=name, engine=engine, project_id=None)
    conn.execute(statement.on_conflict_do_nothing())
    found = conn.execute(query).scalar()
    if found is None:
        raise RuntimeError(f"cannot create the model version {name!r}")
    return int(found)


def served_version_id(conn: Connection, name: str, engine: str) -> int:
    """The id of the model version that answered: a registered one by its (unique) name, such as a
    project's promoted fine-tune ``p7-classic-ft3``, else the global version ``name``."""
    registered = conn.execute(
        select(ModelVersion.id).where(ModelVersion.name == name).order_by(ModelVersion.id).limit(1)
    ).scalar()
    if registered is not None:
        return int(registered)
    return ensure_model_version(conn, name, engine)
