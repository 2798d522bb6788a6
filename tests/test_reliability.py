"""Fault behaviour that is cheap to test in the suite (the full scenarios: benchmarks/reliability.py,
results in docs/reliability.md).

* a bucket job rides out a database outage (its connections terminated and new ones refused for a
  few seconds, as during a Postgres restart, but confined to this session's database) and finishes
  with exact counts and no duplicate masks;
* S3 errors on chosen keys (500, 503, 404) become failed items with their reason, the rest is done,
  and a rerun once the keys are readable again finishes them, writing nothing twice;
* the embedding cache stays within its budget under concurrent first rounds on many images.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from sqlalchemy import select, text
from sqlalchemy.engine import make_url

from seemly.db.models import ItemStatus, Job, JobItem, JobStatus
from seemly.db.session import is_disconnect, make_engine, retry_disconnects
from seemly.embed_cache import EmbedCache
from seemly.engines.base import create_engine
from seemly.prompts import Click, PromptRound
from tests.fixtures.faulty_s3 import FaultyS3Proxy
from tests.fixtures.postgres import block_database
from tests.test_presegment import fill, job_settings, mask_stats, options, tiny_png
from workers.presegment import presegment

OUTAGE_S = 3.0


def test_disconnects_are_retried_until_the_database_is_back(postgres_admin_url, postgres_url):
    name = make_url(postgres_url).database
    db = make_engine(postgres_url)
    calls: list[float] = []

    def query() -> int:
        calls.append(time.monotonic())
        with db.connect() as conn:
            return int(conn.execute(text("SELECT 7")).scalar_one())

    try:
        block_database(postgres_admin_url, name, True)
        timer = threading.Timer(1.0, block_database, (postgres_admin_url, name, False))
        timer.start()
        assert retry_disconnects(query, what="probe", deadline_s=30) == 7
        timer.join()
        assert len(calls) >= 2 and calls[-1] - calls[0] >= 0.9
        # A statement error is not a disconnect: raised at once.
        with pytest.raises(Exception) as failure:
            retry_disconnects(lambda: db.connect().execute(text("SELECT nope")), what="bad", deadline_s=30)
        assert not is_disconnect(failure.value)
    finally:
        block_database(postgres_admin_url, name, False)
        db.dispose()


def test_bucket_job_rides_out_a_database_outage(
    ray_local, postgres_db, postgres_url, postgres_admin_url, s3_bucket, s3_server
):
    count = 40
    fill(s3_bucket, count, prefix="outage/")
    name = make_url(postgres_url).database
    outage: dict[str, float] = {}

    def cut_the_database_once_the_job_runs() -> None:
        deadline = time.monotonic() + 120
        try:
            while time.monotonic() < deadline:
                with postgres_db.connect() as conn:
                    registered = conn.execute(text("SELECT count(*) FROM job_items")).scalar_one()
                if registered:
                    block_database(postgres_admin_url, name, True)
                    outage["start"] = time.monotonic()
                    time.sleep(OUTAGE_S)
                    return
                time.sleep(0.05)
        finally:
            block_database(postgres_admin_url, name, False)
            outage["end"] = time.monotonic()

    cutter = threading.Thread(target=cut_the_database_once_the_job_runs, daemon=True)
    cutter.start()
    try:
        result = presegment(
            s3_bucket.uri("outage/"),
            "p-outage",
            options(batch_size=2, db_retry_s=60),
            job_settings(postgres_url, s3_server),
        )
    finally:
        cutter.join(timeout=30)
    assert "start" in outage, "the outage never started"
    assert result.counts == {"total": count, "done": count, "skipped": 0, "failed": 0, "masks": count}
    assert mask_stats(postgres_db, "p-outage") == (count, count)
    with postgres_db.connect() as conn:
        job = conn.execute(select(Job.__table__).where(Job.id == result.job_id)).one()
        keys = conn.execute(text("SELECT count(*), count(DISTINCT item_key) FROM job_items")).one()
    assert job.status == JobStatus.SUCCEEDED and job.items_done == count
    assert tuple(keys) == (count, count)


def test_s3_errors_on_chosen_keys_fail_only_those_items(
    ray_local, postgres_db, postgres_url, s3_bucket, s3_server
):
    fill(s3_bucket, 10, prefix="flaky/")
    s3_bucket.put("flaky/corrupt.png", tiny_png(77)[:60])  # corrupted bytes
    faults = {"flaky/00002.png": 500, "flaky/00005.png": 503, "flaky/00007.png": 404}
    with FaultyS3Proxy(s3_server, faults) as proxy:
        settings = job_settings(postgres_url, proxy.url)
        first = presegment(s3_bucket.uri("flaky/"), "p-flaky", options(), settings)
        assert first.counts == {"total": 11, "done": 7, "skipped": 0, "failed": 4, "masks": 7}
        with postgres_db.connect() as conn:
            failed = dict(
                conn.execute(
                    select(JobItem.item_key, JobItem.error).where(
                        JobItem.job_id == first.job_id, JobItem.status == ItemStatus.FAILED
                    )
                ).all()
            )
        assert set(failed) == {s3_bucket.uri(k) for k in [*faults, "flaky/corrupt.png"]}
        assert all(failed[s3_bucket.uri(k)] for k in faults)  # every failure says why
        assert "no such object" in failed[s3_bucket.uri("flaky/00007.png")]  # deleted after the listing
        assert proxy.injected["flaky/00002.png"] >= 2  # a 500 is retried (s3_max_attempts=2) first

        proxy.faults.clear()  # the keys are readable again: a rerun does exactly the rest
        second = presegment(s3_bucket.uri("flaky/"), "p-flaky", options(), settings)
    assert second.counts == {"total": 11, "done": 3, "skipped": 7, "failed": 1, "masks": 3}
    assert mask_stats(postgres_db, "p-flaky") == (10, 10)


def test_embed_cache_stays_within_budget_under_concurrent_first_rounds():
    engine = create_engine("classic")
    size = 64
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 255, (size, size, 3), dtype=np.uint8) for _ in range(12)]
    state_bytes = engine.embed(images[0], "probe").nbytes()
    cache = EmbedCache(int(state_bytes * 2.5))  # room for two states
    click = PromptRound(prompts=[Click(x=size / 2, y=size / 2)])
    peaks: list[int] = []

    def annotate(index: int) -> bool:
        sha = f"img{index}"
        hits = []
        for _ in range(2):  # a first and a later round, back to back
            with cache.use(sha, engine.model_version, lambda: engine.embed(images[index], sha)) as (
                state,
                hit,
            ):
                engine.segment(state, click)
                hits.append(hit)
            peaks.append(cache.cached_bytes)
        return hits[0] is False

    threads = 4
    with ThreadPoolExecutor(threads) as pool:
        firsts = list(pool.map(annotate, range(len(images))))
    assert all(firsts)  # no error, and every first round embedded
    # a later round may find its state evicted by the other threads (LRU): at most one re-embed each
    assert len(images) <= cache.stats.misses <= 2 * len(images)
    assert cache.stats.hits + cache.stats.misses == 2 * len(images)
    assert cache.stats.evictions >= len(images) - 3
    # states in use are never evicted, so in flight the cache exceeds its budget by at most one per thread
    assert max(peaks) <= cache.cache_bytes + threads * 2 * max(state_bytes, 1)
    assert cache.cached_bytes <= cache.cache_bytes or len(cache) == 1
