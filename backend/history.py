"""Background writer: prompt rounds, masks, corrections and training requests to the database.

An interactive request must never wait on a database write (architecture: "hot path"), so the
request handlers only :meth:`HistoryWriter.submit` a record, which is a non-blocking put on a bounded
queue. One daemon thread takes records off the queue in batches (up to ``batch_size``, or whatever
arrived within ``max_delay`` seconds) and writes each batch in one transaction.

Failure handling: if a batch fails, it is rolled back and its records are retried one transaction
each, so one bad record never loses the others; a record that still fails is logged (its kind and
the error, never its payload) and dropped. A connection failure is retried with backoff first. If
the queue is full (the database is far behind), new records are dropped and counted rather than
blocking requests. Every write is idempotent (unique keys, see :mod:`seemly.db.models`), so a record
written twice is harmless.

Records are written in submission order (one thread), so a correction submitted after the rounds of
its task finds those rounds already in the database.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from sqlalchemy import Connection, Engine, delete, func, select
from sqlalchemy.exc import OperationalError

from backend import ls_format
from backend.db import ensure_project, insert, served_version_id
from backend.fetch import ImageFetcher, ImageInfo
from plugin.labeling_config import ParsedConfig
from seemly.db.bulk import mask_row, upsert_images, write_masks
from seemly.db.models import (
    Correction,
    ImageUri,
    MaskSource,
    Project,
    PromptSession,
    TrainingReason,
    TrainingRequest,
)
from seemly.db.models import Mask as MaskRow
from seemly.db.models import PromptRound as RoundRow
from seemly.engines.base import Segment
from seemly.masks import Mask

log = logging.getLogger(__name__)


@dataclass
class WriterContext:
    """What records may use while they are written."""

    fetcher: ImageFetcher | None
    parse_config: Any  # Callable[[str], ParsedConfig]
    engine_name: str


class Record(Protocol):
    kind: str

    def apply(self, conn: Connection, ctx: WriterContext) -> None: ...


def _image_id(conn: Connection, info: ImageInfo, uri: str | None) -> int:
    row = {"sha256": info.sha256, "width": info.width, "height": info.height, "size_bytes": info.size_bytes}
    if uri:
        row["uri"] = uri
    return upsert_images(conn, [row])[info.sha256]


# --- interactive rounds ------------------------------------------------------------------------------


@dataclass
class RoundRecord:
    """One interactive round: its session, prompts, answer and latency."""

    ls_project_id: int
    ls_task_id: int
    annotator: str
    session_key: str
    round_index: int
    image: ImageInfo
    uri: str
    prompts: dict[str, Any]
    rle: dict[str, Any] | None
    score: float | None
    latency_ms: float
    model_version: str
    kind: str = "round"

    def apply(self, conn: Connection, ctx: WriterContext) -> None:
        project_id = ensure_project(conn, self.ls_project_id)
        image_id = _image_id(conn, self.image, self.uri)
        version_id = served_version_id(conn, self.model_version, ctx.engine_name)
        conn.execute(
            insert(conn, PromptSession.__table__)
            .values(
                session_key=self.session_key,
                project_id=project_id,
                image_id=image_id,
                annotator=self.annotator,
                ls_task_id=self.ls_task_id,
                model_version_id=version_id,
            )
            .on_conflict_do_nothing(index_elements=["session_key"])
        )
        session_id = conn.execute(
            select(PromptSession.id).where(PromptSession.session_key == self.session_key)
        ).scalar_one()
        conn.execute(
            insert(conn, RoundRow.__table__)
            .values(
                session_id=session_id,
                round_index=self.round_index,
                prompts=self.prompts,
                rle=self.rle,
                score=self.score,
                latency_ms=self.latency_ms,
                model_version_id=version_id,
            )
            .on_conflict_do_nothing(index_elements=["session_id", "round_index"])
        )


# --- batch predictions made here ------------------------------------------------------------------------


@dataclass
class PredictedMasksRecord:
    """Proposals this backend computed for a batch ``/predict``: stored like a bucket job's output,
    so the next request for the same image and model version is answered from the database."""

    ls_project_id: int
    ls_task_id: int
    image: ImageInfo
    uri: str
    segments: Sequence[Segment]
    model_version: str
    kind: str = "predicted-masks"

    def apply(self, conn: Connection, ctx: WriterContext) -> None:
        project_id = ensure_project(conn, self.ls_project_id)
        image_id = _image_id(conn, self.image, self.uri)
        version_id = served_version_id(conn, self.model_version, ctx.engine_name)
        ordinals: dict[str, int] = {}
        rows = []
        for segment in self.segments:
            label = segment.label or ""
            ordinal = ordinals.get(label, 0)
            ordinals[label] = ordinal + 1
            rows.append(
                mask_row(
                    segment.mask,
                    project_id=project_id,
                    image_id=image_id,
                    source=MaskSource.BUCKET,
                    model_version_id=version_id,
                    label=label,
                    ordinal=ordinal,
                    score=float(segment.score),
                    ls_task_id=self.ls_task_id,
                )
            )
        write_masks(conn, rows)


# --- corrections from submitted annotations --------------------------------------------------------------


@dataclass
class _Candidate:
    mask: Mask
    rle: dict[str, Any]
    model_version_id: int | None
    mask_id: int | None


@dataclass
class CorrectionRecord:
    """A submitted (created or updated) annotation: its mask regions become corrections."""

    ls_project_id: int
    annotation_id: int
    ls_task_id: int
    annotator: str | None
    results: list[Any]
    label_config: str | None
    uri: str | None
    action: str = "ANNOTATION_CREATED"
    kind: str = "correction"

    def apply(self, conn: Connection, ctx: WriterContext) -> None:
        project_id = ensure_project(conn, self.ls_project_id)
        config = self._config(conn, ctx, project_id)
        regions = ls_format.annotation_regions(self.results, config) if config is not None else []
        keep_ids = [r.region_id for r in regions]
        stale = delete(Correction).where(
            Correction.project_id == project_id, Correction.ls_annotation_id == self.annotation_id
        )
        if keep_ids:
            stale = stale.where(Correction.ls_region_id.not_in(keep_ids))
        conn.execute(stale)  # regions removed by an update (or all of them) no longer count
        if not regions:
            return
        image_id = self._image(conn, ctx, project_id)
        if image_id is None:
            log.warning(
                "correction for task %s of project %s skipped: its image is unknown",
                self.ls_task_id,
                self.ls_project_id,
            )
            return
        candidates = _candidates(conn, project_id, self.ls_task_id, image_id)
        table = Correction.__table__
        for region in regions:
            best, best_iou = None, None
            for candidate in candidates:
                if candidate.mask.shape != region.mask.shape:
                    continue
                iou = region.mask.iou(candidate.mask)
                if best_iou is None or iou > best_iou:
                    best, best_iou = candidate, iou
            values = {
                "project_id": project_id,
                "image_id": image_id,
                "ls_task_id": self.ls_task_id,
                "ls_annotation_id": self.annotation_id,
                "ls_region_id": region.region_id,
                "label": region.label,
                "predicted_mask_id": best.mask_id if best else None,
                "predicted_rle": best.rle if best else None,
                "model_version_id": best.model_version_id if best else None,
                "submitted_rle": region.mask.to_coco_rle(),
                "iou": best_iou,
                "annotator": self.annotator,
            }
            statement = insert(conn, table).values(**values)
            updated = {
                k: statement.excluded[k]
                for k in values
                if k not in ("project_id", "ls_annotation_id", "ls_region_id")
            }
            updated["updated_at"] = func.now()
            conn.execute(
                statement.on_conflict_do_update(
                    index_elements=["project_id", "ls_annotation_id", "ls_region_id"], set_=updated
                )
            )

    def _config(self, conn: Connection, ctx: WriterContext, project_id: int) -> ParsedConfig | None:
        text = self.label_config
        if not text:
            settings = conn.execute(select(Project.settings).where(Project.id == project_id)).scalar()
            text = (settings or {}).get("label_config")
        if not text:
            log.warning("correction for project %s skipped: no labeling config known", self.ls_project_id)
            return None
        return ctx.parse_config(text)

    def _image(self, conn: Connection, ctx: WriterContext, project_id: int) -> int | None:
        if self.uri:
            found = conn.execute(select(ImageUri.image_id).where(ImageUri.uri == self.uri)).scalar()
            if found is not None:
                return int(found)
        # The task's image as seen by earlier rounds or predictions of this task.
        found = conn.execute(
            select(PromptSession.image_id)
            .where(PromptSession.project_id == project_id, PromptSession.ls_task_id == self.ls_task_id)
            .order_by(PromptSession.id.desc())
            .limit(1)
        ).scalar()
        if found is None:
            found = conn.execute(
                select(MaskRow.image_id)
                .where(MaskRow.project_id == project_id, MaskRow.ls_task_id == self.ls_task_id)
                .order_by(MaskRow.id.desc())
                .limit(1)
            ).scalar()
        if found is not None:
            return int(found)
        if self.uri and ctx.fetcher is not None:  # never seen: fetch it once to learn its identity
            decoded = ctx.fetcher.load(self.uri)
            info = ctx.fetcher.known(self.uri) or ImageInfo(decoded.sha256, decoded.width, decoded.height, 0)
            return _image_id(conn, info, self.uri)
        return None


def _candidates(conn: Connection, project_id: int, ls_task_id: int, image_id: int) -> list[_Candidate]:
    """What was predicted for the task: each interactive session's last round, then stored proposals."""
    out: list[_Candidate] = []
    sessions = conn.execute(
        select(PromptSession.id)
        .where(PromptSession.project_id == project_id, PromptSession.ls_task_id == ls_task_id)
        .order_by(PromptSession.id.desc())
        .limit(50)
    ).scalars()
    for session_id in sessions:
        row = conn.execute(
            select(RoundRow.rle, RoundRow.model_version_id)
            .where(RoundRow.session_id == session_id, RoundRow.rle.is_not(None))
            .order_by(RoundRow.round_index.desc())
            .limit(1)
        ).first()
        if row is not None:
            out.append(_Candidate(Mask.from_coco_rle(row[0]), row[0], row[1], None))
    rows = conn.execute(
        select(MaskRow.id, MaskRow.rle, MaskRow.model_version_id)
        .where(
            MaskRow.project_id == project_id,
            MaskRow.image_id == image_id,
            MaskRow.source.in_([MaskSource.BUCKET, MaskSource.INTERACTIVE]),
        )
        .order_by(MaskRow.id.desc())
        .limit(500)
    )
    for mask_id, rle, version_id in rows:
        out.append(_Candidate(Mask.from_coco_rle(rle), rle, version_id, int(mask_id)))
    return out


@dataclass
class AnnotationsDeletedRecord:
    """Deleted annotations: their corrections go too (they no longer describe what a human wants)."""

    ls_project_id: int
    annotation_ids: list[int]
    kind: str = "annotations-deleted"

    def apply(self, conn: Connection, ctx: WriterContext) -> None:
        project_id = ensure_project(conn, self.ls_project_id)
        conn.execute(
            delete(Correction).where(
                Correction.project_id == project_id, Correction.ls_annotation_id.in_(self.annotation_ids)
            )
        )


@dataclass
class TrainingRequestRecord:
    """Someone pressed Train: record it with the corrections it may use (the scheduler comes later)."""

    ls_project_id: int
    requested_by: str | None = None
    reason: TrainingReason = TrainingReason.BUTTON
    kind: str = "training-request"

    def apply(self, conn: Connection, ctx: WriterContext) -> None:
        project_id = ensure_project(conn, self.ls_project_id)
        upto = conn.execute(
            select(func.max(Correction.id)).where(Correction.project_id == project_id)
        ).scalar()
        conn.execute(
            insert(conn, TrainingRequest.__table__).values(
                project_id=project_id,
                reason=self.reason,
                requested_by=self.requested_by,
                corrections_upto=upto,
            )
        )


# --- the writer ------------------------------------------------------------------------------------------


@dataclass
class WriterStats:
    submitted: int = 0
    written: int = 0
    failed: int = 0
    dropped: int = 0
    batches: int = 0
    last_error: str | None = None
    by_kind: dict[str, int] = field(default_factory=dict)


class HistoryWriter:
    def __init__(
        self,
        db: Engine,
        ctx: WriterContext,
        *,
        max_queue: int = 10_000,
        batch_size: int = 200,
        max_delay: float = 0.05,
        retries: int = 3,
    ) -> None:
        self.db = db
        self.ctx = ctx
        self.batch_size = batch_size
        self.max_delay = max_delay
        self.retries = retries
        self.stats = WriterStats()
        self._queue: queue.Queue[Record | None] = queue.Queue(maxsize=max_queue)
        self._cond = threading.Condition()
        self._pending = 0
        self._thread: threading.Thread | None = None
        self._stopping = False

    # --- request side: never blocks ----------------------------------------------------------------

    def submit(self, record: Record) -> bool:
        """Queue ``record`` for writing; False (and counted) if the queue is full or the writer stopped."""
        with self._cond:
            if self._stopping:
                self.stats.dropped += 1
                return False
            self._pending += 1
            try:
                self._queue.put_nowait(record)  # never blocks: the queue is bounded
            except queue.Full:
                self._pending -= 1
                self.stats.dropped += 1
                dropped = self.stats.dropped
                self._cond.notify_all()
            else:
                self.stats.submitted += 1
                dropped = 0
        if dropped:
            if dropped in (1, 10, 100) or dropped % 1000 == 0:
                log.warning("history queue full: %d records dropped so far", dropped)
            return False
        self._ensure_thread()
        return True

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until everything submitted so far is written (or failed); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued, then stop the thread."""
        self.flush(timeout)
        self._stopping = True
        thread = self._thread
        if thread is not None and thread.is_alive():
            with contextlib.suppress(queue.Full):
                self._queue.put_nowait(None)
            thread.join(timeout)

    # --- writer thread --------------------------------------------------------------------------------

    def _ensure_thread(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        with self._cond:
            if self._thread is not None and self._thread.is_alive():
                return
            self._thread = threading.Thread(target=self._run, name="seemly-history", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            deadline = time.monotonic() + self.max_delay
            while len(batch) < self.batch_size:
                left = deadline - time.monotonic()
                try:
                    item = self._queue.get(timeout=max(left, 0.0)) if left > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._write(batch)
                    self._done(len(batch))
                    return
                batch.append(item)
            try:
                self._write(batch)
            except Exception:  # never let the thread die
                log.exception("history writer failed unexpectedly")
            finally:
                self._done(len(batch))

    def _done(self, count: int) -> None:
        with self._cond:
            self._pending -= count
            self._cond.notify_all()

    def _write(self, batch: list[Record]) -> None:
        for attempt in range(self.retries + 1):
            try:
                with self.db.begin() as conn:
                    for record in batch:
                        record.apply(conn, self.ctx)
                self._count_written(batch)
                self.stats.batches += 1
                return
            except OperationalError as exc:
                if attempt < self.retries:
                    time.sleep(min(0.2 * 2**attempt, 2.0))
                    continue
                self.stats.last_error = f"{type(exc).__name__}: database unavailable"
                break
            except Exception:
                break
        if len(batch) == 1:
            self._write_one(batch[0])
            return
        for record in batch:
            self._write_one(record)

    def _write_one(self, record: Record) -> None:
        try:
            with self.db.begin() as conn:
                record.apply(conn, self.ctx)
            self._count_written([record])
        except Exception as exc:
            self.stats.failed += 1
            self.stats.last_error = f"{record.kind}: {type(exc).__name__}: {_short(exc)}"
            log.warning(
                "history: %s record not written: %s: %s", record.kind, type(exc).__name__, _short(exc)
            )

    def _count_written(self, records: Iterable[Record]) -> None:
        for record in records:
            self.stats.written += 1
            self.stats.by_kind[record.kind] = self.stats.by_kind.get(record.kind, 0) + 1


def _short(exc: BaseException) -> str:
    """An error message for the log: first line only (SQL errors carry parameters on later lines)."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    return text[:300]
