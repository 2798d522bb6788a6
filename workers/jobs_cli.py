"""``seemly jobs``: what the long-running jobs did, and why items failed.

::

    seemly jobs                      # the latest jobs of every project, one line each
    seemly jobs --project cats       # only that project's
    seemly jobs --job 12             # one job: its parameters, counts, and every failed item with its reason
    seemly jobs --job 12 --skipped   # ... and the skipped items too

Counts come from the job row, which the runner refreshes from ``job_items`` as it goes (and which
a finished job has final); failed items are read from ``job_items`` itself, so the list is complete.
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime
from typing import Any

from sqlalchemy import select

from seemly.config import Settings, get_settings
from seemly.db.models import ItemStatus, Job, JobItem, Project
from seemly.db.session import make_engine
from seemly.storage import display_uri

DEFAULT_LIMIT = 50


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def _describe(params: dict[str, Any]) -> str:
    parts = []
    if params.get("prefix"):
        parts.append(display_uri(str(params["prefix"])))
    for key in ("mode", "model_version"):
        if params.get(key):
            parts.append(str(params[key]))
    return " ".join(parts)


def _line(job: Any, project: str | None) -> str:
    return (
        f"job {job.id:<5} {job.kind:<11} {job.status.value if hasattr(job.status, 'value') else job.status:<9} "
        f"{project or '-':<20} total {job.items_total}: done {job.items_done}, skipped {job.items_skipped}, "
        f"failed {job.items_failed}, masks {job.masks_written}  started {_when(job.started_at)}  "
        f"{_describe(job.params or {})}"
    )


def main_for(
    settings: Settings,
    *,
    project: str | None = None,
    job_id: int | None = None,
    limit: int = DEFAULT_LIMIT,
    skipped: bool = False,
    out: Any = None,
) -> int:
    """Print the job list (or one job's report); returns the exit status."""
    out = out or sys.stdout
    db = make_engine(settings.database_url)
    jobs, projects = Job.__table__, Project.__table__
    try:
        with db.connect() as conn:
            names = dict(conn.execute(select(projects.c.id, projects.c.name)).all())
            if job_id is None:
                query = select(jobs).order_by(jobs.c.id.desc()).limit(limit)
                if project is not None:
                    project_id = next((i for i, n in names.items() if n == project), None)
                    if project_id is None:
                        print(f"error: no project named {project!r}", file=sys.stderr)
                        return 2
                    query = query.where(jobs.c.project_id == project_id)
                rows = conn.execute(query).all()
                if not rows:
                    print("no jobs", file=out)
                for job in rows:
                    print(_line(job, names.get(job.project_id)), file=out)
                return 0

            job = conn.execute(select(jobs).where(jobs.c.id == job_id)).one_or_none()
            if job is None:
                print(f"error: no job {job_id}", file=sys.stderr)
                return 2
            print(_line(job, names.get(job.project_id)), file=out)
            print(
                f"  runner {job.runner or '-'}, heartbeat {_when(job.heartbeat_at)}, "
                f"finished {_when(job.finished_at)}",
                file=out,
            )
            for key, value in sorted((job.params or {}).items()):
                print(f"  {key}: {display_uri(str(value)) if key == 'prefix' else value}", file=out)
            items = JobItem.__table__
            statuses = [ItemStatus.FAILED.value] + ([ItemStatus.SKIPPED.value] if skipped else [])
            rows = conn.execute(
                select(items.c.item_key, items.c.status, items.c.error, items.c.attempts)
                .where(items.c.job_id == job_id, items.c.status.in_(statuses))
                .order_by(items.c.status, items.c.item_key)
                .limit(limit)
            ).all()
            label = "failed and skipped items" if skipped else "failed items"
            print(f"{label} ({len(rows)}{' shown, more exist' if len(rows) == limit else ''}):", file=out)
            for key, status, error, attempts in rows:
                status_text = status.value if hasattr(status, "value") else status
                print(f"  {display_uri(key)}  [{status_text}, {attempts} attempt(s)]", file=out)
                for text in (error or "no reason recorded").splitlines()[:5]:
                    print(f"      {text}", file=out)
            return 0
    finally:
        db.dispose()


def configure(parser: argparse.ArgumentParser, words: tuple[str, ...]) -> None:
    parser.add_argument("--project", help="only this project's jobs")
    parser.add_argument("--job", type=int, metavar="ID", help="one job in detail, with its failed items")
    parser.add_argument("--skipped", action="store_true", help="with --job: list skipped items too")
    parser.add_argument(
        "--limit", type=int, default=DEFAULT_LIMIT, help=f"rows to show (default {DEFAULT_LIMIT})"
    )


def run(args: argparse.Namespace, words: tuple[str, ...]) -> int:
    return main_for(
        get_settings(), project=args.project, job_id=args.job, limit=max(1, args.limit), skipped=args.skipped
    )
