"""Mask references without per-row foreign keys (migration 0003) and parallel bulk writes.

The triggers of :mod:`seemly.db.mask_references` must give every guarantee the foreign keys gave:
no mask names a missing project / image / model version (also under a concurrent delete), and
deleting or truncating a parent removes its masks. Real Postgres, and SQLite for the demo.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, select, text
from sqlalchemy.pool import NullPool

from seemly.db import bulk
from seemly.db import models as db
from seemly.db.bulk import MissingReferenceError, write_masks
from seemly.db.migrate import downgrade, upgrade
from seemly.db.session import make_engine, normalize_url
from tests.test_db import _bucket_rows, _duplicate_keys, _mask_count, seed

TRIGGERS = {
    ("masks", "masks_check_references_insert"),
    ("masks", "masks_check_references_update"),
    *(
        (table, name)
        for table in ("projects", "images", "model_versions")
        for name in ("masks_cascade_delete", "masks_cascade_truncate")
    ),
}


def _triggers(url: str) -> set[tuple[str, str]]:
    engine = create_engine(normalize_url(url), poolclass=NullPool)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT c.relname, t.tgname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
                    "WHERE NOT t.tgisinternal"
                )
            )
            return {(table, name) for table, name in rows}
    finally:
        engine.dispose()


def test_migration_and_create_all_install_the_same_triggers(
    postgres_url: str, empty_postgres_url: str
) -> None:
    assert _triggers(postgres_url) >= TRIGGERS
    engine = make_engine(empty_postgres_url, poolclass=NullPool)
    db.Base.metadata.create_all(engine)
    engine.dispose()
    assert _triggers(empty_postgres_url) == _triggers(postgres_url)


def test_parallel_write_of_100k_masks_twice_gives_exactly_100k(postgres_db: Engine, monkeypatch) -> None:
    ids = seed(postgres_db, images=1000)
    rows = _bucket_rows(ids, 100_000)
    used: list[int] = []
    original = bulk._write_parallel
    monkeypatch.setattr(bulk, "_write_parallel", lambda e, v, n: used.append(n) or original(e, v, n))
    assert write_masks(postgres_db, rows) == 100_000
    assert write_masks(postgres_db, rows + rows[:5000]) == 0  # a re-run, duplicates inside it too
    assert used == [bulk.PARALLEL_CONNECTIONS, bulk.PARALLEL_CONNECTIONS]
    assert _mask_count(postgres_db) == 100_000
    assert _duplicate_keys(postgres_db) == 0
    assert write_masks(postgres_db, _bucket_rows(ids, 30_000, start=90_000), connections=3) == 20_000
    assert _mask_count(postgres_db) == 120_000


def test_a_small_pool_limits_the_connections(postgres_url: str, postgres_db: Engine) -> None:
    ids = seed(postgres_db, images=100)
    engine = make_engine(postgres_url, pool_size=1, max_overflow=0)
    try:
        assert write_masks(engine, _bucket_rows(ids, bulk.PARALLEL_MIN_ROWS), connections=4) == (
            bulk.PARALLEL_MIN_ROWS
        )
    finally:
        engine.dispose()
    assert _mask_count(postgres_db) == bulk.PARALLEL_MIN_ROWS


def _with_missing(ids: dict[str, Any], count: int, column: str, value: int) -> list[dict[str, Any]]:
    rows = _bucket_rows(ids, count)
    rows[count // 2] = {**rows[count // 2], column: value}
    return rows


@pytest.mark.parametrize(
    ("count", "connections"),
    [(10, 1), (bulk.COPY_MIN_ROWS, 1), (bulk.PARALLEL_MIN_ROWS, 2)],
    ids=["insert", "copy", "parallel"],
)
@pytest.mark.parametrize(
    ("column", "noun"),
    [("image_id", "image"), ("project_id", "project"), ("model_version_id", "model version")],
)
def test_a_missing_reference_writes_nothing(
    postgres_db: Engine, count: int, connections: int, column: str, noun: str
) -> None:
    ids = seed(postgres_db, images=50)
    rows = _with_missing(ids, count, column, 987_654)
    with pytest.raises(MissingReferenceError, match=rf"masks reference {noun} 987654, which does not exist"):
        write_masks(postgres_db, rows, connections=connections)
    assert _mask_count(postgres_db) == 0


def test_a_missing_reference_rolls_back_the_callers_transaction(postgres_db: Engine) -> None:
    ids = seed(postgres_db, images=5)
    with pytest.raises(MissingReferenceError, match="image 424242"), postgres_db.begin() as conn:
        write_masks(conn, _bucket_rows(ids, 20))
        write_masks(conn, _with_missing(ids, bulk.COPY_MIN_ROWS, "image_id", 424242))
    assert _mask_count(postgres_db) == 0


def test_orm_insert_and_update_are_checked_too(postgres_db: Engine) -> None:
    ids = seed(postgres_db, images=1)
    base = _bucket_rows(ids, 1)[0]
    with pytest.raises(Exception, match="masks reference image 5555"), postgres_db.begin() as conn:
        conn.execute(db.Mask.__table__.insert().values(**{**base, "image_id": 5555}))
    assert write_masks(postgres_db, [base]) == 1
    with pytest.raises(Exception, match="masks reference model version 6666"), postgres_db.begin() as conn:
        conn.execute(db.Mask.__table__.update().values(model_version_id=6666))
    assert _mask_count(postgres_db) == 1


@pytest.mark.parametrize(
    "statement",
    [
        "DELETE FROM images WHERE id = {image}",
        "DELETE FROM model_versions WHERE id = {version}",
        "DELETE FROM projects WHERE id = {project}",
        "TRUNCATE images CASCADE",
        "TRUNCATE model_versions CASCADE",
    ],
)
def test_deleting_a_parent_deletes_its_masks(postgres_db: Engine, statement: str) -> None:
    ids = seed(postgres_db, images=4)
    write_masks(postgres_db, _bucket_rows(ids, 40, per_image=10))
    assert _mask_count(postgres_db) == 40
    with postgres_db.begin() as conn:
        conn.exec_driver_sql(
            statement.format(image=ids["images"][0], version=ids["version"], project=ids["project"])
        )
    assert _mask_count(postgres_db) == (30 if "images WHERE" in statement else 0)


def test_a_concurrent_delete_waits_for_the_writer(postgres_db: Engine) -> None:
    """The writer holds FOR KEY SHARE on the image until it commits; the delete then removes its masks."""
    ids = seed(postgres_db, images=1)
    image = ids["images"][0]
    outcome: dict[str, Any] = {}
    with postgres_db.begin() as writer:
        write_masks(writer, _bucket_rows(ids, 10))

        def delete() -> None:
            with postgres_db.begin() as conn:
                conn.exec_driver_sql("SET LOCAL lock_timeout = '300ms'")
                try:
                    conn.execute(db.Image.__table__.delete().where(db.Image.id == image))
                except Exception as exc:
                    outcome["blocked"] = type(exc.__cause__ or exc).__name__

        thread = threading.Thread(target=delete)
        thread.start()
        thread.join(10)
    assert outcome == {"blocked": "LockNotAvailable"}  # the delete had to wait for the writer
    assert _mask_count(postgres_db) == 10
    with postgres_db.begin() as conn:
        conn.execute(db.Image.__table__.delete().where(db.Image.id == image))
    assert _mask_count(postgres_db) == 0


def test_a_writer_after_an_uncommitted_delete_fails_cleanly(postgres_db: Engine) -> None:
    ids = seed(postgres_db, images=1)
    image = ids["images"][0]
    errors: list[BaseException] = []
    with postgres_db.begin() as deleter:
        deleter.execute(db.Image.__table__.delete().where(db.Image.id == image))

        def write() -> None:
            try:
                write_masks(postgres_db, _bucket_rows(ids, bulk.COPY_MIN_ROWS))
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=write)
        thread.start()
        thread.join(0.5)
        assert thread.is_alive()  # waiting for the deleter's row lock
    thread.join(10)
    assert len(errors) == 1 and isinstance(errors[0], MissingReferenceError), errors
    assert _mask_count(postgres_db) == 0


# --------------------------------------------------------------------------------------------
# SQLite: the same rules with row triggers
# --------------------------------------------------------------------------------------------
def test_sqlite_checks_and_cascades(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'refs.db'}"
    upgrade(url)
    engine = make_engine(url)
    try:
        ids = seed(engine, images=2)
        with pytest.raises(MissingReferenceError, match="missing image"):
            write_masks(engine, _with_missing(ids, 10, "image_id", 999))
        assert _mask_count(engine) == 0
        assert write_masks(engine, _bucket_rows(ids, 20, per_image=10)) == 20
        with engine.begin() as conn:
            conn.execute(db.Image.__table__.delete().where(db.Image.id == ids["images"][0]))
        assert _mask_count(engine) == 10
        with engine.begin() as conn:
            conn.execute(db.Project.__table__.delete())
        assert _mask_count(engine) == 0
    finally:
        engine.dispose()


def test_sqlite_upgrade_keeps_masks_and_correction_links(tmp_path: Path) -> None:
    """0003 rebuilds masks on SQLite; the rows, their ids and the corrections pointing at them survive."""
    url = f"sqlite:///{tmp_path / 'old.db'}"
    upgrade(url, "0002")
    engine = make_engine(url)
    try:
        ids = seed(engine, images=2)
        write_masks(engine, _bucket_rows(ids, 20, per_image=10))
        with engine.begin() as conn:
            mask_id = conn.execute(select(db.Mask.id).order_by(db.Mask.id.desc()).limit(1)).scalar_one()
            conn.exec_driver_sql(
                "INSERT INTO corrections (project_id, image_id, ls_task_id, ls_annotation_id, "
                "predicted_mask_id, submitted_rle, iou, created_at, updated_at) "
                f"VALUES ({ids['project']}, {ids['images'][0]}, 1, 1, {mask_id}, '{{}}', 0.5, "
                "'2026-01-01 00:00:00', '2026-01-01 00:00:00')"
            )
    finally:
        engine.dispose()
    upgrade(url)
    engine = make_engine(url)
    try:
        assert _mask_count(engine) == 20
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT predicted_mask_id FROM corrections").scalar() == mask_id
        downgrade(url, "0002")
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT predicted_mask_id FROM corrections").scalar() == mask_id
            fks = conn.exec_driver_sql("PRAGMA foreign_key_list(masks)").all()
        assert {row[2] for row in fks} == {"projects", "images", "model_versions"}
    finally:
        engine.dispose()
