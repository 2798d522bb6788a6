"""Hand-off to Label Studio: import a project's bucket masks into a Label Studio project as predictions.

::

    seemly ls import-predictions --project NAME --ls-project ID [--ls-url URL] [--ls-api-key KEY]
                                 [--model-version V] [--batch-size 100]

(also run by ``seemly presegment ... --ls-project ID`` when the job is done).

How tasks and images meet: a task's image URL (``task.data[<Image value="$key">]``, e.g.
``s3://bucket/key`` for tasks made by Label Studio's S3 import storage) is looked up in
``image_uris``; the masks of that image by the chosen model version become one prediction of the
task, one region per mask: brush RLE (``Mask.to_ls_brush_rle``) for a ``<BrushLabels>`` config,
polygons for a ``<PolygonLabels>`` one. The prediction carries ``model_version`` (the seemly model
version name) and ``score``: ``1 - uncertainty`` when ``seemly al rank`` ranked the image (so sorting
the Data Manager by prediction score, ascending, puts the most uncertain tasks first; see
docs/learning.md), else the mean of its masks' scores.

Idempotent: a task that already has a prediction of this model version is left alone, so a rerun
(or an import interrupted half-way and started again) creates no duplicates. Predictions are sent
in batches through ``POST /api/projects/<id>/import/predictions`` (label-studio-sdk 2.x
``projects.import_predictions``).
"""

from __future__ import annotations

import argparse
import logging
import secrets
import sys
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, select

from plugin.labeling_config import ControlTag, LabelingConfigError, parse_labeling_config
from seemly.config import Settings, get_settings
from seemly.db.models import ImageUri, MaskSource, ModelVersion, Project, Uncertainty
from seemly.db.models import Mask as MaskRecord
from seemly.db.session import make_engine
from seemly.masks import Mask

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 100
TASK_PAGE_SIZE = 500


class PredictionImportError(Exception):
    """The import cannot proceed (unknown project, config without an output tag, ...)."""


@dataclass
class ImportReport:
    ls_project_id: int
    model_version: str
    tasks_seen: int = 0
    tasks_matched: int = 0  # tasks whose image has masks of this model version
    predictions_created: int = 0
    tasks_already_predicted: int = 0
    tasks_without_masks: int = 0
    regions: int = 0
    unmatched_examples: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"Label Studio project {self.ls_project_id}: {self.tasks_seen} tasks, "
            f"{self.predictions_created} predictions created ({self.regions} regions, model version "
            f"{self.model_version}), {self.tasks_already_predicted} already had one, "
            f"{self.tasks_without_masks} without masks"
        )


def _region_id() -> str:
    return secrets.token_urlsafe(7)[:10]


def mask_results(mask: Mask, label: str, tag: ControlTag, score: float | None) -> list[dict[str, Any]]:
    """The Label Studio result dicts of one mask on ``tag`` (brush: one region; polygon: one per ring)."""
    labels = [label] if label else []
    common = {
        "from_name": tag.name,
        "to_name": tag.to_name,
        "original_width": mask.width,
        "original_height": mask.height,
        "image_rotation": 0,
        "readonly": False,
    }
    if score is not None:
        common["score"] = float(score)
    if tag.result_type == "brushlabels":
        value = {"format": "rle", "rle": mask.to_ls_brush_rle(), "brushlabels": labels}
        return [{"id": _region_id(), "type": "brushlabels", "value": value, **common}]
    return [
        {
            "id": _region_id(),
            "type": "polygonlabels",
            "value": {"points": ring, "closed": True, "polygonlabels": labels},
            **common,
        }
        for ring in mask.to_ls_polygons_percent()
    ]


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _resolve_version(db: Engine, project_id: int, wanted: str | None) -> tuple[int, str]:
    """The model version to import: ``wanted``, or the only one with bucket masks in the project."""
    masks, versions = MaskRecord.__table__, ModelVersion.__table__
    with db.connect() as conn:
        present = conn.execute(
            select(versions.c.id, versions.c.name)
            .where(
                versions.c.id.in_(
                    select(masks.c.model_version_id)
                    .where(masks.c.project_id == project_id, masks.c.source == MaskSource.BUCKET.value)
                    .distinct()
                )
            )
            .order_by(versions.c.id)
        ).all()
    if wanted is not None:
        for version_id, name in present:
            if name == wanted:
                return int(version_id), name
        known = ", ".join(name for _id, name in present) or "none"
        raise PredictionImportError(
            f"no bucket masks of model version {wanted!r} in this project (present: {known})"
        )
    if not present:
        raise PredictionImportError("the project has no bucket masks yet: run `seemly presegment` first")
    if len(present) > 1:
        names = ", ".join(name for _id, name in present)
        raise PredictionImportError(
            f"the project has masks of several model versions ({names}): pick one with --model-version"
        )
    return int(present[0][0]), str(present[0][1])


def _masks_by_uri(
    db: Engine, project_id: int, version_id: int, uris: Iterable[str]
) -> dict[str, list[tuple[str, int, dict[str, Any], float | None]]]:
    """``{uri: [(label, ordinal, rle, score), ...]}`` for the URIs that have masks."""
    masks, image_uris = MaskRecord.__table__, ImageUri.__table__
    out: dict[str, list[tuple[str, int, dict[str, Any], float | None]]] = defaultdict(list)
    with db.connect() as conn:
        rows = conn.execute(
            select(image_uris.c.uri, masks.c.label, masks.c.ordinal, masks.c.rle, masks.c.score)
            .join(masks, masks.c.image_id == image_uris.c.image_id)
            .where(
                image_uris.c.uri.in_(list(uris)),
                masks.c.project_id == project_id,
                masks.c.model_version_id == version_id,
                masks.c.source == MaskSource.BUCKET.value,
            )
            .order_by(image_uris.c.uri, masks.c.label, masks.c.ordinal)
        )
        for uri, label, ordinal, rle, score in rows:
            out[uri].append((label, ordinal, rle, score))
    return out


def uncertainty_by_uri(db: Engine, project_id: int, uris: Iterable[str]) -> dict[str, float]:
    """``{uri: uncertainty}`` for the URIs whose image ``seemly al rank`` scored in this project."""
    table, image_uris = Uncertainty.__table__, ImageUri.__table__
    with db.connect() as conn:
        rows = conn.execute(
            select(image_uris.c.uri, table.c.score)
            .join(table, table.c.image_id == image_uris.c.image_id)
            .where(image_uris.c.uri.in_(list(uris)), table.c.project_id == project_id)
        )
        return {uri: float(score) for uri, score in rows}


def prediction_score(mask_scores: Sequence[float], uncertainty: float | None) -> float | None:
    """A prediction's ``score``: ``1 - uncertainty`` for a ranked image (Label Studio's Data Manager
    sorts by it: lowest = most uncertain), else the mean of the masks' own scores."""
    if uncertainty is not None:
        return round(1.0 - min(max(uncertainty, 0.0), 1.0), 6)
    return sum(mask_scores) / len(mask_scores) if mask_scores else None


def _task_fields(task: Any) -> tuple[int, Mapping[str, Any], str]:
    data = task.get("data") if isinstance(task, Mapping) else getattr(task, "data", None)
    task_id = task.get("id") if isinstance(task, Mapping) else task.id
    versions = task.get("predictions_model_versions") if isinstance(task, Mapping) else None
    if versions is None:
        versions = getattr(task, "predictions_model_versions", None)
    if isinstance(versions, list | tuple):
        versions = ",".join(str(v) for v in versions)
    return int(task_id), data or {}, str(versions or "")


def import_predictions(
    project: str,
    *,
    ls_url: str | None,
    api_key: str | None,
    ls_project_id: int,
    settings: Settings | None = None,
    model_version: str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    client: Any = None,
) -> ImportReport:
    """Create a prediction for every task of ``ls_project_id`` whose image has masks (see the module doc)."""
    from label_studio_sdk import LabelStudio, PredictionRequest

    settings = settings or get_settings()
    if client is None:
        if not ls_url or not api_key:
            raise PredictionImportError("a Label Studio URL and API key are needed (--ls-url, --ls-api-key)")
        client = LabelStudio(base_url=ls_url, api_key=api_key, timeout=120)
    db = make_engine(settings.database_url)
    try:
        with db.connect() as conn:
            project_id = conn.execute(
                select(Project.__table__.c.id).where(Project.__table__.c.name == project)
            ).scalar_one_or_none()
        if project_id is None:
            raise PredictionImportError(f"no seemly project named {project!r}")
        version_id, version_name = _resolve_version(db, int(project_id), model_version)
        ls_project = client.projects.get(id=ls_project_id)
        try:
            config = parse_labeling_config(ls_project.label_config or "")
        except LabelingConfigError as exc:
            raise PredictionImportError(f"Label Studio project {ls_project_id}: {exc}") from None
        tag = config.output
        default_label = tag.labels[0] if len(tag.labels) == 1 else ""
        report = ImportReport(ls_project_id=ls_project_id, model_version=version_name)

        pending: list[Any] = []

        def flush() -> None:
            if pending:
                client.projects.import_predictions(id=ls_project_id, request=list(pending))
                report.predictions_created += len(pending)
                pending.clear()

        # fields=all makes Label Studio compute predictions_model_versions; include keeps the page small.
        tasks = client.tasks.list(
            project=ls_project_id,
            page_size=TASK_PAGE_SIZE,
            fields="all",
            include="id,data,predictions_model_versions",
        )
        page: list[tuple[int, str]] = []

        def handle(page: list[tuple[int, str]]) -> None:
            found = _masks_by_uri(db, int(project_id), version_id, [uri for _id, uri in page])
            uncertain = uncertainty_by_uri(db, int(project_id), list(found))
            for task_id, uri in page:
                rows = found.get(uri)
                if not rows:
                    report.tasks_without_masks += 1
                    if len(report.unmatched_examples) < 5:
                        report.unmatched_examples.append(uri)
                    continue
                results: list[dict[str, Any]] = []
                scores = [float(score) for _l, _o, _r, score in rows if score is not None]
                for label, _ordinal, rle, score in rows:
                    results += mask_results(Mask.from_coco_rle(rle), label or default_label, tag, score)
                report.tasks_matched += 1
                report.regions += len(results)
                pending.append(
                    PredictionRequest(
                        task=task_id,
                        result=results,
                        score=prediction_score(scores, uncertain.get(uri)),
                        model_version=version_name,
                    )
                )
                if len(pending) >= batch_size:
                    flush()

        for task in tasks:
            task_id, data, versions = _task_fields(task)
            report.tasks_seen += 1
            if version_name in {v.strip() for v in versions.split(",") if v.strip()}:
                report.tasks_already_predicted += 1
                continue
            uri = data.get(config.image.data_key)
            if not isinstance(uri, str):
                report.tasks_without_masks += 1
                continue
            page.append((task_id, uri))
            if len(page) >= TASK_PAGE_SIZE:
                handle(page)
                page = []
        handle(page)
        flush()
        return report
    finally:
        db.dispose()


# --------------------------------------------------------------------------------------------
def configure(parser: argparse.ArgumentParser, words: tuple[str, ...]) -> None:
    parser.add_argument("--project", required=True, help="seemly project whose masks to import")
    parser.add_argument("--ls-project", type=int, required=True, help="Label Studio project id")
    parser.add_argument("--ls-url", help="Label Studio URL (default: SEEMLY_LABEL_STUDIO_URL)")
    parser.add_argument(
        "--ls-api-key", help="Label Studio access token (default: SEEMLY_LABEL_STUDIO_API_KEY)"
    )
    parser.add_argument("--model-version", help="model version to import (default: the only one present)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="predictions per request")


def import_from_args(args: argparse.Namespace, settings: Settings, **options: Any) -> ImportReport:
    """:func:`import_predictions` for a command line's ``--project/--ls-url/--ls-api-key/--ls-project``
    (URL and token default to the settings); shared by this command and ``seemly presegment``."""
    key = args.ls_api_key or (
        settings.label_studio_api_key.get_secret_value() if settings.label_studio_api_key else None
    )
    return import_predictions(
        args.project,
        ls_url=args.ls_url or settings.label_studio_url,
        api_key=key,
        ls_project_id=args.ls_project,
        settings=settings,
        **options,
    )


def run(args: argparse.Namespace, words: tuple[str, ...]) -> int:
    settings = get_settings()
    try:
        report = import_from_args(
            args, settings, model_version=args.model_version, batch_size=max(1, args.batch_size)
        )
    except PredictionImportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(report.summary())
    if report.unmatched_examples:
        print("tasks without masks, e.g.: " + ", ".join(report.unmatched_examples))
    return 0
