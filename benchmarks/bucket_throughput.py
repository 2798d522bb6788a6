"""Bucket pre-segmentation throughput: the Ray Data job vs a naive single-process loop, side by side.

One run does everything on this machine:

1. starts moto's S3 server on loopback (its own process) and fills a bucket with ``--images``
   photos made from scikit-image's bundled samples (random crops, flips, resizes to ``--size``,
   JPEG), a realistic mix of sizes and content;
2. measures the engine alone: ``decode + embed + segment`` of ``--bound-sample`` images, bytes
   already in memory, one process. The **compute bound** of the bucket is
   ``mean time x images / cores``: no pipeline on these cores can beat it;
3. runs the **naive loop** (list, then for each key: GET, decode, segment, INSERT image, URI and
   masks row by row with a commit per image) on the first ``--naive-images`` keys;
4. runs the **Ray Data job** (``workers.presegment``) over the whole bucket on a local Ray with
   every core, and reports its throughput, its ratio to the naive loop and to the compute bound,
   and where the actors' time went (segment, waiting for a download, writing).

Results print as a Markdown table; ``--write-docs`` also replaces the "Bucket throughput" section
of docs/benchmarks.md (only that section).

    python benchmarks/bucket_throughput.py                    # 2,000 images of 320x240
    python benchmarks/bucket_throughput.py --images 300 --actors 3 --batch-size 16   # tuning runs
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime
from itertools import pairwise
from pathlib import Path

# One thread per process everywhere (before numpy loads), as in the job's actors: the compute bound,
# the naive loop and the job then all count one core per engine.
for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from sqlalchemy import insert, select, text  # noqa: E402
from sqlalchemy.dialects.postgresql import insert as pg_insert  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from seemly.bench.machine import cpu_model  # noqa: E402
from seemly.config import Settings  # noqa: E402
from seemly.db.migrate import upgrade  # noqa: E402
from seemly.db.models import Image as ImageRow  # noqa: E402
from seemly.db.models import ImageUri, MaskSource  # noqa: E402
from seemly.db.models import Mask as MaskRow  # noqa: E402
from seemly.db.registry import ensure_model_version, ensure_project  # noqa: E402
from seemly.db.session import make_engine  # noqa: E402
from seemly.engines.base import create_engine as create_seg_engine  # noqa: E402
from seemly.pipeline import SegmentMode, segment_bytes  # noqa: E402
from seemly.storage import Storage  # noqa: E402
from tests.fixtures.postgres import temporary_database  # noqa: E402

DEFAULT_URL = os.environ.get(
    "SEEMLY_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
# Photos with an object near the centre (center-box mode finds something); textures (brick, grass)
# and the microscopy slide give "no object" for most crops, which would measure a different workload.
SAMPLES = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "cat")
GRAY_SAMPLES = ("coins", "moon")
ACCESS = SECRET = "bench"
SECTION = "## Bucket throughput (`benchmarks/bucket_throughput.py`)"
NOTES = """
What the runs of 2026-11-25 showed (the numbers above are from the last run; these notes stay):

- **Targets (>= 1.8x the naive loop, >= 85 % of the compute bound, 2 cores): met when the machine
  was quiet**: 1.85x and 86 % in the 18:59 UTC run above (load average ~2 before it). This VM is
  shared, and earlier runs under other tenants' load (load average 4 to 18) measured 1.13x-1.54x
  and 56-71 %: each actor then got ~60 % of a core while the naive loop, which
  needs one core, still got ~95 % of one. The pipeline itself was the same in all of them: actors
  inside their calls 97-99 % of the time, a median gap of 6-17 ms between two calls of an actor,
  and an actor's CPU per image (download + decode + engine + RLE + write) within 3-4 % of the
  engine's own. The remaining ~14 % to the bound: start-up (~3 %), the S3 server, Postgres and Ray's
  own processes sharing the two cores, and the actors' slightly larger CPU per image.
- **Tuning, found by profiling** (the per-call timings and the actor timeline the job reports):
  - Ray Data holds a task's output until it reaches `target_max_block_size` (128 MiB, ~1M keys),
    so the listing reached the actors only at its end. The job sets it to one byte and the source
    emits single-row work packets of `--batch-size` items: segmentation starts on the first page.
  - A streaming `repartition` to cut the listing into batches hung the job with 3 actors on 2
    CPUs: its tasks ask for a whole CPU, which fractional-CPU actors never leave free. Replaced by
    the packets.
  - One output row per image cost a driver round trip per row: a median gap of 660 ms between two
    calls of an actor, 27 % of its time outside calls. One summary row per call: 6-17 ms, 1-3 %.
  - OpenCV limited to one thread per actor (Ray already limits BLAS/OpenMP): one engine per core.
  - Actors: one per core is the default; 3 actors on 2 cores were no better (56 % of the bound, in
    a loaded moment). Batch size 8: the write transaction (images, masks, done marks) costs 1-4 ms
    per image with one mask, ~1 % of the actors' time; batches of 4 and 8 did not differ beyond the
    noise. Start-up (actor processes, imports, engine) takes 5-12 s, once per job.
- About a third of the photos end as failed items "the engine found no object" (the classic engine
  at this snapshot, on textured crops). They cost a full embed + segment in both pipelines and are
  counted as processed.
- The engine was frozen for these runs (a copy of `seemly/` taken at 17:12 UTC): it was being tuned
  at the same time, and its cost per image moved between 0.2 and 1.2 s during the day.
"""


# --------------------------------------------------------------------------------------------
# set-up: database, S3 server, images
# --------------------------------------------------------------------------------------------
@contextmanager
def moto_server() -> Iterator[str]:
    """moto's S3 server in its own process on a free loopback port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        import requests

        deadline = time.monotonic() + 60
        while True:
            try:
                requests.get(url + "/moto-api/", timeout=2)
                break
            except requests.RequestException:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("moto server did not start") from None
                time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def sample_images() -> list[np.ndarray]:
    from skimage import data

    images = [getattr(data, name)() for name in SAMPLES]
    images += [np.stack([getattr(data, name)()] * 3, axis=-1) for name in GRAY_SAMPLES]
    return [img[..., :3] for img in images]


def make_photo(sources: list[np.ndarray], index: int, size: tuple[int, int]) -> bytes:
    """A random crop (60-100 % of a side), maybe flipped, resized to ``size``, as JPEG."""
    rng = np.random.default_rng(index)
    source = sources[index % len(sources)]
    height, width = source.shape[:2]
    target_w, target_h = size
    scale = rng.uniform(0.6, 1.0)
    crop_w = max(16, int(min(width, height * target_w / target_h) * scale))
    crop_h = max(12, int(crop_w * target_h / target_w))
    x0 = int(rng.integers(0, max(1, width - crop_w + 1)))
    y0 = int(rng.integers(0, max(1, height - crop_h + 1)))
    crop = source[y0 : y0 + crop_h, x0 : x0 + crop_w]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    picture = Image.fromarray(np.ascontiguousarray(crop)).resize(size, Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=int(rng.integers(82, 95)))
    return buffer.getvalue()


def fill_bucket(endpoint: str, bucket: str, count: int, size: tuple[int, int]) -> list[bytes]:
    import boto3

    client = boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=ACCESS,
        aws_secret_access_key=SECRET,
    )
    client.create_bucket(Bucket=bucket)
    sources = sample_images()
    payloads = [make_photo(sources, i, size) for i in range(count)]
    with ThreadPoolExecutor(8) as pool:
        list(
            pool.map(
                lambda i: client.put_object(Bucket=bucket, Key=f"photos/{i:06d}.jpg", Body=payloads[i]),
                range(count),
            )
        )
    return payloads


# --------------------------------------------------------------------------------------------
# the three measurements
# --------------------------------------------------------------------------------------------
def measure_bound(
    payloads: list[bytes], settings: Settings, mode: SegmentMode, sample: int
) -> tuple[list[float], list[float]]:
    """Wall and CPU seconds of ``decode + embed + segment`` per image, in a fresh process (no Ray
    threads, nothing else running in it), bytes already in memory."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_time_engine, payloads[:sample], settings, mode).result()


def _time_engine(
    payloads: list[bytes], settings: Settings, mode: SegmentMode
) -> tuple[list[float], list[float]]:
    import cv2

    cv2.setNumThreads(1)
    engine = create_seg_engine(settings.engine)
    segment_bytes("warm-up", payloads[0], engine, mode, max_pixels=10**9, max_bytes=10**9)
    seconds, cpu = [], []
    for data in payloads:  # consecutive keys cycle through every source photo
        started, started_cpu = time.perf_counter(), time.process_time()
        segment_bytes("bench", data, engine, mode, max_pixels=settings.max_image_pixels, max_bytes=10**9)
        seconds.append(time.perf_counter() - started)
        cpu.append(time.process_time() - started_cpu)
    return seconds, cpu


def naive_loop(settings: Settings, prefix: str, limit: int, mode: SegmentMode) -> tuple[int, float]:
    """download → decode → segment → insert row by row, one image at a time, one process."""
    import cv2

    from seemly.db.bulk import mask_row

    cv2.setNumThreads(1)

    storage = Storage.from_settings(settings)
    engine = create_seg_engine(settings.engine)
    db = make_engine(settings.database_url)
    project_id = ensure_project(db, "bench-naive")
    version_id = ensure_model_version(db, engine.model_version, engine=engine.name)
    done = 0
    started = time.perf_counter()
    for info in storage.iter_objects(prefix):
        if done >= limit:
            break
        data = storage.read(info.uri)
        outcome = segment_bytes(
            info.uri,
            data,
            engine,
            mode,
            max_pixels=settings.max_image_pixels,
            max_bytes=settings.max_image_bytes,
        )
        done += 1
        if not outcome.ok:
            continue
        with db.begin() as conn:
            values = {"sha256": outcome.sha256, "width": outcome.width, "height": outcome.height}
            conn.execute(
                pg_insert(ImageRow.__table__)
                .values(**values, size_bytes=outcome.size_bytes)
                .on_conflict_do_nothing(index_elements=["sha256"])
            )
            image_id = conn.execute(
                select(ImageRow.__table__.c.id).where(ImageRow.__table__.c.sha256 == outcome.sha256)
            ).scalar_one()
            conn.execute(
                pg_insert(ImageUri.__table__)
                .values(uri=info.uri, image_id=image_id)
                .on_conflict_do_nothing(index_elements=["uri"])
            )
            for ordinal, segment in enumerate(outcome.segments):
                row = mask_row(
                    segment.mask,
                    project_id=project_id,
                    image_id=image_id,
                    source=MaskSource.BUCKET,
                    model_version_id=version_id,
                    ordinal=ordinal,
                    score=segment.score,
                )
                conn.execute(insert(MaskRow.__table__).values(**row))
    elapsed = time.perf_counter() - started
    db.dispose()
    return done, elapsed


def measure_listing(settings: Settings, prefix: str) -> tuple[int, float, float]:
    """(keys, seconds to list, seconds to list + register as job items), on a throwaway job."""
    from seemly.db.jobs import create_job
    from workers.presegment_stages import JobSpec, iter_source_items

    storage = Storage.from_settings(settings)
    started = time.perf_counter()
    keys = sum(1 for _ in storage.iter_objects(prefix))
    listed = time.perf_counter() - started
    db = make_engine(settings.database_url)
    project_id = ensure_project(db, "bench-listing")
    job_id = create_job(db, "presegment", project_id=project_id, params={"prefix": prefix, "mode": "listing"})
    spec = JobSpec(
        job_id=job_id,
        project_id=project_id,
        model_version_id=ensure_model_version(db, "listing", engine="none"),
        model_version="listing",
        engine_name="classic",
        engine_options={},
        mode="center-box",
        prefix_uri=prefix,
        database_url=settings.database_url,
        storage=storage,
        max_pixels=settings.max_image_pixels,
        max_bytes=settings.max_image_bytes,
    )
    started = time.perf_counter()
    registered = sum(len(chunk["uri"]) for chunk in iter_source_items(spec, None))
    assert registered == keys
    db.dispose()
    return keys, listed, time.perf_counter() - started


def measure_decode(sizes: list[tuple[int, int]], repeat: int = 20) -> dict[str, float]:
    """Milliseconds to decode one JPEG photo of each size (seemly's safe decoder)."""
    from seemly.images import decode_image

    sources = sample_images()
    out = {}
    for width, height in sizes:
        data = [make_photo(sources, i, (width, height)) for i in range(repeat)]
        started = time.perf_counter()
        for payload in data:
            decode_image(payload, max_pixels=10**9, max_bytes=10**9)
        out[f"{width}x{height}"] = (time.perf_counter() - started) / repeat * 1000
    return out


def ray_job(settings: Settings, prefix: str, mode: SegmentMode, actors: int | None, batch_size: int):
    from workers.presegment import PresegmentOptions, presegment

    options = PresegmentOptions(mode=mode.value, actors=actors, batch_size=batch_size, progress=True)
    return presegment(prefix, "bench-ray", options, settings)


# --------------------------------------------------------------------------------------------
def timeline(calls: dict[int, list[tuple[float, float]]], start: float, end: float) -> dict[str, float]:
    """Where the actors' wall time went, from the start/end of every call they made."""
    total = busy = between = tail = 0.0
    first = min((spans[0][0] for spans in calls.values() if spans), default=end)
    gaps: list[float] = []
    for spans in calls.values():
        spans = sorted(spans)
        own = [b[0] - a[1] for a, b in pairwise(spans)]
        total += end - first
        busy += sum(e - s for s, e in spans)
        between += sum(max(0.0, g) for g in own)
        tail += max(0.0, end - spans[-1][1])
        gaps += own
    total = total or 1.0
    return {
        "startup": first - start,
        "busy": busy / total,
        "between": between / total,
        "tail": tail / total,
        "median_gap_ms": statistics.median(gaps) * 1000 if gaps else 0.0,
    }


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--size", default="320x240", help="WxH of the generated photos")
    parser.add_argument(
        "--mode", choices=[m.value for m in SegmentMode], default=SegmentMode.CENTER_BOX.value
    )
    parser.add_argument(
        "--naive-images", type=int, default=300, help="keys the naive loop processes (rate measured)"
    )
    parser.add_argument("--bound-sample", type=int, default=100, help="images timed for the compute bound")
    parser.add_argument("--actors", type=int, default=None, help="Ray actors (default: one per core)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--url", default=DEFAULT_URL, help="Postgres URL of a database to CREATE DATABASE from"
    )
    parser.add_argument("--write-docs", action="store_true", help="replace the section in docs/benchmarks.md")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up (scratch database, S3 server) on kill
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    width, height = (int(v) for v in args.size.lower().split("x"))
    mode = SegmentMode(args.mode)
    cores = os.cpu_count() or 1
    load_before = loadavg()

    with temporary_database(args.url, prefix="seemly_bench") as url, moto_server() as endpoint:
        upgrade(url)
        settings = Settings(
            database_url=url,
            s3_endpoint_url=endpoint,
            s3_access_key_id=ACCESS,
            s3_secret_access_key=SECRET,
            engine="classic",
            ray_num_cpus_per_actor=0.5,
        )
        print(f"filling the bucket with {args.images} photos of {width}x{height} ...", flush=True)
        payloads = fill_bucket(endpoint, "bench", args.images, (width, height))
        prefix = "s3://bench/photos/"
        mean_kib = statistics.mean(len(p) for p in payloads) / 1024

        print(f"timing the engine alone on {args.bound_sample} images ...", flush=True)
        per_image, per_image_cpu = measure_bound(payloads, settings, mode, args.bound_sample)
        mean_s = statistics.mean(per_image)
        bound_s = mean_s * args.images / cores

        print(f"naive loop on {args.naive_images} images ...", flush=True)
        naive_cpu_before = time.process_time()
        naive_n, naive_s = naive_loop(settings, prefix, args.naive_images, mode)
        naive_cpu = time.process_time() - naive_cpu_before
        naive_rate = naive_n / naive_s

        print(f"Ray Data job on {args.images} images ...", flush=True)
        from workers.presegment import ensure_ray

        ensure_ray(settings)  # Ray itself starts before the clock: a cluster is up before a job runs
        driver_cpu_before = time.process_time()
        job_started = time.time()
        result = ray_job(settings, prefix, mode, args.actors, args.batch_size)
        driver_cpu = time.process_time() - driver_cpu_before
        assert result.counts["done"] + result.counts["failed"] == args.images, result.counts
        ray_rate = result.processed / result.elapsed_s

        print("timing the engine alone again, listing, decoding ...", flush=True)
        more, more_cpu = measure_bound(payloads, settings, mode, args.bound_sample)
        per_image += more
        per_image_cpu += more_cpu
        mean_s = statistics.mean(per_image)
        mean_cpu = statistics.mean(per_image_cpu)
        bound_s = mean_s * args.images / cores
        keys, listed_s, registered_s = measure_listing(settings, prefix)
        decode_ms = measure_decode([(width, height), (1024, 768), (1920, 1080)])
        with make_engine(url).connect() as conn:
            masks_per_image = conn.execute(
                text("SELECT avg(mask_count) FROM job_items WHERE job_id = :j AND status = 'done'"),
                {"j": result.job_id},
            ).scalar_one()
    load_after = loadavg()

    stages = result.stage_seconds
    gaps = timeline(result.calls, job_started, job_started + result.elapsed_s)
    actor_time = result.actors * result.elapsed_s
    busy = {k: stages[k] / actor_time for k in ("segment_s", "wait_s", "write_s", "call_s")}
    rows = [
        (
            "naive loop (1 process)",
            naive_n,
            naive_s,
            naive_rate,
            "1.00x",
            f"{naive_rate * mean_s / cores:.0%}",
        ),
        (
            f"Ray Data job ({result.actors} actors, batch {args.batch_size})",
            result.processed,
            result.elapsed_s,
            ray_rate,
            f"{ray_rate / naive_rate:.2f}x",
            f"{ray_rate * mean_s / cores:.0%}",
        ),
    ]
    table = [
        "| pipeline | images | seconds | images/s | vs naive | of compute bound |",
        "|---|---:|---:|---:|---:|---:|",
        *(f"| {name} | {n} | {s:.1f} | {rate:.2f} | {x} | {pct} |" for name, n, s, rate, x, pct in rows),
    ]
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    cpu = cpu_model(platform.processor() or "unknown CPU")
    lines = [
        SECTION,
        "",
        f"Measured {now} on {platform.machine()}, {cores} cores ({cpu}), shared with other work "
        f"(load average {load_before} before, {load_after} after). Bucket: {args.images} JPEG photos of "
        f"{width}x{height} (mean {mean_kib:.0f} KiB) made from scikit-image samples, on moto's S3 server "
        f"(loopback, own process); Postgres on the same machine; engine `{settings.engine}`, mode `{mode.value}`.",
        "",
        *table,
        "",
        f"* Engine alone (decode + embed + segment, one process, {len(per_image)} images timed before and after "
        "the pipelines): mean "
        f"{mean_s * 1000:.0f} ms, median {statistics.median(per_image) * 1000:.0f} ms per image. Compute bound "
        f"for the bucket: {mean_s * 1000:.0f} ms x {args.images} / {cores} cores = {bound_s:.1f} s "
        f"({args.images / bound_s:.2f} images/s).",
        f"* Ray job wall time includes starting the actors (not Ray itself); first result after "
        f"{stages['first_result_s']:.1f} s. Where the actors' time went ({result.actors} actors x "
        f"{result.elapsed_s:.1f} s): inside the UDF {busy['call_s']:.0%} (embed + segment {busy['segment_s']:.0%}, "
        f"waiting for a download {busy['wait_s']:.0%}, writing {busy['write_s']:.0%}, decode + RLE + rest "
        f"{busy['call_s'] - busy['segment_s'] - busy['wait_s'] - busy['write_s']:.0%}); outside it (actor "
        f"start-up, Ray hand-offs, idle at the tail) {1 - busy['call_s']:.0%}.",
        f"* CPU (does not depend on the machine's load): the engine alone needs {mean_cpu * 1000:.0f} ms of CPU "
        f"per image; the naive loop's process used {naive_cpu / naive_n * 1000:.0f} ms per image (S3 server and "
        f"Postgres not counted); the job's actors used {stages['cpu_s'] / result.processed * 1000:.0f} ms per image "
        f"inside their calls (fetch, decode, engine, RLE, write), the driver {driver_cpu / result.processed * 1000:.1f} ms. "
        f"Inside their calls the actors got {stages['cpu_s'] / max(stages['call_s'], 1e-9):.0%} of a core each "
        f"(CPU time / wall time); the naive loop got {naive_cpu / naive_s:.0%} of one. If the actors had had "
        f"their cores to themselves, the job would run at about "
        f"{result.processed / (stages['cpu_s'] / min(result.actors, cores) + gaps['startup']):.2f} images/s "
        "(start-up + the actors' CPU seconds spread over the cores): a projection, not a measurement.",
        f"* Actor timeline: {gaps['startup']:.1f} s from the job's start to the first call, then {gaps['busy']:.0%} "
        f"of each actor's time inside calls, {gaps['between']:.0%} between its calls (Ray hand-offs; median gap "
        f"{gaps['median_gap_ms']:.0f} ms), {gaps['tail']:.0%} idle at the end while the other actor finished.",
        f"* Listing {keys} keys from the loopback S3: {keys / listed_s:.0f} keys/s; listing + registering them "
        f"as job items (COPY, 256 per transaction) + filtering done ones: {keys / registered_s:.0f} keys/s.",
        "* Decoding one JPEG photo (seemly's safe decoder, one core): "
        + ", ".join(f"{size} {ms:.1f} ms" for size, ms in decode_ms.items())
        + f". Masks per segmented image: {float(masks_per_image or 0):.1f}; write cost per image (batch of "
        f"{args.batch_size}, one transaction): {stages['write_s'] / max(1, result.processed) * 1000:.1f} ms.",
        f"* Naive loop measured on the first {naive_n} keys (its rate is steady; the whole bucket would take "
        f"~{args.images / naive_rate:.0f} s).",
        f"* Job {result.job_id}: {result.counts}.",
    ]
    report = "\n".join(lines) + "\n" + NOTES
    print()
    print(report)
    if args.write_docs:
        write_section(ROOT / "docs" / "benchmarks.md", report)
    return 0


def write_section(path: Path, section: str) -> None:
    """Replace (or append) this benchmark's section of docs/benchmarks.md, leaving the rest alone."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(SECTION) + r".*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _m: section + "\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


if __name__ == "__main__":
    raise SystemExit(main())
