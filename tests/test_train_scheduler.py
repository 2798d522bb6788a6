"""The scheduler's triggers and the training slot, on real Postgres (no Ray: the start is recorded).

The slot is the partial unique index ``uq_jobs_one_active_training``; these tests race real
connections against it and check that a dead runner's job is taken over while a live one's is not.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update

from seemly.db.models import Job, JobStatus, Project, TrainingReason, TrainingRequest
from tests.train_support import (
    add_correction,
    add_image,
    count,
    labelled_project,
    make_project,
    train_settings,
)
from workers.presegment import _runner
from workers.scheduler import due, tick
from workers.train_slot import TrainingBusyError, claim_training_slot


def _settings(postgres_url: str, tmp_path: Path, **overrides: object):
    return train_settings(postgres_url, tmp_path, train_min_new_corrections=3, **overrides)


def _request(
    db, project_id: int, *, status: JobStatus, upto: int | None, created_at: datetime | None = None
) -> None:
    values: dict[str, object] = {
        "project_id": project_id,
        "reason": TrainingReason.COUNT,
        "status": status,
        "corrections_upto": upto,
    }
    if created_at is not None:
        values["created_at"] = created_at
    with db.begin() as conn:
        conn.execute(TrainingRequest.__table__.insert().values(**values))


def test_count_trigger_counts_corrections_since_the_last_run(
    postgres_db, postgres_url, tmp_path: Path
) -> None:
    settings = _settings(postgres_url, tmp_path)
    project_id = labelled_project(postgres_db, tmp_path, images=2)
    triggers, _ = due(postgres_db, settings)
    assert triggers == []  # 2 corrections < 3
    image_id, masks = add_image(postgres_db, tmp_path, 77)
    add_correction(postgres_db, project_id, image_id, masks[0], annotation=9)
    (trigger,) = due(postgres_db, settings)[0]
    assert trigger.reason == TrainingReason.COUNT and trigger.detail == "3 new corrections (>= 3)"

    started = []
    outcomes = tick(settings, db=postgres_db, start=started.append)
    assert [o.status for o in outcomes] == ["started"] and started == [trigger]

    # a run took them (whatever its outcome): counting starts again after its corrections_upto
    _request(postgres_db, project_id, status=JobStatus.FAILED, upto=3)
    assert due(postgres_db, settings)[0] == []
    for n in range(3):
        add_correction(postgres_db, project_id, image_id, masks[0], annotation=20 + n)
    assert [t.detail for t in due(postgres_db, settings)[0]] == ["3 new corrections (>= 3)"]
    # a per-project policy wins over the settings; disabled = no automatic trigger
    with postgres_db.begin() as conn:
        conn.execute(
            update(Project.__table__)
            .where(Project.id == project_id)
            .values(settings={"training": {"min_new_corrections": 5}})
        )
    assert due(postgres_db, settings)[0] == []
    with postgres_db.begin() as conn:
        conn.execute(
            update(Project.__table__)
            .where(Project.id == project_id)
            .values(settings={"training": {"enabled": False, "min_new_corrections": 1}})
        )
    assert due(postgres_db, settings)[0] == []


def test_button_request_triggers_even_when_automatic_training_is_off(
    postgres_db, postgres_url, tmp_path: Path
) -> None:
    settings = _settings(postgres_url, tmp_path)
    project_id = labelled_project(postgres_db, tmp_path, images=2, training={"enabled": False})
    assert due(postgres_db, settings)[0] == []
    with postgres_db.begin() as conn:  # what the backend's START_TRAINING webhook records
        conn.execute(
            TrainingRequest.__table__.insert().values(project_id=project_id, reason=TrainingReason.BUTTON)
        )
    (trigger,) = due(postgres_db, settings)[0]
    assert trigger.reason == TrainingReason.BUTTON and trigger.detail == "1 queued training request(s)"


def test_interval_trigger_needs_time_and_new_data(postgres_db, postgres_url, tmp_path: Path) -> None:
    settings = _settings(postgres_url, tmp_path, train_interval_s=3600)
    project_id = labelled_project(postgres_db, tmp_path, images=2)
    long_ago = datetime.now(UTC) - timedelta(hours=2)
    _request(postgres_db, project_id, status=JobStatus.SUCCEEDED, upto=2, created_at=long_ago)
    assert due(postgres_db, settings)[0] == []  # time passed, but nothing new
    image_id, masks = add_image(postgres_db, tmp_path, 78)
    add_correction(postgres_db, project_id, image_id, masks[0], annotation=9)
    (trigger,) = due(postgres_db, settings)[0]
    assert trigger.reason == TrainingReason.INTERVAL and trigger.detail.startswith("1 new corrections and 7")
    assert due(postgres_db, settings, now=long_ago + timedelta(minutes=30))[0] == []  # too early


def test_invalid_policy_is_reported_and_other_projects_go_on(
    postgres_db, postgres_url, tmp_path: Path
) -> None:
    settings = _settings(postgres_url, tmp_path)
    labelled_project(
        postgres_db, tmp_path, images=1, name="bad", ls_project_id=1, training={"min_new_corrections": "x"}
    )
    labelled_project(postgres_db, tmp_path, images=3, name="good", ls_project_id=2)
    triggers, skipped = due(postgres_db, settings)
    assert [t.project for t in triggers] == ["good"]
    (invalid,) = skipped
    assert (
        invalid.status == "invalid"
        and 'project bad: settings["training"] is invalid: min_new_corrections' in invalid.detail
    )


def test_two_concurrent_claims_exactly_one_wins(postgres_db, tmp_path: Path) -> None:
    project_id = make_project(postgres_db)
    barrier = threading.Barrier(4)
    won: list[int] = []
    lost: list[str] = []

    def claim() -> None:
        barrier.wait()
        try:
            won.append(
                claim_training_slot(
                    postgres_db, project_id, params={}, stale_after_s=600, project_name="p-train"
                )[0]
            )
        except TrainingBusyError as exc:
            lost.append(str(exc))

    threads = [threading.Thread(target=claim) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(won) == 1 and len(lost) == 3
    assert all(m.startswith(f"a training is already running for project p-train (job {won[0]}") for m in lost)
    assert count(postgres_db, Job.__table__, Job.kind == "train") == 1
    # the scheduler skips a project whose slot a live runner holds
    labelled = add_image(postgres_db, tmp_path, 5)
    for n in range(3):
        add_correction(postgres_db, project_id, labelled[0], labelled[1][0], annotation=n)
    triggers, skipped = due(postgres_db, train_settings("", tmp_path, train_min_new_corrections=1))
    assert triggers == [] and [(s.status, s.detail) for s in skipped] == [
        ("busy", f"job {won[0]} is training it")
    ]


def test_a_stale_runner_is_taken_over_and_its_requests_requeued(postgres_db, tmp_path: Path) -> None:
    project_id = make_project(postgres_db)
    old = datetime.now(UTC) - timedelta(hours=1)
    with postgres_db.begin() as conn:
        dead = conn.execute(
            Job.__table__.insert()
            .values(
                kind="train",
                project_id=project_id,
                status=JobStatus.RUNNING,
                runner="elsewhere:1",
                heartbeat_at=old,
            )
            .returning(Job.id)
        ).scalar_one()
        conn.execute(
            TrainingRequest.__table__.insert().values(
                project_id=project_id, reason=TrainingReason.BUTTON, status=JobStatus.RUNNING, job_id=dead
            )
        )
    # the scheduler retries it (the run it starts takes the slot over)
    (trigger,) = due(postgres_db, train_settings("", tmp_path))[0]
    assert trigger.detail == f"job {dead} stopped without finishing; retrying"
    # a fresh heartbeat on another host: alive, not taken over
    with postgres_db.begin() as conn:
        conn.execute(update(Job.__table__).where(Job.id == dead).values(heartbeat_at=datetime.now(UTC)))
    with pytest.raises(TrainingBusyError, match=f"job {dead}, runner elsewhere:1"):
        claim_training_slot(postgres_db, project_id, params={}, stale_after_s=600)
    with postgres_db.begin() as conn:
        conn.execute(update(Job.__table__).where(Job.id == dead).values(heartbeat_at=old))

    job_id, took_over = claim_training_slot(postgres_db, project_id, params={}, stale_after_s=600)
    assert took_over == dead and job_id != dead
    with postgres_db.connect() as conn:
        old_job = conn.execute(select(Job.__table__).where(Job.id == dead)).one()
        new_job = conn.execute(select(Job.__table__).where(Job.id == job_id)).one()
        request = conn.execute(select(TrainingRequest.__table__)).one()
    assert old_job.status == JobStatus.FAILED and old_job.errors[-1]["error"].startswith(
        "abandoned: runner elsewhere:1 is gone"
    )
    assert new_job.status == JobStatus.RUNNING and new_job.runner == _runner()
    assert request.status == JobStatus.QUEUED and request.job_id is None  # the next run serves it
