"""``seemly db upgrade`` / ``seemly db downgrade``: Alembic driven from Python.

The migrations live in the top-level ``migrations`` package, found through its import location,
so the commands work the same from a source checkout and from an installed wheel, from any
working directory, without an ``alembic.ini``. Tests and the demo call :func:`upgrade` directly.
"""

from __future__ import annotations

import argparse
import logging
import threading
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.pool import NullPool

import migrations
from seemly.config import get_settings
from seemly.db.session import make_engine, normalize_url

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(migrations.__file__).resolve().parent

# Alembic's ``context``/``op`` are process-wide proxies: two threads migrating at once would trample
# each other. Across processes, env.py serialises migrations with a Postgres advisory lock.
_ALEMBIC_LOCK = threading.Lock()


def _display(url: str) -> str:
    return normalize_url(url).render_as_string(hide_password=True)


def alembic_config(url: str | None = None) -> Config:
    """An Alembic :class:`Config` pointing at our migrations and at ``url`` (default: settings)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # Passed as an attribute, not an ini option, so '%' in passwords needs no escaping.
    config.attributes["url"] = url or get_settings().database_url
    return config


def upgrade(url: str | None = None, revision: str = "head") -> None:
    """Migrate the database at ``url`` up to ``revision`` (idempotent: at head it does nothing)."""
    with _ALEMBIC_LOCK:
        command.upgrade(alembic_config(url), revision)


def downgrade(url: str | None, revision: str) -> None:
    """Migrate the database at ``url`` down to ``revision`` (``base`` drops every table)."""
    with _ALEMBIC_LOCK:
        command.downgrade(alembic_config(url), revision)


def current_revision(url: str | None = None) -> str | None:
    """The revision the database is at, or ``None`` for a database never migrated."""
    engine = make_engine(url or get_settings().database_url, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()


def head_revision() -> str:
    """The newest revision in the migrations folder."""
    head = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    assert head is not None, f"no migrations found in {MIGRATIONS_DIR}"
    return head


# --- command line ---------------------------------------------------------------------------
def configure(parser: argparse.ArgumentParser, words: tuple[str, ...]) -> None:
    parser.add_argument(
        "--url", help="database URL (default: SEEMLY_DATABASE_URL or the embedded SQLite file)"
    )
    if words[-1] == "upgrade":
        parser.add_argument("--revision", default="head", help="target revision (default: head)")
    else:
        parser.add_argument("revision", help="target revision, e.g. 'base' or '-1'")


def run(args: argparse.Namespace, words: tuple[str, ...]) -> int:
    url = args.url or get_settings().database_url
    before = current_revision(url)
    if words[-1] == "upgrade":
        upgrade(url, args.revision)
    else:
        downgrade(url, args.revision)
    after = current_revision(url)
    print(f"{_display(url)}: {before or 'base'} -> {after or 'base'}")
    return 0
