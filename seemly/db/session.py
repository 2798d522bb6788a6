"""Engines and sessions built from :class:`seemly.config.Settings`.

One place decides how seemly talks to its database so that the backend, the Ray workers and the
CLI behave alike: connections are pinged before use (Postgres restarts, idle timeouts behind a
load balancer), SQLite gets WAL + foreign keys on every connection (it enforces neither by
default), and a bare ``postgresql://`` URL uses psycopg 3, the only driver we install.

The schema itself is created by the Alembic migrations (:func:`seemly.db.migrate.upgrade`) on
every backend, SQLite included, so that the demo runs the same DDL as production.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from seemly.config import get_settings

#: How long a SQLite writer waits for another writer's lock before failing (milliseconds).
SQLITE_BUSY_TIMEOUT_MS = 10_000

#: SQLSTATEs that mean "the server is (re)starting or ended this session", besides class 08
#: (connection exceptions): admin_shutdown, crash_shutdown, cannot_connect_now, too_many_connections.
_DISCONNECT_STATES = frozenset({"57P01", "57P02", "57P03", "53300"})

T = TypeVar("T")
log = logging.getLogger(__name__)


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


# --------------------------------------------------------------------------------------------
# riding out a database restart
# --------------------------------------------------------------------------------------------
def is_disconnect(exc: BaseException) -> bool:
    """Whether ``exc`` means the connection was lost or refused (a restart, failover, an admin's
    ``pg_terminate_backend``) rather than a problem with the statement: worth retrying later."""
    if not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    if not isinstance(exc, OperationalError | InterfaceError):
        return False
    state = getattr(exc.orig, "sqlstate", None)
    # psycopg reports a refused or broken connection without a SQLSTATE.
    return state is None or str(state).startswith("08") or state in _DISCONNECT_STATES


def retry_disconnects(
    call: Callable[[], T],
    *,
    what: str,
    deadline_s: float,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """``call()``, repeated while the database is unreachable, for up to ``deadline_s`` seconds.

    Only for idempotent work (each seemly writer is: unique keys, upserts), since a commit whose
    acknowledgement was lost is replayed. Backoff 0.25 s doubling to 5 s; one warning per outage.
    Other errors, and a disconnect past the deadline, propagate.
    """
    started = time.monotonic()
    attempt = 0
    while True:
        try:
            result = call()
        except DBAPIError as exc:
            waited = time.monotonic() - started
            if not is_disconnect(exc) or waited >= deadline_s:
                raise
            if attempt == 0:
                log.warning(
                    "%s: database unreachable (%s); retrying for up to %.0f s", what, _short(exc), deadline_s
                )
            attempt += 1
            sleep(min(0.25 * 2 ** (attempt - 1), 5.0, max(0.05, deadline_s - waited)))
            continue
        if attempt:
            log.warning(
                "%s: database back after %.1f s (%d retries)", what, time.monotonic() - started, attempt
            )
        return result


def _short(exc: DBAPIError) -> str:
    first = str(exc.orig or exc).strip().splitlines()
    return f"{type(exc.orig or exc).__name__}: {first[0] if first else ''}"[:200]
