"""``seemly demo``: the main job end to end on bundled sample images, with embedded defaults.

It makes a small ``file://`` "bucket" from scikit-image's bundled photos (plus one corrupt file, to
show that a bad object becomes a failed row rather than a crash), migrates the database (SQLite by
default, Postgres when ``SEEMLY_DATABASE_URL`` says so), segments every image with the configured
engine, stores images and masks, writes overlay PNGs and prints a summary.
"""

from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

import numpy as np
from PIL import Image as PILImage
from tqdm import tqdm

from seemly.config import get_settings
from seemly.db.bulk import mask_row
from seemly.db.jobs import complete_item, create_job, fail_item, finish_job
from seemly.db.migrate import upgrade
from seemly.db.models import JobStatus, MaskSource
from seemly.db.registry import ensure_model_version, ensure_project
from seemly.db.session import make_engine
from seemly.engines.base import create_engine
from seemly.overlay import overlay
from seemly.pipeline import SegmentMode, segment_bytes
from seemly.storage import Storage, path_to_uri

SAMPLES = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "coins")


def write_sample_bucket(bucket: Path) -> list[Path]:
    """Write scikit-image's bundled sample photos (and one truncated JPEG) into ``bucket``."""
    from skimage import data as samples

    bucket.mkdir(parents=True, exist_ok=True)
    written = []
    for name in SAMPLES:
        path = bucket / f"{name}.jpg"
        if not path.exists():
            array = getattr(samples, name)()
            if array.ndim == 2:
                array = np.stack([array] * 3, axis=-1)
            PILImage.fromarray(array).save(path, quality=92)
        written.append(path)
    broken = bucket / "broken.jpg"
    if not broken.exists():
        buffer = io.BytesIO()
        PILImage.fromarray(np.zeros((64, 64, 3), np.uint8)).save(buffer, format="JPEG")
        broken.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 3])  # truncated on purpose
    written.append(broken)
    return written


def configure(parser: argparse.ArgumentParser, words: tuple[str, ...]) -> None:
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: $SEEMLY_HOME/demo)")
    parser.add_argument(
        "--mode",
        choices=[m.value for m in SegmentMode],
        default=SegmentMode.CENTER_BOX.value,
        help="what to segment in each image",
    )
    parser.add_argument("--project", default="demo", help="project name to store the masks under")


def run(args: argparse.Namespace, words: tuple[str, ...]) -> int:
    settings = get_settings()
    out: Path = (args.out or settings.home / "demo").expanduser().resolve()
    bucket, overlays = out / "bucket", out / "overlays"
    overlays.mkdir(parents=True, exist_ok=True)
    write_sample_bucket(bucket)

    upgrade(settings.database_url)
    db = make_engine(settings.database_url)
    engine = create_engine(settings.engine)
    project_id = ensure_project(db, args.project)
    version_id = ensure_model_version(db, engine.model_version, engine=engine.name)
    mode = SegmentMode(args.mode)
    storage = Storage.from_settings(settings.model_copy(update={"file_roots": [bucket]}))
    job_id = create_job(
        db, "demo", project_id=project_id, params={"bucket": path_to_uri(bucket), "mode": mode.value}
    )

    rows: list[tuple[str, str]] = []
    started = time.perf_counter()
    objects = list(storage.iter_objects(path_to_uri(bucket) + "/"))
    for info in tqdm(objects, desc="segmenting", unit="img"):
        outcome = segment_bytes(
            info.uri,
            storage.read(info.uri),
            engine,
            mode,
            max_pixels=settings.max_image_pixels,
            max_bytes=settings.max_image_bytes,
            keep_image=True,
        )
        name = Path(info.key).name
        if not outcome.ok:
            fail_item(db, job_id, info.uri, outcome.error or "unknown error")
            rows.append((name, f"failed: {outcome.error}"))
            continue
        masks = [
            mask_row(
                s.mask,
                project_id=project_id,
                image_id=0,  # filled in by complete_item once the image row exists
                source=MaskSource.BUCKET,
                model_version_id=version_id,
                label=s.label or "",
                ordinal=i,
                score=s.score,
            )
            for i, s in enumerate(outcome.segments)
        ]
        image_meta = {
            "sha256": outcome.sha256,
            "width": outcome.width,
            "height": outcome.height,
            "size_bytes": outcome.size_bytes,
            "uri": info.uri,
        }
        complete_item(db, job_id, info.uri, image=image_meta, mask_rows=masks)
        target = overlays / f"{Path(name).stem}.png"
        assert outcome.image is not None
        PILImage.fromarray(overlay(outcome.image.array, [s.mask for s in outcome.segments])).save(target)
        best = max((s.score for s in outcome.segments), default=0.0)
        rows.append(
            (
                name,
                f"{len(outcome.segments)} mask(s), best score {best:.2f}, "
                f"embed {outcome.embed_seconds:.2f}s + segment {outcome.segment_seconds:.2f}s -> {target}",
            )
        )
    counts = finish_job(db, job_id, JobStatus.SUCCEEDED)
    elapsed = time.perf_counter() - started

    print(f"\nseemly demo — engine {engine.model_version}, mode {mode.value}, job {job_id}")
    for name, text in rows:
        print(f"  {name:<28} {text}")
    print(
        f"done {counts['done']}, failed {counts['failed']}, masks stored {counts['masks']} "
        f"in {elapsed:.1f}s; database {_display(settings.database_url)}; overlays in {overlays}"
    )
    return 0


def _display(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)
