"""Observability of the backend: Prometheus metrics, request ids in logs and to the segmenter, /health/deep.

The app runs on the real Postgres of the session (``backend_app``); the slow and unreachable
databases are real sockets on loopback (a closed port; a listener that never answers). The
segmenter the request id is forwarded to is a loopback HTTP server speaking the Serve ingress's
wire format (:mod:`seemly.serving`).
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine

from backend.app import BackendOptions, backend_of, create_app
from seemly.config import Settings
from seemly.db.models import Job, JobStatus, ModelVersion, Project
from seemly.db.session import make_engine, session_scope
from seemly.log_setup import JsonFormatter, bind_request_id, install_request_ids
from seemly.masks import Mask
from seemly.serving import SegmentAnswer, WireSegment
from tests.backend_support import (
    BackendUnderTest,
    backend_app_for,
    interactive_body,
    keypoint,
    make_backend,
    make_scene,
    save,
)

PROM = {"Accept": "text/plain;version=0.0.4;q=0.9,*/*;q=0.1"}


@pytest.fixture
def backend_app(postgres_db: Engine, postgres_url: str, tmp_path: Path) -> Iterator[BackendUnderTest]:
    yield from backend_app_for(postgres_db, postgres_url, tmp_path)


def scrape(client: Any, **kwargs: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``/metrics`` as {(sample name, sorted labels): value}."""
    response = client.get("/metrics", headers=PROM, **kwargs)
    assert response.status_code == 200, response.data
    assert response.content_type.startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(response.data.decode()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(samples: dict[Any, float], name: str, **labels: str) -> float | None:
    """The one sample ``name`` whose labels include ``labels``."""
    found = [
        v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(dict(ls).items())
    ]
    assert len(found) <= 1, (name, labels, found)
    return found[0] if found else None


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class SilentServer:
    """Accepts TCP connections and never says a word: a database that hangs."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = int(self.sock.getsockname()[1])
        self.held: list[socket.socket] = []
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)

    def close(self) -> None:
        self._stop = True
        self.sock.close()
        for conn in self.held:
            conn.close()


def app_on(db_url: str, images: Path, **settings: Any) -> BackendUnderTest:
    """An app whose database is ``db_url`` (possibly unreachable)."""
    db = make_engine(db_url, connect_args={"connect_timeout": 30})
    config = Settings(database_url=db_url, file_roots=[str(images)], **settings)
    app = create_app(config, db=db, options=BackendOptions(warm_up=False))
    return BackendUnderTest(app, backend_of(app), app.test_client(), images, db)


# --- metrics ---------------------------------------------------------------------------------------------
def test_round_histogram_cache_and_request_counters(backend_app: BackendUnderTest) -> None:
    scene = make_scene(5)
    uri = save(scene, backend_app.images, "scene.png")
    (cx, cy), (dx, dy) = scene.pct("cat"), scene.pct("dog")
    clicks = [keypoint(scene, cx, cy), keypoint(scene, cx + 2, cy), keypoint(scene, dx, dy, positive=False)]
    for n in range(1, 4):  # Label Studio sends every region of the object so far
        response = backend_app.post("/predict", interactive_body(1, uri, clicks[:n]))
        assert response.status_code == 200, response.json
    wrong = interactive_body(1, uri, [keypoint(scene, cx, cy, label="zebra")])
    assert backend_app.post("/predict", wrong).status_code == 422
    assert backend_app.client.post("/predict", data=b"{nope").status_code == 400  # not a round: no label

    samples = scrape(backend_app.client)
    ok = {"engine": "classic", "model_version": "classic-1", "prompt_kinds": "click", "outcome": "ok"}
    assert value(samples, "seemly_predict_round_seconds_count", **ok) == 3
    assert value(samples, "seemly_predict_round_seconds_bucket", **ok, le="+Inf") == 3
    assert value(samples, "seemly_predict_round_seconds_count", outcome="client_error") == 1
    assert value(samples, "seemly_embed_cache_misses_total") == 1
    assert value(samples, "seemly_embed_cache_hits_total") == 2
    assert value(samples, "seemly_embed_cache_hit_ratio") == pytest.approx(2 / 3)
    assert value(samples, "seemly_http_requests_total", endpoint="/predict", status_class="2xx") == 3
    assert value(samples, "seemly_http_requests_total", endpoint="/predict", status_class="4xx") == 2
    assert value(samples, "seemly_sessions") == 1
    assert value(samples, "seemly_metrics_db_up") == 1
    # The JSON counters stay the default for callers that do not ask for Prometheus.
    legacy = backend_app.client.get("/metrics").json
    assert legacy["embed_cache"]["hits"] == 2
    assert backend_app.client.get("/metrics?format=prometheus").content_type.startswith("text/plain")
    openmetrics = backend_app.client.get("/metrics", headers={"Accept": "application/openmetrics-text"})
    assert openmetrics.content_type.startswith("application/openmetrics-text")
    assert openmetrics.data.rstrip().endswith(b"# EOF")


def test_database_collector_reports_jobs_training_and_promoted_versions(
    backend_app: BackendUnderTest, postgres_db: Engine
) -> None:
    with session_scope(postgres_db) as session:
        project = Project(name="cats", ls_project_id=7)
        session.add(project)
        session.flush()
        running = Job(
            kind="presegment",
            project_id=project.id,
            status=JobStatus.RUNNING,
            items_total=10,
            items_done=4,
            items_failed=1,
        )
        session.add_all(
            [
                running,
                Job(kind="presegment", project_id=project.id, status=JobStatus.SUCCEEDED),
                Job(kind="train", project_id=project.id, status=JobStatus.FAILED),
                Job(kind="train", project_id=project.id, status=JobStatus.SUCCEEDED),
                ModelVersion(name="classic-1", engine="classic", project_id=project.id, promoted=False),
                ModelVersion(name="p1-classic-ft1", engine="classic", project_id=project.id, promoted=True),
            ]
        )
        session.flush()
        job_id = str(running.id)
    samples = scrape(backend_app.client)
    assert value(samples, "seemly_job_items", job_id=job_id, state="total") == 10
    assert value(samples, "seemly_job_items", job_id=job_id, state="done") == 4
    assert value(samples, "seemly_job_items", job_id=job_id, state="failed", project="cats") == 1
    assert value(samples, "seemly_jobs", kind="presegment", status="running") == 1
    assert value(samples, "seemly_jobs", kind="presegment", status="succeeded") == 1
    assert value(samples, "seemly_training_runs", status="failed") == 1
    assert value(samples, "seemly_training_runs", status="succeeded") == 1
    assert value(samples, "seemly_promoted_model_version_info", project="cats", version="p1-classic-ft1") == 1
    assert value(samples, "seemly_promoted_model_version_info", version="classic-1") is None


def test_metrics_stay_fast_when_the_database_is_down_or_hangs(tmp_path: Path) -> None:
    down = app_on(f"postgresql+psycopg://seemly:pw-closed-port@127.0.0.1:{closed_port()}/seemly", tmp_path)
    started = time.perf_counter()
    samples = scrape(down.client)
    assert time.perf_counter() - started < 2.0
    assert value(samples, "seemly_metrics_db_up") == 0
    assert value(samples, "seemly_jobs") is None  # no figures rather than made-up ones
    down.backend.close()

    silent = SilentServer()
    try:
        hung = app_on(
            f"postgresql+psycopg://seemly@127.0.0.1:{silent.port}/seemly",
            tmp_path,
            metrics_db_timeout_s=0.5,
        )
        for _ in range(3):  # the hung query is not started again for each scrape
            started = time.perf_counter()
            samples = scrape(hung.client)
            assert time.perf_counter() - started < 1.5
            assert value(samples, "seemly_metrics_db_up") == 0
        assert len(silent.held) == 1
    finally:
        silent.close()


def test_metrics_follow_basic_auth_unless_public(
    postgres_db: Engine, postgres_url: str, tmp_path: Path
) -> None:
    closed = make_backend(
        postgres_db,
        postgres_url,
        tmp_path,
        backend_basic_auth_user="ls",
        backend_basic_auth_password="pw-1234",
    )
    assert closed.client.get("/metrics", headers=PROM).status_code == 401
    assert closed.client.get("/health/deep").status_code == 401
    closed.backend.history.close()
    public = make_backend(
        postgres_db,
        postgres_url,
        tmp_path,
        backend_basic_auth_user="ls",
        backend_basic_auth_password="pw-1234",
        metrics_public=True,
    )
    assert public.client.get("/metrics", headers=PROM).status_code == 200
    assert public.client.get("/health/deep").status_code == 200
    assert public.client.get("/health").status_code == 401  # everything else stays closed
    assert public.client.post("/predict", json={}).status_code == 401
    samples = scrape(public.client)
    assert value(samples, "seemly_http_requests_total", endpoint="/predict", status_class="4xx") == 1
    public.backend.history.close()


# --- request ids ---------------------------------------------------------------------------------------------
def test_request_ids_are_echoed_and_in_every_log_record_of_the_request(
    backend_app: BackendUnderTest, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    scene = make_scene(6)
    uri = save(scene, backend_app.images, "scene.png")
    body = interactive_body(1, uri, [keypoint(scene, *scene.pct("cat"))])
    response = backend_app.post("/predict", body, headers={"X-Request-ID": "ls-req.42:a"})
    assert response.status_code == 200 and response.headers["X-Request-ID"] == "ls-req.42:a"
    ours = [r for r in caplog.records if getattr(r, "seemly_request_id", None) == "ls-req.42:a"]
    assert any("/predict" in r.getMessage() for r in ours), [r.getMessage() for r in caplog.records]
    # Insane ids (log injection, huge, empty) are replaced by a fresh one, never echoed.
    for bad in ("a b INFO forged", "x" * 200, "", "-leading", "semi;colon"):
        answer = backend_app.client.get("/health", headers={"X-Request-ID": bad})
        echoed = answer.headers["X-Request-ID"]
        assert echoed != bad and len(echoed) == 32 and int(echoed, 16) >= 0
    first = backend_app.client.get("/health").headers["X-Request-ID"]
    assert first != backend_app.client.get("/health").headers["X-Request-ID"]
    # A refused request (401, 413 ...) has an id too; outside a request records say "-".
    assert backend_app.client.post("/setup", data=b"[]").headers.get("X-Request-ID")
    logging.getLogger("backend.test").info("between requests")
    assert caplog.records[-1].seemly_request_id == "-"


def test_callers_may_still_log_a_request_id_extra(caplog: pytest.LogCaptureFixture) -> None:
    """Ray Serve logs its access lines with ``extra={"request_id": ...}``: that must not raise."""
    install_request_ids()
    caplog.set_level(logging.INFO)
    with bind_request_id("ours-1"):
        logging.getLogger("ray.serve.test").info("access", extra={"request_id": "serve-7"})
    record = caplog.records[-1]
    assert (record.request_id, record.seemly_request_id) == ("serve-7", "ours-1")
    assert json.loads(JsonFormatter().format(record))["request_id"] == "serve-7"


def test_json_log_lines_carry_the_request_id() -> None:
    install_request_ids()
    logger = logging.getLogger("seemly.test.json")
    with bind_request_id("rid-1"):
        record = logger.makeRecord(logger.name, logging.INFO, __file__, 1, "hello %s", ("you",), None)
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        failing = logger.makeRecord(logger.name, logging.ERROR, __file__, 2, "failed", (), sys.exc_info())
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "hello you" and line["request_id"] == "rid-1" and line["level"] == "INFO"
    assert line["logger"] == "seemly.test.json" and line["ts"].endswith("+00:00")
    other = json.loads(JsonFormatter().format(failing))
    assert other["request_id"] == "-" and "ValueError: boom" in other["exc"]


class SegmenterService:
    """The Serve ingress's HTTP wire format on loopback; records what reached it."""

    def __init__(self) -> None:
        self.seen: list[tuple[str | None, dict[str, Any]]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _answer(self, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self._answer({"status": "UP", "model_version": "svc-1", "versions": ["svc-1"]})

            def do_POST(self) -> None:
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.seen.append((self.headers.get("X-Request-ID"), request))
                mask = Mask.full(request["height"], request["width"])
                segment = WireSegment(rle=mask.to_coco_rle(), score=0.9, model_version="svc-1")
                answer = SegmentAnswer(
                    status="ok",
                    segments=[segment],
                    model_version="svc-1",
                    request_id=request.get("request_id"),
                ).model_dump(mode="json")
                self._answer(answer)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/segment"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_request_id_is_forwarded_to_the_segmenter(
    postgres_db: Engine, postgres_url: str, tmp_path: Path
) -> None:
    service = SegmenterService()
    try:
        under_test = make_backend(postgres_db, postgres_url, tmp_path, segmenter_url=service.url)
        scene = make_scene(7)
        uri = save(scene, tmp_path, "scene.png")
        body = interactive_body(1, uri, [keypoint(scene, *scene.pct("cat"))])
        response = under_test.post("/predict", body, headers={"X-Request-ID": "fwd-123"})
        assert response.status_code == 200, response.json
        assert service.seen and all(rid == "fwd-123" for rid, _ in service.seen)
        assert all(request["request_id"] == "fwd-123" for _, request in service.seen)
        assert under_test.backend.segmenter.last_answer["request_id"] == "fwd-123"  # type: ignore[attr-defined]
        under_test.backend.history.close()
    finally:
        service.close()


# --- /health/deep ------------------------------------------------------------------------------------------------
def test_deep_health_all_ok(backend_app: BackendUnderTest) -> None:
    started = time.perf_counter()
    response = backend_app.client.get("/health/deep")
    assert time.perf_counter() - started < 2.0
    assert response.status_code == 200, response.json
    body = response.json
    assert body["status"] == "ok" and body["failed"] == []
    components = body["components"]
    assert {"database", "segmenter", f"file_root:{backend_app.images.resolve()}"} <= set(components)
    assert all(c["status"] == "ok" and c["latency_ms"] >= 0 for c in components.values())
    assert "classic" in components["segmenter"]["detail"]


def test_deep_health_names_the_failed_component(tmp_path: Path, postgres_url: str) -> None:
    images = tmp_path / "images"
    images.mkdir()
    down = app_on(f"postgresql+psycopg://seemly:pw-deep-9876@127.0.0.1:{closed_port()}/seemly", images)
    response = down.client.get("/health/deep")
    assert response.status_code == 503
    assert response.json["failed"] == ["database"]
    assert response.json["components"]["segmenter"]["status"] == "ok"
    assert "pw-deep-9876" not in response.get_data(as_text=True)
    down.backend.close()

    missing = tmp_path / "gone"
    config = Settings(database_url=postgres_url, file_roots=[str(images), str(missing)])
    app = create_app(config, options=BackendOptions(warm_up=False))
    response = app.test_client().get("/health/deep")
    assert response.status_code == 503
    assert response.json["failed"] == [f"file_root:{missing.resolve()}"]
    assert "not a directory" in response.json["components"][f"file_root:{missing.resolve()}"]["error"]
    backend_of(app).close()


def test_deep_health_lists_s3_with_a_deadline(s3_bucket: Any, postgres_url: str, tmp_path: Path) -> None:
    s3_bucket.put("photos/a.png", b"x")
    good = dict(
        database_url=postgres_url,
        s3_endpoint_url=s3_bucket.endpoint_url,
        s3_access_key_id="testing",
        s3_secret_access_key="testing",
        health_s3_uris=f"s3://{s3_bucket.name}/photos/",
    )
    app = create_app(Settings(**good), options=BackendOptions(warm_up=False))
    response = app.test_client().get("/health/deep")
    assert response.status_code == 200, response.json
    assert response.json["components"][f"s3:{s3_bucket.name}/photos/"]["status"] == "ok"
    backend_of(app).close()
    missing = {**good, "health_s3_uris": "s3://no-such-bucket-h3/x"}
    app = create_app(Settings(**missing), options=BackendOptions(warm_up=False))
    response = app.test_client().get("/health/deep")
    assert response.status_code == 503 and response.json["failed"] == ["s3:no-such-bucket-h3/x"]
    assert "bucket does not exist" in response.json["components"]["s3:no-such-bucket-h3/x"]["error"]
    backend_of(app).close()
