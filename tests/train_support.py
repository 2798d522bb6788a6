"""Tiny synthetic projects for the learning-loop tests: images with known masks, stored as corrections.

Each image is a small noisy picture with one or two coloured blobs; the ground truth of each blob is
stored as a ``corrections`` row (as the backend's webhook writer does), the PNG on disk under
``root`` with its ``images`` / ``image_uris`` rows. Small enough that simulating click sessions
and a few Ray Train steps take seconds.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from sqlalchemy import Engine, func, select

from seemly.config import Settings
from seemly.db import models as db
from seemly.images import sha256_hex
from seemly.masks import Mask
from seemly.storage import path_to_uri


def scene(seed: int, size: tuple[int, int] = (40, 32), blobs: int = 1) -> tuple[np.ndarray, list[np.ndarray]]:
    """An RGB image and the boolean mask of each blob (ellipses of a colour unlike the ground)."""
    rng = np.random.default_rng(seed)
    width, height = size
    image = (rng.integers(20, 70, (height, width, 3))).astype(np.uint8)
    yy, xx = np.mgrid[:height, :width]
    masks = []
    for index in range(blobs):
        cy = height * (0.5 if blobs == 1 else 0.3 + 0.4 * index) + rng.uniform(-2, 2)
        cx = width * (0.5 if blobs == 1 else 0.3 + 0.4 * index) + rng.uniform(-2, 2)
        ry, rx = height * rng.uniform(0.15, 0.25), width * rng.uniform(0.15, 0.25)
        mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
        image[mask] = rng.integers(150, 250, 3)
        masks.append(mask)
    return image, masks


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def make_project(
    engine: Engine, name: str = "p-train", ls_project_id: int | None = 11, **settings: Any
) -> int:
    with engine.begin() as conn:
        return int(
            conn.execute(
                db.Project.__table__.insert()
                .values(name=name, ls_project_id=ls_project_id, labels=["blob"], settings=settings)
                .returning(db.Project.__table__.c.id)
            ).scalar_one()
        )


def add_image(engine: Engine, root: Path, seed: int, **kwargs: Any) -> tuple[int, list[np.ndarray]]:
    """Write the image of ``scene(seed)`` under ``root`` and register it; returns (image id, masks)."""
    image, masks = scene(seed, **kwargs)
    data = png(image)
    path = root / f"img-{seed}.png"
    path.write_bytes(data)
    with engine.begin() as conn:
        image_id = conn.execute(
            db.Image.__table__.insert()
            .values(
                sha256=sha256_hex(data), width=image.shape[1], height=image.shape[0], size_bytes=len(data)
            )
            .returning(db.Image.__table__.c.id)
        ).scalar_one()
        conn.execute(db.ImageUri.__table__.insert().values(image_id=image_id, uri=path_to_uri(path)))
    return int(image_id), masks


def add_correction(
    engine: Engine,
    project_id: int,
    image_id: int,
    mask: np.ndarray,
    *,
    annotation: int,
    region: str = "r1",
    task: int | None = None,
    label: str = "blob",
) -> int:
    with engine.begin() as conn:
        return int(
            conn.execute(
                db.Correction.__table__.insert()
                .values(
                    project_id=project_id,
                    image_id=image_id,
                    ls_task_id=task if task is not None else image_id,
                    ls_annotation_id=annotation,
                    ls_region_id=region,
                    label=label,
                    submitted_rle=Mask(mask).to_coco_rle(),
                )
                .returning(db.Correction.__table__.c.id)
            ).scalar_one()
        )


def labelled_project(
    engine: Engine,
    root: Path,
    images: int = 6,
    name: str = "p-train",
    ls_project_id: int | None = 11,
    **settings: Any,
) -> int:
    """A project with ``images`` labelled images, one correction each."""
    project_id = make_project(engine, name, ls_project_id, **settings)
    for seed in range(images):
        image_id, masks = add_image(engine, root, 1000 * project_id + seed)
        add_correction(engine, project_id, image_id, masks[0], annotation=100 * project_id + seed)
    return project_id


def train_settings(postgres_url: str, root: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": postgres_url,
        "home": root / "home",
        "file_roots": [root],
        "engine": "classic",
        "ray_num_cpus_per_actor": 0.5,
        "train_epochs": 1,
        "train_held_out_share": 0.34,
    }
    values.update(overrides)
    return Settings(**values)


def count(engine: Engine, table: Any, *where: Any) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table).where(*where)).scalar_one())
