"""Masks a bucket job (or an earlier batch request) already stored for an image and model version.

A batch ``/predict`` for an image whose masks are in the ``masks`` table (``source = 'bucket'``) for
the current model version is answered from there at once, without segmenting. The image is found
by its URI (``image_uris``) when the job registered that URI, so not even a download is needed;
otherwise by sha256 after one download.
"""

from __future__ import annotations

from sqlalchemy import Engine, select

from seemly.db.models import Image, ImageUri, MaskSource, ModelVersion, Project
from seemly.db.models import Mask as MaskRow
from seemly.engines.base import Segment
from seemly.masks import Mask

UNSCORED = 1.0
"""Score given to stored masks whose producer recorded none (Label Studio's ``score`` is always set)."""


def _query(ls_project_id: int, model_version: str):  # type: ignore[no-untyped-def]
    return (
        select(MaskRow.rle, MaskRow.label, MaskRow.score, Image.sha256)
        .join(Image, Image.id == MaskRow.image_id)
        .join(ModelVersion, ModelVersion.id == MaskRow.model_version_id)
        .join(Project, Project.id == MaskRow.project_id)
        .where(
            MaskRow.source == MaskSource.BUCKET,
            ModelVersion.name == model_version,
            Project.ls_project_id == ls_project_id,
        )
        .order_by(MaskRow.label, MaskRow.ordinal)
    )


def _segments(rows, model_version: str) -> list[Segment]:  # type: ignore[no-untyped-def]
    return [
        Segment(
            mask=Mask.from_coco_rle(rle),
            score=float(score) if score is not None else UNSCORED,
            model_version=model_version,
            label=label or None,
        )
        for rle, label, score, _sha in rows
    ]


def by_uri(db: Engine, ls_project_id: int, uri: str, model_version: str) -> tuple[str, list[Segment]] | None:
    """``(sha256, segments)`` stored for the image at ``uri``, or ``None``."""
    query = (
        _query(ls_project_id, model_version)
        .join(ImageUri, ImageUri.image_id == Image.id)
        .where(ImageUri.uri == uri)
    )
    with db.connect() as conn:
        rows = conn.execute(query).all()
    if not rows:
        return None
    return rows[0][3], _segments(rows, model_version)


def by_sha256(db: Engine, ls_project_id: int, sha256: str, model_version: str) -> list[Segment] | None:
    with db.connect() as conn:
        rows = conn.execute(_query(ls_project_id, model_version).where(Image.sha256 == sha256)).all()
    return _segments(rows, model_version) if rows else None
