"""The Ray Data bucket job on a loopback S3 server, real Postgres and the session's local Ray.

What is checked here is the contract, in the database: every image done exactly once, every mask
written once, bad objects failed with their reason, and a killed driver's job finished by a rerun.
Images are tiny (the engine's cost is not under test) so the whole module stays around a minute.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import func, select, text

from seemly.config import Settings
from seemly.db.models import ItemStatus, Job, JobItem, JobStatus, Project
from tests.fixtures.s3 import S3_TEST_ACCESS_KEY, S3_TEST_SECRET_KEY
from workers.box_prompts import BoxPromptsError, parse_box_prompts
from workers.presegment import PresegmentError, PresegmentOptions, presegment

ROOT = Path(__file__).resolve().parents[1]


def tiny_png(seed: int, size: tuple[int, int] = (32, 24)) -> bytes:
    """A small picture with one bright disc on a dark ground: something for the engine to find."""
    rng = np.random.default_rng(seed)
    width, height = size
    image = np.full((height, width, 3), 30, np.uint8) + rng.integers(
        0, 20, (height, width, 3), dtype=np.uint8
    )
    cy, cx = height / 2 + rng.uniform(-1.5, 1.5), width / 2 + rng.uniform(-1.5, 1.5)
    yy, xx = np.mgrid[:height, :width]
    radius = min(width, height) * rng.uniform(0.25, 0.32)
    image[(yy - cy) ** 2 + (xx - cx) ** 2 < radius**2] = rng.integers(150, 255, 3)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def job_settings(postgres_url: str, s3_server: str, **overrides: object) -> Settings:
    return Settings(
        database_url=postgres_url,
        s3_endpoint_url=s3_server,
        s3_access_key_id=S3_TEST_ACCESS_KEY,
        s3_secret_access_key=S3_TEST_SECRET_KEY,
        s3_max_attempts=2,
        engine="classic",
        ray_num_cpus_per_actor=0.5,
        **overrides,
    )


def options(**kwargs: object) -> PresegmentOptions:
    kwargs.setdefault("progress", False)
    kwargs.setdefault("actors", 2)
    kwargs.setdefault("batch_size", 4)
    kwargs.setdefault("refresh_s", 0.5)
    return PresegmentOptions(**kwargs)  # type: ignore[arg-type]


def fill(bucket, count: int, prefix: str = "img/", size: tuple[int, int] = (32, 24)) -> list[str]:
    return [bucket.put(f"{prefix}{i:05d}.png", tiny_png(i, size)) for i in range(count)]


def mask_stats(db, project_name: str) -> tuple[int, int]:
    """(bucket masks, distinct bucket mask keys) of a project."""
    with db.connect() as conn:
        row = conn.execute(
            text(
                "SELECT count(*), count(DISTINCT (m.image_id, m.model_version_id, m.label, m.ordinal)) "
                "FROM masks m JOIN projects p ON p.id = m.project_id WHERE p.name = :n AND m.source = 'bucket'"
            ),
            {"n": project_name},
        ).one()
    return int(row[0]), int(row[1])


def items_by_status(db, job_id: int) -> dict[str, int]:
    with db.connect() as conn:
        rows = conn.execute(
            select(JobItem.status, func.count()).where(JobItem.job_id == job_id).group_by(JobItem.status)
        ).all()
    return {str(status): int(n) for status, n in rows}


# --------------------------------------------------------------------------------------------
def test_full_run_then_rerun_writes_nothing_new(ray_local, postgres_db, postgres_url, s3_bucket, s3_server):
    fill(s3_bucket, 24)
    settings = job_settings(postgres_url, s3_server)

    first = presegment(s3_bucket.uri("img/"), "p-full", options(), settings)
    assert first.counts == {"total": 24, "done": 24, "skipped": 0, "failed": 0, "masks": 24}
    assert not first.resumed and first.processed == 24
    assert mask_stats(postgres_db, "p-full") == (24, 24)  # center-box: one mask per image
    with postgres_db.connect() as conn:
        job = conn.execute(select(Job.__table__).where(Job.id == first.job_id)).one()
        assert job.status == JobStatus.SUCCEEDED
        assert (job.items_total, job.items_done, job.masks_written) == (24, 24, 24)
        assert job.params["prefix"] == s3_bucket.uri("img/") and job.params["mode"] == "center-box"
        uris = conn.execute(text("SELECT count(*) FROM image_uris")).scalar_one()
        assert uris == 24

    second = presegment(s3_bucket.uri("img/"), "p-full", options(), settings)
    assert second.job_id != first.job_id  # the first one finished: a new job, which skips everything
    assert second.processed == 0
    assert second.counts == {"total": 24, "done": 0, "skipped": 24, "failed": 0, "masks": 0}
    assert mask_stats(postgres_db, "p-full") == (24, 24)


def test_bad_objects_become_failed_items_with_reasons(
    ray_local, postgres_db, postgres_url, s3_bucket, s3_server, capsys
):
    good = fill(s3_bucket, 5, prefix="mixed/")
    png = tiny_png(99)
    s3_bucket.put("mixed/notes.txt", b"just some text, not a picture\n")
    s3_bucket.put("mixed/report.pdf", b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n")
    s3_bucket.put("mixed/truncated.png", png[: len(png) // 2])
    s3_bucket.put("mixed/empty.jpg", b"")
    s3_bucket.put("mixed/huge.png", b"\x89PNG" + bytes(30_000))  # over max_image_bytes: never downloaded
    settings = job_settings(postgres_url, s3_server, max_image_bytes=20_000)

    result = presegment(s3_bucket.uri("mixed/"), "p-bad", options(), settings)

    assert result.counts["total"] == 10 and result.counts["done"] == 5 and result.counts["failed"] == 5
    with postgres_db.connect() as conn:
        rows = dict(
            conn.execute(
                select(JobItem.item_key, JobItem.error).where(
                    JobItem.job_id == result.job_id, JobItem.status == ItemStatus.FAILED
                )
            ).all()
        )
        done = set(
            conn.execute(
                select(JobItem.item_key).where(
                    JobItem.job_id == result.job_id, JobItem.status == ItemStatus.DONE
                )
            ).scalars()
        )
    assert done == set(good)
    assert "text" in rows[s3_bucket.uri("mixed/notes.txt")] or "not" in rows[s3_bucket.uri("mixed/notes.txt")]
    assert "PDF" in rows[s3_bucket.uri("mixed/report.pdf")]
    assert (
        "truncated" in rows[s3_bucket.uri("mixed/truncated.png")]
        or "corrupt" in rows[s3_bucket.uri("mixed/truncated.png")]
    )
    assert "empty" in rows[s3_bucket.uri("mixed/empty.jpg")]
    assert "20000" in rows[s3_bucket.uri("mixed/huge.png")]
    with postgres_db.connect() as conn:
        job = conn.execute(select(Job.__table__).where(Job.id == result.job_id)).one()
    assert job.status == JobStatus.SUCCEEDED and job.items_failed == 5
    assert {e["item"] for e in job.errors} == set(rows)

    from workers import jobs_cli

    capsys.readouterr()
    assert jobs_cli.main_for(settings, project="p-bad", job_id=None) == 0
    listing = capsys.readouterr().out
    assert f"{result.job_id}" in listing and "p-bad" in listing and "failed 5" in listing
    assert jobs_cli.main_for(settings, project=None, job_id=result.job_id) == 0
    detail = capsys.readouterr().out
    for key, error in rows.items():
        assert key in detail and error.splitlines()[0][:60] in detail


def test_killed_driver_is_resumed_exactly_once(ray_local, postgres_db, postgres_url, s3_bucket, s3_server):
    count, kill_after = 60, 6
    fill(s3_bucket, count, prefix="kill/", size=(48, 36))
    env = {
        **os.environ,
        "SEEMLY_DATABASE_URL": postgres_url,
        "SEEMLY_S3_ENDPOINT_URL": s3_server,
        "SEEMLY_S3_ACCESS_KEY_ID": S3_TEST_ACCESS_KEY,
        "SEEMLY_S3_SECRET_ACCESS_KEY": S3_TEST_SECRET_KEY,
        "SEEMLY_RAY_ADDRESS": ray_local,
        "SEEMLY_RAY_NUM_CPUS_PER_ACTOR": "0.5",
        "SEEMLY_ENGINE": "classic",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    command = [
        sys.executable,
        "-m",
        "seemly.cli",
        "presegment",
        s3_bucket.uri("kill/"),
        "--project",
        "p-kill",
    ]
    command += ["--actors", "1", "--batch-size", "2", "--no-progress"]
    driver = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    done_at_kill = 0
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and driver.poll() is None:
            with postgres_db.connect() as conn:
                done_at_kill = conn.execute(
                    text(
                        "SELECT count(*) FROM job_items i JOIN jobs j ON j.id = i.job_id "
                        "JOIN projects p ON p.id = j.project_id WHERE p.name = 'p-kill' AND i.status = 'done'"
                    )
                ).scalar_one()
            if done_at_kill >= kill_after:
                driver.send_signal(signal.SIGKILL)
                break
            time.sleep(0.05)
    finally:
        if driver.poll() is None and done_at_kill < kill_after:
            driver.kill()
        output = driver.communicate(timeout=30)[0].decode(errors="replace")
    assert driver.returncode == -signal.SIGKILL, (
        f"the driver ended on its own before the kill:\n{output[-3000:]}"
    )
    assert kill_after <= done_at_kill < count, output[-3000:]

    with postgres_db.connect() as conn:
        project_id = select(Project.id).where(Project.name == "p-kill").scalar_subquery()
        killed = conn.execute(select(Job.__table__).where(Job.project_id == project_id)).one()
    assert killed.status == JobStatus.RUNNING  # nobody got to say otherwise

    settings = job_settings(postgres_url, s3_server)
    resumed = presegment(s3_bucket.uri("kill/"), "p-kill", options(), settings)

    assert resumed.resumed and resumed.job_id == killed.id
    assert resumed.counts == {"total": count, "done": count, "skipped": 0, "failed": 0, "masks": count}
    assert resumed.processed <= count - done_at_kill  # what was done stays done
    assert mask_stats(postgres_db, "p-kill") == (count, count)
    with postgres_db.connect() as conn:
        per_image = conn.execute(
            text(
                "SELECT count(*) FROM (SELECT image_id FROM masks WHERE job_id = :j GROUP BY image_id "
                "HAVING count(*) = 1) AS once"
            ),
            {"j": killed.id},
        ).scalar_one()
    assert per_image == count  # every image has its mask, none has two


def _segment_actor_pids() -> list[int]:
    """PIDs of this session's SegmentWriter actors (their raylet is a child of this process)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            grandparent = int((Path("/proc") / str(ppid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if cmdline.startswith(b"ray::MapWorker(MapBatches(SegmentWriter))") and grandparent == os.getpid():
            pids.append(int(entry.name))
    return pids


def test_thousands_of_keys_across_listing_pages_survive_a_killed_actor(
    ray_local, postgres_db, postgres_url, s3_bucket, s3_server
):
    count, distinct = 1_500, 300  # two ListObjectsV2 pages of 1000, six registration chunks of 256
    payloads = [tiny_png(i, (24, 18)) for i in range(distinct)]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: s3_bucket.put(f"many/{i:05d}.png", payloads[i % distinct]), range(count)))
    settings = job_settings(postgres_url, s3_server)
    killed: list[int] = []

    def kill_one_actor_midway() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with postgres_db.connect() as conn:
                done = conn.execute(text("SELECT count(*) FROM job_items WHERE status = 'done'")).scalar_one()
            pids = _segment_actor_pids()
            if done >= 200 and pids:
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
                return
            time.sleep(0.1)

    import threading

    killer = threading.Thread(target=kill_one_actor_midway, daemon=True)
    killer.start()
    result = presegment(s3_bucket.uri("many/"), "p-many", options(batch_size=16, refresh_s=1.0), settings)
    killer.join(timeout=5)

    assert killed, "no actor was killed: the job ended before the kill"
    assert result.counts == {"total": count, "done": count, "skipped": 0, "failed": 0, "masks": count}
    # the same content under several keys: one image row and one mask per distinct content
    assert mask_stats(postgres_db, "p-many") == (distinct, distinct)
    with postgres_db.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM images")).scalar_one() == distinct
        assert conn.execute(text("SELECT count(*) FROM image_uris")).scalar_one() == count


def test_box_prompts_on_a_file_location(ray_local, postgres_db, postgres_url, tmp_path):
    """file:// works like s3://; each box gives one mask with its label; bad boxes fail their item."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.png").write_bytes(tiny_png(i, (48, 36)))
    (folder / "other.png").write_bytes(tiny_png(7, (48, 36)))  # not in the file: not segmented
    prompts = tmp_path / "boxes.jsonl"
    lines = [
        {"key": "0.png", "boxes": [[8, 6, 40, 30], [0, 0, 24, 18]], "label": "disc"},
        {"uri": (folder / "1.png").as_uri(), "boxes": [[8, 6, 40, 30]]},
        {"key": "0.png", "boxes": [[4, 4, 44, 32]], "label": "disc"},  # the same image again: boxes add up
        {"key": "2.png", "boxes": [[8, 6, 400, 30]], "label": "disc"},  # outside the image
        {"key": "missing.png", "boxes": [[1, 1, 5, 5]]},  # no such file
    ]
    prompts.write_text("".join(json.dumps(line) + "\n" for line in lines))
    settings = Settings(database_url=postgres_url, engine="classic", ray_num_cpus_per_actor=0.5)
    location = folder.as_uri() + "/"

    result = presegment(location, "p-boxes", options(box_prompts=prompts), settings)

    assert result.counts == {"total": 4, "done": 2, "skipped": 0, "failed": 2, "masks": 4}
    with postgres_db.connect() as conn:
        masks = conn.execute(
            text(
                "SELECT u.uri, m.label, m.ordinal FROM masks m JOIN image_uris u ON u.image_id = m.image_id "
                "ORDER BY u.uri, m.label, m.ordinal"
            )
        ).all()
        errors = dict(
            conn.execute(
                select(JobItem.item_key, JobItem.error).where(JobItem.status == ItemStatus.FAILED)
            ).all()
        )
        job = conn.execute(select(Job.__table__).where(Job.id == result.job_id)).one()
    first, second = (folder / "0.png").as_uri(), (folder / "1.png").as_uri()
    assert [tuple(m) for m in masks] == [
        (first, "disc", 0),
        (first, "disc", 1),
        (first, "disc", 2),
        (second, "", 0),
    ]
    assert "outside" in errors[(folder / "2.png").as_uri()]
    assert "no such file" in errors[(folder / "missing.png").as_uri()]
    assert job.params["mode"] == "boxes"


def test_box_prompts_file_is_validated_with_line_numbers():
    lines = [
        '{"key": "p/a.png", "boxes": [[0, 0, 10, 10]], "label": "cat"}',
        "",
        "{not json",
        '{"uri": "s3://bkt/p/x.png", "key": "p/x.png", "boxes": [[0, 0, 1, 1]]}',
        '{"key": "p/c.png", "boxes": [[5, 5, 1, 9]]}',
        '{"key": "p/d.png", "boxes": [[0, 0, 1]]}',
        '{"uri": "s3://elsewhere/d.png", "boxes": [[0, 0, 1, 1]]}',
        '{"key": "p/e.png", "boxes": [], "colour": "red"}',
    ]
    with pytest.raises(BoxPromptsError) as caught:
        parse_box_prompts(lines, "s3://bkt/p/", source="boxes.jsonl")
    message = str(caught.value)
    assert message.startswith("boxes.jsonl: 7 problem(s)")
    assert "line 3: not valid JSON" in message
    assert 'line 4: line: give exactly one of "uri" or "key"' in message
    assert "line 5" in message and "x1 (1) must be greater than x0 (5)" in message
    assert "line 6: boxes.0" in message
    assert "line 7: s3://elsewhere/d.png is not under the job's location s3://bkt/p/" in message
    assert "line 8: boxes" in message and "line 8: colour" in message

    prompts = parse_box_prompts(lines[:1], "s3://bkt/p/")
    assert list(prompts) == ["s3://bkt/p/a.png"] and prompts["s3://bkt/p/a.png"][0].label == "cat"
    with pytest.raises(BoxPromptsError, match="no box prompts"):
        parse_box_prompts(["", "  "], "s3://bkt/p/")


def test_refuses_to_start_with_clear_errors(postgres_db, postgres_url, s3_bucket, s3_server, tmp_path):
    settings = job_settings(postgres_url, s3_server)
    fill(s3_bucket, 1, prefix="x/")
    with pytest.raises(PresegmentError, match="bucket does not exist"):
        presegment("s3://no-such-bucket-here/x/", "p-err", options(), settings)
    with pytest.raises(PresegmentError, match="s3:// or file://"):
        presegment("https://example.com/images/", "p-err", options(), settings)
    with pytest.raises(PresegmentError, match="line 1: not valid JSON"):
        bad = tmp_path / "bad.jsonl"
        bad.write_text("nope\n")
        presegment(s3_bucket.uri("x/"), "p-err", options(box_prompts=bad), settings)

    # a job with the same identity whose driver is alive elsewhere is not taken over silently
    from seemly.db.jobs import create_job
    from seemly.db.registry import ensure_project
    from seemly.engines.base import create_engine

    project_id = ensure_project(postgres_db, "p-err")
    version = create_engine("classic").model_version
    params = {"prefix": s3_bucket.uri("x/"), "mode": "center-box", "model_version": version}
    job_id = create_job(postgres_db, "presegment", project_id=project_id, params=params)
    with postgres_db.begin() as conn:
        conn.execute(Job.__table__.update().where(Job.id == job_id).values(runner="another-host:1"))
    with pytest.raises(PresegmentError, match=f"job {job_id} .* is running"):
        presegment(s3_bucket.uri("x/"), "p-err", options(), settings)
    with pytest.raises(PresegmentError, match=f"job {job_id} was started with"):
        presegment(s3_bucket.uri("x/"), "p-err", options(resume=job_id, mode="everything"), settings)

    # masks of another mode would collide with this project's stored ones: refused
    from seemly.db.bulk import add_job_items

    add_job_items(postgres_db, job_id, [s3_bucket.uri("x/00000.png")])
    with postgres_db.begin() as conn:
        conn.execute(JobItem.__table__.update().where(JobItem.job_id == job_id).values(status="done"))
    with pytest.raises(PresegmentError, match=r"already holds .* mode .center-box."):
        presegment(s3_bucket.uri("x/"), "p-err", options(mode="everything"), settings)


def test_a_replayed_batch_writes_nothing_twice_and_a_bug_fails_only_its_item(
    postgres_db, postgres_url, s3_bucket
):
    """The actor's unit of work, in-process: what a Ray retry of an already committed batch does."""
    from seemly.db.bulk import add_job_items
    from seemly.db.jobs import create_job
    from seemly.db.registry import ensure_model_version, ensure_project
    from workers.presegment_stages import JobSpec, SegmentWriter

    uris = fill(s3_bucket, 3, prefix="unit/")
    project_id = ensure_project(postgres_db, "p-unit")
    version_id = ensure_model_version(postgres_db, "classic-unit", engine="classic")
    job_id = create_job(postgres_db, "presegment", project_id=project_id, params={})
    add_job_items(postgres_db, job_id, uris)
    spec = JobSpec(
        job_id=job_id,
        project_id=project_id,
        model_version_id=version_id,
        model_version="classic-unit",
        engine_name="classic",
        engine_options={},
        mode="center-box",
        prefix_uri=s3_bucket.uri("unit/"),
        database_url=postgres_url,
        storage=s3_bucket.storage,
        max_pixels=10**7,
        max_bytes=10**7,
    )
    writer = SegmentWriter(spec)
    segment = writer._segment

    def buggy(uri: str, data: bytes, boxes: str):
        if uri == uris[1]:
            raise ZeroDivisionError("division by zero")
        return segment(uri, data, boxes)

    writer._segment = buggy  # type: ignore[method-assign]
    batch = {"uri": np.array(uris), "size": np.array([100, 100, 100]), "boxes": np.array(["", "", ""])}
    first = writer(batch)
    assert (first["items"], first["done"], first["failed"], first["masks"]) == ([3], [2], [1], [2])
    assert first["first_internal_error"] == ["internal error: ZeroDivisionError: division by zero"]

    again = writer(batch)  # Ray retrying a batch whose first attempt had committed
    assert (again["done"], again["failed"], again["masks"]) == ([2], [1], [2])
    assert mask_stats(postgres_db, "p-unit") == (2, 2)
    with postgres_db.connect() as conn:
        rows = conn.execute(
            select(JobItem.item_key, JobItem.status, JobItem.attempts, JobItem.error).where(
                JobItem.job_id == job_id
            )
        ).all()
    by_key = {key: (str(status), attempts, error) for key, status, attempts, error in rows}
    assert by_key[uris[0]] == ("done", 2, None) and by_key[uris[2]] == ("done", 2, None)
    assert by_key[uris[1]] == ("failed", 2, "internal error: ZeroDivisionError: division by zero")


def test_source_streams_chunks_and_skips_what_is_done(postgres_db, postgres_url, tmp_path):
    """The listing stage alone (no Ray), on a file:// tree: chunks, registration, resume, rerun."""
    from seemly.db.jobs import create_job
    from seemly.db.registry import ensure_model_version, ensure_project
    from seemly.storage import Storage
    from workers.presegment_stages import JobSpec, iter_source_items, mark_items

    root = tmp_path / "tree"
    (root / "sub").mkdir(parents=True)
    for i in range(7):
        (root / ("sub" if i % 2 else "") / f"{i}.png").write_bytes(b"x" * (i + 1))
    project_id = ensure_project(postgres_db, "p-source")
    version_id = ensure_model_version(postgres_db, "v-source", engine="classic")

    def spec_for(job_id: int, prior: tuple[int, ...] = ()) -> JobSpec:
        return JobSpec(
            job_id=job_id,
            project_id=project_id,
            model_version_id=version_id,
            model_version="v-source",
            engine_name="classic",
            engine_options={},
            mode="center-box",
            prefix_uri=root.as_uri() + "/",
            database_url=postgres_url,
            storage=Storage(file_roots=[root]),
            max_pixels=10**6,
            max_bytes=10**6,
            prior_job_ids=prior,
            chunk_rows=3,
        )

    first = create_job(postgres_db, "presegment", project_id=project_id, params={})
    chunks = list(iter_source_items(spec_for(first), None))
    assert [len(c["uri"]) for c in chunks] == [3, 3, 1]  # registered and emitted chunk by chunk
    uris = [u for c in chunks for u in c["uri"]]
    assert len(set(uris)) == 7 and all(u.startswith("file://") for u in uris)
    assert sorted(s for c in chunks for s in c["size"]) == list(range(1, 8))
    assert items_by_status(postgres_db, first) == {"pending": 7}

    with postgres_db.begin() as conn:  # four finished, one failed: a resume emits the failed and pending ones
        mark_items(conn, first, [{"key": u, "status": "done"} for u in uris[:4]])
        mark_items(conn, first, [{"key": uris[4], "status": "failed", "error": "boom"}])
    again = [u for c in iter_source_items(spec_for(first), None) for u in c["uri"]]
    assert sorted(again) == sorted(uris[4:])

    second = create_job(postgres_db, "presegment", project_id=project_id, params={})  # a rerun
    rerun = [u for c in iter_source_items(spec_for(second, prior=(first,)), None) for u in c["uri"]]
    assert sorted(rerun) == sorted(uris[4:])
    assert items_by_status(postgres_db, second) == {"skipped": 4, "pending": 3}
