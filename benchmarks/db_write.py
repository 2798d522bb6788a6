"""Masks written per second into Postgres: COPY vs SQLAlchemy executemany vs row-by-row.

Ways a bucket job could store its masks, side by side on the same server in one run:

* ``copy, parallel``: :func:`seemly.db.bulk.write_masks` given an Engine, as it runs by default:
  the batch split by image over :data:`~seemly.db.bulk.PARALLEL_CONNECTIONS` connections, each
  COPYing into a staging table and then ``INSERT … SELECT … ON CONFLICT DO NOTHING``, including
  the row validation, JSON encoding and the reference pre-check;
* ``copy, one connection``: the same with ``connections=1`` (one transaction, as a caller's
  Connection gets);
* ``copy (re-run)``: the same rows again, every one a conflict: what a resumed job pays;
* ``executemany``: ``session.execute(insert(Mask), list_of_dicts)`` (SQLAlchemy's batched
  "insertmanyvalues"), one commit;
* ``row-by-row``: one ``INSERT`` and one commit per mask, as a naive loop does;
* ``before``: the one-connection COPY on the schema of revision 0002 (three per-row foreign keys
  on ``masks`` instead of the statement-level reference triggers of 0003), in the same run;
* a diagnostic line (only when connected as a superuser): the one-connection COPY with all
  triggers (the reference checks) switched off, to show what integrity costs. seemly never does this.

CPU is read from ``/proc`` for this process and every Postgres backend of the benchmark's pool.

The benchmark creates a scratch database on the server (``--url`` names any database this user
may ``CREATE DATABASE`` from), migrates it, and drops it at the end. Masks are realistic object
masks on 512x512 images (an ellipse each, COCO RLE ~100-200 bytes), 20 per image.

    python benchmarks/db_write.py --url postgresql+psycopg://postgres@127.0.0.1:5432/postgres
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import Engine, func, insert, select, text
from sqlalchemy.orm import Session

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: tests.fixtures

from seemly.bench.machine import cpu_model
from seemly.db.bulk import PARALLEL_CONNECTIONS, mask_row, upsert_images, write_masks
from seemly.db.migrate import downgrade, upgrade
from seemly.db.models import Job, Mask, MaskSource, ModelVersion, Project
from seemly.db.session import make_engine
from seemly.masks import Mask as BinaryMask
from tests.fixtures.postgres import temporary_database

DEFAULT_URL = os.environ.get(
    "SEEMLY_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
MASKS_PER_IMAGE = 20
SIDE = 512


def ellipse_masks(count: int, seed: int = 0) -> list[BinaryMask]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIDE, 0:SIDE]
    masks = []
    for _ in range(count):
        cy, cx = rng.uniform(64, SIDE - 64, size=2)
        ry, rx = rng.uniform(10, 60, size=2)
        masks.append(BinaryMask(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0))
    return masks


def prepare(engine: Engine, rows: int) -> list[dict[str, Any]]:
    """Reference rows (project, model version, job, images) and ``rows`` mask dicts to write."""
    with Session(engine) as session:
        project = Project(name="bench")
        version = ModelVersion(name="classic-1", engine="classic")
        job = Job(kind="presegment")
        session.add_all([project, version, job])
        session.commit()
        project_id, version_id, job_id = project.id, version.id, job.id
    image_count = -(-rows // MASKS_PER_IMAGE)
    ids = upsert_images(
        engine,
        [
            {"sha256": f"{i:064x}", "width": SIDE, "height": SIDE, "size_bytes": 100_000}
            for i in range(image_count)
        ],
    )
    image_ids = [ids[f"{i:064x}"] for i in range(image_count)]
    templates = [
        mask_row(
            m,
            project_id=project_id,
            image_id=0,
            source=MaskSource.BUCKET,
            model_version_id=version_id,
            job_id=job_id,
        )
        for m in ellipse_masks(MASKS_PER_IMAGE)
    ]
    return [
        {
            **templates[i % MASKS_PER_IMAGE],
            "image_id": image_ids[i // MASKS_PER_IMAGE],
            "ordinal": i % MASKS_PER_IMAGE,
        }
        for i in range(rows)
    ]


def clear_masks(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(text("TRUNCATE TABLE masks CASCADE"))


def count_masks(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.scalar(select(func.count()).select_from(Mask)) or 0)


def by_copy(engine: Engine, rows: list[dict[str, Any]], connections: int | None = None) -> int:
    return write_masks(engine, rows, connections=connections)


def by_copy_without_fk_checks(engine: Engine, rows: list[dict[str, Any]]) -> int:
    """Diagnostic only: the one-connection COPY with triggers (reference checks) off; superuser only."""
    with engine.begin() as conn:
        conn.execute(text("SET LOCAL session_replication_role = replica"))
        return write_masks(conn, rows)


def is_superuser(engine: Engine) -> bool:
    with engine.connect() as conn:
        return conn.scalar(text("SHOW is_superuser")) == "on"


def by_executemany(engine: Engine, rows: list[dict[str, Any]]) -> int:
    with Session(engine) as session:
        session.execute(insert(Mask), rows)
        session.commit()
    return len(rows)


def by_row(engine: Engine, rows: list[dict[str, Any]]) -> int:
    with Session(engine) as session:
        for row in rows:
            session.add(Mask(**row))
            session.commit()
    return len(rows)


@dataclass
class Timing:
    """Median wall time and CPU time (this process, and the Postgres backend when it is local)."""

    rows: int
    wall: float
    client_cpu: float
    server_cpu: float | None

    @property
    def cpu(self) -> float | None:
        return None if self.server_cpu is None else self.client_cpu + self.server_cpu


def backend_cpu_seconds(pid: int) -> float | None:
    """utime + stime of a local Postgres backend from /proc; None when the server is elsewhere."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def backends_cpu_seconds(pids: list[int]) -> float | None:
    seconds = [backend_cpu_seconds(pid) for pid in pids]
    return None if any(s is None for s in seconds) else sum(s for s in seconds if s is not None)


def pool_backend_pids(engine: Engine, size: int) -> list[int]:
    """Check out every pooled connection at once, so each has a backend, and return their pids."""
    connections = [engine.connect() for _ in range(size)]
    try:
        return [int(conn.scalar(text("SELECT pg_backend_pid()")) or 0) for conn in connections]
    finally:
        for conn in connections:
            conn.close()


def prioritise(nice: int | None, backend_pids: list[int]) -> None:
    """Set the nice value of this process and of the measured backends (None: leave them alone)."""
    if nice is None:
        return
    for pid in [0, *backend_pids]:
        os.setpriority(os.PRIO_PROCESS, pid, nice)


def timed(
    fn: Callable[[], int], repeat: int, reset: Callable[[], None] | None, backend_pids: list[int]
) -> tuple[Timing, int]:
    """The median of ``repeat`` runs (``reset`` before each), and the rows the last run wrote."""
    walls, clients, servers, written = [], [], [], 0
    for _ in range(repeat):
        if reset is not None:
            reset()
        server_before = backends_cpu_seconds(backend_pids)
        client_before, start = time.process_time(), time.perf_counter()
        written = fn()
        walls.append(time.perf_counter() - start)
        clients.append(time.process_time() - client_before)
        server_after = backends_cpu_seconds(backend_pids)
        if server_before is not None and server_after is not None:
            servers.append(server_after - server_before)
    server = statistics.median(servers) if len(servers) == repeat else None
    return Timing(written, statistics.median(walls), statistics.median(clients), server), written


def machine() -> str:
    cpu = cpu_model(platform.processor() or platform.machine())
    return f"{os.cpu_count()} CPU ({cpu}), Python {platform.python_version()}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=DEFAULT_URL, help="Postgres URL to create the scratch database from")
    parser.add_argument(
        "--rows", type=int, default=100_000, help="masks for COPY and executemany (default 100000)"
    )
    parser.add_argument("--naive-rows", type=int, default=2_000, help="masks for row-by-row (default 2000)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per method; the median is reported")
    parser.add_argument(
        "--nice",
        type=int,
        default=None,
        help="run this process and its (local) Postgres backends at this nice value, e.g. -10 (needs root): "
        "wall-clock rates on a machine shared with other work",
    )
    args = parser.parse_args(argv)

    with temporary_database(args.url, prefix="seemly_bench") as url:
        upgrade(url)
        # A fixed pool (no overflow, no pre-ping reconnects), so every backend the methods use is measured.
        pool = PARALLEL_CONNECTIONS
        engine = make_engine(url, pool_size=pool, max_overflow=0)
        try:
            with engine.connect() as conn:
                server = str(conn.scalar(text("SHOW server_version")))
            pids = pool_backend_pids(engine, pool)
            prioritise(args.nice, pids)
            rows = prepare(engine, args.rows)
            reset = lambda: clear_masks(engine)  # noqa: E731
            results: list[tuple[str, Timing]] = []

            def measure(name: str, fn: Callable[[], int], expect: int, clear: bool = True) -> None:
                timing, n = timed(fn, args.repeat, reset if clear else None, pids)
                assert n == expect and count_masks(engine) == (n if clear else args.rows), name
                timing.rows = len(rows) if timing.rows == 0 else timing.rows
                results.append((name, timing))

            measure(
                f"`write_masks`, {pool} connections in parallel (COPY → staging → INSERT … ON CONFLICT DO NOTHING)",
                lambda: by_copy(engine, rows),
                args.rows,
            )
            measure(
                "`write_masks`, one connection and transaction (`connections=1`)",
                lambda: by_copy(engine, rows, 1),
                args.rows,
            )
            measure(
                "same COPY again (idempotent re-run: 0 new rows)",
                lambda: by_copy(engine, rows),
                0,
                clear=False,
            )
            if is_superuser(engine):
                measure(
                    "diagnostic: one-connection COPY with the reference triggers off (seemly never does)",
                    lambda: by_copy_without_fk_checks(engine, rows),
                    args.rows,
                )
            timing, _ = timed(lambda: by_executemany(engine, rows), args.repeat, reset, pids)
            results.append(("SQLAlchemy executemany: `session.execute(insert(Mask), rows)`", timing))
            naive = rows[: args.naive_rows]
            timing, _ = timed(lambda: by_row(engine, naive), args.repeat, reset, pids)
            results.append(("row-by-row: one INSERT + commit per mask", timing))
            # The schema before revision 0003: three per-row foreign keys on masks.
            clear_masks(engine)
            engine.dispose()
            downgrade(url, "0002")
            pids = pool_backend_pids(engine, pool)
            prioritise(args.nice, pids)
            measure(
                "before: one-connection COPY on revision 0002 (per-row foreign keys)",
                lambda: by_copy(engine, rows, 1),
                args.rows,
            )
        finally:
            engine.dispose()

    naive_rate = next(t.rows / t.wall for name, t in results if name.startswith("row-by-row"))
    print(
        f"Postgres {server} (local), {machine()}; load average {os.getloadavg()[0]:.1f} at the end"
        f"{'' if args.nice is None else f'; benchmark and its backends at nice {args.nice}'}; "
        f"median of {args.repeat} runs. CPU = seconds of CPU used by this process + its Postgres backends.\n"
    )
    print(
        "| method | rows | wall s | rows/s | vs row-by-row | CPU s (client + server) | rows per CPU-second |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, t in results:
        rate = t.rows / t.wall
        cpu = f"{t.cpu:.2f} ({t.client_cpu:.2f} + {t.server_cpu:.2f})" if t.server_cpu is not None else "n/a"
        per_cpu = f"{t.rows / t.cpu:,.0f}" if t.cpu else "n/a"
        print(
            f"| {name} | {t.rows:,} | {t.wall:.2f} | {rate:,.0f} | {rate / naive_rate:.0f}x | {cpu} | {per_cpu} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
