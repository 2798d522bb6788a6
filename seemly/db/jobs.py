"""Job bookkeeping shared by every runner (the demo, the Ray Data bucket job, training).

The truth about a job's progress is its ``job_items`` rows; the counters on ``jobs`` are derived
from them (:func:`refresh_counts`), so a replayed or resumed job can never double-count. An item's
masks and its ``done`` mark are written in one transaction (:func:`complete_item`): see the
exactly-once argument in :mod:`seemly.db.bulk`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, func, select, update

from seemly.db.bulk import upsert_images, write_masks
from seemly.db.models import ItemStatus, Job, JobItem, JobStatus

MAX_ERROR_SAMPLES = 50


def create_job(engine: Engine, kind: str, *, project_id: int | None, params: Mapping[str, Any]) -> int:
    with engine.begin() as conn:
        job_id = conn.execute(
            Job.__table__.insert()
            .values(
                kind=kind,
                project_id=project_id,
                params=dict(params),
                status=JobStatus.RUNNING,
                started_at=datetime.now(UTC),
                heartbeat_at=datetime.now(UTC),
            )
            .returning(Job.__table__.c.id)
        ).scalar_one()
    return int(job_id)


def pending_item_keys(engine: Engine, job_id: int, keys: Iterable[str]) -> set[str]:
    """Those of ``keys`` not yet ``done`` or ``skipped`` in this job (what a resume must redo)."""
    keys = list(keys)
    if not keys:
        return set()
    table = JobItem.__table__
    with engine.connect() as conn:
        finished = set(
            conn.execute(
                select(table.c.item_key).where(
                    table.c.job_id == job_id,
                    table.c.item_key.in_(keys),
                    table.c.status.in_([ItemStatus.DONE.value, ItemStatus.SKIPPED.value]),
                )
            ).scalars()
        )
    return set(keys) - finished


def complete_item(
    engine: Engine,
    job_id: int,
    item_key: str,
    *,
    image: Mapping[str, Any],
    mask_rows: Iterable[Mapping[str, Any]],
) -> int:
    """Store an item's image, masks and ``done`` mark atomically; returns masks newly written.

    ``mask_rows`` are :func:`seemly.db.bulk.mask_row` dicts without ``image_id`` (filled here).
    """
    with engine.begin() as conn:
        image_id = upsert_images(conn, [image])[str(image["sha256"]).lower()]
        rows = [{**row, "image_id": image_id, "job_id": job_id} for row in mask_rows]
        written = write_masks(conn, rows)
        _set_item(conn, job_id, item_key, ItemStatus.DONE, image_id=image_id, mask_count=len(rows))
    return written


def fail_item(engine: Engine, job_id: int, item_key: str, error: str, *, skipped: bool = False) -> None:
    """Record why an item could not be processed; a resumed job retries failed (not skipped) items."""
    with engine.begin() as conn:
        _set_item(
            conn, job_id, item_key, ItemStatus.SKIPPED if skipped else ItemStatus.FAILED, error=error[:2000]
        )


def _set_item(conn: Any, job_id: int, item_key: str, status: ItemStatus, **values: Any) -> None:
    table = JobItem.__table__
    result = conn.execute(
        update(table)
        .where(table.c.job_id == job_id, table.c.item_key == item_key)
        .values(status=status, attempts=table.c.attempts + 1, **values)
    )
    if result.rowcount == 0:
        conn.execute(
            table.insert().values(job_id=job_id, item_key=item_key, status=status, attempts=1, **values)
        )


def refresh_counts(engine: Engine, job_id: int) -> dict[str, int]:
    """Recompute the job's counters from its items (and bump its heartbeat); returns them."""
    items, jobs = JobItem.__table__, Job.__table__
    with engine.begin() as conn:
        by_status = dict(
            conn.execute(
                select(items.c.status, func.count()).where(items.c.job_id == job_id).group_by(items.c.status)
            ).all()
        )
        masks = conn.execute(
            select(func.coalesce(func.sum(items.c.mask_count), 0)).where(items.c.job_id == job_id)
        )
        counts = {
            "total": sum(by_status.values()),
            "done": int(by_status.get(ItemStatus.DONE, 0)),
            "skipped": int(by_status.get(ItemStatus.SKIPPED, 0)),
            "failed": int(by_status.get(ItemStatus.FAILED, 0)),
            "masks": int(masks.scalar_one()),
        }
        errors = [
            {"item": key, "error": error}
            for key, error in conn.execute(
                select(items.c.item_key, items.c.error)
                .where(items.c.job_id == job_id, items.c.status == ItemStatus.FAILED)
                .order_by(items.c.id)
                .limit(MAX_ERROR_SAMPLES)
            )
        ]
        conn.execute(
            update(jobs)
            .where(jobs.c.id == job_id)
            .values(
                items_total=counts["total"],
                items_done=counts["done"],
                items_skipped=counts["skipped"],
                items_failed=counts["failed"],
                masks_written=counts["masks"],
                errors=errors,
                heartbeat_at=datetime.now(UTC),
            )
        )
    return counts


def finish_job(engine: Engine, job_id: int, status: JobStatus) -> dict[str, int]:
    counts = refresh_counts(engine, job_id)
    with engine.begin() as conn:
        conn.execute(
            update(Job.__table__)
            .where(Job.__table__.c.id == job_id)
            .values(status=status, finished_at=datetime.now(UTC))
        )
    return counts
