"""The serving stack of ``benchmarks/reliability.py``: local Ray, ``seemly serve``, ``seemly backend``.

One local Ray instance on 127.0.0.1 is started by the benchmark's own process (so it can
``ray.kill`` a replica and read the replicas' state), the segmenter is deployed on it by the real
``seemly serve --address …`` command (which deploys and returns, as against a cluster), and the real
``seemly backend`` (gunicorn) runs as a subprocess with ``SEEMLY_SEGMENTER_URL`` pointing at it,
on a scratch Postgres database, with the benchmark's images under a ``file://`` root.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parents[1]
APP = "segmenter"
DEPLOYMENT = "Segmenter"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def seemly_env(**settings: str) -> dict[str, str]:
    """This environment without any ``SEEMLY_*`` of the caller's, plus ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEEMLY_")}
    env.update({"PYTHONUNBUFFERED": "1", "RAY_USAGE_STATS_ENABLED": "0", **settings})
    return env


@dataclass
class Stack:
    backend_url: str
    segmenter_url: str
    gcs_address: str
    backend: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]


def start_ray() -> str:
    """A local Ray owned by this process (127.0.0.1, namespace ``serve``); its GCS address."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=os.cpu_count(),
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            namespace="serve",
            logging_level=logging.WARNING,
            log_to_driver=False,
        )
    return str(ray.get_runtime_context().gcs_address)


@contextmanager
def serving_stack(
    database_url: str,
    images: Path,
    workdir: Path,
    *,
    replicas: int = 2,
    num_cpus: float = 0.5,
    cache_mb: float = 1024,
) -> Iterator[Stack]:
    """Deploy the segmenter with ``seemly serve`` and run ``seemly backend`` in front of it."""
    gcs = start_ray()
    serve_port, backend_port = free_port(), free_port()
    deploy = subprocess.run(
        [
            *(sys.executable, "-m", "seemly.cli", "serve", "--address", gcs),
            *("--host", "127.0.0.1", "--port", str(serve_port)),
            *("--replicas", str(replicas), "--num-cpus", str(num_cpus), "--cache-mb", str(cache_mb)),
        ],
        cwd=ROOT,
        env=seemly_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    if deploy.returncode != 0:
        raise RuntimeError(f"seemly serve failed:\n{deploy.stdout[-2000:]}\n{deploy.stderr[-3000:]}")
    segmenter_url = f"http://127.0.0.1:{serve_port}/segment"
    log_path = workdir / "backend.log"
    env = seemly_env(
        SEEMLY_DATABASE_URL=database_url,
        SEEMLY_SEGMENTER_URL=segmenter_url,
        SEEMLY_FILE_ROOTS=str(images),
        SEEMLY_SEGMENTER_TIMEOUT_S="60",
    )
    with log_path.open("wb") as log:
        backend = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "seemly.cli",
                "backend",
                "--host",
                "127.0.0.1",
                "--port",
                str(backend_port),
            ],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    stack = Stack(f"http://127.0.0.1:{backend_port}", segmenter_url, gcs, backend, log_path)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if requests.get(f"{stack.backend_url}/health", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if backend.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"seemly backend did not start:\n{stack.log_tail()}")
            time.sleep(0.3)
        yield stack
    finally:
        if backend.poll() is None:
            os.killpg(backend.pid, signal.SIGTERM)
            try:
                backend.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(backend.pid, signal.SIGKILL)
                backend.wait(10)
        from ray import serve

        try:
            serve.delete(APP)
            serve.shutdown()
        except Exception as exc:  # the Ray instance goes anyway
            print(f"(serve shutdown: {exc})", file=sys.stderr)


# --- looking inside the deployment -----------------------------------------------------------------------
def segmenter_handle() -> Any:
    from ray import serve

    return serve.get_deployment_handle(DEPLOYMENT, app_name=APP)


def replica_infos(probes: int = 64, expected: int = 2) -> dict[str, dict[str, Any]]:
    """Every live replica's ``info()`` (found by routing probe images until each answered)."""
    import hashlib

    found: dict[str, dict[str, Any]] = {}
    for i in range(probes):
        sha = hashlib.sha256(f"probe{i}".encode()).hexdigest()
        info = segmenter_handle().info.remote(sha256=sha).result(timeout_s=60)
        found[info["replica"]] = info
        if len(found) >= expected:
            break
    return found


def running_replicas() -> int:
    """RUNNING replicas of the Segmenter deployment, as Serve's controller reports them."""
    from ray import serve

    app = serve.status().applications.get(APP)
    if app is None or DEPLOYMENT not in app.deployments:
        return 0
    states = app.deployments[DEPLOYMENT].replica_states or {}
    return int(sum(n for state, n in states.items() if str(getattr(state, "value", state)) == "RUNNING"))


def actor_pid(actor_name: str) -> int | None:
    """The pid of a named Serve actor (from the GCS actor table; no dashboard needed)."""
    import ray

    try:
        actor_id = ray.get_actor(actor_name, namespace="serve")._actor_id.hex()
        # the GCS actor table (Ray's public state API needs the dashboard, which is off here)
        entry = ray._private.state.actors(actor_id=actor_id)
        pid = entry.get("Pid") if isinstance(entry, dict) else None
        return int(pid) if pid else None
    except Exception:
        return None


def rss_mb(pid: int | None) -> float | None:
    if not pid:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None
