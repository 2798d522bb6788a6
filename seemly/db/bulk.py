"""Bulk writers for the tables that grow with a bucket: masks, images, job items.

On Postgres, batches of :data:`COPY_MIN_ROWS` rows or more are streamed with binary ``COPY``
(psycopg 3 ``cursor.copy``) into a temporary staging table, then moved with
``INSERT … SELECT … ON CONFLICT DO NOTHING``. COPY is an order of magnitude faster than row
inserts, and the final ``ON CONFLICT`` makes a re-run of the same batch insert nothing (the unique
keys are documented in :mod:`seemly.db.models`). Smaller batches, and everything on SQLite (the
demo), run as one SQLAlchemy multi-row ``INSERT … ON CONFLICT DO NOTHING`` with the same effect.

Exactly-once bucket jobs: do an image's writes in **one transaction** with the bookkeeping::

    with engine.begin() as conn:
        write_masks(conn, rows_for_this_image)
        conn.execute(update(JobItem).where(...).values(status=ItemStatus.DONE, mask_count=len(rows)))

A crash before the commit leaves neither the masks nor the "done" mark, so the resumed job redoes
the item; a crash after it leaves both, so the item is skipped. Should the same transaction still
be replayed (a retried Ray task racing the original), the mask key turns it into a no-op.

Functions take an :class:`~sqlalchemy.Engine` (each call is its own transaction) or a
:class:`~sqlalchemy.Connection` (the caller's transaction, committed by the caller).

Big batches given an **Engine** (:data:`PARALLEL_MIN_ROWS` rows or more) are split by image over
:data:`PARALLEL_CONNECTIONS` connections, each chunk COPYed in its own transaction at the same time:
COPY scales with server backends, and both the client's encoding and the server's inserts run on
more than one core. Such a call is not atomic (a failure can leave other chunks committed), which
is safe because the unique keys make a re-run insert only what is missing; every reference is
checked before anything is written, so a batch naming a missing image writes nothing. A caller that
needs all-or-nothing passes a Connection, as the per-image writes of bucket jobs do.

Referential integrity of ``masks`` is enforced by statement-level triggers rather than per-row
foreign keys (:mod:`seemly.db.mask_references`); a missing project, image or model version raises
:class:`MissingReferenceError` on every path.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from json.encoder import encode_basestring
from typing import Any

import psycopg.errors
from pycocotools import mask as coco_mask
from sqlalchemy import Connection, Engine, Table, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.sql.dml import Insert

from seemly.db.models import Image, ImageUri, JobItem, MaskSource
from seemly.db.models import Mask as MaskRecord
from seemly.masks import Mask

#: Columns a mask row may carry, in COPY order; ``id`` and ``created_at`` come from the database.
MASK_COLUMNS: tuple[str, ...] = (
    "project_id",
    "image_id",
    "model_version_id",
    "source",
    "label",
    "ordinal",
    "rle",
    "bbox",
    "area",
    "score",
    "job_id",
    "ls_task_id",
    "ls_annotation_id",
)
#: Binary COPY types of the staging columns. JSON travels as text and is cast to jsonb once, in the
#: INSERT: cheaper than the jsonb COPY input path, and the staging table has no JSON to re-parse.
_MASK_STAGE_TYPES = (
    *("int4", "int8", "int4"),  # project_id, image_id, model_version_id
    *("text", "text", "int4"),  # source, label, ordinal
    *("text", "text", "int4", "float8"),  # rle, bbox, area, score
    *("int4", "int8", "int8"),  # job_id, ls_task_id, ls_annotation_id
)
_MASK_CASTS = {"rle": "jsonb", "bbox": "jsonb"}
_MASK_REQUIRED = frozenset({"project_id", "image_id", "source", "rle"})
_MASK_ALLOWED = frozenset(MASK_COLUMNS)
_SOURCES = {source.value: source.value for source in MaskSource}  # a StrEnum member finds its value too

#: Rows per statement on the executemany path (bounds memory, keeps SQLite lock slices short).
CHUNK_ROWS = 10_000
#: Smaller batches go to Postgres as one multi-row ``INSERT … ON CONFLICT DO NOTHING``: for a
#: handful of rows (one image's masks) that is faster than COPY, and creating a staging table per
#: image would churn the system catalogs at bucket scale.
COPY_MIN_ROWS = 1_000

#: Engine-bound batches this big are written over several connections at once (see the module doc).
PARALLEL_MIN_ROWS = 20_000
#: Connections for such a batch: two saturate a 2-core database host (docs/benchmarks.md).
PARALLEL_CONNECTIONS = 2


class MissingReferenceError(ValueError):
    """Mask rows name a project, image or model version that does not exist; the write inserted nothing."""


_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


@contextmanager
def _connection(bind: Engine | Connection) -> Iterator[Connection]:
    if isinstance(bind, Engine):
        with bind.begin() as conn:
            yield conn
    else:
        yield bind


def _insert(conn: Connection, table: Table) -> Insert:
    """``INSERT`` in the dialect that knows ``ON CONFLICT`` (Postgres and SQLite share its syntax)."""
    name = conn.dialect.name
    if name == "postgresql":
        return postgresql.insert(table)
    if name == "sqlite":
        return sqlite.insert(table)
    raise NotImplementedError(f"seemly supports Postgres and SQLite, not {name!r}")


def _chunks(rows: Sequence[Any], size: int = CHUNK_ROWS) -> Iterator[Sequence[Any]]:
    for start in range(0, len(rows), size):
        yield rows[start : start + size]


def _copy_insert(
    conn: Connection,
    table: str,
    columns: Sequence[str],
    types: Sequence[str],
    rows: Iterable[Sequence[Any]],
    casts: Mapping[str, str] | None = None,
) -> int:
    """Binary-COPY ``rows`` into a temporary staging table, then insert the new ones into ``table``.

    The staging table has no constraints, is private to this connection, and is dropped at the
    end; a failed call's leftover is rolled back with its transaction (or, on an autocommit
    connection, dropped by the next call). ``casts`` convert staging columns on the way in.
    """
    casts = casts or {}
    stage = f"seemly_stage_{table}"
    column_list = ", ".join(columns)
    select_list = ", ".join(f"{c}::{casts[c]}" if c in casts else c for c in columns)
    definition = ", ".join(f"{c} {t}" for c, t in zip(columns, types, strict=True))
    # Through SQLAlchemy, not the raw cursor, so that the Connection knows a transaction began.
    conn.exec_driver_sql(f"DROP TABLE IF EXISTS pg_temp.{stage}")
    conn.exec_driver_sql(f"CREATE TEMP TABLE {stage} ({definition})")
    dbapi_connection = conn.connection.dbapi_connection
    assert dbapi_connection is not None
    with dbapi_connection.cursor() as cursor:
        with cursor.copy(f"COPY {stage} ({column_list}) FROM STDIN (FORMAT BINARY)") as copy:
            copy.set_types(list(types))
            for row in rows:
                copy.write_row(row)
        cursor.execute(
            f"INSERT INTO {table} ({column_list}) SELECT {select_list} FROM {stage} ON CONFLICT DO NOTHING"
        )
        inserted = cursor.rowcount
        cursor.execute(f"DROP TABLE {stage}")
    return int(inserted)


def _executemany_insert(
    conn: Connection, table: Table, columns: Sequence[str], rows: Sequence[Sequence[Any]]
) -> int:
    """Multi-row ``INSERT … ON CONFLICT DO NOTHING``; returns the rows actually inserted."""
    statement = _insert(conn, table).on_conflict_do_nothing()
    inserted = 0
    for chunk in _chunks(rows):
        params = [dict(zip(columns, row, strict=True)) for row in chunk]
        if conn.dialect.name == "postgresql":
            # psycopg reports no rowcount for a batched executemany: count what RETURNING gives back.
            inserted += len(conn.execute(statement.returning(table.c.id), params).all())
        else:
            inserted += max(conn.execute(statement, params).rowcount, 0)
    return inserted


# --------------------------------------------------------------------------------------------
# masks
# --------------------------------------------------------------------------------------------
def mask_row(
    mask: Mask,
    *,
    project_id: int,
    image_id: int,
    source: MaskSource | str,
    model_version_id: int | None = None,
    label: str = "",
    ordinal: int = 0,
    score: float | None = None,
    job_id: int | None = None,
    ls_task_id: int | None = None,
    ls_annotation_id: int | None = None,
) -> dict[str, Any]:
    """A :func:`write_masks` row for a :class:`seemly.masks.Mask` (RLE, bbox and area computed)."""
    bbox = mask.bbox
    return {
        "project_id": project_id,
        "image_id": image_id,
        "model_version_id": model_version_id,
        "source": source,
        "label": label,
        "ordinal": ordinal,
        "rle": mask.to_coco_rle(),
        "bbox": list(bbox) if bbox is not None else None,
        "area": mask.area,
        "score": score,
        "job_id": job_id,
        "ls_task_id": ls_task_id,
        "ls_annotation_id": ls_annotation_id,
    }


def _rle_measures(rle: Mapping[str, Any]) -> tuple[int, list[int] | None]:
    """Area and ``[x, y, w, h]`` straight from a COCO RLE, without decoding its pixels."""
    try:
        height, width = (int(v) for v in rle["size"])
        counts = rle["counts"]
        if isinstance(counts, list):
            encoded = coco_mask.frPyObjects({"size": [height, width], "counts": counts}, height, width)
        else:
            encoded = {
                "size": [height, width],
                "counts": counts.encode("ascii") if isinstance(counts, str) else counts,
            }
        area = int(coco_mask.area(encoded))
        bbox = [int(v) for v in coco_mask.toBbox(encoded)]
    except Exception as exc:  # pycocotools raises bare exceptions on corrupt input
        raise ValueError(f"cannot measure COCO RLE: {exc}") from exc
    return (area, bbox) if area else (0, None)


def _mask_values(index: int, row: Mapping[str, Any]) -> tuple[Any, ...]:
    """Validate one row; its values in :data:`MASK_COLUMNS` order (the hot loop: keep it lean)."""
    keys = row.keys()
    if not keys <= _MASK_ALLOWED:
        unknown = sorted(keys - _MASK_ALLOWED)
        raise ValueError(f"mask row {index}: unknown column(s) {unknown}; allowed: {list(MASK_COLUMNS)}")
    if not keys >= _MASK_REQUIRED:
        raise ValueError(f"mask row {index}: missing {sorted(_MASK_REQUIRED - keys)}")
    get = row.get
    source = get("source")
    try:
        source = _SOURCES[source]
    except (KeyError, TypeError):
        raise ValueError(f"mask row {index}: source {source!r} is not one of {list(_SOURCES)}") from None
    rle, area, bbox = get("rle"), get("area"), get("bbox")
    if type(rle) is not dict and not isinstance(rle, Mapping):  # the ABC check is slow: skip it for dicts
        raise ValueError(f"mask row {index}: rle must be a COCO RLE mapping, got {type(rle).__name__}")
    if area is None:
        try:
            area, bbox = _rle_measures(rle)
        except ValueError as exc:
            raise ValueError(f"mask row {index}: {exc}") from None
    return (
        get("project_id"),
        get("image_id"),
        get("model_version_id"),
        source,
        get("label", ""),
        get("ordinal", 0),
        rle,
        bbox,
        area,
        get("score"),
        get("job_id"),
        get("ls_task_id"),
        get("ls_annotation_id"),
    )


def _rle_json(rle: Mapping[str, Any]) -> str:
    """JSON text of a COCO RLE; the common ``{"size": [h, w], "counts": str}`` shape 5x faster than json."""
    if len(rle) == 2:
        size, counts = rle.get("size"), rle.get("counts")
        if type(counts) is str and type(size) in (list, tuple) and len(size) == 2:
            height, width = size
            if type(height) is int and type(width) is int:
                return f'{{"size":[{height},{width}],"counts":{encode_basestring(counts)}}}'
    return _dumps(rle)


def _bbox_json(bbox: Any) -> str | None:
    if bbox is None:
        return None
    if type(bbox) in (list, tuple) and len(bbox) == 4:
        x, y, w, h = bbox
        if type(x) is type(y) is type(w) is type(h) is int:
            return f"[{x},{y},{w},{h}]"
    return _dumps([int(v) for v in bbox])


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _copy_rows(values: Iterable[tuple[Any, ...]]) -> Iterator[tuple[Any, ...]]:
    """Binary-COPY-ready tuples: numbers coerced (numpy scalars welcome), JSON as text."""
    for pid, image, version, source, label, ordinal, rle, bbox, area, score, job, task, annotation in values:
        yield (
            int(pid),
            int(image),
            _opt_int(version),
            source,
            label,
            int(ordinal),
            _rle_json(rle),
            _bbox_json(bbox),
            int(area),
            None if score is None else float(score),
            _opt_int(job),
            _opt_int(task),
            _opt_int(annotation),
        )


def _write_values(conn: Connection, values: Sequence[tuple[Any, ...]]) -> int:
    try:
        if conn.dialect.name == "postgresql" and len(values) >= COPY_MIN_ROWS:
            return _copy_insert(
                conn, "masks", MASK_COLUMNS, _MASK_STAGE_TYPES, _copy_rows(values), casts=_MASK_CASTS
            )
        return _executemany_insert(conn, MaskRecord.__table__, MASK_COLUMNS, values)
    except (psycopg.errors.ForeignKeyViolation, IntegrityError) as exc:
        cause = exc.orig if isinstance(exc, IntegrityError) else exc
        missing = isinstance(cause, psycopg.errors.ForeignKeyViolation) or (
            isinstance(cause, sqlite3.IntegrityError) and "masks reference" in str(cause)
        )
        if not missing:
            raise
        message = getattr(getattr(cause, "diag", None), "message_primary", None) or str(cause)
        raise MissingReferenceError(f"{message}; this write inserted no mask") from exc


def _check_references(conn: Connection, values: Sequence[tuple[Any, ...]]) -> None:
    """Raise :class:`MissingReferenceError` unless every referenced parent row exists (one query each).

    A fast, clear refusal before a parallel write starts; the triggers still guard every row.
    """
    from seemly.db.mask_references import PARENTS

    for table, column, noun, _kind in PARENTS:
        index = MASK_COLUMNS.index(column)
        wanted = sorted({int(row[index]) for row in values if row[index] is not None})
        if not wanted:
            continue
        found = set(
            conn.exec_driver_sql(f"SELECT id FROM {table} WHERE id = ANY(%(ids)s)", {"ids": wanted}).scalars()
        )
        if len(found) < len(wanted):
            missing = [i for i in wanted if i not in found]
            shown = ", ".join(map(str, missing[:5])) + (", …" if len(missing) > 5 else "")
            raise MissingReferenceError(
                f"masks reference {noun} {shown}, which does not exist ({len(missing)} missing "
                f"{table} id(s)); no mask of this batch was written"
            )


def _pool_capacity(engine: Engine) -> int | None:
    """How many connections the engine's pool can hand out at once (None: no limit)."""
    pool = engine.pool
    size, overflow = getattr(pool, "size", None), getattr(pool, "_max_overflow", None)
    if not callable(size) or not isinstance(overflow, int) or overflow < 0:
        return None
    return int(size()) + overflow


def _write_parallel(engine: Engine, values: Sequence[tuple[Any, ...]], connections: int) -> int:
    """Split by image (a unique key never spans two chunks: no waits, no deadlocks) and write at once."""
    with engine.connect() as conn:
        _check_references(conn, values)
    chunks: list[list[tuple[Any, ...]]] = [[] for _ in range(connections)]
    for row in values:
        chunks[int(row[1]) % connections].append(row)

    def write(chunk: Sequence[tuple[Any, ...]]) -> int:
        with engine.begin() as conn:
            return _write_values(conn, chunk)

    with ThreadPoolExecutor(connections, thread_name_prefix="seemly-write-masks") as pool:
        return sum(pool.map(write, [chunk for chunk in chunks if chunk]))


def write_masks(
    bind: Engine | Connection, rows: Iterable[Mapping[str, Any]], *, connections: int | None = None
) -> int:
    """Insert mask rows, skipping those whose unique key already exists; returns how many were new.

    Each row is a mapping with keys from :data:`MASK_COLUMNS` (see :func:`mask_row`): required
    ``project_id``, ``image_id``, ``source``, ``rle``; ``area``/``bbox`` are computed from the RLE
    when ``area`` is absent. Running the same rows again inserts nothing. A row naming a project,
    image or model version that does not exist raises :class:`MissingReferenceError`.

    With an Engine and at least :data:`PARALLEL_MIN_ROWS` rows on Postgres, the batch is written
    over ``connections`` (default :data:`PARALLEL_CONNECTIONS`) connections, each chunk its own
    transaction (see the module docstring); ``connections=1`` keeps one transaction.
    """
    values = [_mask_values(i, row) for i, row in enumerate(rows)]
    if not values:
        return 0
    connections = PARALLEL_CONNECTIONS if connections is None else connections
    if connections < 1:
        raise ValueError(f"connections must be >= 1, got {connections}")
    if isinstance(bind, Engine) and bind.dialect.name == "postgresql" and len(values) >= PARALLEL_MIN_ROWS:
        capacity = _pool_capacity(bind)
        connections = connections if capacity is None else min(connections, capacity)
        if connections > 1:
            return _write_parallel(bind, values, connections)
    with _connection(bind) as conn:
        return _write_values(conn, values)


# --------------------------------------------------------------------------------------------
# images and job items
# --------------------------------------------------------------------------------------------
def upsert_images(bind: Engine | Connection, images: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """Make sure each image (by ``sha256``) and its URIs exist; returns ``{sha256: image id}``.

    Each mapping has ``sha256``, ``width``, ``height``, ``size_bytes`` and optionally ``uri`` (one)
    or ``uris`` (several). An existing image is left as it is. A URI that already names another
    image is moved to this one: the object at that URI was overwritten with new content.
    Rows are written in ``sha256`` order so concurrent writers lock in the same order (no deadlocks).
    """
    by_sha: dict[str, dict[str, Any]] = {}
    uri_to_sha: dict[str, str] = {}
    for index, image in enumerate(images):
        try:
            sha = str(image["sha256"]).lower()
            record = {
                "sha256": sha,
                "width": int(image["width"]),
                "height": int(image["height"]),
                "size_bytes": int(image["size_bytes"]),
            }
        except KeyError as exc:
            raise ValueError(f"image row {index}: missing {exc.args[0]!r}") from None
        by_sha.setdefault(sha, record)
        for uri in [image["uri"]] if image.get("uri") else list(image.get("uris") or []):
            uri_to_sha[str(uri)] = sha
    if not by_sha:
        return {}
    image_table, uri_table = Image.__table__, ImageUri.__table__
    shas = sorted(by_sha)
    with _connection(bind) as conn:
        statement = _insert(conn, image_table).on_conflict_do_nothing(index_elements=["sha256"])
        for chunk in _chunks(shas):
            conn.execute(statement, [by_sha[sha] for sha in chunk])
        ids: dict[str, int] = {}
        for chunk in _chunks(shas, 1000):
            query = select(image_table.c.sha256, image_table.c.id).where(image_table.c.sha256.in_(chunk))
            ids.update({sha: image_id for sha, image_id in conn.execute(query)})
        if uri_to_sha:
            upsert = _insert(conn, uri_table)
            upsert = upsert.on_conflict_do_update(
                index_elements=["uri"],
                set_={"image_id": upsert.excluded.image_id, "last_seen_at": func.now()},
            )
            uri_rows = [{"uri": uri, "image_id": ids[uri_to_sha[uri]]} for uri in sorted(uri_to_sha)]
            for chunk in _chunks(uri_rows):
                conn.execute(upsert, list(chunk))
    return ids


def add_job_items(bind: Engine | Connection, job_id: int, item_keys: Iterable[str]) -> int:
    """Register a job's work items (URIs or sha256s) as ``pending``; returns how many were new.

    Listing a bucket again after a crash registers only what the first listing missed, and items
    already ``done`` keep their status.
    """
    rows = [(job_id, str(key)) for key in dict.fromkeys(item_keys)]
    if not rows:
        return 0
    columns = ("job_id", "item_key")
    with _connection(bind) as conn:
        if conn.dialect.name == "postgresql" and len(rows) >= COPY_MIN_ROWS:
            return _copy_insert(conn, "job_items", columns, ("int4", "text"), rows)
        return _executemany_insert(conn, JobItem.__table__, columns, rows)


__all__ = [
    "MASK_COLUMNS",
    "PARALLEL_CONNECTIONS",
    "PARALLEL_MIN_ROWS",
    "MissingReferenceError",
    "add_job_items",
    "mask_row",
    "upsert_images",
    "write_masks",
]
