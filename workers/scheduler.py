"""``seemly train schedule``: decide, project by project, when to fine-tune; state only in Postgres.

A project is due for a training when (checked in this order):

1. **button** — it has a queued ``training_requests`` row (Label Studio's Train button, the
   ``START_TRAINING`` webhook), or a training whose runner died (its job is taken over and its
   requests served again);
2. **count** — at least ``min_new_corrections`` corrections arrived since the last run's
   ``corrections_upto``;
3. **interval** — ``interval_s`` passed since the last run (or since the project was created) and
   at least one correction arrived since then.

The policy is per project (``projects.settings["training"]``, :mod:`seemly.learning.policy`);
``enabled: false`` turns the automatic triggers (2, 3) off, an explicit request still trains.
A project whose training slot is held by a live run is skipped. Every fact used (requests, their
``corrections_upto`` and times, correction ids, jobs) is in the database, so a restarted scheduler
picks up exactly where the last one stopped, and several schedulers may run side by side: the
training slot (see :mod:`workers.train`) lets only one of them train a project at a time.

Trainings run one after another in the scheduler's process (each on Ray Train).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, func, select

from seemly.config import Settings, get_settings
from seemly.db.models import Correction, JobStatus, Project, TrainingReason, TrainingRequest
from seemly.learning.policy import PolicyError, policy_for

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Trigger:
    """A project that is due, and why."""

    project_id: int
    project: str
    reason: TrainingReason
    detail: str


@dataclass(frozen=True)
class Outcome:
    """What one tick did with one project: ``started`` / ``busy`` / ``failed`` / ``invalid``."""

    project: str
    status: str
    detail: str
    result: Any = None


def _last_run(db: Engine, project_id: int) -> tuple[int | None, datetime | None]:
    """(highest corrections_upto, time) of the project's requests a run has taken (any outcome)."""
    table = TrainingRequest.__table__
    taken = [JobStatus.RUNNING.value, JobStatus.SUCCEEDED.value, JobStatus.FAILED.value]
    with db.connect() as conn:
        row = conn.execute(
            select(func.max(table.c.corrections_upto), func.max(table.c.created_at)).where(
                table.c.project_id == project_id, table.c.status.in_(taken)
            )
        ).one()
    return (int(row[0]) if row[0] is not None else None, row[1])


def _new_corrections(db: Engine, project_id: int, after: int | None) -> int:
    where = [Correction.project_id == project_id]
    if after is not None:
        where.append(Correction.id > after)
    with db.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(Correction).where(*where)).scalar_one())


def _queued_requests(db: Engine, project_id: int) -> int:
    table = TrainingRequest.__table__
    with db.connect() as conn:
        return int(
            conn.execute(
                select(func.count())
                .select_from(table)
                .where(table.c.project_id == project_id, table.c.status == JobStatus.QUEUED)
            ).scalar_one()
        )


def due(
    db: Engine, settings: Settings, *, now: datetime | None = None, only: int | None = None
) -> tuple[list[Trigger], list[Outcome]]:
    """The projects to train now, and the ones skipped for a reason worth telling (bad policy, busy)."""
    from workers.train_slot import active_training, runner_alive

    now = now or datetime.now(UTC)
    table = Project.__table__
    query = select(table.c.id, table.c.name, table.c.settings, table.c.created_at).order_by(table.c.id)
    if only is not None:
        query = query.where(table.c.id == only)
    with db.connect() as conn:
        projects = conn.execute(query).all()
    triggers: list[Trigger] = []
    skipped: list[Outcome] = []
    for project in projects:
        pid, name = int(project.id), str(project.name)
        try:
            policy = policy_for(project.settings, settings, name)
        except PolicyError as exc:
            skipped.append(Outcome(name, "invalid", str(exc)))
            continue
        active = active_training(db, pid)
        if active is not None and runner_alive(
            active.runner, active.heartbeat_at, settings.train_stale_after_s
        ):
            skipped.append(Outcome(name, "busy", f"job {active.id} is training it"))
            continue
        if active is not None:  # its runner died: take the slot over and serve its requests again
            reason = TrainingReason((active.params or {}).get("reason", TrainingReason.BUTTON.value))
            triggers.append(
                Trigger(pid, name, reason, f"job {active.id} stopped without finishing; retrying")
            )
            continue
        queued = _queued_requests(db, pid)
        if queued:
            triggers.append(Trigger(pid, name, TrainingReason.BUTTON, f"{queued} queued training request(s)"))
            continue
        if not policy.enabled:
            continue
        last_upto, last_at = _last_run(db, pid)
        new = _new_corrections(db, pid, last_upto)
        if new >= policy.min_new_corrections:
            triggers.append(
                Trigger(
                    pid,
                    name,
                    TrainingReason.COUNT,
                    f"{new} new corrections (>= {policy.min_new_corrections})",
                )
            )
            continue
        since = last_at or project.created_at
        if new and since is not None and now - since >= timedelta(seconds=policy.interval_s):
            triggers.append(
                Trigger(
                    pid,
                    name,
                    TrainingReason.INTERVAL,
                    f"{new} new corrections and {(now - since).total_seconds():.0f}s since the last run",
                )
            )
    return triggers, skipped


Starter = Callable[[Trigger], Any]


def tick(
    settings: Settings | None = None,
    *,
    db: Engine | None = None,
    start: Starter | None = None,
    only: int | None = None,
) -> list[Outcome]:
    """One pass: train every due project (``start``, default :func:`workers.train.run_training`)."""
    from seemly.db.session import make_engine
    from workers.train import TrainingBusyError, TrainingError, run_training

    settings = settings or get_settings()
    own_db = db is None
    db = db or make_engine(settings.database_url)

    def default_start(trigger: Trigger) -> Any:
        return run_training(
            trigger.project, reason=trigger.reason, requested_by="scheduler", settings=settings, db=db
        )

    start = start or default_start
    try:
        triggers, outcomes = due(db, settings, only=only)
        for outcome in outcomes:
            if outcome.status == "invalid":
                log.error("scheduler: %s", outcome.detail)
        for trigger in triggers:
            log.info("scheduler: training %s (%s: %s)", trigger.project, trigger.reason.value, trigger.detail)
            try:
                result = start(trigger)
            except TrainingBusyError as exc:
                outcomes.append(Outcome(trigger.project, "busy", str(exc)))
            except TrainingError as exc:
                log.error("scheduler: training %s failed: %s", trigger.project, exc)
                outcomes.append(Outcome(trigger.project, "failed", str(exc)))
            else:
                outcomes.append(
                    Outcome(trigger.project, "started", f"{trigger.reason.value}: {trigger.detail}", result)
                )
        return outcomes
    finally:
        if own_db:
            db.dispose()


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def configure(parser: argparse.ArgumentParser, words: tuple[str, ...]) -> None:
    parser.add_argument("--once", action="store_true", help="one pass, then exit")
    parser.add_argument("--interval-s", type=float, default=60.0, help="seconds between passes (default 60)")
    parser.add_argument("--project", help="only this project (name or Label Studio project id)")


def run(args: argparse.Namespace, words: tuple[str, ...]) -> int:
    from seemly.db.session import make_engine
    from workers.train import TrainingError, resolve_project

    if args.interval_s <= 0:
        print("error: --interval-s must be positive", file=sys.stderr)
        return 2
    settings = get_settings()
    db = make_engine(settings.database_url)
    try:
        only = None
        if args.project:
            try:
                only = resolve_project(db, args.project)[0]
            except TrainingError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 2
        while True:
            for outcome in tick(settings, db=db, only=only):
                print(f"{outcome.project}: {outcome.status} — {outcome.detail}", flush=True)
            if args.once:
                return 0
            time.sleep(args.interval_s)
    except KeyboardInterrupt:
        return 0
    finally:
        db.dispose()
