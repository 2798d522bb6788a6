"""Training runs end to end on Ray Train (the session's local Ray), real Postgres, file:// artifacts.

Projects are a handful of 40 x 32 images with one blob each and the refiner trains for two steps:
what is under test is the plumbing (slot, data, TorchTrainer, artifact, gate, registry, requests,
takeover after a kill), not the model's quality, which ``seemly.learning``'s own tests measure.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from seemly.db.models import Job, JobStatus, ModelVersion, TrainingReason, TrainingRequest
from seemly.learning import versions
from seemly.learning.gate import GatePolicy
from seemly.learning.refiner import LearnedRefiner
from seemly.storage import Storage, parse_uri, path_to_uri
from tests.train_support import count, labelled_project, train_settings
from workers.scheduler import tick
from workers.train import TrainingError, TrainOptions, run_training

ROOT = Path(__file__).resolve().parents[1]
ACCEPT = GatePolicy(noc_margin=-1.0, miou_tolerance=1.0, allow_more_failures=True)  # anything passes
REFUSE = GatePolicy(noc_margin=1.0)  # would need 100 % fewer clicks: nothing passes


def options(**kwargs: object) -> TrainOptions:
    values: dict[str, object] = {
        "fit": {"epochs": 1, "max_steps": 2, "batch": 8},
        "sim_max_clicks": 2,
        "sim_sessions": 1,
        "eval_max_clicks": 3,
        "refresh_label_model": False,
        "heartbeat_s": 0.5,
    }
    values.update(kwargs)
    return TrainOptions(**values)  # type: ignore[arg-type]


def test_the_train_button_runs_a_training_on_ray_that_registers_gates_and_promotes(
    ray_local, postgres_db, postgres_url, tmp_path: Path
) -> None:
    project_id = labelled_project(postgres_db, tmp_path, images=6)
    settings = train_settings(postgres_url, tmp_path)
    with postgres_db.begin() as conn:  # what the backend records for Label Studio's Train button
        conn.execute(
            TrainingRequest.__table__.insert().values(
                project_id=project_id, reason=TrainingReason.BUTTON, corrections_upto=6
            )
        )
    started: list[object] = []

    def start(trigger):
        started.append(trigger)
        return run_training(
            trigger.project,
            reason=trigger.reason,
            settings=settings,
            options=options(gate=ACCEPT, refresh_label_model=True),
        )

    outcomes = tick(settings, db=postgres_db, start=start)
    assert [(o.project, o.status) for o in outcomes] == [("p-train", "started")]
    first = outcomes[0].result
    assert first.promoted and first.decision.reason.startswith("promote: NoC@90")

    # the artifact is a loadable refiner, written under the artifacts root, one folder per job
    location = parse_uri(first.artifact_uri)
    assert Path(location.path).is_file()  # type: ignore[union-attr]
    assert first.artifact_uri.endswith(f"/projects/{project_id}/train-{first.job_id}/refiner.pt")
    refiner = LearnedRefiner.load(first.artifact_uri, Storage(file_roots=[settings.home]))
    assert refiner.meta["job_id"] == first.job_id
    assert list((settings.home / "artifacts" / "ray_train").iterdir())  # Ray Train's run folder
    assert first.train_metrics["steps"] == 2 and first.train_metrics["use_gpu"] is False

    # the version row: no parent (the base engine was served), metrics and decision, promoted
    version = versions.get(postgres_db, first.version.id)
    assert version.name == f"p{project_id}-classic-ft1" and version.parent_id is None and version.promoted
    assert version.metrics["current_version"] == "classic (base)"
    assert {"noc90", "miou", "failures", "images", "current"} <= set(version.metrics)
    assert version.metrics["data"]["images"]["held_out"] >= 1
    assert version.decision is not None and version.decision["promote"] is True
    assert versions.promoted_version(postgres_db, project_id).id == version.id

    # the job and the button's request are done; the label model was refreshed too
    with postgres_db.connect() as conn:
        job = conn.execute(select(Job.__table__).where(Job.id == first.job_id)).one()
        request = conn.execute(select(TrainingRequest.__table__)).one()
    assert job.kind == "train" and job.status == JobStatus.SUCCEEDED and job.finished_at is not None
    assert job.params["corrections_upto"] == request.corrections_upto == 6
    assert request.status == JobStatus.SUCCEEDED and request.model_version_id == version.id
    assert request.reason == TrainingReason.BUTTON and request.job_id == first.job_id
    assert first.label_model and first.label_model.endswith(f"project-{project_id}.npz")

    # nothing new since: the next pass has nothing to do
    assert tick(settings, db=postgres_db, start=start) == [] and len(started) == 1


def test_bad_project_and_too_little_data_are_clear(
    ray_local, postgres_db, postgres_url, tmp_path: Path
) -> None:
    settings = train_settings(postgres_url, tmp_path)
    labelled_project(postgres_db, tmp_path, images=1, name="tiny", ls_project_id=42)
    with pytest.raises(
        TrainingError,
        match=r"no project named 'nope' or with Label Studio project id 'nope'; known projects: tiny",
    ):
        run_training("nope", settings=settings, options=options())
    with pytest.raises(
        TrainingError, match=r"tiny has 1 labelled region\(s\) on 1 image\(s\); training needs"
    ):
        run_training("42", settings=settings, options=options())  # by Label Studio project id
    with postgres_db.connect() as conn:
        job = conn.execute(select(Job.__table__)).one()
        request = conn.execute(select(TrainingRequest.__table__)).one()
    assert (
        job.status == JobStatus.FAILED
        and "training needs regions on at least 2 images" in job.errors[-1]["error"]
    )
    assert request.status == JobStatus.FAILED
    assert count(postgres_db, ModelVersion.__table__) == 0
    # the slot is free again: a second attempt fails the same way, not with "already running"
    with pytest.raises(TrainingError, match="training needs"):
        run_training("tiny", settings=settings, options=options())


def test_a_killed_run_leaves_no_version_and_the_next_run_takes_over(
    ray_local, postgres_db, postgres_url, tmp_path: Path
) -> None:
    project_id = labelled_project(postgres_db, tmp_path, images=6)
    # the project already serves a fine-tune (an untrained refiner is a valid one)
    parent_uri = path_to_uri(tmp_path / "parent" / "refiner.pt")
    LearnedRefiner.untrained().save(parent_uri, Storage(file_roots=[tmp_path]))
    parent = versions.register_candidate(
        postgres_db, project_id, "classic", parent_id=None, artifact_uri=parent_uri
    )
    versions.promote(postgres_db, parent.id)
    env = {
        **os.environ,
        "SEEMLY_DATABASE_URL": postgres_url,
        "SEEMLY_HOME": str(tmp_path / "home"),
        "SEEMLY_FILE_ROOTS": str(tmp_path),
        "SEEMLY_RAY_ADDRESS": ray_local,
        "SEEMLY_RAY_NUM_CPUS_PER_ACTOR": "0.5",
        "SEEMLY_TRAIN_EPOCHS": "200",  # long enough to be killed in the middle
        "SEEMLY_TRAIN_HELD_OUT_SHARE": "0.34",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    command = [sys.executable, "-m", "seemly.cli", "train", "run", "--project", "p-train", "--no-label-model"]
    driver = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    killed_job = None
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and driver.poll() is None:
            with postgres_db.connect() as conn:
                killed_job = conn.execute(select(Job.__table__).where(Job.kind == "train")).first()
            # the run is under way once Ray Train has written its run folder
            train_dir = tmp_path / "home" / "artifacts" / "ray_train"
            if killed_job is not None and train_dir.is_dir() and any(train_dir.iterdir()):
                time.sleep(1.0)
                driver.send_signal(signal.SIGKILL)
                break
            time.sleep(0.1)
    finally:
        if driver.poll() is None and killed_job is None:
            driver.kill()
        output = driver.communicate(timeout=60)[0].decode(errors="replace")
    assert driver.returncode == -signal.SIGKILL, (
        f"the driver ended on its own before the kill:\n{output[-3000:]}"
    )
    assert killed_job is not None
    with postgres_db.connect() as conn:
        job = conn.execute(select(Job.__table__).where(Job.id == killed_job.id)).one()
    assert job.status == JobStatus.RUNNING  # nobody got to say otherwise
    assert count(postgres_db, ModelVersion.__table__) == 1  # no half-registered version

    settings = train_settings(postgres_url, tmp_path)
    result = run_training("p-train", settings=settings, options=options(gate=REFUSE))
    assert result.took_over == killed_job.id
    with postgres_db.connect() as conn:
        old = conn.execute(select(Job.__table__).where(Job.id == killed_job.id)).one()
        requests = conn.execute(select(TrainingRequest.__table__).order_by(TrainingRequest.id)).all()
    assert old.status == JobStatus.FAILED and "abandoned: runner" in old.errors[-1]["error"]
    # the killed run's request was re-queued and served by the new run: one request, one version
    assert [(r.status, r.job_id) for r in requests] == [(JobStatus.SUCCEEDED, result.job_id)]
    # one new version, fine-tuned from the served one, refused by the gate: the parent stays served
    names = [v.name for v in versions.list_versions(postgres_db, project_id)]
    assert names == [f"p{project_id}-classic-ft1", f"p{project_id}-classic-ft2"]
    refused = versions.get(postgres_db, result.version.id)
    assert refused.parent_id == parent.id and not refused.promoted
    assert refused.decision["promote"] is False and refused.decision["reason"].startswith("keep current:")
    assert refused.metrics["current_version"] == parent.name
    assert versions.promoted_version(postgres_db, project_id).id == parent.id
