"""The per-project model-version registry: candidates, promotion, rollback, and how to load one.

A project's *served* version is its row with ``promoted = true`` (at most one per project); none
means the base engine. Promotion and rollback are single transactions that move that flag, so
every reader (the backend resolving a project's version, a Serve replica loading one by name)
sees either the old or the new version, never none. Fine-tuned version names carry the project id
(``p7-classic-ft3``) so that a name alone identifies a version across projects: Serve's multiplexed
model id is that name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, func, select, update

from seemly.db.models import ModelVersion, Project, utcnow


class VersionError(ValueError):
    """A version that does not exist, or an operation the registry's state does not allow."""


@dataclass(frozen=True)
class VersionInfo:
    id: int
    name: str
    engine: str
    project_id: int | None
    parent_id: int | None
    artifact_uri: str | None
    promoted: bool
    metrics: dict[str, Any]
    decision: dict[str, Any] | None


def _info(row: Any) -> VersionInfo:
    return VersionInfo(
        id=int(row.id),
        name=row.name,
        engine=row.engine,
        project_id=row.project_id,
        parent_id=row.parent_id,
        artifact_uri=row.artifact_uri,
        promoted=bool(row.promoted),
        metrics=dict(row.metrics or {}),
        decision=dict(row.decision) if row.decision is not None else None,
    )


def _run(bind: Engine | Connection, fn: Any) -> Any:
    if isinstance(bind, Connection):
        return fn(bind)
    with bind.begin() as conn:
        return fn(conn)


_TABLE = ModelVersion.__table__


def engine_spec(info: VersionInfo) -> tuple[str, dict[str, Any]]:
    """(engine name, options) that :func:`seemly.engines.base.create_engine` needs to load ``info``."""
    if not info.artifact_uri:
        return info.engine, {}
    if info.engine == "classic":
        return "classic", {"refiner_uri": info.artifact_uri}
    return info.engine, {"checkpoint": info.artifact_uri}


def candidate_name(project_id: int, engine: str, number: int) -> str:
    """The name of a project's ``number``-th fine-tune: unique across projects by construction."""
    return f"p{project_id}-{engine}-ft{number}"


def get_by_name(bind: Engine | Connection, name: str) -> VersionInfo | None:
    def run(conn: Connection) -> VersionInfo | None:
        rows = conn.execute(select(_TABLE).where(_TABLE.c.name == name).order_by(_TABLE.c.id)).all()
        return _info(rows[0]) if rows else None

    return _run(bind, run)


def get(bind: Engine | Connection, version_id: int) -> VersionInfo:
    def run(conn: Connection) -> VersionInfo:
        row = conn.execute(select(_TABLE).where(_TABLE.c.id == version_id)).one_or_none()
        if row is None:
            raise VersionError(f"no model version with id {version_id}")
        return _info(row)

    return _run(bind, run)


def promoted_version(bind: Engine | Connection, project_id: int) -> VersionInfo | None:
    """The version a project's requests are served with; None = the base engine."""

    def run(conn: Connection) -> VersionInfo | None:
        row = conn.execute(
            select(_TABLE)
            .where(_TABLE.c.project_id == project_id, _TABLE.c.promoted.is_(True))
            .order_by(_TABLE.c.promoted_at.desc(), _TABLE.c.id.desc())
            .limit(1)
        ).one_or_none()
        return _info(row) if row is not None else None

    return _run(bind, run)


def list_versions(bind: Engine | Connection, project_id: int) -> list[VersionInfo]:
    def run(conn: Connection) -> list[VersionInfo]:
        rows = conn.execute(select(_TABLE).where(_TABLE.c.project_id == project_id).order_by(_TABLE.c.id))
        return [_info(r) for r in rows]

    return _run(bind, run)


def register_candidate(
    bind: Engine | Connection,
    project_id: int,
    engine: str,
    *,
    parent_id: int | None,
    artifact_uri: str | None,
    metrics: dict[str, Any] | None = None,
) -> VersionInfo:
    """Record a new (not yet promoted) fine-tune of ``project_id``, named by :func:`candidate_name`."""

    def run(conn: Connection) -> VersionInfo:
        projects = Project.__table__
        # Serialise registrations of one project (row lock on Postgres; SQLite has one writer) so
        # that two concurrent runs never pick the same number.
        locked = select(projects.c.id).where(projects.c.id == project_id)
        if conn.dialect.name == "postgresql":
            locked = locked.with_for_update()
        if conn.execute(locked).first() is None:
            raise VersionError(f"no project with id {project_id}")
        count = int(
            conn.execute(
                select(func.count()).select_from(_TABLE).where(_TABLE.c.project_id == project_id)
            ).scalar_one()
        )
        name = candidate_name(project_id, engine, count + 1)
        while conn.execute(select(_TABLE.c.id).where(_TABLE.c.name == name)).first() is not None:
            count += 1
            name = candidate_name(project_id, engine, count + 1)
        new_id = conn.execute(
            _TABLE.insert()
            .values(
                name=name,
                engine=engine,
                project_id=project_id,
                parent_id=parent_id,
                artifact_uri=artifact_uri,
                metrics=metrics or {},
            )
            .returning(_TABLE.c.id)
        ).scalar_one()
        return get(conn, int(new_id))

    return _run(bind, run)


def record_decision(
    bind: Engine | Connection,
    version_id: int,
    decision: dict[str, Any],
    metrics: dict[str, Any] | None = None,
) -> None:
    def run(conn: Connection) -> None:
        values: dict[str, Any] = {"decision": decision}
        if metrics is not None:
            values["metrics"] = metrics
        conn.execute(update(_TABLE).where(_TABLE.c.id == version_id).values(**values))

    _run(bind, run)


def promote(bind: Engine | Connection, version_id: int) -> VersionInfo:
    """Make ``version_id`` its project's served version (the previous one stops being served)."""

    def run(conn: Connection) -> VersionInfo:
        info = get(conn, version_id)
        if info.project_id is None:
            raise VersionError(f"version {info.name} belongs to no project and cannot be promoted")
        conn.execute(
            update(_TABLE)
            .where(_TABLE.c.project_id == info.project_id, _TABLE.c.id != version_id)
            .values(promoted=False)
        )
        conn.execute(
            update(_TABLE).where(_TABLE.c.id == version_id).values(promoted=True, promoted_at=utcnow())
        )
        return get(conn, version_id)

    return _run(bind, run)


def rollback(bind: Engine | Connection, project_id: int) -> VersionInfo | None:
    """Serve the current version's parent again (None: back to the base engine); one transaction."""

    def run(conn: Connection) -> VersionInfo | None:
        current = promoted_version(conn, project_id)
        if current is None:
            raise VersionError(f"project {project_id} serves the base engine: there is nothing to roll back")
        conn.execute(update(_TABLE).where(_TABLE.c.id == current.id).values(promoted=False))
        parent = get(conn, current.parent_id) if current.parent_id is not None else None
        if parent is None or parent.project_id != project_id:
            return None
        return promote(conn, parent.id)

    return _run(bind, run)
