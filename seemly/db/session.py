"""Engines and sessions built from :class:`seemly.config.Settings`.

One place decides how seemly talks to its database so that the backend, the Ray workers and the
CLI behave alike: connections are pinged before use (Postgres restarts, idle timeouts behind a
load balancer), SQLite gets WAL + foreign keys on every connection (it enforces neither by
default), and a bare ``postgresql://`` URL uses psycopg 3, the only driver we install.

The schema itself is created by the Alembic migrations (:func:`seemly.db.migrate.upgrade`) on
every backend, SQLite included, so that the demo runs the same DDL as production.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.orm import Session, sessionmaker

from seemly.config import get_settings

#: How long a SQLite writer waits for another writer's lock before failing (milliseconds).
SQLITE_BUSY_TIMEOUT_MS = 10_000


def normalize_url(url: str | URL) -> URL:
    """``postgresql://`` / ``postgres://`` → ``postgresql+psycopg://`` (psycopg 3); others unchanged."""
    parsed = make_url(str(url) if isinstance(url, URL) else url.replace("postgres://", "postgresql://", 1))
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def _sqlite_file(url: URL) -> Path | None:
    database = url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database).expanduser()


def _on_sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        # WAL: readers do not block the writer (the demo's backend reads while a job writes).
        # In-memory databases answer "memory" and stay as they are.
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
    finally:
        cursor.close()


def make_engine(url: str | URL | None = None, **kwargs: Any) -> Engine:
    """An :class:`~sqlalchemy.Engine` for ``url`` (default: ``Settings().database_url``).

    Extra keyword arguments go to :func:`sqlalchemy.create_engine` and win over the defaults.
    For a SQLite file, its parent directory is created (the default lives in ``~/.seemly``).
    """
    parsed = normalize_url(url if url is not None else get_settings().database_url)
    options: dict[str, Any] = {"pool_pre_ping": True}
    if parsed.get_backend_name() == "sqlite":
        path = _sqlite_file(parsed)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        # The same connection may be used by a thread pool (the backend's background writer).
        options["connect_args"] = {"check_same_thread": False}
    options.update(kwargs)
    engine = create_engine(parsed, **options)
    if parsed.get_backend_name() == "sqlite":
        event.listen(engine, "connect", _on_sqlite_connect)
    return engine


@lru_cache(maxsize=8)
def get_engine(url: str | None = None) -> Engine:
    """The process-wide engine for ``url`` (default: the settings' URL), created once and reused."""
    return make_engine(url)


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions that keep loaded attributes after commit (objects are handed to other threads)."""
    return sessionmaker(bind=engine, expire_on_commit=False)


@contextmanager
def session_scope(engine: Engine | None = None) -> Iterator[Session]:
    """A session in one transaction: committed when the block succeeds, rolled back when it raises.

    >>> with session_scope() as session:  # doctest: +SKIP
    ...     session.add(Project(name="cats"))
    """
    session = session_factory(engine or get_engine())()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
