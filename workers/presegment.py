"""``seemly presegment``: segment every image under a bucket prefix with Ray Data, exactly once.

::

    seemly presegment s3://bucket/prefix --project NAME [--mode everything|center-box]
                      [--box-prompts FILE] [--resume JOB_ID] [--actors N] [--batch-size N]
                      [--ls-url URL --ls-api-key KEY --ls-project ID]

The pipeline (stages in :mod:`workers.presegment_stages`)::

    read_datasource(BucketItems)  ──►  map_batches(SegmentWriter, ActorPoolStrategy)  ──►  driver
    list pages, register job_items      fetch ─► decode ─► embed ─► segment ─► COPY         tqdm bar,
    (streamed, one chunk at a time)     (N actors, GPUs when configured)                    job counters

A job is identified by (project, location, mode, model version). Without ``--resume`` the latest
unfinished job with that identity is resumed when its driver is gone (same host and its process
is dead, or its heartbeat is stale); otherwise a new job starts, which still skips every image an
earlier job of the same identity finished. Either way only unfinished items are processed, and
the database's keys make a replayed write a no-op: see :mod:`workers.presegment_stages`.

``file://`` locations work like ``s3://`` ones; the job's own directory is added to the file roots
for this job (the operator named it), and on a multi-node cluster it must be a shared filesystem.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, select, update
from sqlalchemy.exc import DBAPIError

from seemly.config import Settings, get_settings
from seemly.db.jobs import create_job, finish_job, refresh_counts
from seemly.db.models import ItemStatus, Job, JobItem, JobStatus
from seemly.db.registry import ensure_model_version, ensure_project
from seemly.db.session import is_disconnect, make_engine, retry_disconnects
from seemly.pipeline import SegmentMode
from seemly.storage import FileLocation, S3Location, Storage, StorageError, display_uri, parse_uri
from workers.box_prompts import BoxPrompt, BoxPromptsError, load_box_prompts
from workers.presegment_stages import BOXES_MODE, DB_RETRY_S, JobSpec, SegmentWriter, make_source

log = logging.getLogger(__name__)

JOB_KIND = "presegment"
DEFAULT_BATCH_SIZE = 8
DEFAULT_REFRESH_S = 5.0
DEFAULT_STALE_S = 120.0
SOURCE_CPUS = 0.1  # the listing task mostly waits on the network
BLOCK_BYTES = 1
"""``DataContext.target_max_block_size`` for the job: every work packet travels as its own block.

Ray Data buffers a task's output until it exceeds this size (128 MiB by default), which would hold
the listing back until ~1M keys had been read. With one byte, the source hands each packet
(``--batch-size`` items in one row, see :func:`workers.presegment_stages.make_source`) downstream
the moment its chunk is registered, and each actor call gets exactly one packet, so batches
spread over all actors. (A streaming ``repartition`` could split big blocks instead, but its tasks
ask for a whole CPU each, which a small cluster full of fractional-CPU actors never has free: the
job would wait forever.) Single-row blocks cannot be sliced further, so nothing else changes."""


STAGE_KEYS = ("segment_s", "fetch_s", "wait_s", "write_s", "call_s", "cpu_s")
"""Timings each actor call reports (seconds, summed over the call): embed + segment, downloads, time
spent waiting for a download, the batch's write, the whole call, and the call's CPU time."""


class PresegmentError(Exception):
    """A job that cannot start (bad location, job conflict, bad prompts); the message says why."""


@dataclass
class PresegmentOptions:
    """Knobs of one run; the CLI flags map onto these one to one."""

    mode: str = SegmentMode.CENTER_BOX.value
    box_prompts: Path | None = None
    resume: int | None = None
    actors: int | None = None  # default: one per CPU (or per GPU share) in the cluster
    batch_size: int = DEFAULT_BATCH_SIZE
    fetch_threads: int = 8
    chunk_rows: int = 256
    max_tasks_in_flight_per_actor: int = 2
    refresh_s: float = DEFAULT_REFRESH_S
    abort_after_internal_errors: int = 50  # consecutive items failing on a bug (not a bad image) stop the job
    stale_after_s: float = DEFAULT_STALE_S
    progress: bool = True
    db_retry_s: float = DB_RETRY_S  # how long every stage waits out an unreachable database


@dataclass
class PresegmentResult:
    job_id: int
    resumed: bool
    counts: dict[str, int]
    processed: int  # items this run segmented or failed (not those skipped at the source)
    elapsed_s: float
    actors: int
    stage_seconds: dict[str, float] = field(default_factory=dict)  # summed over items
    calls: dict[int, list[tuple[float, float]]] = field(default_factory=dict)  # per actor: call spans


# --------------------------------------------------------------------------------------------
# job identity, resume
# --------------------------------------------------------------------------------------------
def _runner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _runner_alive(runner: str | None, heartbeat: datetime | None, stale_after_s: float) -> bool:
    """Whether the driver that holds a ``running`` job may still be working on it."""
    if runner and runner.rpartition(":")[0] == socket.gethostname():
        pid = runner.rpartition(":")[2]
        if pid.isdigit():
            if int(pid) == os.getpid():
                return False
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                return False
            except PermissionError:
                return True
            return True
    if heartbeat is None:
        return False
    return datetime.now(UTC) - heartbeat < timedelta(seconds=stale_after_s)


def _same_identity(params: Mapping[str, Any], identity: Mapping[str, Any]) -> bool:
    return all(params.get(key) == value for key, value in identity.items())


def _jobs_like(db: Engine, project_id: int, identity: Mapping[str, Any]) -> list[Job]:
    with db.connect() as conn:
        rows = conn.execute(
            select(Job.__table__)
            .where(Job.__table__.c.kind == JOB_KIND, Job.__table__.c.project_id == project_id)
            .order_by(Job.__table__.c.id)
        ).all()
    return [row for row in rows if _same_identity(row.params or {}, identity)]  # type: ignore[misc]


def _claim(db: Engine, job_id: int) -> None:
    with db.begin() as conn:
        conn.execute(
            update(Job.__table__)
            .where(Job.__table__.c.id == job_id)
            .values(
                status=JobStatus.RUNNING,
                runner=_runner(),
                heartbeat_at=datetime.now(UTC),
                finished_at=None,
            )
        )


def _check_mode_conflict(db: Engine, project_id: int, mode: str, model_version: str) -> None:
    """Refuse a second mode on a project that already holds bucket masks of this model version.

    The bucket mask key is ``(project, image, model version, label, ordinal)``: it has no mode, so
    the masks of another mode would collide with the stored ones and be dropped as "already
    written". Until the key carries the mode, one (project, model version) gets one mode.
    """
    jobs, items = Job.__table__, JobItem.__table__
    with db.connect() as conn:
        rows = conn.execute(
            select(jobs.c.id, jobs.c.params).where(jobs.c.kind == JOB_KIND, jobs.c.project_id == project_id)
        ).all()
        for job_id, params in rows:
            params = params or {}
            if params.get("model_version") != model_version or params.get("mode") in (None, mode):
                continue
            has_done = conn.execute(
                select(items.c.id)
                .where(items.c.job_id == job_id, items.c.status == ItemStatus.DONE.value)
                .limit(1)
            ).first()
            if has_done is not None:
                raise PresegmentError(
                    f"this project already holds {model_version} masks made in mode {params['mode']!r} "
                    f"(job {job_id}); masks of mode {mode!r} would collide with them (the stored mask key "
                    "has no mode). Use another --project for this mode."
                )


def choose_job(
    db: Engine,
    project_id: int,
    identity: Mapping[str, Any],
    params: Mapping[str, Any],
    options: PresegmentOptions,
) -> tuple[int, bool, tuple[int, ...]]:
    """The job to run: ``(job id, resumed?, ids of the other jobs with the same identity)``."""
    similar = _jobs_like(db, project_id, identity)
    if options.resume is not None:
        with db.connect() as conn:
            job = conn.execute(
                select(Job.__table__).where(Job.__table__.c.id == options.resume)
            ).one_or_none()
        if job is None or job.kind != JOB_KIND:
            raise PresegmentError(f"job {options.resume} does not exist or is not a presegment job")
        if job.project_id != project_id or not _same_identity(job.params or {}, identity):
            theirs = {k: (job.params or {}).get(k) for k in identity}
            raise PresegmentError(
                f"job {options.resume} was started with {theirs}, not {dict(identity)}; "
                "resume it with the same location, mode and engine (or start a new job)"
            )
        job_id = int(job.id)
        resumed = True
    else:
        unfinished = [
            j for j in similar if j.status in (JobStatus.RUNNING, JobStatus.FAILED, JobStatus.CANCELLED)
        ]
        latest = unfinished[-1] if unfinished else None
        if (
            latest is not None
            and latest.status == JobStatus.RUNNING
            and _runner_alive(latest.runner, latest.heartbeat_at, options.stale_after_s)
        ):
            raise PresegmentError(
                f"job {latest.id} with the same location, mode and model version is running "
                f"(runner {latest.runner}, last heartbeat {latest.heartbeat_at:%Y-%m-%d %H:%M:%S}Z); "
                f"wait for it, or join it with --resume {latest.id}"
            )
        if latest is not None:
            job_id, resumed = int(latest.id), True
        else:
            job_id = create_job(db, JOB_KIND, project_id=project_id, params=dict(params))
            resumed = False
    _claim(db, job_id)
    others = tuple(int(j.id) for j in similar if int(j.id) != job_id)
    return job_id, resumed, others


# --------------------------------------------------------------------------------------------
# Ray
# --------------------------------------------------------------------------------------------
def ensure_ray(settings: Settings) -> None:
    """Connect to ``settings.ray_address`` or start a local Ray bound to 127.0.0.1 (once)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    if ray.is_initialized():
        return
    common: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING}
    if settings.ray_address:
        ray.init(address=settings.ray_address, **common)
    else:
        ray.init(_node_ip_address="127.0.0.1", **common)


def actor_count(settings: Settings, wanted: int | None) -> int:
    """``wanted`` actors (default: one per CPU core, or per GPU share), capped at what the cluster fits.

    An actor pool bigger than the cluster would wait forever for its last actors to be scheduled.
    """
    import ray

    resources = ray.cluster_resources()
    cpus = float(resources.get("CPU", 1))
    fits = int((cpus - SOURCE_CPUS + 1e-9) // settings.ray_num_cpus_per_actor)
    if settings.ray_num_gpus_per_actor > 0:
        fits = min(fits, int(resources.get("GPU", 0) // settings.ray_num_gpus_per_actor + 1e-9))
        default = fits
    else:
        default = min(int(cpus), fits)  # the engine is compute-bound: one per core
    count = wanted or default
    if count > fits:
        log.warning("%d actors do not fit in the cluster (%s); using %d", count, resources, max(1, fits))
        count = fits
    if count < 1:
        raise PresegmentError(
            f"the cluster ({cpus:g} CPUs, {resources.get('GPU', 0):g} GPUs) cannot hold one actor of "
            f"{settings.ray_num_cpus_per_actor:g} CPU and {settings.ray_num_gpus_per_actor:g} GPU"
        )
    return count


def build_dataset(
    spec: JobSpec,
    box_prompts: Mapping[str, list[BoxPrompt]] | None,
    options: PresegmentOptions,
    settings: Settings,
    actors: int,
) -> Any:
    """``read_datasource(BucketItems) → map_batches(SegmentWriter, actor pool)``.

    Work packets flow one block each (see :data:`BLOCK_BYTES`), so batches spread over the whole
    actor pool as soon as a chunk is listed. Actors are restarted
    and their calls retried by Ray when a worker dies: Ray Data's defaults for actor pools
    (``max_restarts=-1``, ``max_task_retries=-1``) are what a long bucket job wants, and a replayed
    batch is harmless (see :mod:`workers.presegment_stages`).
    """
    import ray.data

    context = ray.data.DataContext.get_current()
    saved = (context.target_max_block_size, context.enable_progress_bars)
    context.target_max_block_size = BLOCK_BYTES
    context.enable_progress_bars = False  # our own bar counts committed items
    try:
        dataset = ray.data.read_datasource(
            make_source(spec, box_prompts), num_cpus=SOURCE_CPUS, override_num_blocks=1
        )
        return dataset.map_batches(
            SegmentWriter,
            fn_constructor_args=(spec,),
            batch_size=1,  # one work packet of ``options.batch_size`` images per call
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(
                size=actors, max_tasks_in_flight_per_actor=options.max_tasks_in_flight_per_actor
            ),
            num_cpus=settings.ray_num_cpus_per_actor,
            num_gpus=settings.ray_num_gpus_per_actor or None,
        )
    finally:
        context.target_max_block_size, context.enable_progress_bars = saved


# --------------------------------------------------------------------------------------------
# the job
# --------------------------------------------------------------------------------------------
def _job_storage(settings: Settings, prefix_uri: str) -> Storage:
    location = parse_uri(prefix_uri)
    if isinstance(location, S3Location):
        if not location.key and prefix_uri.rstrip("/") != f"s3://{location.bucket}":
            raise PresegmentError(f"{prefix_uri}: expected s3://bucket or s3://bucket/prefix")
        return Storage.from_settings(settings)
    if isinstance(location, FileLocation):
        root = Path(location.path)
        root = root if root.is_dir() else root.parent
        return Storage.from_settings(settings, file_roots=[*settings.file_roots, root])
    raise PresegmentError(f"{display_uri(prefix_uri)}: a bucket job needs an s3:// or file:// location")


def presegment(
    prefix_uri: str,
    project: str,
    options: PresegmentOptions | None = None,
    settings: Settings | None = None,
) -> PresegmentResult:
    """Run (or resume) a job to completion; raises :class:`PresegmentError` when it cannot start."""
    options = options or PresegmentOptions()
    settings = settings or get_settings()
    started = time.perf_counter()
    try:
        storage = _job_storage(settings, prefix_uri)
    except StorageError as exc:
        raise PresegmentError(str(exc)) from None
    box_prompts: dict[str, list[BoxPrompt]] | None = None
    if options.box_prompts is not None:
        try:
            box_prompts = load_box_prompts(options.box_prompts, prefix_uri)
        except BoxPromptsError as exc:
            raise PresegmentError(str(exc)) from None
        mode = BOXES_MODE
    else:
        mode = SegmentMode(options.mode).value
        try:  # fail now, clearly, on a missing bucket or wrong credentials: not inside a Ray task
            next(iter(storage.iter_objects(prefix_uri)), None)
        except StorageError as exc:
            raise PresegmentError(f"cannot list {display_uri(prefix_uri)}: {exc}") from None

    from seemly.engines.base import configured_engine_spec, create_engine

    engine_name, engine_options = configured_engine_spec(settings)
    engine = create_engine(engine_name, **engine_options)
    db = make_engine(settings.database_url)
    try:
        project_id = ensure_project(db, project)
        version_id = ensure_model_version(db, engine.model_version, engine=engine.name)
        identity = {"prefix": prefix_uri, "mode": mode, "model_version": engine.model_version}
        params = {**identity, "engine": engine.name}
        if options.box_prompts is not None:
            params["box_prompts"] = str(options.box_prompts)
        _check_mode_conflict(db, project_id, mode, engine.model_version)
        job_id, resumed, others = choose_job(db, project_id, identity, params, options)
        spec = JobSpec(
            job_id=job_id,
            project_id=project_id,
            model_version_id=version_id,
            model_version=engine.model_version,
            engine_name=settings.engine,
            engine_options=engine_options,
            mode=mode,
            prefix_uri=prefix_uri,
            database_url=settings.database_url,
            storage=storage,
            max_pixels=settings.max_image_pixels,
            max_bytes=settings.max_image_bytes,
            prior_job_ids=others,
            chunk_rows=options.chunk_rows,
            packet_rows=options.batch_size,
            fetch_threads=options.fetch_threads,
            db_retry_s=options.db_retry_s,
        )
        del engine  # the actors build their own
        return _execute(db, spec, box_prompts, options, settings, resumed, started)
    finally:
        db.dispose()


def _batches(dataset: Any) -> Iterator[dict[str, Any]]:
    """The job's output batches (one per actor call) as they complete."""
    with warnings.catch_warnings():
        # Ray Data warns that a one-task source cannot feed the whole pool; its packet-sized blocks do.
        warnings.filterwarnings(
            "ignore", message="The minimum number of concurrent actors", category=UserWarning
        )
        yield from dataset.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=0)


def _show(bar: Any, counts: Mapping[str, int], final: bool = False) -> None:
    """Total and failures from the database; the position is the driver's own count of results
    (a batch is committed before its result reaches the driver, so mixing the two would count it
    twice) except at the end, when the database's is final."""
    bar.total = counts["total"]
    if final:
        bar.n = counts["done"] + counts["skipped"] + counts["failed"]
    bar.set_postfix(failed=counts["failed"], refresh=False)
    bar.refresh()


def _execute(
    db: Engine,
    spec: JobSpec,
    box_prompts: Mapping[str, list[BoxPrompt]] | None,
    options: PresegmentOptions,
    settings: Settings,
    resumed: bool,
    started: float,
) -> PresegmentResult:
    from tqdm import tqdm

    counts = refresh_counts(db, spec.job_id)
    try:
        ensure_ray(settings)
        actors = actor_count(settings, options.actors)
        dataset = build_dataset(spec, box_prompts, options, settings, actors)
    except BaseException:
        finish_job(db, spec.job_id, JobStatus.FAILED)
        raise
    verb = "resuming" if resumed else "starting"
    where = display_uri(spec.prefix_uri)
    log.info(
        "%s job %s: %s, mode %s, %s, %d actors",
        verb,
        spec.job_id,
        where,
        spec.mode,
        spec.model_version,
        actors,
    )
    bar = tqdm(
        desc=f"job {spec.job_id}",
        unit="img",
        initial=counts["done"] + counts["skipped"],
        total=counts["total"] or None,
        disable=not options.progress,
        dynamic_ncols=True,
        file=sys.stderr,
    )
    stage = {
        "segment_s": 0.0,
        "fetch_s": 0.0,
        "wait_s": 0.0,
        "write_s": 0.0,
        "call_s": 0.0,
        "cpu_s": 0.0,
        "first_result_s": 0.0,
    }
    processed = 0
    calls: dict[int, list[tuple[float, float]]] = {}  # actor pid -> [(start, end)] of its calls
    next_refresh = time.monotonic() + options.refresh_s
    status = JobStatus.FAILED
    internal_streak, first_internal = 0, ""
    try:
        for batch in _batches(dataset):
            n = int(batch["items"].sum())
            if not processed:
                stage["first_result_s"] = time.perf_counter() - started
            processed += n
            for key in STAGE_KEYS:
                stage[key] += float(batch[key].sum())
            for row in range(len(batch["items"])):
                span = (float(batch["call_start"][row]), float(batch["call_end"][row]))
                calls.setdefault(int(batch["actor_pid"][row]), []).append(span)
                if batch["done"][row]:  # a success ends a run of bug-failures
                    internal_streak, first_internal = 0, ""
                internal_streak += int(batch["internal_errors"][row])
                first_internal = first_internal or str(batch["first_internal_error"][row])
            if internal_streak >= max(options.abort_after_internal_errors, 1):
                raise PresegmentError(
                    f"job {spec.job_id} stopped: the last {internal_streak} images all failed with an internal "
                    f"error, e.g. {first_internal!r}. Fix the cause, then rerun to resume (failed items are retried)."
                )
            bar.update(n)
            if time.monotonic() >= next_refresh:
                try:
                    counts = refresh_counts(db, spec.job_id)
                    _show(bar, counts)
                except DBAPIError as exc:  # progress can wait for the database; the work goes on
                    if not is_disconnect(exc):
                        raise
                    log.warning("job %s: progress not refreshed, the database is unreachable", spec.job_id)
                next_refresh = time.monotonic() + options.refresh_s
        status = JobStatus.SUCCEEDED
    except KeyboardInterrupt:
        status = JobStatus.CANCELLED
        raise
    finally:
        counts = retry_disconnects(
            lambda: finish_job(db, spec.job_id, status),
            what=f"job {spec.job_id}: recording its end",
            deadline_s=options.db_retry_s,
        )
        _show(bar, counts, final=True)
        bar.close()
    return PresegmentResult(
        job_id=spec.job_id,
        resumed=resumed,
        counts=counts,
        processed=processed,
        elapsed_s=time.perf_counter() - started,
        actors=actors,
        stage_seconds=stage,
        calls=calls,
    )


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def configure(parser: argparse.ArgumentParser, words: tuple[str, ...]) -> None:
    parser.add_argument("location", help="s3://bucket/prefix or file:///dir/ to segment every image under")
    parser.add_argument("--project", required=True, help="project name the masks are stored under")
    parser.add_argument(
        "--mode",
        choices=[m.value for m in SegmentMode],
        default=SegmentMode.CENTER_BOX.value,
        help="what to segment in each image (default: center-box)",
    )
    parser.add_argument(
        "--box-prompts",
        type=Path,
        metavar="FILE",
        help='JSON lines {"uri"|"key": ..., "boxes": [[x0,y0,x1,y1], ...], "label": ...}: segment exactly '
        "these images, one mask per box (replaces the listing and --mode)",
    )
    parser.add_argument(
        "--resume",
        type=int,
        metavar="JOB_ID",
        help="resume this job (default: the latest unfinished job with the same location, mode and model, "
        "when its driver is gone)",
    )
    parser.add_argument(
        "--actors", type=int, help="segmentation actors (default: one per CPU, or per GPU share)"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_BATCH_SIZE,
        help=f"images per actor call and per database transaction (default {DEFAULT_BATCH_SIZE})",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    ls = parser.add_argument_group("Label Studio hand-off (optional)")
    ls.add_argument("--ls-url", help="import the masks as predictions into this Label Studio")
    ls.add_argument("--ls-api-key", help="Label Studio access token (default: SEEMLY_LABEL_STUDIO_API_KEY)")
    ls.add_argument("--ls-project", type=int, help="Label Studio project id")


def run(args: argparse.Namespace, words: tuple[str, ...]) -> int:
    settings = get_settings()
    if args.ls_project is not None and not (args.ls_url or settings.label_studio_url):
        print("error: --ls-project needs --ls-url (or SEEMLY_LABEL_STUDIO_URL)", file=sys.stderr)
        return 2
    options = PresegmentOptions(
        mode=args.mode,
        box_prompts=args.box_prompts,
        resume=args.resume,
        actors=args.actors,
        batch_size=max(1, args.batch_size),
        progress=not args.no_progress,
    )
    try:
        result = presegment(args.location, args.project, options, settings)
    except PresegmentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # the pipeline failed (database down, Ray lost its nodes, ...)
        log.debug("job failed", exc_info=True)
        print(
            f"error: the job stopped ({type(exc).__name__}: {exc}); rerun the same command to resume",
            file=sys.stderr,
        )
        return 1
    counts = result.counts
    rate = result.processed / result.elapsed_s if result.elapsed_s else 0.0
    print(
        f"job {result.job_id} {'resumed' if result.resumed else 'done'}: {counts['total']} images — "
        f"done {counts['done']}, skipped {counts['skipped']}, failed {counts['failed']}, "
        f"masks {counts['masks']}; this run {result.processed} images in {result.elapsed_s:.1f}s "
        f"({rate:.1f} img/s, {result.actors} actors)"
    )
    if counts["failed"]:
        print(f"failed items: seemly jobs --job {result.job_id}")
    if args.ls_project is not None:
        from workers.ls_predictions import PredictionImportError, import_from_args

        try:
            report = import_from_args(args, settings)
        except PredictionImportError as exc:
            print(f"error: Label Studio import: {exc}", file=sys.stderr)
            return 2
        print(report.summary())
    return 0  # finished: failed items are listed by `seemly jobs`, and a rerun retries them
