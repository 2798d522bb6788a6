"""The relational schema of seemly: one typed SQLAlchemy 2 model per table.

Design rules that every writer (the ML backend, the Ray jobs, the training loop) relies on:

* **Image identity is the sha256 of the bytes.** ``images`` holds one row per distinct content;
  ``image_uris`` maps the many places an image lives (``s3://…``, ``/data/upload/…``) onto it.
* **Every write that can be retried has a unique key**, so that a retry is an
  ``INSERT … ON CONFLICT DO NOTHING`` and never a duplicate:

  ========================  ==================================================================
  table                     idempotency key
  ========================  ==================================================================
  images                    ``sha256``
  image_uris                ``uri`` (an overwritten object moves its URI to the new image)
  masks (source=bucket)     ``(project_id, image_id, model_version_id, label, ordinal)``
  masks (from annotations)  ``(project_id, ls_annotation_id, source, label, ordinal)``
  masks (interactive)       none: every answer is kept (history lives in prompt_rounds)
  corrections               ``(project_id, ls_annotation_id, ls_region_id)``
  prompt_sessions           ``session_key`` (chosen by the client, e.g. a uuid4)
  prompt_rounds             ``(session_id, round_index)``
  job_items                 ``(job_id, item_key)``
  model_versions            ``(project_id, name)``; ``name`` alone for global versions
  ========================  ==================================================================

* **Exactly-once bucket jobs**: a worker writes an image's masks *and* marks its ``job_items`` row
  done in one transaction (see :mod:`seemly.db.bulk`); the mask key above makes even a replay of
  that transaction harmless.
* **Portable**: JSON columns are JSONB on Postgres and JSON on SQLite; enums are VARCHAR + CHECK
  (no native Postgres enum types, so adding a value is a plain constraint change); big-integer
  keys fall back to SQLite's ``INTEGER PRIMARY KEY`` so they still auto-increment there.
* Timestamps are timezone-aware UTC in Python on both backends (:class:`UTCDateTime`).

JSON columns are not mutation-tracked: assign a new value (``row.metrics = {...}``) instead of
changing the stored dict in place.

``Mask`` and ``PromptRound`` here are the *stored rows*; the domain types of the same names live in
:mod:`seemly.masks` and :mod:`seemly.prompts`. Import this module under a name to keep them apart:
``from seemly.db import models as db`` then ``db.Mask``.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Dialect,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    event,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

#: Stable constraint names, so that Alembic revisions can refer to them on every backend.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

#: JSONB on Postgres (indexable, compact, key order irrelevant), plain JSON elsewhere.
#: ``none_as_null`` stores Python ``None`` as SQL NULL rather than the JSON literal ``null``.
JSONType = JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")

#: 64-bit ids for the tables that grow with the number of images × masks; on SQLite only
#: ``INTEGER PRIMARY KEY`` auto-increments, and it is 64-bit there anyway.
BigIntId = BigInteger().with_variant(Integer(), "sqlite")


class UTCDateTime(TypeDecorator[datetime]):
    """``TIMESTAMP WITH TIME ZONE`` that always hands back aware UTC datetimes.

    Postgres already does; SQLite stores naive text, so values are normalised to UTC on the way in
    and tagged as UTC on the way out. Naive datetimes given by callers are taken to be UTC.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


def _str_enum(enum_cls: type[enum.Enum], name: str) -> Enum:
    """VARCHAR + CHECK storing the enum *values* (``"bucket"``), portable and easy to extend."""
    return Enum(
        enum_cls,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=16,
        validate_strings=True,
        values_callable=lambda members: [m.value for m in members],
    )


class MaskSource(enum.StrEnum):
    """Where a mask came from."""

    INTERACTIVE = "interactive"  # answered to an annotator's prompts in Label Studio
    BUCKET = "bucket"  # written by a pre-segmentation job over a bucket
    ANNOTATION = "annotation"  # a human annotation imported from Label Studio
    CORRECTION = "correction"  # a submitted annotation that corrected a prediction


class JobStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class ItemStatus(enum.StrEnum):
    """State of one unit of work in a job; ``pending`` and ``failed`` items are retried on resume."""

    PENDING = "pending"
    DONE = "done"
    SKIPPED = "skipped"  # nothing to do (already segmented, not an image, too large, ...)
    FAILED = "failed"


class TrainingReason(enum.StrEnum):
    COUNT = "count"  # N new corrections since the last training
    INTERVAL = "interval"  # the periodic schedule fired
    BUTTON = "button"  # someone asked for it


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def _created() -> Mapped[datetime]:
    return mapped_column(UTCDateTime(), nullable=False, server_default=func.now())


# --------------------------------------------------------------------------------------------
# projects, images
# --------------------------------------------------------------------------------------------
class Project(Base):
    """A Label Studio project as seemly knows it: its labels and its learning-loop settings."""

    __tablename__ = "projects"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    ls_project_id: Mapped[int | None] = mapped_column(BigInteger, unique=True)
    labels: Mapped[list[Any]] = mapped_column(
        JSONType, nullable=False, default=list, server_default=text("'[]'")
    )
    settings: Mapped[dict[str, Any]] = mapped_column(
        JSONType, nullable=False, default=dict, server_default=text("'{}'")
    )
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = mapped_column(
        UTCDateTime(), nullable=False, server_default=func.now(), onupdate=utcnow
    )

    model_versions: Mapped[list[ModelVersion]] = relationship(back_populates="project", passive_deletes=True)

    def __repr__(self) -> str:
        return f"Project(id={self.id!r}, name={self.name!r})"


class Image(Base):
    """One distinct image content. Everything that caches or de-duplicates keys on ``sha256``."""

    __tablename__ = "images"
    __table_args__ = (
        CheckConstraint("length(sha256) = 64", name="sha256_hex"),
        CheckConstraint("width > 0 AND height > 0", name="positive_size"),
    )

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = _created()

    uris: Mapped[list[ImageUri]] = relationship(back_populates="image", passive_deletes=True)

    def __repr__(self) -> str:
        return f"Image(id={self.id!r}, sha256={self.sha256[:12]!r}…, {self.width}x{self.height})"


class ImageUri(Base):
    """A place an image can be read from. A URI names exactly one image at a time."""

    __tablename__ = "image_uris"

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), index=True)
    # 2048 characters keeps the unique B-tree entry under Postgres' ~2.7 kB limit; S3 keys are ≤1024 bytes.
    uri: Mapped[str] = mapped_column(String(2048), unique=True)
    created_at: Mapped[datetime] = _created()
    last_seen_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False, server_default=func.now())

    image: Mapped[Image] = relationship(back_populates="uris")


# --------------------------------------------------------------------------------------------
# model versions
# --------------------------------------------------------------------------------------------
class ModelVersion(Base):
    """A servable model: a base engine (``project_id`` NULL) or a fine-tune for one project.

    ``promoted`` says the eval gate accepted it (``decision`` records why); the version a project
    serves is its promoted version with the latest ``promoted_at`` (rolling back = promoting an
    older version again).
    """

    __tablename__ = "model_versions"
    __table_args__ = (
        UniqueConstraint("project_id", "name", name="uq_model_versions_project_id_name"),
        # NULLs are distinct in unique constraints, so global versions need their own index.
        Index(
            "uq_model_versions_global_name",
            "name",
            unique=True,
            postgresql_where=text("project_id IS NULL"),
            sqlite_where=text("project_id IS NULL"),
        ),
        Index("ix_model_versions_project_id_promoted_at", "project_id", "promoted_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100))  # e.g. "classic-1", "sam2-ft-3"
    engine: Mapped[str] = mapped_column(String(50))  # engine name: classic | sam | sam2 ...
    project_id: Mapped[int | None] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    parent_id: Mapped[int | None] = mapped_column(
        ForeignKey("model_versions.id", ondelete="SET NULL"), index=True
    )
    metrics: Mapped[dict[str, Any]] = mapped_column(
        JSONType, nullable=False, default=dict, server_default=text("'{}'")
    )
    artifact_uri: Mapped[str | None] = mapped_column(String(2048))
    promoted: Mapped[bool] = mapped_column(
        Boolean, nullable=False, default=False, server_default=text("false")
    )
    promoted_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    decision: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    created_at: Mapped[datetime] = _created()

    project: Mapped[Project | None] = relationship(back_populates="model_versions")
    parent: Mapped[ModelVersion | None] = relationship(remote_side=[id])

    def __repr__(self) -> str:
        return f"ModelVersion(id={self.id!r}, name={self.name!r}, project_id={self.project_id!r})"


# --------------------------------------------------------------------------------------------
# interactive history
# --------------------------------------------------------------------------------------------
class PromptSession(Base):
    """An annotator's sequence of prompt rounds on one image (one Label Studio task).

    ``session_key`` is chosen by the serving side (a uuid4) so that history, written later in
    background batches, can be retried without creating the session twice.
    """

    __tablename__ = "prompt_sessions"
    __table_args__ = (Index("ix_prompt_sessions_project_id_ls_task_id", "project_id", "ls_task_id"),)

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True)
    session_key: Mapped[str] = mapped_column(String(64), unique=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), index=True)
    annotator: Mapped[str | None] = mapped_column(String(255))  # Label Studio user id or e-mail
    ls_task_id: Mapped[int | None] = mapped_column(BigInteger)
    model_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id", ondelete="SET NULL"))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False, server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(
        UTCDateTime(), nullable=False, server_default=func.now(), onupdate=utcnow
    )

    rounds: Mapped[list[PromptRound]] = relationship(
        back_populates="session", order_by="PromptRound.round_index", passive_deletes=True
    )


class PromptRound(Base):
    """One request of a session: the prompts (as :class:`seemly.prompts.PromptRound` JSON) and the answer."""

    __tablename__ = "prompt_rounds"
    __table_args__ = (
        UniqueConstraint("session_id", "round_index", name="uq_prompt_rounds_session_id_round_index"),
        CheckConstraint("round_index >= 0", name="round_index_non_negative"),
    )

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True)
    session_id: Mapped[int] = mapped_column(ForeignKey("prompt_sessions.id", ondelete="CASCADE"))
    round_index: Mapped[int] = mapped_column(Integer)
    prompts: Mapped[dict[str, Any]] = mapped_column(JSONType)
    rle: Mapped[dict[str, Any] | None] = mapped_column(JSONType)  # COCO RLE of the answer
    score: Mapped[float | None] = mapped_column(Float)
    latency_ms: Mapped[float | None] = mapped_column(Float)
    model_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = _created()

    session: Mapped[PromptSession] = relationship(back_populates="rounds")


# --------------------------------------------------------------------------------------------
# jobs
# --------------------------------------------------------------------------------------------
class Job(Base):
    """A long-running job (bucket pre-segmentation, training, export) and its progress counters.

    ``heartbeat_at`` is bumped by the runner; a ``running`` job whose heartbeat is stale is dead and
    may be resumed, which re-runs only its ``pending``/``failed`` items.
    """

    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_status", "status"),
        Index("ix_jobs_project_id_kind", "project_id", "kind"),
        # At most one queued or running training per project: the scheduler's lock lives in the
        # database, so it holds across processes, machines and restarts.
        Index(
            "uq_jobs_one_active_training",
            "project_id",
            unique=True,
            postgresql_where=text("kind = 'train' AND status IN ('queued', 'running')"),
            sqlite_where=text("kind = 'train' AND status IN ('queued', 'running')"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))  # presegment | train | export | ...
    status: Mapped[JobStatus] = mapped_column(
        _str_enum(JobStatus, "job_status"), nullable=False, default=JobStatus.QUEUED, server_default="queued"
    )
    project_id: Mapped[int | None] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    params: Mapped[dict[str, Any]] = mapped_column(
        JSONType, nullable=False, default=dict, server_default=text("'{}'")
    )
    items_total: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0, server_default="0")
    items_done: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0, server_default="0")
    items_skipped: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0, server_default="0")
    items_failed: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0, server_default="0")
    masks_written: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0, server_default="0")
    errors: Mapped[list[Any]] = mapped_column(
        JSONType, nullable=False, default=list, server_default=text("'[]'")
    )  # a bounded sample of error summaries; the full list is job_items.error
    runner: Mapped[str | None] = mapped_column(String(255))  # Ray job id / host:pid holding the job
    created_at: Mapped[datetime] = _created()
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    items: Mapped[list[JobItem]] = relationship(back_populates="job", passive_deletes=True)


class JobItem(Base):
    """One unit of a job (an image URI or sha256). ``(job_id, item_key)`` makes listing resumable."""

    __tablename__ = "job_items"
    __table_args__ = (
        UniqueConstraint("job_id", "item_key", name="uq_job_items_job_id_item_key"),
        Index("ix_job_items_job_id_status", "job_id", "status"),
    )

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    item_key: Mapped[str] = mapped_column(String(2048))
    image_id: Mapped[int | None] = mapped_column(ForeignKey("images.id", ondelete="SET NULL"))
    status: Mapped[ItemStatus] = mapped_column(
        _str_enum(ItemStatus, "item_status"),
        nullable=False,
        default=ItemStatus.PENDING,
        server_default="pending",
    )
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0, server_default="0")
    mask_count: Mapped[int] = mapped_column(Integer, nullable=False, default=0, server_default="0")
    error: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(
        UTCDateTime(), nullable=False, server_default=func.now(), onupdate=utcnow
    )

    job: Mapped[Job] = relationship(back_populates="items")


# --------------------------------------------------------------------------------------------
# masks and corrections
# --------------------------------------------------------------------------------------------
class Mask(Base):
    """A stored mask (COCO RLE) with the measures that queries and exports need.

    ``label`` is ``""`` for unlabeled masks (segment-everything); ``ordinal`` numbers the masks a
    producer made for the same (image, model version, label), which is what makes bucket writes
    idempotent. Annotation/correction masks carry their Label Studio ids and their own key.
    """

    __tablename__ = "masks"
    __table_args__ = (
        # Exactly-once bucket output: a replayed write of the same image by the same version is a no-op.
        Index(
            "uq_masks_bucket_output",
            "project_id",
            "image_id",
            "model_version_id",
            "label",
            "ordinal",
            unique=True,
            postgresql_where=text("source = 'bucket'"),
            sqlite_where=text("source = 'bucket'"),
        ),
        # A re-imported Label Studio annotation is a no-op.
        Index(
            "uq_masks_annotation",
            "project_id",
            "ls_annotation_id",
            "source",
            "label",
            "ordinal",
            unique=True,
            postgresql_where=text("ls_annotation_id IS NOT NULL"),
            sqlite_where=text("ls_annotation_id IS NOT NULL"),
        ),
        CheckConstraint(
            "model_version_id IS NOT NULL OR source IN ('annotation', 'correction')",
            name="model_output_has_version",
        ),
        CheckConstraint("ordinal >= 0", name="ordinal_non_negative"),
        # The partial indexes below skip the rows they never find (bucket masks have no task),
        # which keeps the hot path, bulk bucket writes, down to four index insertions per row.
        Index("ix_masks_image_id", "image_id"),
        Index(
            "ix_masks_project_id_ls_task_id",
            "project_id",
            "ls_task_id",
            postgresql_where=text("ls_task_id IS NOT NULL"),
            sqlite_where=text("ls_task_id IS NOT NULL"),
        ),
        Index(
            "ix_masks_job_id",
            "job_id",
            postgresql_where=text("job_id IS NOT NULL"),
            sqlite_where=text("job_id IS NOT NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True)
    # References without per-row foreign keys: statement-level triggers check them once per batch
    # and cascade deletes (seemly/db/mask_references.py, migration 0003, docs/benchmarks.md).
    project_id: Mapped[int] = mapped_column(Integer, nullable=False)
    image_id: Mapped[int] = mapped_column(BigIntId, nullable=False)
    model_version_id: Mapped[int | None] = mapped_column(Integer)
    source: Mapped[MaskSource] = mapped_column(_str_enum(MaskSource, "mask_source"), nullable=False)
    label: Mapped[str] = mapped_column(String(200), nullable=False, default="", server_default="")
    ordinal: Mapped[int] = mapped_column(Integer, nullable=False, default=0, server_default="0")
    rle: Mapped[dict[str, Any]] = mapped_column(JSONType)  # {"size": [h, w], "counts": "..."}
    bbox: Mapped[list[int] | None] = mapped_column(JSONType)  # [x, y, w, h]; NULL when empty
    area: Mapped[int] = mapped_column(Integer)
    score: Mapped[float | None] = mapped_column(Float)
    # Provenance only, deliberately not a foreign key: jobs are append-only history, and the
    # per-row check would cost ~10 % of bulk write throughput (docs/benchmarks.md).
    job_id: Mapped[int | None] = mapped_column(Integer)
    ls_task_id: Mapped[int | None] = mapped_column(BigInteger)
    ls_annotation_id: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = _created()

    image: Mapped[Image] = relationship(primaryjoin="foreign(Mask.image_id) == Image.id")
    model_version: Mapped[ModelVersion | None] = relationship(
        primaryjoin="foreign(Mask.model_version_id) == ModelVersion.id"
    )

    def __repr__(self) -> str:
        return (
            f"Mask(id={self.id!r}, image_id={self.image_id!r}, source={self.source!r}, label={self.label!r})"
        )


class Correction(Base):
    """A submitted Label Studio region beside the prediction it replaced: the training signal.

    Keyed by the Label Studio region, so a re-sent webhook is a no-op and an *updated* annotation
    can be upserted over the old row.
    """

    __tablename__ = "corrections"
    __table_args__ = (
        UniqueConstraint(
            "project_id",
            "ls_annotation_id",
            "ls_region_id",
            name="uq_corrections_project_id_annotation_region",
        ),
        Index("ix_corrections_project_id_id", "project_id", "id"),
        Index("ix_corrections_model_version_id", "model_version_id"),
        Index("ix_corrections_image_id", "image_id"),
    )

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"))
    ls_task_id: Mapped[int] = mapped_column(BigInteger)
    ls_annotation_id: Mapped[int] = mapped_column(BigInteger)
    ls_region_id: Mapped[str] = mapped_column(String(64), nullable=False, default="", server_default="")
    label: Mapped[str] = mapped_column(String(200), nullable=False, default="", server_default="")
    predicted_mask_id: Mapped[int | None] = mapped_column(ForeignKey("masks.id", ondelete="SET NULL"))
    predicted_rle: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    model_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id", ondelete="SET NULL"))
    submitted_rle: Mapped[dict[str, Any]] = mapped_column(JSONType)
    iou: Mapped[float | None] = mapped_column(Float)  # NULL when there was no prediction to compare
    annotator: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = mapped_column(
        UTCDateTime(), nullable=False, server_default=func.now(), onupdate=utcnow
    )


class TrainingRequest(Base):
    """A reason to fine-tune a project's model, and what became of it.

    ``corrections_upto`` is the highest ``corrections.id`` the run may use, which makes a training
    run reproducible and lets the scheduler count "new corrections since the last request".
    """

    __tablename__ = "training_requests"
    __table_args__ = (Index("ix_training_requests_project_id_status", "project_id", "status"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    reason: Mapped[TrainingReason] = mapped_column(
        _str_enum(TrainingReason, "training_reason"), nullable=False
    )
    status: Mapped[JobStatus] = mapped_column(
        _str_enum(JobStatus, "job_status"), nullable=False, default=JobStatus.QUEUED, server_default="queued"
    )
    requested_by: Mapped[str | None] = mapped_column(String(255))
    corrections_upto: Mapped[int | None] = mapped_column(BigInteger)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"))
    model_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = _created()


class Uncertainty(Base):
    """How unsure the served model is about an image of a project (active learning).

    One row per (project, image), rewritten by every ranking run; ``score`` in [0, 1], higher =
    less sure, is what orders the annotation queue (and, as ``1 - score``, the prediction score
    Label Studio's Data Manager sorts by). ``components`` keeps the signals it was made of.
    """

    __tablename__ = "uncertainty"
    __table_args__ = (
        UniqueConstraint("project_id", "image_id", name="uq_uncertainty_project_id_image_id"),
        Index("ix_uncertainty_project_id_score", "project_id", "score"),
    )

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"))
    model_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id", ondelete="SET NULL"))
    ls_task_id: Mapped[int | None] = mapped_column(BigInteger)
    score: Mapped[float] = mapped_column(Float)
    components: Mapped[dict[str, Any]] = mapped_column(
        JSONType, nullable=False, default=dict, server_default=text("'{}'")
    )
    computed_at: Mapped[datetime] = _created()


def _install_mask_references(_metadata: Any, connection: Any, **kw: Any) -> None:
    """``metadata.create_all`` gets the integrity triggers of migration 0003 too (after every table)."""
    from seemly.db import mask_references

    if any(table.name == "masks" for table in kw.get("tables") or ()):
        mask_references.install(connection)


event.listen(Base.metadata, "after_create", _install_mask_references)


__all__ = [
    "NAMING_CONVENTION",
    "Base",
    "BigIntId",
    "Correction",
    "Image",
    "ImageUri",
    "ItemStatus",
    "JSONType",
    "Job",
    "JobItem",
    "JobStatus",
    "Mask",
    "MaskSource",
    "ModelVersion",
    "Project",
    "PromptRound",
    "PromptSession",
    "TrainingReason",
    "TrainingRequest",
    "UTCDateTime",
    "Uncertainty",
    "utcnow",
]
