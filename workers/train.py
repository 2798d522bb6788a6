"""``seemly train run``: fine-tune a project's refiner on Ray Train, gate it, register (and promote) it.

One run, in order (each step's failure fails the job with a clear message, nothing half-done
is ever served)::

    claim the project's training slot  (jobs row kind=train, status=running; the partial unique
        index uq_jobs_one_active_training refuses a second one; a dead runner's job is taken over)
    load data     corrections + human masks up to fixed ids, images through seemly.storage,
                  split train / held-out by image sha256        (seemly.learning.data)
    simulate      click sessions of the current engine on the training pairs -> refiner examples
    fit           Ray Train TorchTrainer: fit_refiner in the worker(s), a checkpoint per epoch
    artifact      the final refiner -> <artifacts>/projects/<p>/train-<job>/refiner.pt (written whole)
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
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import Engine, select, update

from seemly.config import Settings, get_settings
from seemly.db.models import Job, JobStatus, Project, TrainingReason, TrainingRequest
from seemly.learning import versions
from seemly.learning.artifacts import artifact_storage, artifact_uri, artifacts_root, local_root
from seemly.learning.data import (
    TrainingData,
    TrainingDataError,
    TrainingPair,
    data_bounds,
    load_training_data,
)
from seemly.learning.gate import Decision, EvalMetrics, GatePolicy, decide
from seemly.learning.policy import PolicyError, TrainingPolicy, policy_for
from workers.presegment import _runner, ensure_ray
from workers.train_slot import (
    MAX_ERRORS,
    Heartbeat,
    TrainingBusyError,
    TrainingError,
    claim_training_slot,
)

log = logging.getLogger(__name__)

ENGINE = "classic"  # the refiner is the classic engine's learned part
REFINER_FILE = "refiner.pt"


@dataclass
class TrainOptions:
    """Knobs of one run beyond the project's policy; tests shrink them."""

    fit: dict[str, Any] = field(default_factory=dict)  # FitConfig fields over the policy's epochs
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
def _base_engine(current: versions.VersionInfo | None, storage: Any) -> Any:
    """The engine the project is served with now: its promoted fine-tune, or the base classic engine."""
    from seemly.engines.base import create_engine

    if current is None:
        return create_engine(ENGINE)
    name, options = versions.engine_spec(current)
    if name != ENGINE:
        raise TrainingError(
            f"the promoted version {current.name} is a {name!r} model; training fine-tunes the {ENGINE} "
            "engine's refiner only"
        )
    return create_engine(name, storage=storage, **options)


def simulate(
    engine: Any, pairs: Sequence[TrainingPair], options: TrainOptions
) -> tuple[list[Any], list[dict[str, Any]]]:
    """Refiner examples from simulated sessions of ``engine`` on ``pairs``; a failing pair is reported."""
    from seemly.learning.examples import simulate_examples

    examples: list[Any] = []
    failed: list[dict[str, Any]] = []
    for index, pair in enumerate(pairs):
        rng = np.random.default_rng([options.seed, pair.image_id, index])
        try:
            examples += simulate_examples(
                engine,
                pair.image,
                pair.gt,
                rng=rng,
                max_clicks=options.sim_max_clicks,
                sessions=options.sim_sessions,
                source=f"{pair.sha256[:12]}:{pair.key}",
            )
        except Exception as exc:  # one bad pair never fails the run
            log.warning("training: simulating image %s region %s failed: %s", pair.image_id, pair.key, exc)
            failed.append(
                {"image_id": pair.image_id, "region": pair.key, "error": f"{type(exc).__name__}: {exc}"[:500]}
            )
    return examples, failed


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train worker: fit the refiner on this worker's shard; report every epoch with a checkpoint."""
    import ray
    import ray.train
    import ray.train.torch

    from seemly.learning.fit import FitConfig, fit_refiner
    from seemly.learning.refiner import LearnedRefiner

    context = ray.train.get_context()
    rank, size = context.get_world_rank(), context.get_world_size()
    examples = ray.get(config["examples"])[rank::size]
    init = LearnedRefiner.from_bytes(config["init"], source="parent refiner") if config.get("init") else None

    def report(metrics: dict[str, Any], snapshot: LearnedRefiner) -> None:
        if rank != 0:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as folder:
            (Path(folder) / REFINER_FILE).write_bytes(snapshot.to_bytes())
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))

    fit_refiner(
        examples,
        FitConfig(**config["fit"]),
        init=init,
        prepare_model=ray.train.torch.prepare_model,
        report=report,
    )


def _run_config(settings: Settings, name: str) -> Any:
    """Checkpoints under ``<artifacts>/ray_train``: a local folder, or the S3 bucket of the artifacts."""
    from ray.train import CheckpointConfig, RunConfig

    checkpoints = CheckpointConfig(num_to_keep=1)
    root = local_root(settings)
    if root is not None:
        return RunConfig(name=name, storage_path=str(root / "ray_train"), checkpoint_config=checkpoints)
    from pyarrow import fs

    bucket_prefix = artifacts_root(settings).removeprefix("s3://")
    key = settings.s3_access_key_id.get_secret_value() if settings.s3_access_key_id else None
    secret = settings.s3_secret_access_key.get_secret_value() if settings.s3_secret_access_key else None
    endpoint = settings.s3_endpoint_url
    filesystem = fs.S3FileSystem(
        access_key=key,
        secret_key=secret,
        region=settings.s3_region,
        endpoint_override=endpoint.split("://", 1)[-1] if endpoint else None,
        scheme=endpoint.split("://", 1)[0] if endpoint and "://" in endpoint else "https",
    )
    return RunConfig(
        name=name,
        storage_path=f"{bucket_prefix}/ray_train",
        storage_filesystem=filesystem,
        checkpoint_config=checkpoints,
    )


def fit_on_ray(
    examples: Sequence[Any],
    fit: dict[str, Any],
    init: bytes | None,
    settings: Settings,
    options: TrainOptions,
    name: str,
) -> tuple[bytes, dict[str, Any]]:
    """Run :func:`train_loop` on a ``TorchTrainer``; returns the final refiner's bytes and metrics."""
    import ray
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    ensure_ray(settings)
    gpus = float(ray.cluster_resources().get("GPU", 0))
    use_gpu = options.use_gpu if options.use_gpu is not None else gpus > 0
    workers = options.num_workers or settings.train_num_workers
    resources: dict[str, float] = {"CPU": settings.ray_num_cpus_per_actor}
    if use_gpu:
        resources["GPU"] = 1.0
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"examples": ray.put(list(examples)), "fit": fit, "init": init},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=_run_config(settings, name),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise TrainingError(
            f"Ray Train run {name} ended without a checkpoint: {result.error or 'no epoch finished'}"
        )
    with result.checkpoint.as_directory() as folder:
        data = (Path(folder) / REFINER_FILE).read_bytes()
    metrics = dict(result.metrics or {})
    metrics.update({"workers": workers, "use_gpu": use_gpu})
    return data, metrics


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
            ENGINE,
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
    from seemly.engines.base import create_engine
    from seemly.learning.refiner import LearnedRefiner
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
    current_engine = _base_engine(parent, artifacts)
    clock = time.perf_counter()
    examples, failed = simulate(current_engine, data.train, options)
    errors += failed
    seconds["simulate"] = time.perf_counter() - clock
    if not examples:
        raise TrainingError(
            f"project {name}: no training example could be simulated from {len(data.train)} regions "
            f"({len(failed)} failed{', e.g. ' + failed[0]['error'] if failed else ''})"
        )

    clock = time.perf_counter()
    init = getattr(current_engine, "refiner", None)
    fit = {
        "epochs": policy.epochs,
        "seed": options.seed,
        "refiner": {"image": policy.refiner_sees_image},
        **options.fit,
    }
    refiner_bytes, train_metrics = fit_on_ray(
        examples,
        fit,
        init.to_bytes() if isinstance(init, LearnedRefiner) else None,
        settings,
        options,
        f"project-{project_id}-job-{job_id}-{os.getpid()}",
    )
    seconds["fit"] = time.perf_counter() - clock

    refiner = LearnedRefiner.from_bytes(refiner_bytes, source=f"job {job_id} checkpoint")
    refiner.meta.update(
        {"project_id": project_id, "job_id": job_id, "parent": parent.name if parent else None}
    )
    uri = artifact_uri(settings, project_id, job_id, REFINER_FILE)
    refiner.save(uri, artifacts)
    say(f"job {job_id}: artifact {uri}")

    clock = time.perf_counter()
    candidate_engine = create_engine(ENGINE, refiner_uri=uri, storage=artifacts)  # what will be served
    candidate = evaluate(candidate_engine, data.held_out, options.eval_max_clicks)
    current = evaluate(current_engine, data.held_out, options.eval_max_clicks)
    seconds["evaluate"] = time.perf_counter() - clock
    decision = decide(candidate, current, options.gate or policy.gate)
    say(f"job {job_id}: {decision.reason}")

    metrics = {
        **candidate.model_dump(),
        "current": current.model_dump(),
        "current_version": parent.name if parent else f"{ENGINE} (base)",
        "data": data.summary(),
        "examples": len(examples),
        "failed_images": len({e["image_id"] for e in errors if "image_id" in e}),
        "train": {k: v for k, v in train_metrics.items() if isinstance(v, int | float | str | bool)},
        "job_id": job_id,
        "seconds": seconds,
    }
    version = _register(db, job_id, project_id, parent, uri, metrics, decision)
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
