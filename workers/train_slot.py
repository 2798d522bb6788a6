"""A project's training slot: at most one queued or running training per project, held in Postgres.

The ``jobs`` row of a run (kind ``train``) is the lock: the partial unique index
``uq_jobs_one_active_training`` refuses a second active one, so the rule holds across processes,
machines and restarts. A run keeps its row alive with a :class:`Heartbeat`; a rival whose runner is
gone (a dead pid on this host) or whose heartbeat is older than ``SEEMLY_TRAIN_STALE_AFTER_S`` is
marked failed, its training requests re-queued, and the slot taken over.
"""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, select, update
from sqlalchemy.exc import IntegrityError

from seemly.db.models import Job, JobStatus, TrainingRequest
from workers.presegment import _runner, _runner_alive

log = logging.getLogger(__name__)

JOB_KIND = "train"
MAX_ERRORS = 50


class TrainingError(Exception):
    """A training that cannot start or did not finish; the message says why (shown to operators)."""


class TrainingBusyError(TrainingError):
    """The project's training slot is held by a live run."""


def active_training(db: Engine, project_id: int) -> Any | None:
    jobs = Job.__table__
    with db.connect() as conn:
        return conn.execute(
            select(jobs).where(
                jobs.c.project_id == project_id,
                jobs.c.kind == JOB_KIND,
                jobs.c.status.in_([JobStatus.QUEUED.value, JobStatus.RUNNING.value]),
            )
        ).first()


def runner_alive(runner: str | None, heartbeat: datetime | None, stale_after_s: float) -> bool:
    """Whether a training job's runner may still be working: a dead pid on this host is dead at
    once, another host's runner when its heartbeat is stale. This process's own job (another
    thread, e.g. a second scheduler loop) counts as alive while its heartbeat is fresh."""
    if runner == _runner():
        return heartbeat is not None and datetime.now(UTC) - heartbeat < timedelta(seconds=stale_after_s)
    return _runner_alive(runner, heartbeat, stale_after_s)


def _abandon(db: Engine, job: Any, why: str) -> bool:
    """Mark a dead run's job failed and re-queue its requests; False if someone else just did."""
    jobs, requests = Job.__table__, TrainingRequest.__table__
    with db.begin() as conn:
        changed = conn.execute(
            update(jobs)
            .where(
                jobs.c.id == job.id,
                jobs.c.status == job.status,
                jobs.c.runner.is_not_distinct_from(job.runner),
            )
            .values(
                status=JobStatus.FAILED,
                finished_at=datetime.now(UTC),
                errors=[*(job.errors or []), {"error": why}][-MAX_ERRORS:],
            )
        ).rowcount
        if changed:
            conn.execute(
                update(requests)
                .where(requests.c.job_id == job.id, requests.c.status == JobStatus.RUNNING)
                .values(status=JobStatus.QUEUED, job_id=None)
            )
    return bool(changed)


def claim_training_slot(
    db: Engine,
    project_id: int,
    *,
    params: dict[str, Any],
    stale_after_s: float,
    project_name: str = "",
) -> tuple[int, int | None]:
    """Insert this run's ``running`` job; returns ``(job id, id of the dead job taken over or None)``.

    The database decides who wins (the partial unique index): two concurrent claims, from any
    processes or machines, give exactly one job. A loser whose rival is alive gets
    :class:`TrainingBusyError`; a rival that is dead (see the module docstring) is marked failed
    and the claim is retried once.
    """
    shown = project_name or f"project {project_id}"
    took_over: int | None = None
    for _attempt in range(3):
        now = datetime.now(UTC)
        try:
            with db.begin() as conn:
                job_id = conn.execute(
                    Job.__table__.insert()
                    .values(
                        kind=JOB_KIND,
                        project_id=project_id,
                        params=params,
                        status=JobStatus.RUNNING,
                        runner=_runner(),
                        started_at=now,
                        heartbeat_at=now,
                    )
                    .returning(Job.__table__.c.id)
                ).scalar_one()
            return int(job_id), took_over
        except IntegrityError:
            pass
        rival = active_training(db, project_id)
        if rival is None:
            continue  # it finished in between: try again
        if runner_alive(rival.runner, rival.heartbeat_at, stale_after_s):
            beat = f", last heartbeat {rival.heartbeat_at:%Y-%m-%d %H:%M:%S}Z" if rival.heartbeat_at else ""
            raise TrainingBusyError(
                f"a training is already running for project {shown} (job {rival.id}, runner {rival.runner}{beat})"
            )
        since = rival.heartbeat_at or rival.started_at
        why = (
            f"abandoned: runner {rival.runner} is gone (last heartbeat "
            f"{since:%Y-%m-%d %H:%M:%S}Z); taken over by {_runner()}"
            if since
            else f"abandoned: runner {rival.runner} is gone; taken over by {_runner()}"
        )
        if _abandon(db, rival, why):
            log.warning("training job %s of %s: %s", rival.id, shown, why)
            took_over = int(rival.id)
    raise TrainingBusyError(f"could not claim the training slot of project {shown}: it keeps changing hands")


class Heartbeat:
    """Bumps the job's ``heartbeat_at`` in a thread while the run works; tells if the slot was lost."""

    def __init__(self, db: Engine, job_id: int, every_s: float) -> None:
        self.db, self.job_id, self.every_s = db, job_id, every_s
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"train-heartbeat-{job_id}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def beat(self) -> None:
        jobs = Job.__table__
        with self.db.begin() as conn:
            mine = conn.execute(
                update(jobs)
                .where(
                    jobs.c.id == self.job_id, jobs.c.status == JobStatus.RUNNING, jobs.c.runner == _runner()
                )
                .values(heartbeat_at=datetime.now(UTC))
            ).rowcount
        if not mine and not self.lost:
            self.lost = True
            log.error(
                "training job %s was taken over by another runner; this run's result will be dropped",
                self.job_id,
            )

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.beat()
            except Exception as exc:  # a database hiccup must not kill the training
                log.warning("training job %s: heartbeat failed: %s", self.job_id, exc)
