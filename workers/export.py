"""``seemly export coco``: a project's masks as a COCO instances JSON file.

::

    seemly export coco --project NAME --out FILE|s3://bucket/key [--model-version V] [--source bucket]

* ``images``: one per image that has masks: ``id`` (seemly's image id), ``file_name`` (its first URI
  in alphabetical order; every URI is in ``seemly_uris``), ``width``, ``height``, ``seemly_sha256``.
* ``annotations``: one per mask: ``segmentation`` as compressed COCO RLE (``{"size": [h, w],
  "counts": "..."}``, exactly as stored), ``bbox`` ``[x, y, w, h]``, ``area`` (pixels), ``score``,
  ``iscrowd`` 0, ``category_id``, ``seemly_model_version``.
* ``categories``: the project's labels in order, then any other label found on a mask; masks
  without a label go to category ``object``.

Without ``--model-version`` the export takes the only model version with masks of that source in
the project, and refuses (listing them) when there are several: mixing two models' masks in one
file would double every object.

The file is written incrementally (rows are streamed from the database), so a project of millions
of masks does not have to fit in memory; an ``s3://`` destination is written to a temporary file first.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from sqlalchemy import Engine, func, select

from seemly.config import Settings, get_settings
from seemly.db.models import Image, ImageUri, MaskSource, ModelVersion, Project
from seemly.db.models import Mask as MaskRecord
from seemly.db.session import make_engine
from seemly.storage import FileLocation, Storage, StorageError, parse_uri

UNLABELED = "object"
STREAM_ROWS = 2_000


class ExportError(Exception):
    """The export cannot be made (unknown project, ambiguous model version, ...)."""


def _versions(db: Engine, project_id: int, source: str) -> list[tuple[int, str]]:
    masks, versions = MaskRecord.__table__, ModelVersion.__table__
    with db.connect() as conn:
        return [
            (int(i), str(n))
            for i, n in conn.execute(
                select(versions.c.id, versions.c.name)
                .where(
                    versions.c.id.in_(
                        select(masks.c.model_version_id)
                        .where(masks.c.project_id == project_id, masks.c.source == source)
                        .distinct()
                    )
                )
                .order_by(versions.c.id)
            )
        ]


def _dump(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _write_list(out: IO[str], name: str, items: Iterator[dict[str, Any]], last: bool = False) -> int:
    out.write(f'"{name}":[')
    count = 0
    for item in items:
        out.write(("," if count else "") + _dump(item))
        count += 1
    out.write("]" + ("" if last else ","))
    return count


def write_coco(
    db: Engine, project: str, out: IO[str], *, model_version: str | None = None, source: str = "bucket"
) -> dict[str, int]:
    """Stream the COCO document of ``project`` into ``out``; returns counts of images/annotations/categories."""
    source = MaskSource(source).value
    projects = Project.__table__
    with db.connect() as conn:
        row = conn.execute(
            select(projects.c.id, projects.c.labels).where(projects.c.name == project)
        ).one_or_none()
    if row is None:
        raise ExportError(f"no project named {project!r}")
    project_id, labels = int(row.id), [str(label) for label in (row.labels or [])]
    present = _versions(db, project_id, source)
    if model_version is not None:
        chosen = [(i, n) for i, n in present if n == model_version]
        if not chosen:
            names = ", ".join(n for _i, n in present) or "none"
            raise ExportError(f"no {source} masks of model version {model_version!r} (present: {names})")
    elif len(present) > 1:
        raise ExportError(
            f"masks of several model versions ({', '.join(n for _i, n in present)}): pick one with --model-version"
        )
    else:
        chosen = present
    version_ids = [i for i, _n in chosen]
    version_names = dict(chosen)

    masks, images, uris = MaskRecord.__table__, Image.__table__, ImageUri.__table__
    where = (masks.c.project_id == project_id) & (masks.c.source == source)
    if version_ids:
        where = where & masks.c.model_version_id.in_(version_ids)

    with db.connect() as conn:
        found = [str(v) for (v,) in conn.execute(select(masks.c.label).where(where).distinct())]
    names = list(dict.fromkeys(labels + sorted(label for label in found if label and label not in labels)))
    if "" in found and UNLABELED not in names:
        names.append(UNLABELED)
    category_ids = {name: index for index, name in enumerate(names, start=1)}
    category_ids[""] = category_ids.get(UNLABELED, 0)

    def image_rows() -> Iterator[dict[str, Any]]:
        image_ids = select(masks.c.image_id).where(where).distinct().scalar_subquery()
        uri_list = (
            select(uris.c.image_id, func.min(uris.c.uri).label("first_uri"), func.count().label("n"))
            .group_by(uris.c.image_id)
            .subquery()
        )
        query = (
            select(images.c.id, images.c.width, images.c.height, images.c.sha256, uri_list.c.first_uri)
            .join(uri_list, uri_list.c.image_id == images.c.id, isouter=True)
            .where(images.c.id.in_(image_ids))
            .order_by(images.c.id)
        )
        with db.connect() as conn:
            for image in conn.execution_options(yield_per=STREAM_ROWS).execute(query):
                yield {
                    "id": int(image.id),
                    "file_name": image.first_uri or image.sha256,
                    "width": int(image.width),
                    "height": int(image.height),
                    "seemly_sha256": image.sha256,
                }

    def annotation_rows() -> Iterator[dict[str, Any]]:
        query = (
            select(
                masks.c.id,
                masks.c.image_id,
                masks.c.label,
                masks.c.rle,
                masks.c.bbox,
                masks.c.area,
                masks.c.score,
                masks.c.model_version_id,
            )
            .where(where)
            .order_by(masks.c.image_id, masks.c.label, masks.c.ordinal, masks.c.id)
        )
        with db.connect() as conn:
            for mask in conn.execution_options(yield_per=STREAM_ROWS).execute(query):
                rle = dict(mask.rle)
                counts = rle.get("counts")
                if isinstance(counts, list):  # uncompressed RLE: compress, as COCO tools expect for files
                    from pycocotools import mask as coco_mask

                    height, width = rle["size"]
                    encoded = coco_mask.frPyObjects(rle, height, width)
                    rle = {"size": [height, width], "counts": encoded["counts"].decode("ascii")}
                bbox = [float(v) for v in mask.bbox] if mask.bbox else [0.0, 0.0, 0.0, 0.0]
                item: dict[str, Any] = {
                    "id": int(mask.id),
                    "image_id": int(mask.image_id),
                    "category_id": category_ids.get(mask.label or "", category_ids[""]),
                    "segmentation": rle,
                    "area": float(mask.area),
                    "bbox": bbox,
                    "iscrowd": 0,
                }
                if mask.score is not None:
                    item["score"] = float(mask.score)
                if mask.model_version_id is not None:
                    item["seemly_model_version"] = version_names.get(int(mask.model_version_id))
                yield item

    out.write("{")
    info = {
        "description": f"seemly project {project} ({source} masks)",
        "version": ", ".join(version_names.values()) or "-",
        "date_created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    out.write(f'"info":{_dump(info)},"licenses":[],')
    n_images = _write_list(out, "images", image_rows())
    n_annotations = _write_list(out, "annotations", annotation_rows())
    categories = (
        {"id": category_id, "name": name, "supercategory": ""}
        for name, category_id in category_ids.items()
        if name
    )
    n_categories = _write_list(out, "categories", categories, last=True)
    out.write("}\n")
    return {"images": n_images, "annotations": n_annotations, "categories": n_categories}


def export_coco(
    project: str,
    destination: str | Path,
    *,
    settings: Settings | None = None,
    model_version: str | None = None,
    source: str = "bucket",
) -> dict[str, int]:
    """Write the COCO file to a local path, ``file://`` or ``s3://`` URI; returns the counts.

    A local file appears complete or not at all (written beside it, then renamed).
    """
    settings = settings or get_settings()
    target = str(destination)
    db = make_engine(settings.database_url)
    try:
        if target.startswith("s3://"):
            parse_uri(target)
            with tempfile.TemporaryFile("w+", encoding="utf-8") as text:
                counts = write_coco(db, project, text, model_version=model_version, source=source)
                text.seek(0)
                data = text.read().encode("utf-8")
            Storage.from_settings(settings, default_max_bytes=None).write(target, data, "application/json")
            return counts
        location = parse_uri(target) if target.startswith("file:") else None
        path = Path(location.path) if isinstance(location, FileLocation) else Path(target)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial")
        try:
            with partial.open("w", encoding="utf-8") as out:
                counts = write_coco(db, project, out, model_version=model_version, source=source)
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
        return counts
    finally:
        db.dispose()


def configure(parser: argparse.ArgumentParser, words: tuple[str, ...]) -> None:
    parser.add_argument("--project", required=True, help="seemly project to export")
    parser.add_argument("--out", required=True, help="output file (or s3://bucket/key)")
    parser.add_argument("--model-version", help="model version whose masks to export (default: the only one)")
    parser.add_argument(
        "--source",
        default=MaskSource.BUCKET.value,
        choices=[s.value for s in MaskSource],
        help="which masks: bucket job output (default), interactive answers, annotations, corrections",
    )


def run(args: argparse.Namespace, words: tuple[str, ...]) -> int:
    try:
        counts = export_coco(args.project, args.out, model_version=args.model_version, source=args.source)
    except (ExportError, StorageError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"wrote {args.out}: {counts['images']} images, {counts['annotations']} annotations, "
        f"{counts['categories']} categories"
    )
    return 0
