"""``seemly train run``: fine-tune a project's model on Ray Train, gate it, register (and promote) it.

What trains is the learned part of the engine the project is served with (its promoted version's
engine, or its policy's ``base_engine`` while none is promoted): the classic engine's refiner, or
SAM's mask decoder (:mod:`workers.train_sam`). One run, in order (each step's failure fails the job
with a clear message, nothing half-done is ever served)::

    claim the project's training slot  (jobs row kind=train, status=running; the partial unique
        index uq_jobs_one_active_training refuses a second one; a dead runner's job is taken over)
    load data     corrections + human masks up to fixed ids, images through seemly.storage,
                  split train / held-out by image sha256        (seemly.learning.data)
    simulate      classic: click sessions of the current engine on the training pairs -> refiner examples
                  sam: the training images and masks in SAM's input frame (prompts are simulated
                  in the worker, from the decoder's own predictions)
    fit           Ray Train TorchTrainer (workers.train_ray): fit_refiner / fit_decoder in the
                  worker(s), a checkpoint per epoch
    artifact      <artifacts>/projects/<p>/train-<job>/refiner.pt, or sam.pth: the whole fine-tuned
                  SAM checkpoint (written whole)
    evaluate      candidate and current (promoted version or base engine) on the held-out pairs
    gate          seemly.learning.gate.decide
    register      one transaction: the version row (parent = current), its metrics and decision,
                  and the promotion when the gate says so; only if this job still holds the slot
    label model   retrained from the same masks (text prompts); a failure here is reported, not fatal
    finish        the job and its training_requests succeeded (or failed, with the reason)

A killed driver leaves its job ``running``: the next run (or scheduler tick) sees that its runner
is gone (same host, dead pid) or its heartbeat is older than ``SEEMLY_TRAIN_STALE_AFTER_S``, marks
it failed, re-queues its training requests and takes the slot. Because the version row is written
only after the artifact exists and in the same transaction as its decision, a killed run leaves at
most an unreferenced artifact folder, never a version.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, select, update

from seemly.config import Settings, get_settings
from seemly.db.models import Job, JobStatus, Project, TrainingReason, TrainingRequest
from seemly.learning import versions
from seemly.learning.artifacts import artifact_storage, artifact_uri, local_root
from seemly.learning.data import (
    TrainingData,
    TrainingDataError,
    TrainingPair,
    data_bounds,
    load_training_data,
)
from seemly.learning.gate import Decision, EvalMetrics, GatePolicy, decide
from seemly.learning.policy import PolicyError, TrainingPolicy, policy_for
from workers.presegment import _runner
from workers.train_refiner import train_refiner
from workers.train_sam import sam_engine, served_engine, train_sam
from workers.train_slot import (
    MAX_ERRORS,
    Heartbeat,
    TrainingBusyError,
    TrainingError,
    claim_training_slot,
)

log = logging.getLogger(__name__)

ENGINE = "classic"  # the refiner is the classic engine's learned part; the label model uses it too


@dataclass
class TrainOptions:
    """Knobs of one run beyond the project's policy; tests shrink them."""

    # FitConfig (classic) or DecoderFitConfig (sam) fields over the policy's epochs
    fit: dict[str, Any] = field(default_factory=dict)
    sim_max_clicks: int = 6
    sim_sessions: int = 2
    eval_max_clicks: int = 20
    num_workers: int | None = None  # default: SEEMLY_TRAIN_NUM_WORKERS
    use_gpu: bool | None = None  # default: when the cluster has GPUs
    heartbeat_s: float = 10.0
    stale_after_s: float | None = None  # default: SEEMLY_TRAIN_STALE_AFTER_S
    gate: GatePolicy | None = None  # default: the project's policy
    refresh_label_model: bool = True
    seed: int = 0


@dataclass
class TrainingResult:
    job_id: int
    project_id: int
    version: versions.VersionInfo
    parent: versions.VersionInfo | None
    decision: Decision
    artifact_uri: str
    data: dict[str, Any]
    failed_images: list[dict[str, Any]]
    train_metrics: dict[str, Any]
    label_model: str | None  # its URI, or why it was not refreshed
    took_over: int | None = None  # the dead job this run replaced
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def promoted(self) -> bool:
        return self.decision.promote


# --------------------------------------------------------------------------------------------
# projects
# --------------------------------------------------------------------------------------------
def resolve_project(db: Engine, ref: str | int) -> tuple[int, str, dict[str, Any]]:
    """``(id, name, settings)`` of a project given by name or by its Label Studio project id."""
    text = str(ref).strip()
    if not text:
        raise TrainingError("--project needs a project name or a Label Studio project id")
    table = Project.__table__
    with db.connect() as conn:
        row = conn.execute(
            select(table.c.id, table.c.name, table.c.settings).where(table.c.name == text)
        ).first()
        if row is None and text.isdigit():
            row = conn.execute(
                select(table.c.id, table.c.name, table.c.settings).where(table.c.ls_project_id == int(text))
            ).first()
        if row is None:
            known = conn.execute(select(table.c.name).order_by(table.c.name).limit(10)).scalars().all()
    if row is None:
        hint = f"; known projects: {', '.join(known)}" if known else "; there are no projects yet"
        raise TrainingError(f"no project named {text!r} or with Label Studio project id {text!r}{hint}")
    return int(row.id), str(row.name), dict(row.settings or {})


# --------------------------------------------------------------------------------------------
# training requests
# --------------------------------------------------------------------------------------------
def _take_requests(
    db: Engine,
    project_id: int,
    job_id: int,
    reason: TrainingReason,
    requested_by: str | None,
    corrections_now: int | None,
) -> tuple[list[int], int | None]:
    """Attach the project's queued requests to this job (or create one); returns (ids, corrections_upto)."""
    table = TrainingRequest.__table__
    with db.begin() as conn:
        rows = conn.execute(
            select(table.c.id, table.c.corrections_upto)
            .where(table.c.project_id == project_id, table.c.status == JobStatus.QUEUED)
            .order_by(table.c.id)
            .with_for_update(skip_locked=True)
        ).all()
        if not rows:
            new_id = conn.execute(
                table.insert()
                .values(
                    project_id=project_id,
                    reason=reason,
                    requested_by=requested_by,
                    corrections_upto=corrections_now,
                    status=JobStatus.RUNNING,
                    job_id=job_id,
                )
                .returning(table.c.id)
            ).scalar_one()
            return [int(new_id)], corrections_now
        ids = [int(r.id) for r in rows]
        conn.execute(update(table).where(table.c.id.in_(ids)).values(status=JobStatus.RUNNING, job_id=job_id))
        # a request recorded before any correction existed still wants whatever is there now
        bounds = [int(r.corrections_upto) for r in rows if r.corrections_upto is not None]
        upto = max(bounds) if bounds else corrections_now
        conn.execute(
            update(table)
            .where(table.c.id.in_(ids), table.c.corrections_upto.is_(None))
            .values(corrections_upto=upto)
        )
        return ids, upto


def _finish(
    db: Engine,
    job_id: int,
    request_ids: Sequence[int],
    status: JobStatus,
    *,
    errors: list[dict[str, Any]] | None = None,
    version_id: int | None = None,
    params: dict[str, Any] | None = None,
) -> None:
    jobs, requests = Job.__table__, TrainingRequest.__table__
    values: dict[str, Any] = {
        "status": status,
        "finished_at": datetime.now(UTC),
        "heartbeat_at": datetime.now(UTC),
    }
    if errors is not None:
        values["errors"] = errors[-MAX_ERRORS:]
        values["items_failed"] = sum(1 for e in errors if "image_id" in e)
    if params is not None:
        values["params"] = params
    with db.begin() as conn:
        conn.execute(
            update(jobs)
            .where(jobs.c.id == job_id, jobs.c.status == JobStatus.RUNNING, jobs.c.runner == _runner())
            .values(**values)
        )
        if request_ids:
            conn.execute(
                update(requests)
                .where(requests.c.id.in_(list(request_ids)), requests.c.job_id == job_id)
                .values(status=status, model_version_id=version_id)
            )


# --------------------------------------------------------------------------------------------
# examples, Ray Train, evaluation
# --------------------------------------------------------------------------------------------
def _base_engine(name: str, options: dict[str, Any], storage: Any, settings: Settings | None = None) -> Any:
    """The engine the project is served with now (see :func:`workers.train_sam.served_engine`)."""
    from seemly.engines.base import create_engine

    if name == "sam":
        return sam_engine(options["checkpoint"], storage, settings or get_settings())
    if not options:
        return create_engine(ENGINE)
    return create_engine(name, storage=storage, **options)


def _served_now(
    parent: versions.VersionInfo | None,
    engine_name: str,
    engine_options: dict[str, Any],
    base: Any,
    settings: Settings,
) -> tuple[Any, str]:
    """(engine, name) the gate measures the candidate against: what the project's annotators get now.

    That is the engine training starts from, except when nothing is promoted and the project's
    policy names another base engine than ``SEEMLY_ENGINE`` (a project opting into SAM
    fine-tuning while the backend serves the classic engine): its first candidate must beat the
    engine actually served, since promoting it switches the project over.
    """
    from seemly.engines.base import EngineError, configured_engine_spec, create_engine

    if parent is not None:
        return base, parent.name
    name, options = configured_engine_spec(settings)
    if (name, options.get("checkpoint")) == (engine_name, engine_options.get("checkpoint")):
        return base, f"{engine_name} (base)"
    try:
        return create_engine(name, **options), f"{name} (served base)"
    except EngineError as exc:
        raise TrainingError(f"cannot load the served base engine {name!r} to gate against: {exc}") from None


def _samples(pairs: Sequence[TrainingPair]) -> list[Any]:
    from seemly.bench.datasets import Sample

    return [
        Sample(f"{p.sha256[:12]}-{p.key}", p.image, p.gt, None, Path(f"{p.sha256[:12]}-{p.key}"))
        for p in pairs
    ]


def evaluate(engine: Any, pairs: Sequence[TrainingPair], max_clicks: int) -> EvalMetrics:
    from seemly.learning.evaluate import evaluate_engine

    return EvalMetrics.from_result(evaluate_engine(engine, _samples(pairs), max_clicks=max_clicks))


# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------
def _register(
    db: Engine,
    job_id: int,
    project_id: int,
    engine_name: str,
    parent: versions.VersionInfo | None,
    uri: str,
    metrics: dict[str, Any],
    decision: Decision,
) -> versions.VersionInfo:
    """Version row + decision (+ promotion) in one transaction, only while this job holds the slot."""
    jobs = Job.__table__
    with db.begin() as conn:
        mine = conn.execute(
            select(jobs.c.id)
            .where(jobs.c.id == job_id, jobs.c.status == JobStatus.RUNNING, jobs.c.runner == _runner())
            .with_for_update()
        ).first()
        if mine is None:
            raise TrainingError(
                f"job {job_id} lost its training slot (taken over as dead); its candidate is not registered"
            )
        info = versions.register_candidate(
            conn,
            project_id,
            engine_name,
            parent_id=parent.id if parent else None,
            artifact_uri=uri,
            metrics=metrics,
        )
        versions.record_decision(conn, info.id, decision.as_record())
        if decision.promote:
            info = versions.promote(conn, info.id)
        return versions.get(conn, info.id)


def _refresh_label_model(db: Engine, project_id: int, job_id: int, settings: Settings) -> str:
    """Retrain the project's label model; returns its URI or why it was not refreshed."""
    from seemly.engines.base import create_engine
    from seemly.engines.label_model import (
        LabelModelError,
        default_label_model_uri,
        label_model_storage,
        record_label_model,
        train_label_model,
    )
    from seemly.storage import Storage

    if local_root(settings) is None:
        storage = Storage.from_settings(settings)
        uri = artifact_uri(settings, project_id, job_id, "label-model.npz")
    else:
        storage = label_model_storage(settings)
        uri = default_label_model_uri(project_id, settings)
    try:
        model = train_label_model(db, project_id, storage=storage, engine=create_engine(ENGINE))
    except LabelModelError as exc:
        return f"not refreshed: {exc}"
    model.save(uri, storage)
    record_label_model(db, project_id, uri, model)
    return uri


def run_training(
    project: str | int,
    *,
    reason: TrainingReason | str = TrainingReason.BUTTON,
    requested_by: str | None = None,
    settings: Settings | None = None,
    options: TrainOptions | None = None,
    db: Engine | None = None,
    progress: Callable[[str], None] | None = None,
) -> TrainingResult:
    """Train, gate and register one version of ``project`` (name or Label Studio id); see the module docstring.

    Raises :class:`TrainingError` (with the job marked failed when one was claimed) on anything
    that stops the run; :class:`TrainingBusyError` when a live run holds the project's slot.
    """
    from seemly.db.session import make_engine

    settings = settings or get_settings()
    options = options or TrainOptions()
    reason = TrainingReason(reason)
    say = progress or (lambda message: log.info("%s", message))
    own_db = db is None
    db = db or make_engine(settings.database_url)
    try:
        project_id, name, project_settings = resolve_project(db, project)
        try:
            policy: TrainingPolicy = policy_for(project_settings, settings, name)
        except PolicyError as exc:
            raise TrainingError(str(exc)) from None
        corrections_now, masks_upto = data_bounds(db, project_id)
        params: dict[str, Any] = {"reason": reason.value, "masks_upto": masks_upto, "engine": ENGINE}
        job_id, took_over = claim_training_slot(
            db,
            project_id,
            params=params,
            stale_after_s=options.stale_after_s or settings.train_stale_after_s,
            project_name=name,
        )
        request_ids, corrections_upto = _take_requests(
            db, project_id, job_id, reason, requested_by, corrections_now
        )
        params.update({"corrections_upto": corrections_upto, "request_ids": request_ids})
        say(f"job {job_id}: training project {name} ({reason.value}), corrections up to {corrections_upto}")
        errors: list[dict[str, Any]] = []
        try:
            with Heartbeat(db, job_id, options.heartbeat_s) as heartbeat:
                result = _run(
                    db, job_id, project_id, name, policy, params, settings, options, errors, say, took_over
                )
                if heartbeat.lost:
                    raise TrainingError(f"job {job_id} was taken over while it ran")
        except BaseException as exc:
            message = (
                str(exc)
                if isinstance(exc, TrainingError | TrainingDataError)
                else f"{type(exc).__name__}: {exc}"
            )
            status = JobStatus.CANCELLED if isinstance(exc, KeyboardInterrupt) else JobStatus.FAILED
            try:
                _finish(
                    db,
                    job_id,
                    request_ids,
                    status,
                    errors=[*errors, {"error": message[:2000]}],
                    params=params,
                )
            except Exception:  # the database is gone too: the stale heartbeat frees the slot later
                log.exception("training job %s: could not record its failure", job_id)
            if isinstance(exc, TrainingError):
                raise
            if isinstance(exc, TrainingDataError):
                raise TrainingError(message) from None
            if isinstance(exc, Exception):
                raise TrainingError(f"job {job_id} failed: {message}") from exc
            raise
        _finish(
            db,
            job_id,
            request_ids,
            JobStatus.SUCCEEDED,
            errors=errors,
            version_id=result.version.id,
            params=params,
        )
        return result
    finally:
        if own_db:
            db.dispose()


def _run(
    db: Engine,
    job_id: int,
    project_id: int,
    name: str,
    policy: TrainingPolicy,
    params: dict[str, Any],
    settings: Settings,
    options: TrainOptions,
    errors: list[dict[str, Any]],
    say: Callable[[str], None],
    took_over: int | None,
) -> TrainingResult:
    from seemly.storage import Storage

    seconds: dict[str, float] = {}
    clock = time.perf_counter()
    artifacts = artifact_storage(settings)
    data: TrainingData = load_training_data(
        db,
        project_id,
        Storage.from_settings(settings),
        corrections_upto=params["corrections_upto"],
        masks_upto=params["masks_upto"],
        held_out_share=policy.held_out_share,
        max_images=policy.max_images,
        project_name=name,
    )
    errors += data.failed
    seconds["data"] = time.perf_counter() - clock
    say(f"job {job_id}: {data.summary()}")

    parent = versions.promoted_version(db, project_id)
    engine_name, engine_options = served_engine(parent, policy, settings)
    params["engine"] = engine_name
    current_engine = _base_engine(engine_name, engine_options, artifacts, settings)
    gate_engine, gate_name = _served_now(parent, engine_name, engine_options, current_engine, settings)
    run_name = f"project-{project_id}-job-{job_id}-{os.getpid()}"
    meta = {"project_id": project_id, "job_id": job_id, "parent": parent.name if parent else None}
    clock = time.perf_counter()
    if engine_name == "sam":
        uri, train_metrics, examples = train_sam(
            current_engine,
            engine_options["checkpoint"],
            data.train,
            policy,
            settings,
            artifacts,
            fit={"epochs": policy.epochs, "seed": options.seed, **options.fit},
            num_workers=options.num_workers,
            use_gpu=options.use_gpu,
            name=run_name,
            meta=meta,
            project_id=project_id,
            job_id=job_id,
        )
        seconds["fit"] = time.perf_counter() - clock
        candidate_engine = sam_engine(uri, artifacts, settings)  # what will be served
    else:
        uri, train_metrics, examples = train_refiner(
            current_engine, data, policy, settings, options, artifacts, errors, seconds, run_name, meta, name
        )
        candidate_engine = _base_engine(ENGINE, {"refiner_uri": uri}, artifacts)  # what will be served
    say(f"job {job_id}: artifact {uri}")

    clock = time.perf_counter()
    candidate = evaluate(candidate_engine, data.held_out, options.eval_max_clicks)
    current = evaluate(gate_engine, data.held_out, options.eval_max_clicks)
    seconds["evaluate"] = time.perf_counter() - clock
    decision = decide(candidate, current, options.gate or policy.gate)
    say(f"job {job_id}: {decision.reason}")

    metrics = {
        **candidate.model_dump(),
        "current": current.model_dump(),
        "current_version": gate_name,
        "data": data.summary(),
        "examples": examples,
        "failed_images": len({e["image_id"] for e in errors if "image_id" in e}),
        "train": {k: v for k, v in train_metrics.items() if isinstance(v, int | float | str | bool)},
        "job_id": job_id,
        "seconds": seconds,
    }
    version = _register(db, job_id, project_id, engine_name, parent, uri, metrics, decision)
    say(f"job {job_id}: registered {version.name}{' (promoted)' if version.promoted else ''}")

    label_model: str | None = None
    if options.refresh_label_model:
        try:
            label_model = _refresh_label_model(db, project_id, job_id, settings)
        except Exception as exc:  # text prompts keep their old model; the new version stands
            label_model = f"not refreshed: {type(exc).__name__}: {exc}"
            errors.append({"error": f"label model {label_model}"[:2000]})
    return TrainingResult(
        job_id=job_id,
        project_id=project_id,
        version=version,
        parent=parent,
        decision=decision,
        artifact_uri=uri,
        data=data.summary(),
        failed_images=[e for e in errors if "image_id" in e],
        train_metrics=train_metrics,
        label_model=label_model,
        took_over=took_over,
        seconds=seconds,
    )


__all__ = [
    "TrainOptions",
    "TrainingBusyError",
    "TrainingError",
    "TrainingResult",
    "claim_training_slot",
    "resolve_project",
    "run_training",
]
