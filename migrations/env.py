"""Alembic environment for seemly, configured from Python rather than an ini file.

The database URL comes, in order, from ``config.attributes["url"]`` (what
:func:`seemly.db.migrate.upgrade` passes), the ``sqlalchemy.url`` option, or ``SEEMLY_DATABASE_URL``
via :class:`seemly.config.Settings`. A caller may also hand over an open connection in
``config.attributes["connection"]`` to migrate inside its own transaction.

No ``logging.fileConfig`` here: it would replace the application's logging set-up and hide output.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, text
from sqlalchemy.pool import NullPool

from seemly.config import get_settings
from seemly.db.models import Base
from seemly.db.session import make_engine, normalize_url

#: Postgres advisory lock held while migrating, so that two processes starting at once
#: (the backend and a worker) do not both try to create the same tables.
MIGRATION_LOCK_KEY = 0x5EE_D8_0001

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    url = (
        config.attributes.get("url")
        or config.get_main_option("sqlalchemy.url")
        or get_settings().database_url
    )
    return normalize_url(url).render_as_string(hide_password=False)


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things; batch mode rebuilds the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
        context.run_migrations()


def run_migrations_offline() -> None:
    """Emit the SQL script instead of running it (``alembic upgrade --sql``)."""
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection)
        return
    engine = make_engine(_url(), poolclass=NullPool)
    try:
        with engine.connect() as connection:
            _configure(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
