"""Get-or-create for the small reference rows every writer needs: projects and model versions.

Both are race-safe (``INSERT … ON CONFLICT DO NOTHING`` then ``SELECT``) so that the backend's
threads, Ray workers and the CLI can call them concurrently without duplicates or errors.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, Engine, select
from sqlalchemy.dialects import postgresql, sqlite

from seemly.db.models import ModelVersion, Project


def _insert(conn: Connection, table: Any) -> Any:
    return (postgresql if conn.dialect.name == "postgresql" else sqlite).insert(table)


def _with_connection(bind: Engine | Connection, fn: Any) -> Any:
    if isinstance(bind, Connection):
        return fn(bind)
    with bind.begin() as conn:
        return fn(conn)


def ensure_project(
    bind: Engine | Connection, name: str, *, labels: list[str] | None = None, ls_project_id: int | None = None
) -> int:
    """The id of project ``name``, creating it if needed (labels/ids fill in blanks only)."""
    if not name or len(name) > 200:
        raise ValueError("a project name must be 1-200 characters")

    def run(conn: Connection) -> int:
        table = Project.__table__
        values: dict[str, Any] = {"name": name, "labels": labels or []}
        if ls_project_id is not None:
            values["ls_project_id"] = ls_project_id
        conn.execute(_insert(conn, table).values(**values).on_conflict_do_nothing(index_elements=["name"]))
        row = conn.execute(select(table.c.id, table.c.labels).where(table.c.name == name)).one()
        if labels and not row.labels:
            conn.execute(table.update().where(table.c.id == row.id).values(labels=labels))
        return int(row.id)

    return _with_connection(bind, run)


def ensure_model_version(
    bind: Engine | Connection, name: str, *, engine: str, project_id: int | None = None
) -> int:
    """The id of model version ``name`` (global when ``project_id`` is None), creating it if needed."""

    def run(conn: Connection) -> int:
        table = ModelVersion.__table__
        where = table.c.name == name
        where = where & (
            table.c.project_id.is_(None) if project_id is None else table.c.project_id == project_id
        )
        existing = conn.execute(select(table.c.id).where(where)).scalar_one_or_none()
        if existing is not None:
            return int(existing)
        index = ["name"] if project_id is None else ["project_id", "name"]
        statement = _insert(conn, table).values(name=name, engine=engine, project_id=project_id)
        if project_id is None:
            statement = statement.on_conflict_do_nothing(
                index_elements=index, index_where=table.c.project_id.is_(None)
            )
        else:
            statement = statement.on_conflict_do_nothing(index_elements=index)
        conn.execute(statement)
        return int(conn.execute(select(table.c.id).where(where)).scalar_one())

    return _with_connection(bind, run)
