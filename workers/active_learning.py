"""Active learning: rank a project's unlabelled images by how unsure the served model is about them.

::

    seemly al rank --project P [--actors N] [--batch-size 4] [--seed 0]
    seemly al next --project P [-n 10] [--strategy top|weighted|hybrid|diverse|auto] [--seed 0] [--json]

``rank`` scores every image the project knows (bucket-job items, stored masks, interactive
sessions) that no human has labelled yet (no correction, no annotation mask) with
:func:`seemly.learning.uncertainty.image_uncertainty`: the project's promoted version, compared with
the version it replaced (its parent, else the base engine) when one is promoted. The work runs on
Ray Data, as :mod:`workers.presegment` does: the image list flows through an actor pool
(``map_batches``, fractional CPUs, each actor loads the engines once and reads images through
:class:`seemly.storage.Storage`) and the driver upserts one ``uncertainty`` row per image (key
``(project, image)``), so a rerun rewrites the same rows, with the same scores (seeded probes).
An image that cannot be read or decoded is a counted failure with its message; the others go on.
Rows of images labelled since the last run are deleted.

``rank`` also stores each image's appearance features (:func:`seemly.learning.selection.image_features`,
under ``components["features"]``), so ``next`` can choose a batch that is not made of look-alikes.

``next`` lists the unlabelled images to annotate next (Label Studio task id when known, image URI,
uncertainty): by default the most uncertain (``top``), or a batch chosen by another strategy of
:func:`seemly.learning.selection.select_batch` (``--strategy``, seeded by ``--seed``), listed most
uncertain first. Label Studio itself orders tasks by prediction score: the
predictions :mod:`workers.ls_predictions` imports carry ``score = 1 - uncertainty`` (docs/learning.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from sqlalchemy import Connection, Engine, and_, delete, func, literal, select, union_all
from sqlalchemy.dialects import postgresql, sqlite

from seemly.config import Settings, get_settings
from seemly.db.models import (
    Correction,
    Image,
    ImageUri,
    Job,
    JobItem,
    MaskSource,
    ModelVersion,
    Project,
    PromptSession,
    Uncertainty,
)
from seemly.db.models import Mask as MaskRow
from seemly.db.registry import ensure_model_version
from seemly.db.session import make_engine
from seemly.engines.base import configured_engine_spec
from seemly.learning import versions
from seemly.learning.selection import STRATEGIES, select_batch
from seemly.learning.versions import VersionInfo
from seemly.storage import Storage

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 4
# auto: diverse while the project has no promoted version (the untrained engine's uncertainty picks
# outlier batches: the cold start), the most uncertain once it has one (docs/learning.md)
CHOICES = (*STRATEGIES, "auto")
DEFAULT_STRATEGY = "auto"  # what `al next` lists unless --strategy says otherwise (docs/learning.md)
MAX_ERRORS_KEPT = 50
HUMAN_SOURCES = (MaskSource.ANNOTATION.value, MaskSource.CORRECTION.value)
FEATURES_KEY = "features"  # in an uncertainty row's components: image_features, for --strategy diverse


class ActiveLearningError(Exception):
    """Ranking cannot start (unknown project, ...); the message says why."""


# --------------------------------------------------------------------------------------------
# which images, which project
# --------------------------------------------------------------------------------------------
def resolve_project(db: Engine | Connection, project: str) -> int:
    """A project by name, else by numeric id."""

    def run(conn: Connection) -> int:
        table = Project.__table__
        found = conn.execute(select(table.c.id).where(table.c.name == project)).scalar()
        if found is None and project.isdigit():
            found = conn.execute(select(table.c.id).where(table.c.id == int(project))).scalar()
        if found is None:
            raise ActiveLearningError(f"no seemly project named {project!r}")
        return int(found)

    if isinstance(db, Connection):
        return run(db)
    with db.connect() as conn:
        return run(conn)


def labelled_images(project_id: int) -> Any:
    """``SELECT image_id`` of the project's images a human has labelled (corrections, annotations)."""
    masks, corrections = MaskRow.__table__, Correction.__table__
    return union_all(
        select(corrections.c.image_id).where(corrections.c.project_id == project_id),
        select(masks.c.image_id).where(masks.c.project_id == project_id, masks.c.source.in_(HUMAN_SOURCES)),
    )


def _known_images(project_id: int) -> Any:
    """``(image_id, ls_task_id)`` of every image the project has seen, one row per sighting."""
    masks, sessions, items, jobs = (
        MaskRow.__table__,
        PromptSession.__table__,
        JobItem.__table__,
        Job.__table__,
    )
    return union_all(
        select(masks.c.image_id, masks.c.ls_task_id).where(masks.c.project_id == project_id),
        select(sessions.c.image_id, sessions.c.ls_task_id).where(sessions.c.project_id == project_id),
        select(items.c.image_id, literal(None).label("ls_task_id"))
        .join(jobs, jobs.c.id == items.c.job_id)
        .where(jobs.c.project_id == project_id, items.c.image_id.is_not(None)),
    ).subquery("known")


def _uri_of(image_id: Any) -> Any:
    """The image's most recently seen URI (a scalar subquery)."""
    uris = ImageUri.__table__
    return (
        select(uris.c.uri)
        .where(uris.c.image_id == image_id)
        .order_by(uris.c.last_seen_at.desc(), uris.c.id.desc())
        .limit(1)
        .scalar_subquery()
    )


@dataclass(frozen=True)
class Candidate:
    image_id: int
    sha256: str
    uri: str | None
    ls_task_id: int | None


def unlabelled_images(conn: Connection, project_id: int) -> list[Candidate]:
    known = _known_images(project_id)
    images = Image.__table__
    rows = conn.execute(
        select(known.c.image_id, func.max(known.c.ls_task_id), images.c.sha256, _uri_of(known.c.image_id))
        .join(images, images.c.id == known.c.image_id)
        .where(known.c.image_id.not_in(labelled_images(project_id)))
        .group_by(known.c.image_id, images.c.sha256)
        .order_by(known.c.image_id)
    ).all()
    return [Candidate(int(r[0]), r[2], r[3], int(r[1]) if r[1] is not None else None) for r in rows]


# --------------------------------------------------------------------------------------------
# scoring, on Ray
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ScoreSpec:
    """What an actor needs (pickled once into each): the engines to compare and how to read images."""

    engines: tuple[VersionInfo | None, ...]  # [served, compared-with]; None = the base engine
    base_engine: str
    base_options: Mapping[str, Any]
    device: str | None
    storage: Storage
    max_pixels: int
    max_bytes: int
    seed: int = 0


class UncertaintyScorer:
    """Ray Data actor: ``{image_id, sha256, uri}`` rows in, ``{image_id, score, components, error}`` out."""

    def __init__(self, spec: ScoreSpec) -> None:
        from seemly.engines.base import create_engine
        from seemly.learning.loading import load_version

        self.spec = spec
        base = create_engine(spec.base_engine, **dict(spec.base_options))
        self.engines = [
            base if info is None else load_version(info, device=spec.device) for info in spec.engines
        ]

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {
            "image_id": [],
            "score": [],
            "components": [],
            "error": [],
            "version": [],
        }
        for image_id, sha256, uri in zip(batch["image_id"], batch["sha256"], batch["uri"], strict=True):
            score, components, error = self._one(str(sha256), str(uri))
            out["image_id"].append(int(image_id))
            out["score"].append(score)
            out["components"].append(json.dumps(components))
            out["error"].append(error)
            out["version"].append(self.engines[0].model_version)
        return out

    def _one(self, sha256: str, uri: str) -> tuple[float, dict[str, Any], str]:
        from seemly.engines.base import EngineError
        from seemly.images import ImageError, decode_image
        from seemly.learning.selection import image_features
        from seemly.learning.uncertainty import image_uncertainty
        from seemly.storage import StorageError

        try:
            data = self.spec.storage.read(uri, max_bytes=self.spec.max_bytes)
            decoded = decode_image(data, max_pixels=self.spec.max_pixels, max_bytes=self.spec.max_bytes)
            if decoded.sha256 != sha256:
                return float("nan"), {}, f"{uri}: the content changed since it was registered"
            found = image_uncertainty(self.engines, decoded.array, decoded.sha256, seed=self.spec.seed)
            features = [round(float(v), 6) for v in image_features(decoded.array)]
        except (StorageError, ImageError, EngineError, ValueError, OSError) as exc:
            message = str(exc)
            return float("nan"), {}, (message if uri in message else f"{uri}: {message}")[:500]
        except Exception as exc:  # a bug: counted and reported, never stops the other images
            log.exception("uncertainty of %s failed", uri)
            return float("nan"), {}, f"{uri}: internal error: {type(exc).__name__}: {exc}"[:500]
        components: dict[str, Any] = {k: round(float(v), 6) for k, v in found.components.items()}
        return found.score, {**components, FEATURES_KEY: features}, ""


def compared_engines(db: Engine, project_id: int) -> tuple[VersionInfo | None, ...]:
    """The served version, and the one it replaced (its parent, else the base engine) if any."""
    current = versions.promoted_version(db, project_id)
    if current is None:
        return (None,)
    parent = versions.get(db, current.parent_id) if current.parent_id is not None else None
    return (current, parent)


# --------------------------------------------------------------------------------------------
# rank
# --------------------------------------------------------------------------------------------
@dataclass
class RankReport:
    project_id: int
    model_version: str | None = None
    compared_with: str | None = None
    candidates: int = 0
    ranked: int = 0
    failed: int = 0
    labelled_dropped: int = 0  # uncertainty rows of images labelled since the last run
    errors: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0

    def summary(self) -> str:
        versus = f" vs {self.compared_with}" if self.compared_with else ""
        return (
            f"project {self.project_id}: {self.candidates} unlabelled images, {self.ranked} ranked, "
            f"{self.failed} failed (model {self.model_version}{versus}) in {self.elapsed_s:.1f}s"
        )


def _upsert(conn: Connection, project_id: int, rows: Sequence[dict[str, Any]]) -> None:
    table = Uncertainty.__table__
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    statement = dialect.insert(table).values([{"project_id": project_id, **row} for row in rows])
    conn.execute(
        statement.on_conflict_do_update(
            index_elements=["project_id", "image_id"],
            set_={
                "score": statement.excluded.score,
                "components": statement.excluded.components,
                "model_version_id": statement.excluded.model_version_id,
                "ls_task_id": statement.excluded.ls_task_id,
                "computed_at": func.now(),
            },
        )
    )


def _results(dataset: Any) -> Iterator[dict[str, Any]]:
    yield from dataset.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=0)


def rank(
    project: str,
    *,
    settings: Settings | None = None,
    actors: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 0,
) -> RankReport:
    """Score the project's unlabelled images and store the ranking (see the module doc)."""
    settings = settings or get_settings()
    started = time.perf_counter()
    db = make_engine(settings.database_url)
    try:
        project_id = resolve_project(db, project)
        report = RankReport(project_id=project_id)
        engines = compared_engines(db, project_id)
        base_name, base_options = configured_engine_spec(settings)
        report.compared_with = (
            None if len(engines) < 2 else (engines[1].name if engines[1] else "base engine")
        )
        with db.begin() as conn:
            dropped = conn.execute(
                delete(Uncertainty.__table__).where(
                    Uncertainty.__table__.c.project_id == project_id,
                    Uncertainty.__table__.c.image_id.in_(labelled_images(project_id)),
                )
            )
            report.labelled_dropped = int(dropped.rowcount or 0)
            candidates = unlabelled_images(conn, project_id)
        report.candidates = len(candidates)
        todo = []
        for candidate in candidates:
            if candidate.uri is None:
                report.failed += 1
                report.errors.append(f"image {candidate.sha256[:12]}…: no known URI to read it from")
            else:
                todo.append(candidate)
        if todo:
            spec = ScoreSpec(
                engines=engines,
                base_engine=base_name,
                base_options=base_options,
                device=settings.device,
                storage=Storage.from_settings(settings),
                max_pixels=settings.max_image_pixels,
                max_bytes=settings.max_image_bytes,
                seed=seed,
            )
            _score(db, project_id, todo, spec, settings, actors, batch_size, report)
        report.errors = report.errors[:MAX_ERRORS_KEPT]
        report.elapsed_s = time.perf_counter() - started
        return report
    finally:
        db.dispose()


def _score(
    db: Engine,
    project_id: int,
    todo: Sequence[Candidate],
    spec: ScoreSpec,
    settings: Settings,
    actors: int | None,
    batch_size: int,
    report: RankReport,
) -> None:
    import ray.data

    from workers.presegment import actor_count, ensure_ray

    ensure_ray(settings)
    size = min(actor_count(settings, actors), max(1, len(todo)))
    tasks = {c.image_id: c.ls_task_id for c in todo}
    context = ray.data.DataContext.get_current()
    saved = context.enable_progress_bars
    context.enable_progress_bars = False
    try:
        dataset = ray.data.from_items(
            [{"image_id": c.image_id, "sha256": c.sha256, "uri": c.uri} for c in todo],
            override_num_blocks=max(1, min(len(todo), size * 4)),
        ).map_batches(
            UncertaintyScorer,
            fn_constructor_args=(spec,),
            batch_size=max(1, batch_size),
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=size),
            num_cpus=settings.ray_num_cpus_per_actor,
            num_gpus=settings.ray_num_gpus_per_actor or None,
        )
        version_ids: dict[str, int] = {}
        for batch in _results(dataset):
            rows = []
            for image_id, score, components, error, version in zip(
                batch["image_id"],
                batch["score"],
                batch["components"],
                batch["error"],
                batch["version"],
                strict=True,
            ):
                if error:
                    report.failed += 1
                    report.errors.append(str(error))
                    continue
                version = str(version)
                if version not in version_ids:
                    version_ids[version] = _version_id(db, version, spec)
                rows.append(
                    {
                        "image_id": int(image_id),
                        "score": float(score),
                        "components": json.loads(str(components)),
                        "model_version_id": version_ids[version],
                        "ls_task_id": tasks.get(int(image_id)),
                    }
                )
                report.model_version = version
            if rows:
                with db.begin() as conn:
                    _upsert(conn, project_id, rows)
                report.ranked += len(rows)
    finally:
        context.enable_progress_bars = saved
    if report.model_version is None:
        report.model_version = spec.engines[0].name if spec.engines[0] else spec.base_engine


def _version_id(db: Engine, name: str, spec: ScoreSpec) -> int:
    served = spec.engines[0]
    if served is not None and served.name == name:
        return served.id
    return ensure_model_version(db, name, engine=spec.base_engine)


# --------------------------------------------------------------------------------------------
# next
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NextTask:
    rank: int
    ls_task_id: int | None
    uri: str | None
    uncertainty: float
    model_version: str | None
    components: dict[str, float]


def next_tasks(
    db: Engine, project_id: int, count: int = 10, *, strategy: str = "top", seed: int = 0
) -> list[NextTask]:
    """The ``count`` unlabelled images of the project to label next, most uncertain first.

    ``top``: the most uncertain (in SQL, whatever the project's size). The other strategies of
    :func:`select_batch` read every ranked unlabelled image's score (and features) and draw the
    batch with ``numpy.random.default_rng(seed)``."""
    if count < 1:
        raise ActiveLearningError("the number of tasks must be at least 1")
    if strategy not in CHOICES:
        raise ActiveLearningError(f"unknown strategy {strategy!r}: use one of {', '.join(CHOICES)}")
    if strategy == "auto":
        strategy = "diverse" if versions.promoted_version(db, project_id) is None else "top"
    table, names = Uncertainty.__table__, ModelVersion.__table__
    query = (
        select(table.c.ls_task_id, _uri_of(table.c.image_id), table.c.score, names.c.name, table.c.components)
        .outerjoin(names, names.c.id == table.c.model_version_id)
        .where(and_(table.c.project_id == project_id, table.c.image_id.not_in(labelled_images(project_id))))
        .order_by(table.c.score.desc(), table.c.image_id)
    )
    with db.connect() as conn:
        rows = conn.execute(query.limit(count) if strategy == "top" else query).all()
    if strategy != "top" and rows:
        features = None
        if strategy == "diverse":
            stored = [(r[4] or {}).get(FEATURES_KEY) for r in rows]
            missing = sum(1 for f in stored if not f)
            if missing or len({len(f) for f in stored}) > 1:
                raise ActiveLearningError(
                    f"{missing or 'some'} ranked images have no (or older) appearance features: "
                    "run `seemly al rank` again before --strategy diverse"
                )
            features = stored
        picked = select_batch(
            [float(r[2]) for r in rows], count, np.random.default_rng(seed), strategy, features=features
        )
        rows = [rows[i] for i in sorted(picked)]  # rows are most uncertain first
    return [
        NextTask(
            i + 1,
            r[0],
            r[1],
            float(r[2]),
            r[3],
            {k: float(v) for k, v in (r[4] or {}).items() if k != FEATURES_KEY},
        )
        for i, r in enumerate(rows)
    ]


def format_table(tasks: Sequence[NextTask]) -> str:
    lines = [f"{'rank':>4}  {'task':>8}  {'uncertainty':>11}  image"]
    for task in tasks:
        shown = str(task.ls_task_id) if task.ls_task_id is not None else "-"
        lines.append(f"{task.rank:>4}  {shown:>8}  {task.uncertainty:>11.3f}  {task.uri or '-'}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def configure(parser: argparse.ArgumentParser, words: tuple[str, ...]) -> None:
    parser.add_argument("--project", required=True, help="seemly project (name, or numeric id)")
    if words[-1] == "rank":
        parser.add_argument("--actors", type=int, help="scoring actors (default: one per CPU)")
        parser.add_argument(
            "--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="images per actor call (default 4)"
        )
        parser.add_argument("--seed", type=int, default=0, help="seed of the probe prompts' jitter")
    else:
        parser.add_argument("-n", type=int, default=10, help="how many tasks (default 10)")
        parser.add_argument(
            "--strategy",
            choices=CHOICES,
            default=DEFAULT_STRATEGY,
            help=f"how the batch is chosen (default {DEFAULT_STRATEGY}; docs/learning.md#active-learning)",
        )
        parser.add_argument("--seed", type=int, default=0, help="seed of the sampled strategies")
        parser.add_argument("--json", action="store_true", help="JSON instead of a table")


def run(args: argparse.Namespace, words: tuple[str, ...]) -> int:
    settings = get_settings()
    try:
        if words[-1] == "rank":
            report = rank(
                args.project,
                settings=settings,
                actors=args.actors,
                batch_size=args.batch_size,
                seed=args.seed,
            )
            print(report.summary())
            for error in report.errors[:10]:
                print(f"  failed: {error}")
            return 0
        if args.n < 1:
            raise ActiveLearningError("-n must be at least 1")
        db = make_engine(settings.database_url)
        try:
            tasks = next_tasks(
                db, resolve_project(db, args.project), args.n, strategy=args.strategy, seed=args.seed
            )
        finally:
            db.dispose()
    except ActiveLearningError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([asdict(t) for t in tasks], indent=2))
    elif not tasks:
        print(f"no ranked unlabelled images in project {args.project!r}: run `seemly al rank` first")
    else:
        print(format_table(tasks))
    return 0
