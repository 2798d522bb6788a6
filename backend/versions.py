"""Which model version serves a Label Studio project: its promoted version, cached for a few seconds.

The registry (:mod:`seemly.learning.versions`) is the source of truth: promoting or rolling back is
a transaction there, and every backend process follows within ``SEEMLY_VERSION_REFRESH_S``. No
restart, no message between processes. A request looks the version up in memory; once the entry is
older than the refresh interval, *one* request thread re-reads it while concurrent requests keep
using the value they had, so a promotion never makes requests wait on one another.

The database is not needed to answer: when it cannot be read, the last known version keeps being
served (a warning is logged, once per outage); a project never resolved yet gets the base engine.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from backend.db import find_project
from seemly.learning import versions
from seemly.learning.versions import VersionInfo

log = logging.getLogger(__name__)


@dataclass
class _Entry:
    info: VersionInfo | None  # None: the base engine
    fetched: float  # monotonic time of the last successful read (or of the failed first one)
    refreshing: bool = False


class ProjectVersions:
    """Label Studio project id -> its promoted :class:`VersionInfo` (None = the base engine)."""

    def __init__(
        self,
        db: Engine,
        refresh_s: float = 5.0,
        *,
        max_projects: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if refresh_s < 0:
            raise ValueError("refresh_s must not be negative")
        self.db = db
        self.refresh_s = refresh_s
        self.max_projects = max_projects
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: dict[int, _Entry] = {}
        self._failing = False
        self.lookups = 0
        self.failures = 0

    def resolve(self, ls_project_id: int) -> VersionInfo | None:
        """The version to serve ``ls_project_id`` with now (see the module doc)."""
        now = self._clock()
        with self._lock:
            entry = self._entries.get(ls_project_id)
            if entry is not None and (now - entry.fetched < self.refresh_s or entry.refreshing):
                return entry.info  # fresh, or another thread is re-reading it: use what we have
            if entry is not None:
                entry.refreshing = True
        try:
            info = self._read(ls_project_id)
        except SQLAlchemyError as exc:
            with self._lock:
                self.failures += 1
                first_failure, self._failing = not self._failing, True
                if entry is None:  # never known: the base engine until the database answers
                    entry = self._store(ls_project_id, _Entry(None, now))
                entry.refreshing = False
                entry.fetched = now  # retry after refresh_s, not on every request
                served = entry.info
            if first_failure:
                log.warning(
                    "cannot read the promoted model version (%s); serving the last known version (%s) "
                    "until the database answers",
                    type(exc).__name__,
                    served.name if served else "the base engine",
                )
            return served
        except BaseException:
            with self._lock:
                if entry is not None:
                    entry.refreshing = False
            raise
        with self._lock:
            if self._failing:
                log.info("the model registry is readable again")
            self._failing = False
            # fresh as of when the read began: a promotion committed during the read is seen next time
            self._store(ls_project_id, _Entry(info, now))
        return info

    def forget(self, ls_project_id: int | None = None) -> None:
        """Drop cached answers (all, or one project's): the next request reads the registry."""
        with self._lock:
            if ls_project_id is None:
                self._entries.clear()
            else:
                self._entries.pop(ls_project_id, None)

    def project_versions(self, ls_project_id: int) -> list[VersionInfo]:
        """Every registered version of the project (for ``/versions``); empty if the DB is down."""
        try:
            with self.db.connect() as conn:
                found = find_project(conn, ls_project_id)
                return versions.list_versions(conn, found[0]) if found else []
        except SQLAlchemyError as exc:
            log.warning("cannot list the model versions of project %s: %s", ls_project_id, type(exc).__name__)
            return []

    def _read(self, ls_project_id: int) -> VersionInfo | None:
        self.lookups += 1
        with self.db.connect() as conn:
            found = find_project(conn, ls_project_id)
            return versions.promoted_version(conn, found[0]) if found else None

    def _store(self, ls_project_id: int, entry: _Entry) -> _Entry:
        self._entries[ls_project_id] = entry
        if len(self._entries) > self.max_projects:  # bounded: drop the oldest read
            oldest = min(self._entries, key=lambda k: self._entries[k].fetched)
            self._entries.pop(oldest, None)
        return entry
