"""``seemly backend`` as a real gunicorn server in a subprocess (the way it runs in production)."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from sqlalchemy import Engine, func, select

from backend.cli import configure, gunicorn_config
from seemly.db.models import PromptRound
from tests.backend_support import BRUSH_CONFIG, PROJECT, interactive_body, keypoint, make_scene, save
from tests.fixtures.label_studio import free_port

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "server-test-token-7c1e"


def test_gunicorn_settings_single_worker_threads() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    configure(parser)
    config = gunicorn_config(parser.parse_args(["--port", "9999"]))
    assert config["bind"] == "127.0.0.1:9999"
    assert (config["workers"], config["threads"], config["worker_class"]) == (1, 8, "gthread")
    assert config["preload_app"] is False and config["accesslog"] is None


@pytest.fixture
def server(
    postgres_db: Engine, postgres_url: str, tmp_path: Path
) -> Iterator[tuple[str, Path, subprocess.Popen]]:
    port = free_port()
    images = tmp_path / "images"
    images.mkdir()
    log_path = tmp_path / "backend.log"
    env = {
        **os.environ,
        "SEEMLY_DATABASE_URL": postgres_url,
        "SEEMLY_FILE_ROOTS": str(images),
        "SEEMLY_MAX_REQUEST_BYTES": "200000",
        "PYTHONUNBUFFERED": "1",
    }
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "seemly.cli", "-v", "backend", "--port", str(port), "--threads", "4"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except requests.RequestException:
            time.sleep(0.3)
    else:
        proc.kill()
        pytest.fail(f"backend did not start:\n{log_path.read_text()[-3000:]}")
    try:
        yield url, images, proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def test_served_by_gunicorn(server, postgres_db: Engine, tmp_path: Path) -> None:
    url, images, proc = server
    started = time.perf_counter()
    assert requests.get(f"{url}/health", timeout=1).json()["status"] == "UP"
    assert time.perf_counter() - started < 1.0
    setup = {
        "project": PROJECT,
        "schema": BRUSH_CONFIG,
        "hostname": "http://127.0.0.1:1",
        "access_token": TOKEN,
    }
    response = requests.post(f"{url}/setup", json=setup, timeout=3)
    assert response.status_code == 200, response.text

    scene = make_scene(31)
    uri = save(scene, images, "s.png")
    x, y = scene.pct("cat")
    response = requests.post(
        f"{url}/predict", json=interactive_body(1, uri, [keypoint(scene, x, y)]), timeout=30
    )
    assert response.status_code == 200, response.text

    # a chunked body (no Content-Length) past SEEMLY_MAX_REQUEST_BYTES is refused with 413
    conn = http.client.HTTPConnection("127.0.0.1", int(url.rsplit(":", 1)[1]), timeout=10)
    chunks = (b'{"tasks": "' + b"x" * 100_000 for _ in range(3))
    conn.request(
        "POST", "/predict", body=chunks, headers={"Content-Type": "application/json"}, encode_chunked=True
    )
    answer = conn.getresponse()
    assert answer.status == 413, answer.read()
    assert "SEEMLY_MAX_REQUEST_BYTES" in json.loads(answer.read())["error"]
    conn.close()

    # SIGTERM: the worker writes the queued history before it exits
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(30) == 0
    with postgres_db.connect() as conn:
        assert conn.execute(select(func.count()).select_from(PromptRound)).scalar_one() == 1
    log_text = (tmp_path / "backend.log").read_text()
    assert "POST /predict" in log_text  # -v logs requests ...
    assert TOKEN not in log_text  # ... but never the token /setup carried
