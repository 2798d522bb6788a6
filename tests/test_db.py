"""The database layer on a real PostgreSQL 15 (and on SQLite, the demo's embedded database).

Covers: migrations up/down/up, migrations == models, ORM round trips, the unique keys that make
retried writes idempotent, the COPY bulk writer at 100k rows and its re-run, the exactly-once
pattern for bucket jobs, and the ``seemly db`` commands.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, create_engine, func, inspect, select, text, update
from sqlalchemy.dialects import postgresql
from sqlalchemy.exc import IntegrityError
from sqlalchemy.pool import NullPool

from seemly import cli
from seemly.db import models as db
from seemly.db.bulk import COPY_MIN_ROWS, MASK_COLUMNS, add_job_items, mask_row, upsert_images, write_masks
from seemly.db.migrate import MIGRATIONS_DIR, current_revision, downgrade, head_revision, upgrade
from seemly.db.session import make_engine, normalize_url, session_scope
from seemly.masks import Mask

TABLES = {
    "projects",
    "images",
    "image_uris",
    "model_versions",
    "prompt_sessions",
    "prompt_rounds",
    "jobs",
    "job_items",
    "masks",
    "corrections",
    "training_requests",
    "uncertainty",
}


def sha(i: int) -> str:
    return f"{i:064x}"


def table_names(url: str) -> set[str]:
    engine = create_engine(normalize_url(url), poolclass=NullPool)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def seed(engine: Engine, images: int = 3) -> dict[str, Any]:
    """A project, a global model version, a job and ``images`` images; their ids."""
    with session_scope(engine) as session:
        project = db.Project(
            name="cats", ls_project_id=7, labels=["cat", "dog"], settings={"train_every": 50}
        )
        version = db.ModelVersion(name="classic-1", engine="classic")
        job = db.Job(kind="presegment", params={"uri": "s3://bucket/prefix"})
        session.add_all([project, version, job])
        session.flush()
        ids = {"project": project.id, "version": version.id, "job": job.id}
    ids["images"] = list(
        upsert_images(
            engine,
            [{"sha256": sha(i), "width": 32, "height": 24, "size_bytes": 1000 + i} for i in range(images)],
        ).values()
    )
    return ids


def square(size: int = 8, height: int = 24, width: int = 32) -> Mask:
    data = np.zeros((height, width), dtype=bool)
    data[2 : 2 + size, 3 : 3 + size] = True
    return Mask(data)


# --------------------------------------------------------------------------------------------
# migrations
# --------------------------------------------------------------------------------------------
def test_migrations_up_down_up_on_postgres(empty_postgres_url: str) -> None:
    assert current_revision(empty_postgres_url) is None
    upgrade(empty_postgres_url)
    assert current_revision(empty_postgres_url) == head_revision() == "0003"
    assert table_names(empty_postgres_url) == TABLES | {"alembic_version"}
    upgrade(empty_postgres_url)  # at head already: a no-op, not an error

    downgrade(empty_postgres_url, "base")
    assert current_revision(empty_postgres_url) is None
    assert table_names(empty_postgres_url) == {"alembic_version"}

    upgrade(empty_postgres_url)
    assert table_names(empty_postgres_url) == TABLES | {"alembic_version"}


def test_concurrent_upgrades_do_not_collide(empty_postgres_url: str) -> None:
    """Processes starting together (backend, workers) all migrate; the advisory lock serialises them."""
    script = "import sys; from seemly.db.migrate import upgrade; upgrade(sys.argv[1])"
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", script, empty_postgres_url], stderr=subprocess.PIPE, text=True
        )
        for _ in range(3)
    ]
    failures = [p.stderr.read() for p in processes if p.wait(timeout=120) != 0 and p.stderr is not None]
    assert not failures, failures
    assert current_revision(empty_postgres_url) == "0003"


def test_threads_may_call_upgrade_concurrently(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'threads.db'}"
    errors: list[BaseException] = []

    def migrate() -> None:
        try:
            upgrade(url)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=migrate) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    assert current_revision(url) == "0003"


def _schema(url: str) -> dict[str, Any]:
    """Everything the inspector reports about our tables, in a comparable form."""
    engine = create_engine(normalize_url(url), poolclass=NullPool)
    try:
        inspector = inspect(engine)
        schema: dict[str, Any] = {}
        for table in sorted(TABLES):
            schema[table] = {
                "columns": [
                    (c["name"], str(c["type"]), c["nullable"], str(c.get("default")))
                    for c in inspector.get_columns(table)
                ],
                "pk": inspector.get_pk_constraint(table)["name"],
                "fks": sorted(
                    (
                        fk["name"],
                        tuple(fk["constrained_columns"]),
                        fk["referred_table"],
                        fk["options"].get("ondelete"),
                    )
                    for fk in inspector.get_foreign_keys(table)
                ),
                "uniques": sorted(
                    (u["name"], tuple(u["column_names"])) for u in inspector.get_unique_constraints(table)
                ),
                "checks": sorted((c["name"], c["sqltext"]) for c in inspector.get_check_constraints(table)),
                "indexes": sorted(
                    (
                        i["name"],
                        tuple(i["column_names"]),
                        i["unique"],
                        str(i.get("dialect_options", {}).get("postgresql_where")),
                    )
                    for i in inspector.get_indexes(table)
                ),
            }
        return schema
    finally:
        engine.dispose()


def test_migrations_create_exactly_the_models(postgres_url: str, empty_postgres_url: str) -> None:
    """The hand-written revision and ``models.py`` must describe the same database, name for name."""
    engine = make_engine(empty_postgres_url, poolclass=NullPool)
    db.Base.metadata.create_all(engine)
    engine.dispose()
    assert _schema(postgres_url) == _schema(empty_postgres_url)

    migrated = make_engine(postgres_url, poolclass=NullPool)
    with migrated.connect() as conn:
        diff = compare_metadata(
            MigrationContext.configure(conn, opts={"compare_type": True}), db.Base.metadata
        )
    migrated.dispose()
    assert diff == []


def test_migrations_located_from_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert (MIGRATIONS_DIR / "env.py").is_file()
    assert (MIGRATIONS_DIR / "script.py.mako").is_file()
    assert (MIGRATIONS_DIR / "versions" / "0001_initial.py").is_file()
    monkeypatch.chdir(tmp_path)  # nothing depends on the working directory
    url = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    upgrade(url)
    assert current_revision(url) == "0003"


# --------------------------------------------------------------------------------------------
# SQLite: the embedded demo database
# --------------------------------------------------------------------------------------------
def test_sqlite_demo_path(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'nested' / 'seemly.db'}"  # parent directory is created
    upgrade(url)
    assert table_names(url) == TABLES | {"alembic_version"}
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            diff = compare_metadata(MigrationContext.configure(conn), db.Base.metadata)
        assert diff == []

        ids = seed(engine, images=2)
        rows = [
            mask_row(
                square(4 + k),
                project_id=ids["project"],
                image_id=image_id,
                source=db.MaskSource.BUCKET,
                model_version_id=ids["version"],
                ordinal=k,
            )
            for image_id in ids["images"]
            for k in range(3)
        ]
        assert write_masks(engine, rows) == 6
        assert write_masks(engine, rows) == 0
        assert add_job_items(engine, ids["job"], ["a", "b", "a"]) == 2
        assert add_job_items(engine, ids["job"], ["b", "c"]) == 1

        with session_scope(engine) as session:
            stored = session.scalars(select(db.Mask).order_by(db.Mask.id)).all()
            assert len(stored) == 6
            assert stored[0].source is db.MaskSource.BUCKET
            assert Mask.from_coco_rle(stored[0].rle) == square(4)
            assert stored[0].bbox == [3, 2, 4, 4]
            assert stored[0].created_at.tzinfo is not None
            session.add(db.ImageUri(image_id=999, uri="file:///nowhere.png"))
            with pytest.raises(IntegrityError):  # foreign keys are enforced on SQLite too
                session.flush()
            session.rollback()
    finally:
        engine.dispose()
    downgrade(url, "base")
    assert table_names(url) == {"alembic_version"}


# --------------------------------------------------------------------------------------------
# ORM round trips
# --------------------------------------------------------------------------------------------
def test_round_trip_every_table(postgres_db: Engine) -> None:
    ids = seed(postgres_db)
    image_id = ids["images"][0]
    prompts = {"prompts": [{"kind": "click", "x": 3.5, "y": 4.0, "positive": True}], "label": "cat"}
    rle = square().to_coco_rle()
    with session_scope(postgres_db) as session:
        tuned = db.ModelVersion(
            name="classic-ft-1",
            engine="classic",
            project_id=ids["project"],
            parent_id=ids["version"],
            metrics={"miou": 0.81},
            artifact_uri="s3://models/cats/1",
            promoted=True,
            promoted_at=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
            decision={"promote": True, "delta_miou": 0.03},
        )
        session.add(tuned)
        session.flush()
        prompt_session = db.PromptSession(
            session_key="0f" * 16,
            project_id=ids["project"],
            image_id=image_id,
            annotator="ann@example.com",
            ls_task_id=11,
            model_version_id=tuned.id,
        )
        prompt_session.rounds = [
            db.PromptRound(
                round_index=i, prompts=prompts, rle=rle, score=0.9, latency_ms=12.5, model_version_id=tuned.id
            )
            for i in range(2)
        ]
        session.add(prompt_session)
        predicted = db.Mask(
            project_id=ids["project"],
            image_id=image_id,
            model_version_id=tuned.id,
            source=db.MaskSource.INTERACTIVE,
            label="cat",
            rle=rle,
            bbox=[3, 2, 8, 8],
            area=64,
            score=0.9,
            ls_task_id=11,
        )
        session.add(predicted)
        session.flush()
        session.add(
            db.Correction(
                project_id=ids["project"],
                image_id=image_id,
                ls_task_id=11,
                ls_annotation_id=21,
                ls_region_id="r1",
                label="cat",
                predicted_mask_id=predicted.id,
                model_version_id=tuned.id,
                submitted_rle=rle,
                iou=1.0,
                annotator="ann@example.com",
            )
        )
        session.add(db.JobItem(job_id=ids["job"], item_key="s3://bucket/prefix/a.png", image_id=image_id))
        session.add(
            db.TrainingRequest(project_id=ids["project"], reason=db.TrainingReason.COUNT, corrections_upto=1)
        )

    with session_scope(postgres_db) as session:
        project = session.scalars(select(db.Project)).one()
        assert (project.labels, project.settings) == (["cat", "dog"], {"train_every": 50})
        tuned = session.scalars(select(db.ModelVersion).where(db.ModelVersion.project_id == project.id)).one()
        assert tuned.parent is not None and tuned.parent.name == "classic-1"
        assert tuned.metrics == {"miou": 0.81} and tuned.decision == {"promote": True, "delta_miou": 0.03}
        assert tuned.promoted_at == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
        stored_session = session.scalars(select(db.PromptSession)).one()
        assert [r.round_index for r in stored_session.rounds] == [0, 1]
        assert stored_session.rounds[1].prompts == prompts
        assert Mask.from_coco_rle(stored_session.rounds[1].rle) == square()
        correction = session.scalars(select(db.Correction)).one()
        assert correction.iou == 1.0 and correction.submitted_rle == rle
        job = session.get(db.Job, ids["job"])
        assert (
            job is not None
            and job.status is db.JobStatus.QUEUED
            and job.items_total == 0
            and job.errors == []
        )
        item = session.scalars(select(db.JobItem)).one()
        assert item.status is db.ItemStatus.PENDING and item.attempts == 0
        request = session.scalars(select(db.TrainingRequest)).one()
        assert request.status is db.JobStatus.QUEUED and request.reason is db.TrainingReason.COUNT
        image = session.get(db.Image, ids["images"][0])
        assert image is not None and image.created_at.tzinfo is not None
        assert tuned.decision is not None and isinstance(tuned.created_at, datetime)


def test_json_none_is_sql_null(postgres_db: Engine) -> None:
    ids = seed(postgres_db)
    with postgres_db.connect() as conn:
        count = select(func.count()).select_from(db.ModelVersion).where(db.ModelVersion.decision.is_(None))
        assert conn.scalar(count) == 1
        raw = conn.execute(
            text("SELECT decision IS NULL FROM model_versions WHERE id = :id"), {"id": ids["version"]}
        )
        assert raw.scalar() is True


# --------------------------------------------------------------------------------------------
# unique keys: retried writes are no-ops
# --------------------------------------------------------------------------------------------
def _violates(engine: Engine, *objects: Any) -> None:
    with pytest.raises(IntegrityError), session_scope(engine) as session:
        session.add_all(objects)


def test_unique_keys_reject_duplicates(postgres_db: Engine) -> None:
    ids = seed(postgres_db, images=1)
    project, version, image = ids["project"], ids["version"], ids["images"][0]
    _violates(postgres_db, db.Project(name="cats"))
    _violates(postgres_db, db.Image(sha256=sha(0), width=1, height=1, size_bytes=1))
    _violates(postgres_db, db.Image(sha256="abc", width=1, height=1, size_bytes=1))  # not a sha256
    _violates(postgres_db, db.ModelVersion(name="classic-1", engine="classic"))  # global name
    with session_scope(postgres_db) as session:
        session.add(
            db.ModelVersion(name="classic-1", engine="classic", project_id=project)
        )  # per project: fine
        session.add(db.ImageUri(image_id=image, uri="s3://b/a.png"))
        session.add(db.JobItem(job_id=ids["job"], item_key="s3://b/a.png"))
    _violates(postgres_db, db.ModelVersion(name="classic-1", engine="classic", project_id=project))
    _violates(postgres_db, db.ImageUri(image_id=image, uri="s3://b/a.png"))
    _violates(postgres_db, db.JobItem(job_id=ids["job"], item_key="s3://b/a.png"))

    with session_scope(postgres_db) as session:
        prompt_session = db.PromptSession(session_key="k1", project_id=project, image_id=image)
        prompt_session.rounds = [db.PromptRound(round_index=0, prompts={})]
        session.add(prompt_session)
        session.flush()
        session_id = prompt_session.id
    _violates(postgres_db, db.PromptRound(session_id=session_id, round_index=0, prompts={}))
    _violates(postgres_db, db.PromptSession(session_key="k1", project_id=project, image_id=image))

    rle = square().to_coco_rle()
    bucket = dict(project_id=project, image_id=image, model_version_id=version, rle=rle, area=64)
    with session_scope(postgres_db) as session:
        session.add(db.Mask(source=db.MaskSource.BUCKET, label="cat", ordinal=0, **bucket))
        # Same key but interactive: the bucket key does not apply, sessions repeat freely.
        session.add(db.Mask(source=db.MaskSource.INTERACTIVE, label="cat", ordinal=0, **bucket))
        session.add(db.Mask(source=db.MaskSource.INTERACTIVE, label="cat", ordinal=0, **bucket))
    _violates(postgres_db, db.Mask(source=db.MaskSource.BUCKET, label="cat", ordinal=0, **bucket))
    # Model output needs a model version; annotations do not.
    _violates(postgres_db, db.Mask(source=db.MaskSource.BUCKET, **{**bucket, "model_version_id": None}))
    annotation = dict(project_id=project, image_id=image, rle=rle, area=64, ls_annotation_id=5, label="cat")
    with session_scope(postgres_db) as session:
        session.add(db.Mask(source=db.MaskSource.ANNOTATION, **annotation))
    _violates(postgres_db, db.Mask(source=db.MaskSource.ANNOTATION, **annotation))


def test_resent_webhook_is_idempotent_and_update_upserts(postgres_db: Engine) -> None:
    ids = seed(postgres_db, images=1)
    table = db.Correction.__table__
    first = square(4).to_coco_rle()
    values = dict(
        project_id=ids["project"],
        image_id=ids["images"][0],
        ls_task_id=3,
        ls_annotation_id=9,
        ls_region_id="abc",
        label="cat",
        submitted_rle=first,
        iou=0.5,
    )
    key = ["project_id", "ls_annotation_id", "ls_region_id"]
    with postgres_db.begin() as conn:
        once = postgresql.insert(table).values(values).on_conflict_do_nothing(index_elements=key)
        assert conn.execute(once.returning(table.c.id)).all() == [(1,)]
        assert conn.execute(once.returning(table.c.id)).all() == []  # the same webhook again
        edited = square(6).to_coco_rle()
        statement = postgresql.insert(table).values({**values, "submitted_rle": edited, "iou": 0.7})
        conn.execute(
            statement.on_conflict_do_update(
                index_elements=key,
                set_={"submitted_rle": statement.excluded.submitted_rle, "iou": statement.excluded.iou},
            )
        )
        rows = conn.execute(select(table.c.submitted_rle, table.c.iou)).all()
    assert rows == [(edited, 0.7)]


# --------------------------------------------------------------------------------------------
# bulk writers
# --------------------------------------------------------------------------------------------
def _bucket_rows(
    ids: dict[str, Any], count: int, start: int = 0, per_image: int = 10
) -> list[dict[str, Any]]:
    templates = [square(2 + k % 10).to_coco_rle() for k in range(per_image)]
    images = ids["images"]
    return [
        {
            "project_id": ids["project"],
            "image_id": images[(i // per_image) % len(images)],
            "model_version_id": ids["version"],
            "source": "bucket",
            "label": "",
            "ordinal": i // (per_image * len(images)) * per_image + i % per_image,
            "rle": templates[i % per_image],
            "bbox": [3, 2, 2 + i % 10, 2 + i % 10],
            "area": (2 + i % 10) ** 2,
            "score": 0.5,
            "job_id": ids["job"],
        }
        for i in range(start, start + count)
    ]


def _duplicate_keys(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(
            conn.scalar(
                text(
                    "SELECT count(*) FROM (SELECT 1 FROM masks WHERE source = 'bucket' "
                    "GROUP BY project_id, image_id, model_version_id, label, ordinal HAVING count(*) > 1) d"
                )
            )
        )


def _mask_count(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.scalar(select(func.count()).select_from(db.Mask)) or 0)


def test_copy_100k_masks_then_rerun_inserts_nothing(postgres_db: Engine) -> None:
    ids = seed(postgres_db, images=1000)
    rows = _bucket_rows(ids, 100_000)
    assert write_masks(postgres_db, rows) == 100_000
    assert _mask_count(postgres_db) == 100_000
    assert write_masks(postgres_db, rows) == 0  # the idempotent re-run
    assert _mask_count(postgres_db) == 100_000
    # A resumed job overlapping what was written: only the new half goes in.
    assert write_masks(postgres_db, _bucket_rows(ids, 20_000, start=90_000)) == 10_000
    assert _mask_count(postgres_db) == 110_000
    assert _duplicate_keys(postgres_db) == 0
    with postgres_db.connect() as conn:
        stored = conn.execute(
            select(db.Mask.rle, db.Mask.bbox, db.Mask.area).where(db.Mask.ordinal == 3).limit(1)
        ).one()
    assert Mask.from_coco_rle(stored.rle) == square(5)
    assert stored.bbox == [3, 2, 5, 5] and stored.area == 25


@pytest.mark.parametrize("count", [10, COPY_MIN_ROWS + 500], ids=["insert", "copy"])
def test_both_write_paths_are_idempotent(postgres_db: Engine, count: int) -> None:
    ids = seed(postgres_db, images=200)
    rows = _bucket_rows(ids, count)
    assert write_masks(postgres_db, rows + rows) == count  # duplicates inside one batch: written once
    assert write_masks(postgres_db, rows) == 0
    assert write_masks(postgres_db, _bucket_rows(ids, count, start=count // 2)) == count - count // 2
    assert _mask_count(postgres_db) == count + count - count // 2
    assert _duplicate_keys(postgres_db) == 0


def test_copy_path_on_an_autocommit_connection(postgres_db: Engine) -> None:
    ids = seed(postgres_db, images=200)
    rows = _bucket_rows(ids, COPY_MIN_ROWS)
    with postgres_db.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        assert write_masks(conn, rows) == COPY_MIN_ROWS
        assert write_masks(conn, rows) == 0
    assert _mask_count(postgres_db) == COPY_MIN_ROWS


def test_write_masks_joins_the_callers_transaction(postgres_db: Engine) -> None:
    """Exactly-once: an item's masks and its ``done`` mark commit together or not at all."""
    ids = seed(postgres_db, images=1)
    add_job_items(postgres_db, ids["job"], ["s3://b/a.png"])
    rows = _bucket_rows(ids, 5)
    mark_done = (
        update(db.JobItem)
        .where(db.JobItem.job_id == ids["job"], db.JobItem.item_key == "s3://b/a.png")
        .values(status=db.ItemStatus.DONE, mask_count=5)
    )

    class WorkerCrash(Exception):
        pass

    with pytest.raises(WorkerCrash), postgres_db.begin() as conn:
        assert write_masks(conn, rows) == 5
        conn.execute(mark_done)
        raise WorkerCrash
    assert _mask_count(postgres_db) == 0
    with postgres_db.connect() as conn:
        assert conn.scalar(select(db.JobItem.status)) is db.ItemStatus.PENDING

    for expected in (5, 0):  # the resumed item, then a replay of the same transaction
        with postgres_db.begin() as conn:
            assert write_masks(conn, rows) == expected
            conn.execute(mark_done)
    assert _mask_count(postgres_db) == 5
    with postgres_db.connect() as conn:
        assert conn.scalar(select(db.JobItem.status)) is db.ItemStatus.DONE
    # Two COPY batches in one transaction (the staging table is dropped after each) also work.
    big = _bucket_rows(ids, 2 * COPY_MIN_ROWS, start=5)
    with postgres_db.begin() as conn:
        assert write_masks(conn, big[:COPY_MIN_ROWS]) + write_masks(conn, big[COPY_MIN_ROWS:]) == len(big)


def test_write_masks_measures_rle_when_area_missing(postgres_db: Engine) -> None:
    ids = seed(postgres_db, images=1)
    empty = Mask.empty(24, 32).to_coco_rle()
    base = {"project_id": ids["project"], "image_id": ids["images"][0], "source": db.MaskSource.ANNOTATION}
    uncompressed = {"size": [24, 32], "counts": [0, 24 * 32]}  # column-major: all foreground
    rows = [
        {**base, "rle": square(6).to_coco_rle(), "ls_annotation_id": 1},
        {**base, "rle": empty, "ls_annotation_id": 2},
        {**base, "rle": uncompressed, "ls_annotation_id": 3},
    ]
    assert write_masks(postgres_db, rows) == 3
    with postgres_db.connect() as conn:
        measured = conn.execute(select(db.Mask.area, db.Mask.bbox).order_by(db.Mask.ls_annotation_id)).all()
    assert measured == [(36, [3, 2, 6, 6]), (0, None), (24 * 32, [0, 0, 32, 24])]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"model_version": 1}, "unknown column"),
        ({"project_id": 1, "image_id": 1, "source": "bucket"}, "missing ['rle']"),
        ({"project_id": 1, "image_id": 1, "source": "robot", "rle": {}}, "not one of"),
        ({"project_id": 1, "image_id": 1, "source": "bucket", "rle": "xyz"}, "COCO RLE mapping"),
        ({"project_id": 1, "image_id": 1, "source": "bucket", "rle": {"size": [2, 2]}}, "cannot measure"),
    ],
)
def test_write_masks_rejects_bad_rows_before_writing(row: dict[str, Any], message: str) -> None:
    engine = make_engine("sqlite://")
    with pytest.raises(ValueError, match="mask row 0") as excinfo:
        write_masks(engine, [row])
    assert message in str(excinfo.value)
    assert set(MASK_COLUMNS) >= {"rle", "bbox", "area"}


def test_upsert_images_by_sha256(postgres_db: Engine) -> None:
    first = upsert_images(
        postgres_db,
        [
            {"sha256": sha(1).upper(), "width": 10, "height": 20, "size_bytes": 5, "uri": "s3://b/1.png"},
            {
                "sha256": sha(2),
                "width": 10,
                "height": 20,
                "size_bytes": 5,
                "uris": ["s3://b/2.png", "/data/2.png"],
            },
        ],
    )
    assert set(first) == {sha(1), sha(2)}
    again = upsert_images(postgres_db, [{"sha256": sha(1), "width": 10, "height": 20, "size_bytes": 5}])
    assert again == {sha(1): first[sha(1)]}
    # s3://b/1.png was overwritten with the content of image 2: the URI moves.
    upsert_images(
        postgres_db, [{"sha256": sha(2), "width": 10, "height": 20, "size_bytes": 5, "uri": "s3://b/1.png"}]
    )
    with postgres_db.connect() as conn:
        uris = dict(conn.execute(select(db.ImageUri.uri, db.ImageUri.image_id)).all())
        images = conn.scalar(select(func.count()).select_from(db.Image))
    assert images == 2
    assert uris == {
        "s3://b/1.png": first[sha(2)],
        "s3://b/2.png": first[sha(2)],
        "/data/2.png": first[sha(2)],
    }
    with pytest.raises(ValueError, match="missing 'width'"):
        upsert_images(postgres_db, [{"sha256": sha(3)}])


def test_add_job_items_registers_only_new_keys(postgres_db: Engine) -> None:
    ids = seed(postgres_db, images=1)
    keys = [f"s3://b/{i}.png" for i in range(COPY_MIN_ROWS)]
    assert add_job_items(postgres_db, ids["job"], keys) == COPY_MIN_ROWS  # COPY path
    assert add_job_items(postgres_db, ids["job"], keys[:10]) == 0  # INSERT path
    with postgres_db.begin() as conn:
        conn.execute(
            update(db.JobItem).where(db.JobItem.item_key == keys[0]).values(status=db.ItemStatus.DONE)
        )
    assert add_job_items(postgres_db, ids["job"], [*keys, "s3://b/new.png"]) == 1
    with postgres_db.connect() as conn:
        statuses = dict(
            conn.execute(select(db.JobItem.status, func.count()).group_by(db.JobItem.status)).all()
        )
    assert statuses == {db.ItemStatus.DONE: 1, db.ItemStatus.PENDING: COPY_MIN_ROWS}


# --------------------------------------------------------------------------------------------
# sessions, URLs, the command line
# --------------------------------------------------------------------------------------------
def test_normalize_url_picks_psycopg3() -> None:
    assert normalize_url("postgresql://u@h/d").drivername == "postgresql+psycopg"
    assert normalize_url("postgres://u@h/d").drivername == "postgresql+psycopg"
    assert normalize_url("postgresql+psycopg://u@h/d").drivername == "postgresql+psycopg"
    assert normalize_url("sqlite:///x.db").drivername == "sqlite"


def test_session_scope_commits_or_rolls_back(postgres_db: Engine) -> None:
    with pytest.raises(RuntimeError), session_scope(postgres_db) as session:
        session.add(db.Project(name="lost"))
        session.flush()
        raise RuntimeError("boom")
    with session_scope(postgres_db) as session:
        assert session.scalars(select(db.Project)).all() == []
        session.add(db.Project(name="kept"))
    with session_scope(postgres_db) as session:
        assert [p.name for p in session.scalars(select(db.Project))] == ["kept"]


def test_cli_db_upgrade_and_downgrade(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    assert cli.main(["db", "upgrade", "--url", url]) == 0
    assert "base -> 0003" in capsys.readouterr().out
    assert cli.main(["db", "downgrade", "base", "--url", url]) == 0
    assert "0003 -> base" in capsys.readouterr().out
    assert table_names(url) == {"alembic_version"}


def test_cli_db_upgrade_uses_settings_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from seemly.config import get_settings

    url = f"sqlite:///{tmp_path / 'from-env.db'}"
    monkeypatch.setenv("SEEMLY_DATABASE_URL", url)
    get_settings.cache_clear()
    try:
        assert cli.main(["db", "upgrade"]) == 0
    finally:
        get_settings.cache_clear()
    assert current_revision(url) == "0003"
    capsys.readouterr()


def test_cli_on_an_unmigrated_database_says_how_to_migrate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from seemly.config import get_settings

    monkeypatch.setenv("SEEMLY_DATABASE_URL", f"sqlite:///{tmp_path / 'empty.db'}")
    get_settings.cache_clear()
    try:
        assert cli.main(["train", "versions", "--project", "cats"]) == 2
    finally:
        get_settings.cache_clear()
    err = capsys.readouterr().err
    assert "no seemly tables yet: run `seemly db upgrade`" in err and "Traceback" not in err
