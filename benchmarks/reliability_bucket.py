"""Bucket-job fault scenarios of ``benchmarks/reliability.py``: the database goes away mid-job, and
S3 fails on chosen keys. Each runs the real job (``workers.presegment.presegment`` on Ray Data)
over moto's S3 server on loopback and checks the outcome in Postgres with SQL.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from seemly.config import Settings
from seemly.db.session import make_engine
from tests.fixtures.faulty_s3 import FaultyS3Proxy
from tests.fixtures.postgres import block_database
from tests.fixtures.s3 import S3_TEST_ACCESS_KEY, S3_TEST_SECRET_KEY, make_s3_client
from tests.test_presegment import tiny_png
from workers.presegment import PresegmentOptions, presegment

IMAGE_SIZE = (160, 120)


def job_settings(database_url: str, endpoint: str) -> Settings:
    return Settings(
        database_url=database_url,
        s3_endpoint_url=endpoint,
        s3_access_key_id=S3_TEST_ACCESS_KEY,
        s3_secret_access_key=S3_TEST_SECRET_KEY,
        s3_max_attempts=3,
        engine="classic",
        ray_num_cpus_per_actor=0.5,
    )


def fill_bucket(endpoint: str, bucket: str, prefix: str, count: int) -> list[str]:
    client = make_s3_client(endpoint)
    client.create_bucket(Bucket=bucket)
    keys = [f"{prefix}{i:05d}.png" for i in range(count)]
    with ThreadPoolExecutor(8) as pool:
        list(
            pool.map(
                lambda i: client.put_object(Bucket=bucket, Key=keys[i], Body=tiny_png(i, IMAGE_SIZE)),
                range(count),
            )
        )
    return keys


def job_check(db: Engine, project: str) -> dict[str, Any]:
    """Per project: items by status, and the duplicate checks (masks and items by their unique keys)."""
    with db.connect() as conn:
        by_status = dict(
            conn.execute(
                text(
                    "SELECT i.status, count(*) FROM job_items i JOIN jobs j ON j.id = i.job_id "
                    "JOIN projects p ON p.id = j.project_id WHERE p.name = :p GROUP BY i.status"
                ),
                {"p": project},
            ).all()
        )
        masks, mask_keys, images = conn.execute(
            text(
                "SELECT count(*), count(DISTINCT (m.image_id, m.model_version_id, m.label, m.ordinal)), "
                "count(DISTINCT m.image_id) FROM masks m JOIN projects p ON p.id = m.project_id "
                "WHERE p.name = :p AND m.source = 'bucket'"
            ),
            {"p": project},
        ).one()
        items, item_keys = conn.execute(
            text(
                "SELECT count(*), count(DISTINCT (i.job_id, i.item_key)) FROM job_items i JOIN jobs j "
                "ON j.id = i.job_id JOIN projects p ON p.id = j.project_id WHERE p.name = :p"
            ),
            {"p": project},
        ).one()
        jobs = [
            dict(row._mapping)
            for row in conn.execute(
                text(
                    "SELECT j.id, j.status, j.items_total, j.items_done, j.items_skipped, j.items_failed, "
                    "j.masks_written FROM jobs j JOIN projects p ON p.id = j.project_id WHERE p.name = :p "
                    "ORDER BY j.id"
                ),
                {"p": project},
            )
        ]
    return {
        "items_by_status": {str(k): int(v) for k, v in by_status.items()},
        "masks": int(masks),
        "masks_duplicated": int(masks) - int(mask_keys),
        "images_with_masks": int(images),
        "items_duplicated": int(items) - int(item_keys),
        "jobs": jobs,
    }


# --- the database goes away --------------------------------------------------------------------------------
def database_up(url: str) -> bool:
    try:
        engine = make_engine(url, poolclass=NullPool, connect_args={"connect_timeout": 2})
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        finally:
            engine.dispose()
        return True
    except Exception:
        return False


def restart_postgres(version: str = "15") -> None:
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart"],
        check=True,
        capture_output=True,
        timeout=120,
    )


@dataclass
class OutageRun:
    outage: dict[str, float] = field(default_factory=dict)  # start, end (monotonic), done_at_start
    runs: list[dict[str, Any]] = field(default_factory=list)  # each job run: ok / error, seconds
    check: dict[str, Any] = field(default_factory=dict)


def database_outage(
    database_url: str,
    admin_url: str,
    endpoint: str,
    *,
    count: int,
    how: str,
    outage_s: float,
    db_retry_s: float,
    project: str,
) -> OutageRun:
    """A bucket job of ``count`` images; when a quarter is done the database goes away:
    ``how="restart"`` restarts the whole Postgres server (``pg_ctlcluster … restart``), ``"block"``
    refuses connections to this job's database for ``outage_s`` and ends its sessions. If the job
    stops, it is rerun (a resume) until it finishes. The outcome is checked in SQL."""
    bucket = f"rel-{how}-{int(time.time())}"
    fill_bucket(endpoint, bucket, "img/", count)
    settings = job_settings(database_url, endpoint)
    db = make_engine(database_url)
    run = OutageRun()
    name = str(make_url(database_url).database)

    def cut() -> None:
        deadline = time.monotonic() + 600
        try:
            while time.monotonic() < deadline:
                with db.connect() as conn:
                    done = conn.execute(
                        text(
                            "SELECT count(*) FROM job_items i JOIN jobs j ON j.id = i.job_id JOIN projects p "
                            "ON p.id = j.project_id WHERE p.name = :p AND i.status = 'done'"
                        ),
                        {"p": project},
                    ).scalar_one()
                if done >= count // 4:
                    run.outage["done_at_start"] = float(done)
                    run.outage["start"] = time.monotonic()
                    if how == "restart":
                        restart_postgres()
                    else:
                        block_database(admin_url, name, True)
                        time.sleep(outage_s)
                    return
                time.sleep(0.1)
        finally:
            if how != "restart":
                block_database(admin_url, name, False)
            while not database_up(database_url) and time.monotonic() < deadline:
                time.sleep(0.05)
            run.outage["end"] = time.monotonic()

    cutter = threading.Thread(target=cut, daemon=True)
    cutter.start()
    # batches of 4: an actor writes every ~1-2 s here, so an outage of a few seconds meets its writes
    options = PresegmentOptions(progress=False, actors=2, batch_size=4, refresh_s=1.0, db_retry_s=db_retry_s)
    for _attempt in range(3):
        started = time.monotonic()
        try:
            result = presegment(f"s3://{bucket}/img/", project, options, settings)
            run.runs.append(
                {
                    "ok": True,
                    "s": time.monotonic() - started,
                    "job": result.job_id,
                    "resumed": result.resumed,
                    "processed": result.processed,
                }
            )
            break
        except Exception as exc:
            run.runs.append(
                {
                    "ok": False,
                    "s": time.monotonic() - started,
                    "error": f"{type(exc).__name__}: {str(exc)[:300]}",
                }
            )
            cutter.join(timeout=120)
            while not database_up(database_url):
                time.sleep(0.2)
    cutter.join(timeout=120)
    db.dispose()
    db = make_engine(database_url)
    run.check = job_check(db, project)
    db.dispose()
    return run


# --- S3 errors on chosen keys --------------------------------------------------------------------------------
def s3_errors(
    database_url: str,
    endpoint: str,
    *,
    count: int,
    project: str,
    on_first: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """A bucket job where chosen keys fail: 500 (sick server), 503 (throttled), 404 (deleted after the
    listing), corrupted bytes. Then the faults clear and the job is rerun: the rest gets done."""
    bucket = f"rel-s3-{int(time.time())}"
    keys = fill_bucket(endpoint, bucket, "img/", count)
    client = make_s3_client(endpoint)
    corrupt = keys[3::25]
    for key in corrupt:
        client.put_object(Bucket=bucket, Key=key, Body=tiny_png(999, IMAGE_SIZE)[:200])
    faults: dict[str, int] = {}
    for i, key in enumerate(k for k in keys if k not in corrupt):
        if i % 20 == 7:
            faults[key] = 500
        elif i % 20 == 13:
            faults[key] = 503
        elif i % 40 == 1:
            faults[key] = 404
    db = make_engine(database_url)
    out: dict[str, Any] = {"count": count, "faults": {}, "corrupt": len(corrupt)}
    for status in (500, 503, 404):
        out["faults"][status] = sum(1 for s in faults.values() if s == status)
    with FaultyS3Proxy(endpoint, faults) as proxy:
        settings = job_settings(database_url, proxy.url)
        options = PresegmentOptions(progress=False, actors=2, batch_size=8, refresh_s=1.0)
        started = time.monotonic()
        first = presegment(f"s3://{bucket}/img/", project, options, settings)
        out["first"] = {"counts": first.counts, "s": time.monotonic() - started, "job": first.job_id}
        with db.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT item_key, error FROM job_items WHERE job_id = :j AND status = 'failed' ORDER BY item_key"
                ),
                {"j": first.job_id},
            ).all()
        out["failed_messages"] = _group_messages([(str(k), str(e)) for k, e in rows], bucket)
        out["failed_keys_match"] = {str(k).split(f"s3://{bucket}/", 1)[1] for k, _ in rows} == set(
            faults
        ) | set(corrupt)
        out["injected_requests"] = sum(proxy.injected.values())
        if on_first is not None:
            on_first(out)
        proxy.faults.clear()
        second = presegment(f"s3://{bucket}/img/", project, options, settings)
        out["second"] = {"counts": second.counts, "job": second.job_id}
    out["check"] = job_check(db, project)
    db.dispose()
    return out


def _group_messages(rows: list[tuple[str, str]], bucket: str) -> dict[str, int]:
    """Failure messages with the key taken out, counted."""
    grouped: dict[str, int] = {}
    for key, error in rows:
        message = error.replace(key, "<key>").replace(f"s3://{bucket}/", "")
        grouped[message] = grouped.get(message, 0) + 1
    return grouped
