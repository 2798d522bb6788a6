"""Reliability under load and faults: the figures of docs/reliability.md, reproducible.

::

    .venv/bin/python benchmarks/reliability.py all                    # everything (~15 minutes)
    .venv/bin/python benchmarks/reliability.py load --duration-s 30   # a smoke run of one scenario
    .venv/bin/python benchmarks/reliability.py serve-kill cache       # several scenarios, one stack

Scenarios (each checks the database with SQL afterwards: rows lost, rows duplicated):

``load``        ``--annotators`` (8) simulated annotators for ``--duration-s`` (300) against the
                Serve segmenter *through the backend*: Label Studio-shaped click sessions on
                ``/predict`` and submitted annotations on ``/webhook`` (benchmarks/reliability_load.py);
                the stack is the real ``seemly serve`` + ``seemly backend`` (reliability_stack.py).
``serve-kill``  the same load while a Segmenter replica is ``ray.kill``-ed (``--kills`` times): what
                the annotators saw, and how long Serve took to have all replicas running again.
``cache``       a tiny embedding-cache budget (``--cache-mb``) and a stream of distinct images:
                evictions, hit ratio, replica RSS over time, errors.
``db-outage``   a bucket job whose database refuses connections for a few seconds (this job's
                database only), with the job's database retries off (the old behaviour: the job
                stops, a rerun resumes it) and on (it waits and finishes).
``postgres-restart``  a bucket job while the whole Postgres server restarts (``pg_ctlcluster …
                restart``; shared with other work on this machine: run it rarely).
``s3-errors``   a bucket job over moto's S3 where chosen keys answer 500 / 503 / 404 or hold
                corrupted bytes (reliability_bucket.py), then a rerun once they are readable.
``train-kill``  ``seemly train run`` killed mid-run, then run again: no half-registered or
                duplicated model version (needs the corrections the load scenario stored).

Everything runs on loopback, on a scratch Postgres database (dropped at the end), a local Ray at
127.0.0.1 started by this process, and moto's S3 server in this process. ``--json FILE`` keeps
every figure; the markdown tables are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import reliability_bucket as bucket  # noqa: E402
import reliability_load as load  # noqa: E402
import reliability_stack as stack  # noqa: E402
import requests  # noqa: E402
from sqlalchemy import text  # noqa: E402

from seemly.bench.machine import cpu_model  # noqa: E402
from seemly.db.migrate import upgrade  # noqa: E402
from seemly.db.session import make_engine  # noqa: E402
from tests.fixtures.postgres import DEFAULT_ADMIN_URL, temporary_database  # noqa: E402

STACK_SCENARIOS = ("load", "serve-kill", "cache")
BUCKET_SCENARIOS = ("db-outage", "postgres-restart", "s3-errors")
ALL = (*STACK_SCENARIOS, *BUCKET_SCENARIOS, "train-kill")


def machine() -> dict[str, Any]:
    model = cpu_model("unknown CPU")
    return {
        "cpus": os.cpu_count(),
        "cpu": model,
        "arch": platform.machine(),
        "python": platform.python_version(),
        "loadavg": [round(v, 2) for v in os.getloadavg()],
    }


def fmt(value: float) -> str:
    return "-" if value != value else f"{value:.0f}"


# --- stack scenarios ------------------------------------------------------------------------------------------
def metrics(backend_url: str) -> dict[str, Any]:
    try:
        return requests.get(f"{backend_url}/metrics", timeout=5).json()
    except (requests.RequestException, ValueError):
        return {}


def latency_table(calls: list[load.Call]) -> list[str]:
    lines = ["| requests | n | p50 (ms) | p90 (ms) | p99 (ms) | max (ms) |", "|---|---:|---:|---:|---:|---:|"]
    for name, kinds in (
        ("first round", ("first",)),
        ("later rounds", ("later",)),
        ("submit (webhook)", ("submit",)),
    ):
        row = load.latency_row([c for c in calls if c.kind in kinds])
        lines.append(
            f"| {name} | {row['n']} | {fmt(row['p50'])} | {fmt(row['p90'])} | {fmt(row['p99'])} | {fmt(row['max'])} |"
        )
    return lines


def error_summary(calls: list[load.Call]) -> dict[str, int]:
    grouped: dict[str, int] = {}
    for call in calls:
        if call.status != 200:
            key = f"{call.status} {call.error[:160]}"
            grouped[key] = grouped.get(key, 0) + 1
    return grouped


def run_load(
    args: argparse.Namespace, st: stack.Stack, db: Any, pool: load.ImagePool, task_base: int
) -> dict[str, Any]:
    before = load.counts(db)
    la_before = os.getloadavg()
    result = load.run_annotators(
        st.backend_url,
        pool,
        annotators=args.annotators,
        duration_s=args.duration_s,
        rounds=args.rounds,
        think_s=args.think_s,
        task_base=task_base,
    )
    check = load.db_check(db, result, before)
    requests_made = len(result.calls)
    out = {
        "annotators": args.annotators,
        "duration_s": round(result.elapsed_s, 1),
        "rounds_per_image": args.rounds,
        "think_s": args.think_s,
        "requests": requests_made,
        "errors": len(result.errors),
        "error_messages": error_summary(result.calls),
        "images": result.sessions,
        "throughput_rps": round(requests_made / result.elapsed_s, 2),
        "rounds_per_s": round(sum(1 for c in result.calls if c.kind != "submit") / result.elapsed_s, 2),
        "latency": {
            k: load.latency_row([c for c in result.calls if c.kind == k])
            for k in ("first", "later", "submit")
        },
        "db": check,
        "backend_metrics": {
            k: v for k, v in metrics(st.backend_url).items() if "history" in k or "cache" in k
        },
        "loadavg_before": [round(v, 2) for v in la_before],
        "loadavg_after": [round(v, 2) for v in os.getloadavg()],
    }
    print("\n".join(latency_table(result.calls)))
    print(json.dumps({k: v for k, v in out.items() if k != "latency"}, indent=1, default=str))
    return out


def run_serve_kill(
    args: argparse.Namespace, st: stack.Stack, db: Any, pool: load.ImagePool, task_base: int
) -> dict[str, Any]:
    import ray

    duration = args.kill_duration_s
    kills: list[dict[str, Any]] = []
    stop = threading.Event()
    replicas = args.replicas

    def killer() -> None:
        spacing = duration / (args.kills + 1)
        for k in range(args.kills):
            if stop.wait(spacing if k == 0 else max(0.0, spacing - (time.monotonic() - kills[-1]["at"]))):
                return
            victim = stack.segmenter_handle().info.remote(sha256=f"{k:064x}").result(timeout_s=60)
            at = time.monotonic()
            ray.kill(ray.get_actor(victim["actor_name"], namespace="serve"), no_restart=True)
            record: dict[str, Any] = {"at": at, "victim": victim["actor_name"], "t_s": round(at - started, 1)}
            seen_down = None
            while time.monotonic() - at < 180 and not stop.is_set():
                running = stack.running_replicas()
                if running < replicas and seen_down is None:
                    seen_down = time.monotonic() - at
                if seen_down is not None and running >= replicas:
                    record["replaced_after_s"] = round(time.monotonic() - at, 1)
                    break
                time.sleep(0.2)
            record["seen_down_after_s"] = None if seen_down is None else round(seen_down, 1)
            kills.append(record)

    before = load.counts(db)
    started = time.monotonic()
    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    result = load.run_annotators(
        st.backend_url,
        pool,
        annotators=args.annotators,
        duration_s=duration,
        rounds=args.rounds,
        think_s=args.think_s,
        task_base=task_base,
    )
    stop.set()
    thread.join(timeout=200)
    check = load.db_check(db, result, before)
    for record in kills:  # what annotators saw around each kill
        window = [
            c
            for c in result.calls
            if record["at"] - 1 <= c.started + c.ms / 1e3 and c.started <= record["at"] + 30
        ]
        ok_after = [c for c in result.calls if c.status == 200 and c.started >= record["at"]]
        record["calls_in_30s_window"] = len(window)
        record["errors_in_window"] = sum(1 for c in window if c.status != 200)
        record["max_ms_in_window"] = round(max((c.ms for c in window), default=0))
        record["first_ok_after_s"] = (
            round(min(c.started + c.ms / 1e3 for c in ok_after) - record["at"], 2) if ok_after else None
        )
        record.pop("at")
    out = {
        "annotators": args.annotators,
        "duration_s": round(result.elapsed_s, 1),
        "requests": len(result.calls),
        "errors": len(result.errors),
        "error_messages": error_summary(result.calls),
        "kills": kills,
        "latency": {
            k: load.latency_row([c for c in result.calls if c.kind == k])
            for k in ("first", "later", "submit")
        },
        "db": check,
        "loadavg_after": [round(v, 2) for v in os.getloadavg()],
    }
    print("\n".join(latency_table(result.calls)))
    print(json.dumps({k: v for k, v in out.items() if k != "latency"}, indent=1, default=str))
    return out


def _cache_totals(infos: dict[str, dict[str, Any]]) -> dict[str, Any]:
    caches = [i["cache"] for i in infos.values()]
    return {
        "hits": sum(c["hits"] for c in caches),
        "misses": sum(c["misses"] for c in caches),
        "evictions": sum(c["evictions"] for c in caches),
        "bytes": [c["bytes"] for c in caches],
        "entries": [c["entries"] for c in caches],
        "budget_bytes": [c["budget_bytes"] for c in caches],
    }


def run_cache(
    args: argparse.Namespace, st: stack.Stack, db: Any, pool: load.ImagePool, task_base: int
) -> dict[str, Any]:
    from workers import serve_cli

    def live(**changes: Any) -> None:
        serve_cli.deploy(serve_cli.apply_overrides(serve_cli.deployed_config(), live=changes), wait_s=120)

    infos = stack.replica_infos(expected=args.replicas)
    pids = {name: stack.actor_pid(info["actor_name"]) for name, info in infos.items()}
    rss_before = {name: stack.rss_mb(pid) for name, pid in pids.items()}
    live(cache_mb=args.cache_mb)
    infos = stack.replica_infos(expected=args.replicas)
    start_totals = _cache_totals(infos)
    rss_start = {name: stack.rss_mb(pid) for name, pid in pids.items()}
    samples: dict[str, list[float]] = {name: [] for name in pids}
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(1.0):
            for name, pid in pids.items():
                value = stack.rss_mb(pid)
                if value is not None:
                    samples[name].append(value)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    before = load.counts(db)
    try:
        result = load.run_annotators(
            st.backend_url,
            pool,
            annotators=args.annotators,
            duration_s=args.cache_duration_s,
            rounds=args.cache_rounds,
            think_s=0.0,
            task_base=task_base,
        )
    finally:
        stop.set()
        sampler.join(timeout=5)
        infos_end = stack.replica_infos(expected=args.replicas)
        live(cache_mb=args.cache_mb_default)
    check = load.db_check(db, result, before)
    end = _cache_totals(infos_end)
    hits, misses = end["hits"] - start_totals["hits"], end["misses"] - start_totals["misses"]
    later = [c for c in result.calls if c.kind == "later"]
    out = {
        "cache_mb": args.cache_mb,
        "annotators": args.annotators,
        "duration_s": round(result.elapsed_s, 1),
        "images": result.sessions,
        "requests": len(result.calls),
        "errors": len(result.errors),
        "error_messages": error_summary(result.calls),
        "hits": hits,
        "misses": misses,
        "hit_ratio": round(hits / max(1, hits + misses), 3),
        "later_rounds": len(later),
        "evictions": end["evictions"] - start_totals["evictions"],
        "cache_bytes_end": end["bytes"],
        "entries_end": end["entries"],
        "rss_mb_before_shrink": rss_before,
        "rss_mb_after_shrink": rss_start,
        "rss_mb_peak_during": {n: round(max(v), 1) if v else None for n, v in samples.items()},
        "rss_mb_end": {n: (round(v[-1], 1) if v else None) for n, v in samples.items()},
        "latency": {
            k: load.latency_row([c for c in result.calls if c.kind == k]) for k in ("first", "later")
        },
        "db": check,
    }
    print(json.dumps(out, indent=1, default=str))
    return out


# --- train-kill ---------------------------------------------------------------------------------------------
def run_train_kill(args: argparse.Namespace, database_url: str, workdir: Path) -> dict[str, Any]:
    """``seemly train run`` killed mid-run (SIGKILL once its job row is running), then run to the end."""
    train = ROOT / "workers" / "train.py"
    if not train.exists():
        return {"status": "pending: workers/train.py does not exist yet"}
    db = make_engine(database_url)
    with db.connect() as conn:
        project = conn.execute(text("SELECT name FROM projects ORDER BY id LIMIT 1")).scalar()
        corrections = conn.execute(text("SELECT count(*) FROM corrections")).scalar_one()
    if project is None or not corrections:
        return {"status": "skipped: no project with corrections (run the load scenario first)"}
    env = stack.seemly_env(
        SEEMLY_DATABASE_URL=database_url,
        SEEMLY_FILE_ROOTS=str(workdir / "images"),
        SEEMLY_HOME=str(workdir / "home"),
        SEEMLY_RAY_ADDRESS=stack.start_ray(),
    )
    command = [sys.executable, "-m", "seemly.cli", "train", "run", "--project", str(project)]
    if args.train_epochs:
        command += ["--epochs", str(args.train_epochs)]

    def snapshot() -> dict[str, Any]:
        with db.connect() as conn:
            versions = conn.execute(
                text("SELECT count(*), count(DISTINCT (coalesce(project_id, 0), name)) FROM model_versions")
            ).one()
            names = list(conn.execute(text("SELECT name FROM model_versions ORDER BY id")).scalars())
            jobs = [
                dict(r._mapping)
                for r in conn.execute(
                    text("SELECT id, status, runner FROM jobs WHERE kind = 'train' ORDER BY id")
                )
            ]
        return {"versions": int(versions[0]), "version_keys": int(versions[1]), "names": names, "jobs": jobs}

    out: dict[str, Any] = {"project": project, "corrections": int(corrections), "before": snapshot()}
    log_path = workdir / "train-killed.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    started = time.monotonic()
    killed_at = None
    while proc.poll() is None and time.monotonic() - started < 600:
        snap = snapshot()
        if any(j["status"] == "running" for j in snap["jobs"][len(out["before"]["jobs"]) :]):
            time.sleep(args.train_kill_after_s)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                killed_at = time.monotonic() - started
            break
        time.sleep(0.2)
    proc.wait(30)
    out["killed_after_s"] = None if killed_at is None else round(killed_at, 1)
    out["killed_exit"] = proc.returncode
    out["after_kill"] = snapshot()
    rerun_started = time.monotonic()
    try:
        second = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
        out["rerun_exit"] = second.returncode
        out["rerun_stdout_tail"] = [line for line in second.stdout.splitlines() if line.strip()][-6:]
    except subprocess.TimeoutExpired:
        out["rerun_exit"] = "timed out after 1200 s"
    out["rerun_s"] = round(time.monotonic() - rerun_started, 1)
    out["killed_log_tail"] = [
        line
        for line in log_path.read_text(errors="replace").splitlines()
        if line.strip() and "pid=" not in line
    ][-6:]
    out["after_rerun"] = snapshot()
    db.dispose()
    print(json.dumps(out, indent=1, default=str))
    return out


# --- main -------------------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scenarios", nargs="*", default=["all"], help=f"any of {', '.join(ALL)}, or all")
    parser.add_argument("--duration-s", type=float, default=300.0, help="length of the load scenario")
    parser.add_argument("--annotators", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=4, help="clicks per image")
    parser.add_argument("--think-s", type=float, default=1.0, help="an annotator's pause between two clicks")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--num-cpus", type=float, default=0.5, help="CPUs per Segmenter replica")
    parser.add_argument("--kills", type=int, default=2, help="replicas killed during serve-kill")
    parser.add_argument("--kill-duration-s", type=float, default=120.0)
    parser.add_argument("--cache-mb", type=float, default=24.0, help="cache budget for the cache scenario")
    parser.add_argument("--cache-mb-default", type=float, default=1024.0)
    parser.add_argument("--cache-duration-s", type=float, default=90.0)
    parser.add_argument("--cache-rounds", type=int, default=3)
    parser.add_argument("--bucket-images", type=int, default=240, help="images per bucket-job scenario")
    parser.add_argument("--outage-s", type=float, default=8.0, help="db-outage: seconds without the database")
    parser.add_argument("--train-kill-after-s", type=float, default=8.0)
    parser.add_argument(
        "--train-epochs", type=int, help="train-kill: --epochs of the training (its policy's)"
    )
    parser.add_argument("--admin-url", default=os.environ.get("SEEMLY_TEST_POSTGRES_URL", DEFAULT_ADMIN_URL))
    parser.add_argument("--json", type=Path, help="write every figure here")
    args = parser.parse_args(argv)
    chosen = list(ALL) if "all" in args.scenarios else args.scenarios
    unknown = set(chosen) - set(ALL)
    if unknown:
        parser.error(f"unknown scenario(s) {sorted(unknown)}; choose from {', '.join(ALL)}")

    report: dict[str, Any] = {"machine_start": machine(), "args": {k: str(v) for k, v in vars(args).items()}}
    print(f"machine: {report['machine_start']}", flush=True)
    with (
        tempfile.TemporaryDirectory(prefix="seemly-reliability-") as tmp,
        temporary_database(args.admin_url, prefix="seemly_reliability") as database_url,
    ):
        workdir = Path(tmp)
        upgrade(database_url)
        db = make_engine(database_url)
        try:
            if any(s in chosen for s in STACK_SCENARIOS):
                pool = load.ImagePool(workdir / "images", salt=str(int(time.time())))
                with stack.serving_stack(
                    database_url,
                    workdir / "images",
                    workdir,
                    replicas=args.replicas,
                    num_cpus=args.num_cpus,
                    cache_mb=args.cache_mb_default,
                ) as st:
                    # warm-up: imports, first calls in every replica (not measured)
                    warm = load.run_annotators(
                        st.backend_url,
                        load.ImagePool(workdir / "images", "warm"),
                        annotators=2,
                        duration_s=1,
                        rounds=2,
                        think_s=0,
                        task_base=900_000,
                    )
                    load.db_check(db, warm)  # waits until its history is written: not counted later
                    for index, name in enumerate(s for s in STACK_SCENARIOS if s in chosen):
                        print(f"\n== {name} ==", flush=True)
                        runner = {"load": run_load, "serve-kill": run_serve_kill, "cache": run_cache}[name]
                        report[name] = runner(args, st, db, pool, task_base=1_000_000 * (index + 1))
                        save(args.json, report)
                    report["backend_log_errors"] = [
                        line
                        for line in st.log_tail(200_000).splitlines()
                        if " ERROR " in line or "Traceback" in line
                    ][:20]
            if "train-kill" in chosen:
                print("\n== train-kill ==", flush=True)
                report["train-kill"] = run_train_kill(args, database_url, workdir)
                save(args.json, report)
            bucket_chosen = [s for s in BUCKET_SCENARIOS if s in chosen]
            if bucket_chosen:
                report.update(run_bucket_scenarios(args, bucket_chosen, database_url, report))
        finally:
            db.dispose()
            import ray

            if ray.is_initialized():
                ray.shutdown()
    report["machine_end"] = machine()
    print(f"\nmachine at the end: {report['machine_end']}")
    save(args.json, report)
    return 0


def save(path: Path | None, report: dict[str, Any]) -> None:
    """Write the report so far (after every scenario: a later failure keeps the earlier figures)."""
    if path is not None:
        path.write_text(json.dumps(report, indent=1, default=str))


def run_bucket_scenarios(
    args: argparse.Namespace, chosen: list[str], database_url: str, report: dict[str, Any]
) -> dict[str, Any]:
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per S3 request otherwise
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out: dict[str, Any] = {}
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    try:
        if "db-outage" in chosen:
            for retries in (False, True):
                name = f"db-outage-{'retry' if retries else 'noretry'}"
                print(f"\n== {name} ==", flush=True)
                run = bucket.database_outage(
                    database_url,
                    args.admin_url,
                    endpoint,
                    count=args.bucket_images,
                    how="block",
                    outage_s=args.outage_s,
                    db_retry_s=120.0 if retries else 0.0,
                    project=name,
                )
                out[name] = report[name] = _outage_report(run)
                print(json.dumps(out[name], indent=1, default=str), flush=True)
                save(args.json, report)
        if "postgres-restart" in chosen:
            print("\n== postgres-restart ==", flush=True)
            run = bucket.database_outage(
                database_url,
                args.admin_url,
                endpoint,
                count=args.bucket_images,
                how="restart",
                outage_s=0,
                db_retry_s=120.0,
                project="pg-restart",
            )
            out["postgres-restart"] = report["postgres-restart"] = _outage_report(run)
            save(args.json, report)
            print(json.dumps(out["postgres-restart"], indent=1, default=str), flush=True)
        if "s3-errors" in chosen:
            print("\n== s3-errors ==", flush=True)
            out["s3-errors"] = bucket.s3_errors(
                database_url, endpoint, count=args.bucket_images, project="s3-errors"
            )
            print(json.dumps(out["s3-errors"], indent=1, default=str), flush=True)
    finally:
        server.stop()
    return out


def _outage_report(run: bucket.OutageRun) -> dict[str, Any]:
    outage = run.outage
    return {
        "outage_s": round(outage["end"] - outage["start"], 2)
        if "end" in outage and "start" in outage
        else None,
        "done_at_outage": outage.get("done_at_start"),
        "runs": run.runs,
        "check": run.check,
    }


if __name__ == "__main__":
    raise SystemExit(main())
