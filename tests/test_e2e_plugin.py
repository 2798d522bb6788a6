"""End to end against a real Label Studio (tests/fixtures/label_studio.py): project bootstrap and the
interactive-annotation protocol.

The seemly ML backend is stood in for by :class:`StubBackend`, a tiny HTTP server on 127.0.0.1 that
answers like a Label Studio ML backend must (``/health``, ``/setup``, ``/predict``, ``/webhook``)
and records every request, so the tests can assert what Label Studio really sends. The S3 source and
target are a moto server on 127.0.0.1.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from PIL import Image

from plugin.connect import WEBHOOK_ACTIONS, ConnectError, ConnectResult, connect_project
from plugin.labeling_config import parse_labeling_config
from plugin.templates import TEMPLATE_NAMES, render_config
from seemly.config import Settings
from tests.fixtures.label_studio import LabelStudioServer, free_port

pytestmark = pytest.mark.e2e

MODEL_VERSION = "stub-0.1"


# --- a stand-in ML backend ------------------------------------------------------------------------


class StubBackend:
    """Answers Label Studio's ML-backend calls and keeps ``(method, path, json)`` of each request."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, Any]] = []
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _body(self) -> Any:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    return json.loads(raw) if raw else None
                except ValueError:
                    return raw.decode("utf-8", "replace")

            def _answer(self, status: int, payload: Any) -> None:
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                with stub.lock:
                    stub.requests.append(("GET", self.path, None))
                if self.path.split("?")[0] in ("/", "/health"):
                    self._answer(200, {"status": "UP", "model_class": "StubBackend"})
                elif self.path.startswith("/versions"):
                    self._answer(200, {"versions": [MODEL_VERSION]})
                else:
                    self._answer(404, {"error": "not found"})

            def do_POST(self) -> None:
                body = self._body()
                with stub.lock:
                    stub.requests.append(("POST", self.path, body))
                path = self.path.split("?")[0]
                if path == "/setup":
                    self._answer(200, {"model_version": MODEL_VERSION})
                elif path == "/predict":
                    self._answer(200, stub.predict(body))
                elif path == "/webhook":
                    self._answer(201, {"status": "ok"})
                else:
                    self._answer(404, {"error": "not found"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def predict(self, body: Any) -> dict[str, Any]:
        """A fixed answer in the shape Label Studio expects: one polygon for the first context label."""
        context = ((body or {}).get("params") or {}).get("context") or {}
        label = "object"
        for item in context.get("result") or []:
            value = item.get("value", {})
            kind = item.get("type", "")
            if kind.endswith("labels") and value.get(kind):
                label = value[kind][0]
                break
        result = {
            "from_name": "polygon",
            "to_name": "image",
            "type": "polygonlabels",
            "original_width": 64,
            "original_height": 48,
            "image_rotation": 0,
            "value": {"points": [[10, 10], [60, 10], [60, 60], [10, 60]], "polygonlabels": [label]},
            "score": 0.9,
        }
        return {"results": [{"result": [result], "score": 0.9, "model_version": MODEL_VERSION}]}

    def calls(self, method: str, path: str) -> list[Any]:
        with self.lock:
            return [body for m, p, body in self.requests if m == method and p.split("?")[0] == path]

    def wait_for(self, method: str, path: str, count: int = 1, timeout: float = 20.0) -> list[Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.calls(method, path)
            if len(found) >= count:
                return found
            time.sleep(0.1)
        raise AssertionError(f"{method} {path}: {len(self.calls(method, path))} calls, expected {count}")

    def __enter__(self) -> StubBackend:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def backend() -> Iterator[StubBackend]:
    with StubBackend() as stub:
        yield stub


# --- a loopback S3 ------------------------------------------------------------------------------


def png_bytes(color: tuple[int, int, int], size: tuple[int, int] = (64, 48)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def s3_settings() -> Iterator[Settings]:
    """A moto S3 server on 127.0.0.1 with bucket ``seemly-e2e`` (two PNGs under ``images/``)."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        s3 = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id="e2e-key",
            aws_secret_access_key="e2e-secret",
        )
        s3.create_bucket(Bucket="seemly-e2e")
        s3.put_object(Bucket="seemly-e2e", Key="images/a.png", Body=png_bytes((200, 30, 30)))
        s3.put_object(Bucket="seemly-e2e", Key="images/b.png", Body=png_bytes((30, 200, 30)))
        s3.put_object(Bucket="seemly-e2e", Key="images/notes.txt", Body=b"not an image")
        yield Settings(
            s3_endpoint_url=endpoint,
            s3_region="us-east-1",
            s3_access_key_id="e2e-key",
            s3_secret_access_key="e2e-secret",
        )
    finally:
        server.stop()


# --- helpers ------------------------------------------------------------------------------------


def _results(ls: LabelStudioServer, path: str, **params: Any) -> list[dict[str, Any]]:
    response = ls.session.get(ls.api(path), params=params, timeout=30)
    assert response.status_code == 200, response.text
    data = response.json()
    return data["results"] if isinstance(data, dict) and "results" in data else data


def _tasks(ls: LabelStudioServer, project_id: int) -> list[dict[str, Any]]:
    response = ls.session.get(ls.api("/tasks"), params={"project": project_id, "page_size": 1000}, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()["tasks"]


def _stored_uri(url: str) -> str:
    """``/tasks/7/resolve/?fileuri=czM6Ly9i...`` -> ``s3://b...`` (other URLs unchanged)."""
    query = parse_qs(urlsplit(url).query)
    if "fileuri" not in query:
        return url
    return base64.b64decode(query["fileuri"][0]).decode()


def _connect(ls: LabelStudioServer, **kwargs: Any) -> ConnectResult:
    return connect_project(ls.client(), **kwargs)


# --- tests --------------------------------------------------------------------------------------


@pytest.mark.parametrize("template", TEMPLATE_NAMES)
def test_templates_pass_label_studio_validation(label_studio: LabelStudioServer, template: str) -> None:
    xml = render_config(template, ["cat", 'dog & "friends" <3'])
    response = label_studio.session.post(
        label_studio.api("/projects/validate"), json={"label_config": xml}, timeout=30
    )
    assert response.status_code in (200, 204), response.text


def test_connect_is_idempotent(
    label_studio: LabelStudioServer, backend: StubBackend, s3_settings: Settings
) -> None:
    title = "e2e idempotent"
    kwargs = dict(
        title=title,
        template="polygon",
        labels=["cat", "dog"],
        backend_url=backend.url,
        s3_source="s3://seemly-e2e/images",
        s3_target="s3://seemly-e2e/exports/",
        settings=s3_settings,
    )
    first = _connect(label_studio, **kwargs)
    actions = {s.step: s.action for s in first.steps if s.action != "synced"}
    assert actions == {
        "project": "created",
        "labeling config": "unchanged",
        "ML backend": "created",
        "webhook": "updated",  # Label Studio adds <backend>/webhook for all actions; connect narrows it
        "S3 source": "created",
        "S3 target": "created",
    }, first.report()
    assert first.changed

    # The config Label Studio stored is ours, verbatim, and passes its own validation again.
    project = label_studio.session.get(label_studio.api(f"/projects/{first.project_id}"), timeout=30).json()
    assert project["label_config"].strip() == render_config("polygon", ["cat", "dog"]).strip()
    check = label_studio.session.post(
        label_studio.api(f"/projects/{first.project_id}/validate"),
        json={"label_config": project["label_config"]},
        timeout=30,
    )
    assert check.status_code == 200, check.text
    assert parse_labeling_config(project["label_config"]).labels == ("cat", "dog")

    # Label Studio asked the backend for /health and /setup before accepting it.
    assert backend.calls("GET", "/health")
    setup = backend.calls("POST", "/setup")[0]
    assert setup["project"].startswith(f"{first.project_id}.")
    assert setup["schema"].strip() == project["label_config"].strip()
    assert {"hostname", "access_token", "extra_params"} <= set(setup)

    # The S3 source synced the two PNGs (not the .txt) as tasks. The task API shows them through
    # Label Studio's resolver: /tasks/<id>/resolve/?fileuri=<base64 of the s3:// URI>.
    tasks = _tasks(label_studio, first.project_id)
    uris = sorted(_stored_uri(t["data"]["image"]) for t in tasks)
    assert uris == ["s3://seemly-e2e/images/a.png", "s3://seemly-e2e/images/b.png"]

    # /predict gets the task's stored URI (s3://...), not the resolver URL the task API shows.
    s3_task = min(tasks, key=lambda t: t["id"])
    answer = label_studio.session.post(
        label_studio.api(f"/ml/{first.ml_backend_id}/interactive-annotating"),
        json={"task": s3_task["id"], "context": {"result": []}},
        timeout=60,
    )
    assert answer.status_code == 200 and "data" in answer.json(), answer.text
    sent = backend.calls("POST", "/predict")[-1]["tasks"][0]
    assert sent["data"]["image"] == _stored_uri(s3_task["data"]["image"])
    assert sent["data"]["image"].startswith("s3://seemly-e2e/images/")

    second = _connect(label_studio, **kwargs)
    assert not second.changed, second.report()
    assert (second.project_id, second.ml_backend_id, second.webhook_id) == (
        first.project_id,
        first.ml_backend_id,
        first.webhook_id,
    )
    assert (second.import_storage_id, second.export_storage_id) == (
        first.import_storage_id,
        first.export_storage_id,
    )

    # One of each, after two runs.
    projects = [p for p in _results(label_studio, "/projects", title=title) if p["title"] == title]
    assert len(projects) == 1
    backends = _results(label_studio, "/ml", project=first.project_id)
    assert [(b["url"], b["is_interactive"]) for b in backends] == [(backend.url, True)]
    hooks = [
        h
        for h in _results(label_studio, "/webhooks", project=first.project_id)
        if h["project"] == first.project_id
    ]
    assert len(hooks) == 1
    assert hooks[0]["url"] == f"{backend.url}/webhook"
    assert sorted(hooks[0]["actions"]) == sorted(WEBHOOK_ACTIONS)
    assert hooks[0]["send_for_all_actions"] is False and hooks[0]["send_payload"] is True
    assert len(_results(label_studio, "/storages/s3", project=first.project_id)) == 1
    assert len(_results(label_studio, "/storages/export/s3", project=first.project_id)) == 1
    assert len(_tasks(label_studio, first.project_id)) == 2  # the re-sync imported nothing twice

    # Nothing secret in what connect prints.
    text = first.report() + second.report()
    for secret in ("e2e-secret", "e2e-key", label_studio.token):
        assert secret not in text


def test_connect_keeps_labels_of_existing_project(label_studio: LabelStudioServer) -> None:
    title = "e2e keep labels"
    first = _connect(label_studio, title=title, labels=["tumour", "vessel"])
    assert first.labels == ["tumour", "vessel"]
    again = _connect(label_studio, title=title)  # no labels given: keep the project's
    assert again.labels == ["tumour", "vessel"] and not again.changed
    switched = _connect(label_studio, title=title, template="polygon")
    assert [s.action for s in switched.steps if s.step == "labeling config"] == ["updated"]
    assert parse_labeling_config(switched.label_config).polygon is not None


def test_interactive_annotation_round_trip(label_studio: LabelStudioServer, backend: StubBackend) -> None:
    """Upload two images, then replay what the Label Studio frontend sends for smart prompts."""
    result = _connect(
        label_studio, title="e2e interactive", template="polygon", labels=["cat"], backend_url=backend.url
    )
    project_id, ml_id = result.project_id, result.ml_backend_id

    files = {
        f"file{i}": (f"img{i}.png", png_bytes(color), "image/png")
        for i, color in enumerate([(250, 0, 0), (0, 0, 250)])
    }
    upload = label_studio.session.post(
        label_studio.api(f"/projects/{project_id}/import"), files=files, timeout=60
    )
    assert upload.status_code == 201, upload.text
    assert upload.json()["task_count"] == 2
    tasks = _tasks(label_studio, project_id)
    assert len(tasks) == 2 and all(t["data"]["image"].startswith("/data/upload/") for t in tasks)
    task = tasks[0]

    # Exactly the body the frontend posts (web/apps/labelstudio/src/pages/DataManager/DataManager.jsx):
    # {task, context: {result: [serialized smart regions of one label + type]}}.
    context = {
        "result": [
            {
                "original_width": 64,
                "original_height": 48,
                "image_rotation": 0,
                "value": {"x": 25.0, "y": 50.0, "width": 0.8, "keypointlabels": ["cat"], "labels": ["cat"]},
                "is_positive": True,
                "id": "kp_pos_1",
                "from_name": "point",
                "to_name": "image",
                "type": "keypointlabels",
                "origin": "manual",
            },
            {
                "original_width": 64,
                "original_height": 48,
                "image_rotation": 0,
                "value": {"x": 75.0, "y": 50.0, "width": 0.8, "keypointlabels": ["cat"], "labels": ["cat"]},
                "is_positive": False,
                "id": "kp_neg_1",
                "from_name": "point",
                "to_name": "image",
                "type": "keypointlabels",
                "origin": "manual",
            },
        ]
    }
    response = label_studio.session.post(
        label_studio.api(f"/ml/{ml_id}/interactive-annotating"),
        json={"task": task["id"], "context": context},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    answer = response.json()
    assert "errors" not in answer, answer
    assert answer["data"]["result"][0]["value"]["polygonlabels"] == ["cat"]  # what the frontend shows

    predict = backend.wait_for("POST", "/predict")[-1]
    assert predict["params"]["context"] == context  # forwarded untouched
    assert predict["label_config"].strip() == result.label_config.strip()
    assert predict["project"].startswith(f"{project_id}.")
    (sent,) = predict["tasks"]
    assert sent["id"] == task["id"] and sent["data"] == task["data"]
    assert {"annotations", "predictions", "drafts"} <= set(sent)
    cfg = parse_labeling_config(predict["label_config"])
    assert [cfg.point_is_positive(r) for r in context["result"]] == [True, False]

    # A text prompt (TextArea) and a box are separate requests with their own context.
    for item in (
        {
            "value": {"text": ["the red cat"]},
            "id": "txt1",
            "from_name": "prompt",
            "to_name": "image",
            "type": "textarea",
            "origin": "manual",
        },
        {
            "original_width": 64,
            "original_height": 48,
            "image_rotation": 0,
            "value": {
                "x": 10.0,
                "y": 10.0,
                "width": 50.0,
                "height": 60.0,
                "rotation": 0,
                "rectanglelabels": ["cat"],
            },
            "id": "box1",
            "from_name": "box",
            "to_name": "image",
            "type": "rectanglelabels",
            "origin": "manual",
        },
    ):
        r = label_studio.session.post(
            label_studio.api(f"/ml/{ml_id}/interactive-annotating"),
            json={"task": task["id"], "context": {"result": [item]}},
            timeout=60,
        )
        assert r.status_code == 200 and "data" in r.json(), r.text
        assert backend.calls("POST", "/predict")[-1]["params"]["context"] == {"result": [item]}

    # Corrections reach the backend as webhooks; "Start training" as START_TRAINING on /webhook.
    polygon = answer["data"]["result"][0]
    created = label_studio.session.post(
        label_studio.api(f"/tasks/{task['id']}/annotations"), json={"result": [polygon]}, timeout=60
    )
    assert created.status_code == 201, created.text
    events = [b["action"] for b in backend.wait_for("POST", "/webhook")]
    assert "ANNOTATION_CREATED" in events
    train = label_studio.session.post(label_studio.api(f"/ml/{ml_id}/train"), json={}, timeout=60)
    assert train.status_code == 200, train.text
    deadline = time.monotonic() + 20
    while "START_TRAINING" not in [b["action"] for b in backend.calls("POST", "/webhook")]:
        assert time.monotonic() < deadline, backend.calls("POST", "/webhook")
        time.sleep(0.1)


def test_interactive_annotation_reports_backend_errors(
    label_studio: LabelStudioServer, backend: StubBackend
) -> None:
    """Label Studio answers 200 with {"errors": [...]} when the backend fails or is not interactive."""
    result = _connect(label_studio, title="e2e errors", labels=["cat"], backend_url=backend.url)
    files = {"file0": ("x.png", png_bytes((1, 2, 3)), "image/png")}
    label_studio.session.post(
        label_studio.api(f"/projects/{result.project_id}/import"), files=files, timeout=60
    )
    task_id = _tasks(label_studio, result.project_id)[0]["id"]
    # A PATCH must repeat url and project: Label Studio re-runs /health and /setup with the submitted
    # fields only (without url: KeyError; without project: HTTP 500 "setup_() missing ... 'project'").
    off = label_studio.session.patch(
        label_studio.api(f"/ml/{result.ml_backend_id}"),
        json={"url": backend.url, "project": result.project_id, "is_interactive": False},
        timeout=30,
    )
    assert off.status_code == 200, off.text
    r = label_studio.session.post(
        label_studio.api(f"/ml/{result.ml_backend_id}/interactive-annotating"),
        json={"task": task_id, "context": {"result": []}},
        timeout=60,
    )
    assert r.status_code == 200
    assert r.json() == {"errors": ["Model is not set to be used for interactive preannotations"]}
    # connect repairs it (is_interactive back on).
    again = _connect(label_studio, title="e2e errors", labels=["cat"], backend_url=backend.url)
    assert [s.action for s in again.steps if s.step == "ML backend"] == ["updated"]
    assert label_studio.session.get(label_studio.api(f"/ml/{result.ml_backend_id}"), timeout=30).json()[
        "is_interactive"
    ]


def test_unreachable_backend_is_refused_with_a_clear_error(label_studio: LabelStudioServer) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ConnectError, match=r"connect the ML backend at http://127\.0\.0\.1:\d+ .*HTTP 400"):
        _connect(label_studio, title="e2e dead backend", backend_url=dead)
    project = _results(label_studio, "/projects", title="e2e dead backend")
    assert len(project) == 1  # the project and its config stay; a rerun with a live backend finishes the job
    assert _results(label_studio, "/ml", project=project[0]["id"]) == []


def test_cli_connect_prints_steps_without_secrets(
    label_studio: LabelStudioServer,
    backend: StubBackend,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from plugin import connect as connect_module
    from seemly import cli

    settings = Settings(label_studio_url=label_studio.url, label_studio_api_key=label_studio.token)
    monkeypatch.setattr(connect_module, "get_settings", lambda: settings)
    argv = ["ls", "connect", "--project", "e2e cli", "--labels", "cat, dog", "--backend-url", backend.url]
    assert cli.main(argv) == 0
    first = capsys.readouterr().out
    assert 'project "e2e cli"' in first and "ML backend" in first and "created" in first
    assert cli.main(argv) == 0
    second = capsys.readouterr().out
    assert "created" not in second and "updated" not in second
    assert label_studio.token not in first + second
