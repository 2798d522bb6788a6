"""Secrets never reach a log line: the backend and a bucket job run with every credential set, at DEBUG.

Credentials in play: S3 access key id and secret key (moto with IAM authentication on, so they are
real and checked), a Label Studio API token, a database URL with a password (the test server trusts
loopback, so any password connects), the backend's basic-auth password. The requests include
failing ones (wrong S3 credentials, a Label Studio token that is refused, a wrong basic-auth
password, a database that is down). All log output is captured — pytest's records, a JSON handler
installed the way ``seemly`` installs its own, and the stdout/stderr of a ``seemly presegment``
process with its Ray workers — and searched for every secret.
"""

from __future__ import annotations

import base64
import io
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine
from sqlalchemy.engine import make_url

from backend.app import BackendOptions, backend_of, create_app
from seemly.config import Settings
from seemly.log_setup import REDACTOR, JsonFormatter, install_request_ids
from tests.backend_support import BRUSH_CONFIG, PROJECT, interactive_body, keypoint, make_scene
from tests.fixtures.s3 import make_s3_client
from tests.test_backend_app import FakeLabelStudio

ROOT = Path(__file__).resolve().parents[1]
LS_TOKEN = "ls-secret-token-7f3a9c21"
WRONG_LS_TOKEN = "ls-wrong-token-55e0b8d4"
BASIC_PASSWORD = "basic-pw-c0ffee-1234"
DB_PASSWORD = "db-pw-9d8c7b6a5f"
WRONG_S3_SECRET = "wrong-s3-secret-0a1b2c3d4e5f"


def with_password(url: str, password: str) -> str:
    return make_url(url).set(password=password).render_as_string(hide_password=False)


def put(bucket: Any, creds: Any, key: str, data: bytes) -> str:
    """Upload with the IAM user's credentials (moto's authentication is on)."""
    make_s3_client(bucket.endpoint_url, creds).put_object(Bucket=bucket.name, Key=key, Body=data)
    return bucket.uri(key)


def assert_no_secret(text: str, secrets: list[str]) -> None:
    assert text.strip(), "nothing was logged at all"
    for secret in secrets:
        assert secret not in text, f"secret {secret[:4]}… found in the logs"


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """A DEBUG JSON handler on the root logger, installed before the app (as ``seemly backend`` does)."""
    install_request_ids()
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(REDACTOR)  # as seemly.log_setup.setup_logging does
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield stream
    root.removeHandler(handler)
    root.setLevel(old_level)


def test_backend_logs_no_secret(
    postgres_db: Engine,
    postgres_url: str,
    s3_bucket: Any,
    s3_enforced_auth: Any,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    json_log: io.StringIO,
) -> None:
    creds = s3_enforced_auth
    scene = make_scene(21, width=64, height=48)
    s3_uri = put(s3_bucket, creds, "secret/scene.png", scene.png)  # the test's own upload: not captured
    caplog.set_level(logging.DEBUG)
    server = FakeLabelStudio(LS_TOKEN, {"/data/upload/1/scene.png": scene.png})
    db_url = with_password(postgres_url, DB_PASSWORD)
    common: dict[str, Any] = dict(
        database_url=db_url,
        file_roots=[str(tmp_path)],
        s3_endpoint_url=s3_bucket.endpoint_url,
        s3_max_attempts=1,
        label_studio_api_key=LS_TOKEN,
        backend_basic_auth_user="ls",
        backend_basic_auth_password=BASIC_PASSWORD,
        health_s3_uris=f"s3://{s3_bucket.name}/secret/",
    )
    auth = {"Authorization": "Basic " + base64.b64encode(f"ls:{BASIC_PASSWORD}".encode()).decode()}
    x, y = scene.pct("cat")
    try:
        good = create_app(
            Settings(
                **common, s3_access_key_id=creds.access_key_id, s3_secret_access_key=creds.secret_access_key
            ),
            options=BackendOptions(warm_up=False),
        )
        client = good.test_client()
        setup = {"project": PROJECT, "schema": BRUSH_CONFIG, "hostname": server.url, "access_token": LS_TOKEN}
        assert client.post("/setup", json=setup, headers=auth).status_code == 200
        for uri in (s3_uri, "/data/upload/1/scene.png"):
            answer = client.post(
                "/predict", json=interactive_body(1, uri, [keypoint(scene, x, y)]), headers=auth
            )
            assert answer.status_code == 200, answer.json
        assert client.get("/health/deep", headers=auth).status_code == 200
        assert client.get("/metrics", headers={**auth, "Accept": "text/plain"}).status_code == 200
        # failing: a wrong basic-auth password, malformed bodies that contain secrets, a refused token
        wrong_auth = {"Authorization": "Basic " + base64.b64encode(f"ls:{LS_TOKEN}".encode()).decode()}
        assert client.get("/health", headers=wrong_auth).status_code == 401
        assert client.post("/predict", data=b"{" + LS_TOKEN.encode(), headers=auth).status_code == 400
        bad_setup = {**setup, "access_token": WRONG_LS_TOKEN, "hostname": f"http://u:{DB_PASSWORD}@x"}
        client.post("/setup", json=bad_setup, headers=auth)
        backend_of(good).history.flush(30)
        backend_of(good).close()

        wrong = create_app(
            Settings(**common, s3_access_key_id=creds.access_key_id, s3_secret_access_key=WRONG_S3_SECRET),
            options=BackendOptions(warm_up=False),
        )
        client = wrong.test_client()
        refused = client.post(
            "/predict", json=interactive_body(2, s3_uri, [keypoint(scene, x, y)]), headers=auth
        )
        assert refused.status_code == 403, refused.json
        deep = client.get("/health/deep", headers=auth)
        assert deep.status_code == 503 and deep.json["failed"] == [f"s3:{s3_bucket.name}/secret/"]
        backend_of(wrong).close()

        down_url = with_password("postgresql+psycopg://seemly@127.0.0.1:1/seemly", DB_PASSWORD)
        down = create_app(
            Settings(**{**common, "database_url": down_url}), options=BackendOptions(warm_up=False)
        )
        client = down.test_client()
        assert client.get("/health/deep", headers=auth).status_code == 503
        assert client.get("/metrics", headers={**auth, "Accept": "text/plain"}).status_code == 200
        batch = {
            "tasks": [{"id": 3, "data": {"image": s3_uri}}],
            "project": PROJECT,
            "label_config": BRUSH_CONFIG,
        }
        client.post("/predict", json=batch, headers=auth)
        backend_of(down).history.close()
    finally:
        server.close()
    logging.getLogger("backend.test").debug("Authorization: Token %s", LS_TOKEN)  # redacted even so
    secrets = [
        LS_TOKEN,
        WRONG_LS_TOKEN,
        BASIC_PASSWORD,
        DB_PASSWORD,
        creds.secret_access_key,
        creds.access_key_id,
        WRONG_S3_SECRET,
        base64.b64encode(f"ls:{BASIC_PASSWORD}".encode()).decode(),
    ]
    captured = caplog.text + "\n".join(r.getMessage() for r in caplog.records)
    assert_no_secret(captured, secrets)
    assert_no_secret(json_log.getvalue(), secrets)
    assert '"request_id"' in json_log.getvalue()


def run_presegment(env: dict[str, str], uri: str, project: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "seemly.cli", "-v", "presegment", uri, "--project", project]
    command += ["--actors", "1", "--batch-size", "2", "--no-progress"]
    return subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)


@pytest.mark.slow
def test_bucket_job_logs_no_secret(
    ray_local: str, postgres_db: Engine, postgres_url: str, s3_bucket: Any, s3_enforced_auth: Any
) -> None:
    creds = s3_enforced_auth
    scene = make_scene(22, width=48, height=36)
    put(s3_bucket, creds, "job/a.png", scene.png)
    put(s3_bucket, creds, "job/b.png", make_scene(23, width=48, height=36).png)
    env = {
        **os.environ,
        "SEEMLY_DATABASE_URL": with_password(postgres_url, DB_PASSWORD),
        "SEEMLY_S3_ENDPOINT_URL": s3_bucket.endpoint_url,
        "SEEMLY_S3_ACCESS_KEY_ID": creds.access_key_id,
        "SEEMLY_S3_SECRET_ACCESS_KEY": creds.secret_access_key,
        "SEEMLY_S3_MAX_ATTEMPTS": "1",
        "SEEMLY_LABEL_STUDIO_API_KEY": LS_TOKEN,
        "SEEMLY_BACKEND_BASIC_AUTH_PASSWORD": BASIC_PASSWORD,
        "SEEMLY_RAY_ADDRESS": ray_local,
        "SEEMLY_RAY_NUM_CPUS_PER_ACTOR": "0.5",
        "SEEMLY_LOG_FORMAT": "json",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    done = run_presegment(env, s3_bucket.uri("job/"), "p-secrets")
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert '"level": "DEBUG"' in output  # it did log at DEBUG, as JSON
    refused = run_presegment(
        {**env, "SEEMLY_S3_SECRET_ACCESS_KEY": WRONG_S3_SECRET}, s3_bucket.uri("job/"), "p-s2"
    )
    refused_output = refused.stdout + refused.stderr
    assert refused.returncode != 0 and "SEEMLY_S3_SECRET_ACCESS_KEY" in refused_output, refused_output[-3000:]
    secrets = [
        DB_PASSWORD,
        creds.secret_access_key,
        creds.access_key_id,
        LS_TOKEN,
        BASIC_PASSWORD,
        WRONG_S3_SECRET,
    ]
    assert_no_secret(output + refused_output, secrets)
