"""Metrics read from Postgres at scrape time: jobs, their progress, training runs, promoted versions.

A scrape must never hang on the database (Prometheus would time out and lose *every* metric of
the backend, including the ones that would show the database is the problem). So:

* the query runs in a background thread and the scrape waits for it at most ``timeout_s``;
  a query still running is not started twice (a dead database does not pile up threads);
* a successful snapshot is reused for ``cache_s`` seconds (a scrape every few seconds from several
  Prometheus replicas costs one query);
* when the database does not answer in time, the last snapshot (if any) is served and
  ``seemly_metrics_db_up`` is 0; ``seemly_metrics_db_snapshot_age_seconds`` says how old it is.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import Engine, func, select, text

from seemly.db.models import Job, JobStatus, ModelVersion, Project

log = logging.getLogger(__name__)

TRAIN_KIND = "train"


@dataclass
class DbSnapshot:
    """What one scrape query saw."""

    taken: float
    jobs: list[tuple[str, str, int]] = field(default_factory=list)  # (kind, status, count)
    running: list[tuple[int, str, str, int, int, int, int]] = field(default_factory=list)
    """(job id, kind, project, total, done, failed, skipped) of running jobs."""
    promoted: list[tuple[str, str, str]] = field(default_factory=list)  # (project, version, engine)


def read_snapshot(db: Engine, statement_timeout_ms: int) -> DbSnapshot:
    """One read-only transaction (Postgres: bounded by ``statement_timeout``)."""
    jobs_t, projects_t, versions_t = Job.__table__, Project.__table__, ModelVersion.__table__
    with db.connect() as conn:
        if db.dialect.name == "postgresql":
            conn.execute(text(f"SET LOCAL statement_timeout = {int(statement_timeout_ms)}"))
        jobs = conn.execute(
            select(jobs_t.c.kind, jobs_t.c.status, func.count()).group_by(jobs_t.c.kind, jobs_t.c.status)
        ).all()
        running = conn.execute(
            select(
                jobs_t.c.id,
                jobs_t.c.kind,
                func.coalesce(projects_t.c.name, ""),
                jobs_t.c.items_total,
                jobs_t.c.items_done,
                jobs_t.c.items_failed,
                jobs_t.c.items_skipped,
            )
            .select_from(jobs_t.outerjoin(projects_t, projects_t.c.id == jobs_t.c.project_id))
            .where(jobs_t.c.status == JobStatus.RUNNING.value)
            .order_by(jobs_t.c.id)
            .limit(200)  # bounded label cardinality, whatever happens to the jobs table
        ).all()
        promoted_rows = conn.execute(
            select(projects_t.c.name, versions_t.c.name, versions_t.c.engine)
            .select_from(versions_t.join(projects_t, projects_t.c.id == versions_t.c.project_id))
            .where(versions_t.c.promoted.is_(True))
            .order_by(projects_t.c.name, versions_t.c.promoted_at.desc().nulls_last(), versions_t.c.id.desc())
        ).all()
    promoted: dict[str, tuple[str, str, str]] = {}
    for project, version, engine in promoted_rows:
        promoted.setdefault(project, (project, version, engine))  # the latest promotion per project
    return DbSnapshot(
        taken=time.time(),
        jobs=[(str(k), str(getattr(s, "value", s)), int(n)) for k, s, n in jobs],
        running=[(int(r[0]), str(r[1]), str(r[2]), *(int(v or 0) for v in r[3:])) for r in running],
        promoted=list(promoted.values()),
    )


class DatabaseCollector(Collector):
    """Prometheus collector over :func:`read_snapshot` with a timeout and a short cache (module doc)."""

    def __init__(self, db: Engine, *, timeout_s: float = 1.0, cache_s: float = 5.0) -> None:
        self.db = db
        self.timeout_s = timeout_s
        self.cache_s = cache_s
        self._lock = threading.Lock()
        self._snapshot: DbSnapshot | None = None
        self._ok = False
        self._inflight: threading.Event | None = None

    def describe(self) -> Iterable[Metric]:
        return []

    def _refresh(self, done: threading.Event) -> None:
        try:
            snapshot = read_snapshot(self.db, int(max(self.timeout_s, 0.1) * 2000))
        except Exception as exc:  # any failure: the scrape reports db_up 0, the error type goes to the log
            log.warning("metrics: cannot read jobs from the database (%s)", type(exc).__name__)
            with self._lock:
                self._ok = False
        else:
            with self._lock:
                self._snapshot, self._ok = snapshot, True
        finally:
            with self._lock:
                self._inflight = None
            done.set()

    def snapshot(self) -> tuple[DbSnapshot | None, bool]:
        """The freshest snapshot within ``timeout_s`` and whether the database answered."""
        with self._lock:
            current = self._snapshot
            if self._ok and current is not None and time.time() - current.taken < self.cache_s:
                return current, True
            done = self._inflight
            if done is None:
                done = self._inflight = threading.Event()
                threading.Thread(
                    target=self._refresh, args=(done,), name="seemly-metrics-db", daemon=True
                ).start()
        finished = done.wait(self.timeout_s)
        with self._lock:
            return self._snapshot, finished and self._ok

    def collect(self) -> Iterator[Metric]:
        started = time.perf_counter()
        snapshot, ok = self.snapshot()
        up = GaugeMetricFamily("seemly_metrics_db_up", "1 if the database answered this scrape in time.")
        up.add_metric([], 1.0 if ok else 0.0)
        yield up
        took = GaugeMetricFamily(
            "seemly_metrics_db_scrape_seconds", "Time this scrape waited for the database."
        )
        took.add_metric([], time.perf_counter() - started)
        yield took
        if snapshot is None:
            return
        age = GaugeMetricFamily(
            "seemly_metrics_db_snapshot_age_seconds", "Age of the database figures below."
        )
        age.add_metric([], max(0.0, time.time() - snapshot.taken))
        yield age
        jobs = GaugeMetricFamily("seemly_jobs", "Jobs by kind and status.", labels=["kind", "status"])
        training = GaugeMetricFamily(
            "seemly_training_runs", "Training jobs (kind 'train') by status.", labels=["status"]
        )
        for kind, status, count in snapshot.jobs:
            jobs.add_metric([kind, status], count)
            if kind == TRAIN_KIND:
                training.add_metric([status], count)
        yield jobs
        yield training
        items = GaugeMetricFamily(
            "seemly_job_items",
            "Items of each running job by state (total | done | failed | skipped).",
            labels=["job_id", "kind", "project", "state"],
        )
        for job_id, kind, project, total, done, failed, skipped in snapshot.running:
            for state, value in (("total", total), ("done", done), ("failed", failed), ("skipped", skipped)):
                items.add_metric([str(job_id), kind, project, state], value)
        yield items
        promoted = GaugeMetricFamily(
            "seemly_promoted_model_version_info",
            "The model version each project serves (value 1; the version is a label).",
            labels=["project", "version", "engine"],
        )
        for project, version, engine in snapshot.promoted:
            promoted.add_metric([project, version, engine], 1.0)
        yield promoted
