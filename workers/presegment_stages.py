"""The two Ray Data stages of a bucket pre-segmentation job, and the database writes they make.

::

    ItemSource (read task)                      SegmentWriter (actor pool)                driver
    list a page ─► register job_items (COPY) ─► fetch (threads) ─► decode ─► embed ─► ─► progress bar,
      ─► drop items already done ─► emit block    segment ─► ONE transaction per batch:   job counters
                                                  images + masks (COPY) + done/failed marks

Exactly-once rests on three facts, each enforced by Postgres rather than by the pipeline:

1. an item's masks and its ``done`` mark are committed in the same transaction (per batch), so an
   item is either finished with all its masks or not finished with none of them;
2. the source emits only the items that are not ``done``/``skipped`` in this job (nor ``done`` in an
   earlier job of the same project, location, mode and model version), so a rerun or resume
   re-does only what never committed;
3. should an item still be done twice (a Ray task retried after its first attempt committed, two
   drivers on one job), the bucket mask key ``(project, image, model version, label, ordinal)``
   turns the second write into a no-op.

Nothing here keeps state that matters across a crash: kill any process at any moment and the
database is consistent; rerun and the rest gets done. A database that goes away for a while (a
restart, a failover) is waited out (:data:`DB_RETRY_S`) and the interrupted transaction replayed,
which fact 3 makes harmless: the job pauses instead of stopping (docs/reliability.md).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from typing import Any

import numpy as np
from sqlalchemy import Connection, Engine, bindparam, select, update
from sqlalchemy.exc import DBAPIError, OperationalError

from seemly.db.bulk import add_job_items, mask_row, upsert_images, write_masks
from seemly.db.models import ItemStatus, JobItem, MaskSource
from seemly.db.session import retry_disconnects
from seemly.engines.base import Engine as SegEngine
from seemly.engines.base import EngineError, Segment
from seemly.images import ImageError, decode_image
from seemly.pipeline import ImageOutcome, SegmentMode, segment_bytes
from seemly.prompts import PromptError, PromptRound
from seemly.storage import Storage, StorageError, display_uri
from workers.box_prompts import BoxPrompt, decode_boxes, encode_boxes

log = logging.getLogger(__name__)

BOXES_MODE = "boxes"
"""The job mode when a box-prompts file, not a listing, says what to segment."""

MAX_ERROR_CHARS = 2000
INTERNAL_ERROR = "internal error:"
"""Prefix of the reason of an item that failed on an unexpected exception (a bug, not a bad image)."""
WRITE_ATTEMPTS = 4  # a deadlock between two writers is retried, anything else fails the batch
DB_RETRY_S = 120.0
"""How long a stage waits for an unreachable database (a Postgres restart or failover) before it
gives up and the job stops (rerun to resume). Every write is idempotent, so retrying is safe."""


@dataclass(frozen=True)
class JobSpec:
    """Everything a stage needs, pickled once into each Ray task/actor (no live connections)."""

    job_id: int
    project_id: int
    model_version_id: int
    model_version: str
    engine_name: str
    engine_options: Mapping[str, Any]
    mode: str  # a SegmentMode value or BOXES_MODE
    prefix_uri: str
    database_url: str
    storage: Storage
    max_pixels: int
    max_bytes: int
    prior_job_ids: tuple[int, ...] = ()  # earlier jobs with the same identity: their done items count
    chunk_rows: int = 256  # items per registration transaction
    packet_rows: int = 8  # items per work packet (one actor call, one write transaction)
    fetch_threads: int = 8
    db_retry_s: float = DB_RETRY_S  # wait this long for an unreachable database (see DB_RETRY_S)


def _db(url: str) -> Engine:
    from seemly.db.session import make_engine

    return make_engine(url, pool_size=1, max_overflow=2)


# --------------------------------------------------------------------------------------------
# job_items bookkeeping, batched
# --------------------------------------------------------------------------------------------
_ITEMS = JobItem.__table__
_MARK = (
    update(_ITEMS)
    .where(_ITEMS.c.job_id == bindparam("b_job"), _ITEMS.c.item_key == bindparam("b_key"))
    .values(
        status=bindparam("b_status"),
        error=bindparam("b_error"),
        image_id=bindparam("b_image"),
        mask_count=bindparam("b_masks"),
        attempts=_ITEMS.c.attempts + 1,
    )
)


def mark_items(conn: Connection, job_id: int, marks: Sequence[Mapping[str, Any]]) -> None:
    """Set the status of many registered items in one round trip (``executemany``), in key order.

    Each mark: ``key``, ``status`` and optionally ``error``, ``image_id``, ``mask_count``. Sorting
    by key makes two writers touching overlapping items lock them in the same order (no deadlock).
    """
    params = [
        {
            "b_job": job_id,
            "b_key": m["key"],
            "b_status": ItemStatus(m["status"]),
            "b_error": (m.get("error") or None) and str(m["error"])[:MAX_ERROR_CHARS],
            "b_image": m.get("image_id"),
            "b_masks": int(m.get("mask_count") or 0),
        }
        for m in sorted(marks, key=lambda m: m["key"])
    ]
    if params:
        conn.execute(_MARK, params)


def register_chunk(conn: Connection, spec: JobSpec, keys: Sequence[str]) -> set[str]:
    """Register listed keys as items of the job; returns those that still need work.

    Keys already ``done``/``skipped`` in this job are dropped (a resume); keys ``done`` by an
    earlier job of the same identity are marked ``skipped`` here and dropped (a rerun).
    """
    add_job_items(conn, spec.job_id, keys)
    finished = set(
        conn.execute(
            select(_ITEMS.c.item_key).where(
                _ITEMS.c.job_id == spec.job_id,
                _ITEMS.c.item_key.in_(keys),
                _ITEMS.c.status.in_([ItemStatus.DONE.value, ItemStatus.SKIPPED.value]),
            )
        ).scalars()
    )
    todo = [k for k in keys if k not in finished]
    if spec.prior_job_ids and todo:
        earlier = dict(
            conn.execute(
                select(_ITEMS.c.item_key, _ITEMS.c.job_id).where(
                    _ITEMS.c.job_id.in_(spec.prior_job_ids),
                    _ITEMS.c.item_key.in_(todo),
                    _ITEMS.c.status == ItemStatus.DONE.value,
                )
            ).all()
        )
        if earlier:
            mark_items(
                conn,
                spec.job_id,
                [
                    {"key": k, "status": ItemStatus.SKIPPED, "error": f"already segmented by job {job}"}
                    for k, job in earlier.items()
                ],
            )
            todo = [k for k in todo if k not in earlier]
    return set(todo)


# --------------------------------------------------------------------------------------------
# stage 1: the streaming source
# --------------------------------------------------------------------------------------------
def _chunks(iterable: Iterator[Any], size: int) -> Iterator[list[Any]]:
    while chunk := list(islice(iterable, size)):
        yield chunk


def iter_source_items(
    spec: JobSpec, box_prompts: Mapping[str, list[BoxPrompt]] | None
) -> Iterator[dict[str, list]]:
    """Yield column batches ``{"uri", "size", "boxes"}`` of the items that still need work.

    The listing is consumed lazily, one page at a time, and each chunk is registered in
    ``job_items`` before it is emitted: at any moment only a chunk of keys is in memory, and the job's
    ``total`` grows as the listing proceeds.
    """
    if box_prompts is not None:
        entries: Iterator[tuple[str, int, str]] = (
            (uri, -1, encode_boxes(boxes)) for uri, boxes in box_prompts.items()
        )
    else:
        entries = ((info.uri, int(info.size), "") for info in spec.storage.iter_objects(spec.prefix_uri))
    db = _db(spec.database_url)
    try:
        for chunk in _chunks(entries, spec.chunk_rows):
            keys = [uri for uri, _size, _boxes in chunk]

            def register(keys: list[str] = keys) -> set[str]:
                with db.begin() as conn:
                    return register_chunk(conn, spec, keys)

            todo = retry_disconnects(
                register, what=f"job {spec.job_id}: registering items", deadline_s=spec.db_retry_s
            )
            rows = [entry for entry in chunk if entry[0] in todo]
            if rows:
                yield {
                    "uri": [r[0] for r in rows],
                    "size": [r[1] for r in rows],
                    "boxes": [r[2] for r in rows],
                }
    finally:
        db.dispose()


def make_source(spec: JobSpec, box_prompts: Mapping[str, list[BoxPrompt]] | None) -> Any:
    """A Ray Data :class:`~ray.data.Datasource` streaming :func:`iter_source_items` as work packets.

    One read task walks the listing (S3 pages are sequential by nature). Each registered chunk is
    cut into packets of ``spec.packet_rows`` items, and every packet is one single-row block
    (list-valued columns ``uri``, ``size``, ``boxes``): one actor call processes one packet, and
    Ray Data's per-block bookkeeping is paid once per batch, not once per image. The job sets
    ``DataContext.target_max_block_size`` so that packets leave the read task one by one, as soon as
    their chunk is registered (see ``workers.presegment.BLOCK_BYTES``).
    """
    import pyarrow as pa
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    schema = pa.schema(
        [("uri", pa.list_(pa.string())), ("size", pa.list_(pa.int64())), ("boxes", pa.list_(pa.string()))]
    )
    size = max(1, spec.packet_rows)

    class BucketItemsDatasource(Datasource):
        def get_name(self) -> str:
            return "BucketItems"

        def estimate_inmemory_data_size(self) -> int | None:
            return None

        def get_read_tasks(
            self, parallelism: int, per_task_row_limit: int | None = None, data_context: Any = None
        ) -> list[ReadTask]:
            def read() -> Iterator[pa.Table]:
                for chunk in iter_source_items(spec, box_prompts):
                    for start in range(0, len(chunk["uri"]), size):
                        packet = {name: [values[start : start + size]] for name, values in chunk.items()}
                        yield pa.table(packet, schema=schema)

            metadata = BlockMetadata(num_rows=None, size_bytes=None, input_files=None, exec_stats=None)
            return [ReadTask(read, metadata, schema=schema, per_task_row_limit=per_task_row_limit)]

    return BucketItemsDatasource()


def _flat(column: Any) -> list[Any]:
    """A batch column as a flat list: packets (lists per row) are concatenated, scalars kept."""
    out: list[Any] = []
    for value in column:
        if isinstance(value, list | tuple | np.ndarray):
            out.extend(value)
        else:
            out.append(value)
    return out


# --------------------------------------------------------------------------------------------
# stage 2: fetch, segment, write (a callable class run in an actor pool)
# --------------------------------------------------------------------------------------------
def segment_boxes(
    uri: str, data: bytes, engine: SegEngine, boxes: Sequence[BoxPrompt], *, max_pixels: int, max_bytes: int
) -> ImageOutcome:
    """Like :func:`seemly.pipeline.segment_bytes`, with one prompt round (and mask) per box."""
    outcome = ImageOutcome(uri=uri, size_bytes=len(data))
    try:
        image = decode_image(data, max_pixels=max_pixels, max_bytes=max_bytes)
    except ImageError as exc:
        outcome.error = str(exc)
        return outcome
    outcome.sha256, outcome.width, outcome.height = image.sha256, image.width, image.height
    try:
        started = time.perf_counter()
        state = engine.embed(image.array, image.sha256)
        embedded = time.perf_counter()
        for index, box in enumerate(boxes):
            if box.x1 > image.width or box.y1 > image.height:
                raise PromptError(
                    f"boxes[{index}]",
                    f"box {[box.x0, box.y0, box.x1, box.y1]} lies outside the {image.width}x{image.height} image",
                )
            best = engine.segment(state, PromptRound(prompts=[box.to_box()], label=box.label or None))[0]
            outcome.segments.append(Segment(best.mask, best.score, best.model_version, box.label or None))
        outcome.embed_seconds = embedded - started
        outcome.segment_seconds = time.perf_counter() - embedded
    except (EngineError, PromptError, ValueError) as exc:
        outcome.error = f"segmentation failed: {exc}"
    return outcome


def _ordinals(segments: Sequence[Segment]) -> list[tuple[str, int]]:
    """(label, ordinal) per segment: ordinals count up per label, in the engine's order."""
    seen: dict[str, int] = {}
    out = []
    for segment in segments:
        label = segment.label or ""
        out.append((label, seen.get(label, 0)))
        seen[label] = seen.get(label, 0) + 1
    return out


class SegmentWriter:
    """The actor: holds the engine, a storage client and a DB pool; one call = one batch of items.

    Fetches run in a thread pool (I/O overlaps with segmentation of the batch's earlier images),
    segmentation runs in the actor's thread, and the batch's results are committed in one
    transaction: image rows, masks (COPY for big batches), done/failed marks.
    """

    def __init__(self, spec: JobSpec) -> None:
        from seemly.engines.base import create_engine

        self.spec = spec
        _one_thread_per_actor()
        self.engine = create_engine(spec.engine_name, **dict(spec.engine_options))
        self.db = _db(spec.database_url)
        self.pool = ThreadPoolExecutor(max(1, spec.fetch_threads), thread_name_prefix="fetch")
        self.mode = None if spec.mode == BOXES_MODE else SegmentMode(spec.mode)

    def _fetch(self, uri: str, size: int) -> tuple[bytes | None, str | None, float]:
        started = time.perf_counter()
        if size > self.spec.max_bytes:
            return None, f"{display_uri(uri)}: {size} bytes, over the limit of {self.spec.max_bytes}", 0.0
        try:
            data = self.spec.storage.read(uri, max_bytes=self.spec.max_bytes)
        except StorageError as exc:
            return None, str(exc), time.perf_counter() - started
        return data, None, time.perf_counter() - started

    def _segment(self, uri: str, data: bytes, boxes: str) -> ImageOutcome:
        if self.mode is None:
            return segment_boxes(
                uri,
                data,
                self.engine,
                decode_boxes(boxes),
                max_pixels=self.spec.max_pixels,
                max_bytes=self.spec.max_bytes,
            )
        return segment_bytes(
            uri, data, self.engine, self.mode, max_pixels=self.spec.max_pixels, max_bytes=self.spec.max_bytes
        )

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, list[Any]]:
        """Process one batch; returns a one-row summary (counts, first internal error, timings)."""
        called, called_cpu = time.perf_counter(), time.process_time()
        uris = [str(u) for u in _flat(batch["uri"])]
        sizes = [int(s) for s in _flat(batch["size"])]
        boxes = [str(b) for b in _flat(batch["boxes"])]
        futures = [self.pool.submit(self._fetch, uri, size) for uri, size in zip(uris, sizes, strict=True)]
        outcomes: list[ImageOutcome] = []
        wait_s, fetch_s = [], []
        for uri, future, box_text in zip(uris, futures, boxes, strict=True):
            waited = time.perf_counter()
            data, error, fetch_seconds = future.result()
            wait_s.append(time.perf_counter() - waited)
            fetch_s.append(fetch_seconds)
            if error is not None or data is None:
                outcomes.append(ImageOutcome(uri=uri, error=error or "unreadable"))
                continue
            try:
                outcomes.append(self._segment(uri, data, box_text))
            except MemoryError:
                outcomes.append(ImageOutcome(uri=uri, error="out of memory while segmenting"))
            except Exception as exc:  # an engine bug on one image must not stop a million-image job
                log.exception("job %s: %s", self.spec.job_id, display_uri(uri))
                outcomes.append(ImageOutcome(uri=uri, error=f"{INTERNAL_ERROR} {type(exc).__name__}: {exc}"))
        started = time.perf_counter()
        masks = self._write(outcomes)
        written = time.perf_counter()
        internal = [o.error for o in outcomes if o.error and o.error.startswith(INTERNAL_ERROR)]
        # One summary row per call: Ray Data hands every output block to the driver separately, and
        # a row per image would cost a round trip each between this actor and the driver.
        return {
            "items": [len(outcomes)],
            "done": [sum(1 for o in outcomes if o.ok)],
            "failed": [sum(1 for o in outcomes if not o.ok)],
            "masks": [sum(masks)],
            "internal_errors": [len(internal)],
            "first_internal_error": [internal[0] if internal else ""],
            "segment_s": [sum(o.embed_seconds + o.segment_seconds for o in outcomes)],
            "fetch_s": [sum(fetch_s)],
            "wait_s": [sum(wait_s)],
            "write_s": [written - started],
            "call_s": [written - called],
            "cpu_s": [time.process_time() - called_cpu],
            # when and where the call ran (epoch seconds, pid): a profile finds the gaps between calls
            "call_start": [time.time() - (written - called)],
            "call_end": [time.time()],
            "actor_pid": [os.getpid()],
        }

    def _write(self, outcomes: Sequence[ImageOutcome]) -> list[int]:
        """Commit the batch (images, masks, marks) in one transaction; returns masks per item.

        A lost database (restart, failover) is waited for up to ``spec.db_retry_s``: the batch's
        work is kept and the transaction replayed, which the unique keys make harmless.
        """
        return retry_disconnects(
            lambda: self._write_retrying_deadlocks(outcomes),
            what=f"job {self.spec.job_id}: writing a batch",
            deadline_s=self.spec.db_retry_s,
        )

    def _write_retrying_deadlocks(self, outcomes: Sequence[ImageOutcome]) -> list[int]:
        spec = self.spec
        for attempt in range(1, WRITE_ATTEMPTS + 1):
            try:
                with self.db.begin() as conn:
                    return self._write_in(conn, outcomes)
            except OperationalError as exc:  # deadlock / serialization failure: retry the whole batch
                if attempt == WRITE_ATTEMPTS or not _retryable(exc):  # a disconnect: see _write
                    raise
                log.warning("job %s: batch write retried after %s", spec.job_id, type(exc.orig).__name__)
                time.sleep(0.05 * attempt)
        raise AssertionError("unreachable")

    def _write_in(self, conn: Connection, outcomes: Sequence[ImageOutcome]) -> list[int]:
        spec = self.spec
        good = [o for o in outcomes if o.ok]
        ids = upsert_images(
            conn,
            [
                {
                    "sha256": o.sha256,
                    "width": o.width,
                    "height": o.height,
                    "size_bytes": o.size_bytes,
                    "uri": o.uri,
                }
                for o in good
            ],
        )
        rows: list[dict[str, Any]] = []
        for outcome in good:
            image_id = ids[str(outcome.sha256)]
            for segment, (label, ordinal) in zip(outcome.segments, _ordinals(outcome.segments), strict=True):
                rows.append(
                    mask_row(
                        segment.mask,
                        project_id=spec.project_id,
                        image_id=image_id,
                        source=MaskSource.BUCKET,
                        model_version_id=spec.model_version_id,
                        label=label,
                        ordinal=ordinal,
                        score=float(segment.score),
                        job_id=spec.job_id,
                    )
                )
        rows.sort(key=lambda r: (r["image_id"], r["label"], r["ordinal"]))  # same lock order everywhere
        write_masks(conn, rows)
        mark_items(
            conn,
            spec.job_id,
            [
                {
                    "key": o.uri,
                    "status": ItemStatus.DONE if o.ok else ItemStatus.FAILED,
                    "error": o.error,
                    "image_id": ids[str(o.sha256)] if o.ok else None,
                    "mask_count": len(o.segments) if o.ok else 0,
                }
                for o in outcomes
            ],
        )
        return [len(o.segments) if o.ok else 0 for o in outcomes]


def _one_thread_per_actor() -> None:
    """Keep OpenCV to one thread: Ray already limits the BLAS/OpenMP pools of an actor
    (``OMP_NUM_THREADS``), and an actor is given a CPU share, not a machine; more actors, not more
    threads per actor, is how the job uses the cores (``--actors``)."""
    try:
        import cv2
    except ImportError:  # pragma: no cover - opencv is a dependency, but engines may not need it
        return
    cv2.setNumThreads(1)


def _retryable(exc: DBAPIError) -> bool:
    sqlstate = getattr(exc.orig, "sqlstate", None)
    return sqlstate in ("40P01", "40001")  # deadlock_detected, serialization_failure
