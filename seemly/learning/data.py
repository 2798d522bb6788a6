"""A project's training pairs from Postgres: (image, ground-truth region), split train / held-out.

Where the ground truth comes from: the ``corrections`` table (a submitted Label Studio region,
usually beside the prediction it replaced) and ``masks`` rows of human origin (``annotation`` /
``correction`` sources, e.g. imported annotations). One region has one ground truth, the latest:

* a correction's region is ``(image, ls_region_id)`` (an updated annotation upserts its row, and
  the same Label Studio region in a later annotation of the task replaces it);
* a stored human mask's region is ``(image, ls_annotation_id, label, ordinal)``;
* the same mask stored twice (a correction row *and* a human mask row) counts once.

Reproducibility: a run reads corrections up to ``corrections_upto`` and human masks up to
``masks_upto`` (both ids, recorded in the job's params), so re-running a job sees the same data.

The split is by image (every region of an image lands on the same side) and by the image's
sha256, not by rank: ``int(sha256[:8], 16) / 2**32 < held_out_share`` is held out. An image
therefore never moves between the sides as the project grows, so a version is never gated on
images it (or its parent) was trained on. When that rule leaves a side empty and the project has
at least two images, the image with the lowest (resp. highest) hash is moved, so that both sides
always exist; the only case where a once-trained image can be held out later.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sqlalchemy import Engine, func, select

from seemly.db.models import Correction, MaskSource
from seemly.db.models import Mask as MaskRow
from seemly.masks import Mask, MaskError

log = logging.getLogger(__name__)

MIN_IMAGES = 2  # one to train on, one to gate on


class TrainingDataError(ValueError):
    """A project without enough usable examples to train (or evaluate) a version; says what is missing."""


@dataclass(frozen=True)
class RegionRef:
    """A ground-truth region as stored (before its image is read)."""

    image_id: int
    key: str  # the region's identity within its image
    label: str
    rle: dict[str, Any]
    source: str  # "correction" | "annotation"
    row_id: int


@dataclass
class TrainingPair:
    """One image with one ground-truth region (boolean ``gt`` of the image's shape)."""

    image_id: int
    sha256: str
    key: str
    label: str
    image: np.ndarray
    gt: np.ndarray
    source: str


@dataclass
class TrainingData:
    """The pairs of one run, split, with what could not be used and the ids that bound the data."""

    train: list[TrainingPair]
    held_out: list[TrainingPair]
    failed: list[dict[str, Any]] = field(default_factory=list)  # {"image_id", "error"}
    corrections_upto: int | None = None
    masks_upto: int | None = None

    @property
    def images(self) -> dict[str, int]:
        return {
            "train": len({p.image_id for p in self.train}),
            "held_out": len({p.image_id for p in self.held_out}),
            "failed": len(self.failed),
        }

    def summary(self) -> dict[str, Any]:
        return {
            "train_regions": len(self.train),
            "held_out_regions": len(self.held_out),
            "images": self.images,
            "corrections_upto": self.corrections_upto,
            "masks_upto": self.masks_upto,
        }


def data_bounds(db: Engine, project_id: int) -> tuple[int | None, int | None]:
    """The newest correction id and human-mask id of a project: what a run started now may use."""
    with db.connect() as conn:
        corrections = conn.execute(
            select(func.max(Correction.id)).where(Correction.project_id == project_id)
        ).scalar()
        masks = conn.execute(
            select(func.max(MaskRow.id)).where(
                MaskRow.project_id == project_id,
                MaskRow.source.in_([MaskSource.ANNOTATION, MaskSource.CORRECTION]),
            )
        ).scalar()
    return (int(corrections) if corrections is not None else None, int(masks) if masks is not None else None)


def region_refs(
    db: Engine, project_id: int, *, corrections_upto: int | None, masks_upto: int | None
) -> list[RegionRef]:
    """The project's ground-truth regions, one per region (the latest), in a stable order."""
    latest: dict[tuple[int, str], tuple[Any, RegionRef]] = {}

    def keep(order: Any, ref: RegionRef) -> None:
        slot = (ref.image_id, ref.key)
        if slot not in latest or order >= latest[slot][0]:
            latest[slot] = (order, ref)

    with db.connect() as conn:
        if corrections_upto is not None:
            rows = conn.execute(
                select(
                    Correction.id,
                    Correction.image_id,
                    Correction.ls_annotation_id,
                    Correction.ls_region_id,
                    Correction.label,
                    Correction.submitted_rle,
                    Correction.updated_at,
                )
                .where(Correction.project_id == project_id, Correction.id <= corrections_upto)
                .order_by(Correction.id)
            ).all()
            for row in rows:
                key = f"r:{row.ls_region_id}" if row.ls_region_id else f"a:{row.ls_annotation_id}:{row.label}"
                ref = RegionRef(
                    int(row.image_id), key, row.label, row.submitted_rle, "correction", int(row.id)
                )
                keep((row.updated_at, 1, row.id), ref)
        if masks_upto is not None:
            rows = conn.execute(
                select(
                    MaskRow.id,
                    MaskRow.image_id,
                    MaskRow.ls_annotation_id,
                    MaskRow.label,
                    MaskRow.ordinal,
                    MaskRow.rle,
                    MaskRow.created_at,
                )
                .where(
                    MaskRow.project_id == project_id,
                    MaskRow.source.in_([MaskSource.ANNOTATION, MaskSource.CORRECTION]),
                    MaskRow.id <= masks_upto,
                )
                .order_by(MaskRow.id)
            ).all()
            for row in rows:
                owner = row.ls_annotation_id if row.ls_annotation_id is not None else f"m{row.id}"
                key = f"m:{owner}:{row.label}:{row.ordinal}"
                ref = RegionRef(int(row.image_id), key, row.label, row.rle, "annotation", int(row.id))
                keep((row.created_at, 0, row.id), ref)
    # the same mask under two keys (a correction row and a human mask row) counts once, as the correction
    out: list[RegionRef] = []
    seen: set[tuple[int, str]] = set()
    ordered = sorted(
        latest.values(), key=lambda item: (item[1].image_id, item[1].source != "correction", item[1].key)
    )
    for _order, ref in ordered:
        digest = (ref.image_id, json.dumps(ref.rle, sort_keys=True))
        if digest in seen:
            continue
        seen.add(digest)
        out.append(ref)
    return out


def held_out_fraction(sha256: str) -> float:
    """Where an image falls in [0, 1): its sha256's first 32 bits (uniform, stable)."""
    return int(sha256[:8], 16) / 2**32


def split_images(sha256s: list[str], held_out_share: float) -> tuple[set[str], set[str]]:
    """(train, held-out) image sha256s; see the module docstring for the rule and its fallback."""
    if not 0.0 < held_out_share < 1.0:
        raise TrainingDataError(f"held-out share must be between 0 and 1 (exclusive), not {held_out_share}")
    unique = sorted(set(sha256s), key=lambda s: (held_out_fraction(s), s))
    held = {s for s in unique if held_out_fraction(s) < held_out_share}
    train = set(unique) - held
    if len(unique) >= MIN_IMAGES:
        if not held:
            held = {unique[0]}
            train.discard(unique[0])
        elif not train:
            train = {unique[-1]}
            held.discard(unique[-1])
    return train, held


def load_training_data(
    db: Engine,
    project_id: int,
    storage: Any,
    *,
    corrections_upto: int | None,
    masks_upto: int | None,
    held_out_share: float = 0.2,
    max_images: int | None = None,
    project_name: str | None = None,
) -> TrainingData:
    """Read, decode and split a project's training pairs (see the module docstring).

    An image that cannot be read, or whose regions do not fit its size, is reported in
    ``failed`` and left out; the run goes on with the others. Raises :class:`TrainingDataError`
    when fewer than two usable images remain.
    """
    from seemly.engines.label_model import _load_image

    shown = project_name or f"project {project_id}"
    refs = region_refs(db, project_id, corrections_upto=corrections_upto, masks_upto=masks_upto)
    by_image: dict[int, list[RegionRef]] = {}
    for ref in refs:
        by_image.setdefault(ref.image_id, []).append(ref)
    if len(by_image) < MIN_IMAGES:
        raise TrainingDataError(
            f"{shown} has {len(refs)} labelled region(s) on {len(by_image)} image(s); training needs regions "
            f"on at least {MIN_IMAGES} images (one to learn from, one to check the result on): "
            "annotate or correct more tasks first"
        )
    image_ids = sorted(by_image)
    if max_images is not None and len(image_ids) > max_images:
        image_ids = image_ids[-max_images:]  # the newest images
    pairs: list[TrainingPair] = []
    failed: list[dict[str, Any]] = []
    for image_id in image_ids:
        try:
            loaded = _load_image(db, image_id, storage)
        except Exception as exc:  # a bug or a storage error on one image never fails the run
            log.warning("training data: image %s failed: %s", image_id, exc)
            loaded = None
            failed.append({"image_id": image_id, "error": f"{type(exc).__name__}: {exc}"[:500]})
            continue
        if loaded is None:
            failed.append({"image_id": image_id, "error": "cannot be read from any of its URIs"})
            continue
        image, sha256 = loaded
        usable = 0
        for ref in by_image[image_id]:
            try:
                gt = np.asarray(Mask.from_coco_rle(ref.rle).data, dtype=bool)
            except (MaskError, KeyError, TypeError, ValueError) as exc:
                log.warning("training data: region %s of image %s is not a mask: %s", ref.key, image_id, exc)
                continue
            if gt.shape != image.shape[:2] or not gt.any():
                continue
            pairs.append(TrainingPair(image_id, sha256, ref.key, ref.label, image, gt, ref.source))
            usable += 1
        if not usable:
            failed.append(
                {"image_id": image_id, "error": "no region fits the image (size mismatch or empty)"}
            )
    train_shas, held_shas = split_images([p.sha256 for p in pairs], held_out_share)
    if not train_shas or not held_shas:
        raise TrainingDataError(
            f"{shown}: only {len({p.sha256 for p in pairs})} of {len(image_ids)} labelled images could be used "
            f"({len(failed)} failed, e.g. {failed[0]['error'] if failed else 'none'}); training needs at least "
            f"{MIN_IMAGES}"
        )
    return TrainingData(
        train=[p for p in pairs if p.sha256 in train_shas],
        held_out=[p for p in pairs if p.sha256 in held_shas],
        failed=failed,
        corrections_upto=corrections_upto,
        masks_upto=masks_upto,
    )
