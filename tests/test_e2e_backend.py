"""End to end: the real seemly backend (gunicorn subprocess) behind a real Label Studio 1.23.2.

The project is created from the plugin's brush template with :func:`plugin.connect.connect_project`
(which connects the ML backend with ``is_interactive`` and adds the webhook). Images with known
ground truth are uploaded to Label Studio, so the backend must fetch ``/data/upload/...`` with the
token Label Studio handed it in ``/setup``. Then, all through Label Studio's API:

* interactive rounds via ``POST /api/ml/{id}/interactive-annotating`` with the frontend's JSON
  (``{"task": id, "context": {"result": [<the region just drawn>]}}``): a positive click, a negative
  click, a smart rectangle, a text prompt (refused by the classic engine, as it must), then a click
  that takes its label from the text; masks are checked against the ground truth (IoU);
* batch predictions via the Data Manager action ``retrieve_tasks_predictions``: one image already
  has bucket-job masks in Postgres (returned as they are), the other is segmented;
* a submitted annotation reaches ``/webhook`` and becomes a correction row with its IoU;
* pressing Train (``POST /api/ml/{id}/train``) records a training request.

Per-round latency as seen through Label Studio is printed; with ``SEEMLY_E2E_WRITE_BENCHMARKS=1``
it is also written to ``docs/benchmarks.md`` ("## Interactive latency through Label Studio (e2e)").
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy import Engine, select

from plugin.connect import connect_project
from seemly.config import Settings
from seemly.db.bulk import mask_row, upsert_images, write_masks
from seemly.db.models import Correction, MaskSource, ModelVersion, Project, PromptRound, TrainingRequest
from seemly.masks import Mask
from tests.backend_support import LABELS, Scene, brush_mask, make_scene
from tests.fixtures.label_studio import LabelStudioServer, free_port

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "docs" / "benchmarks.md"
SECTION = "## Interactive latency through Label Studio (e2e)"
WIDTH, HEIGHT = 640, 480


# --- the backend as a subprocess ------------------------------------------------------------------------------


@dataclass
class RunningBackend:
    url: str
    log_path: Path
    proc: subprocess.Popen[bytes]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def seemly_backend(postgres_db: Engine, postgres_url: str, tmp_path: Path) -> Iterator[RunningBackend]:
    port = free_port()
    log_path = tmp_path / "seemly-backend.log"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("SEEMLY_")},
        "SEEMLY_DATABASE_URL": postgres_url,
        "PYTHONUNBUFFERED": "1",
    }
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "seemly.cli", "-v", "backend", "--host", "127.0.0.1", "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    backend = RunningBackend(f"http://127.0.0.1:{port}", log_path, proc)
    deadline = time.monotonic() + 90
    while True:
        try:
            if requests.get(f"{backend.url}/health", timeout=1).status_code == 200:
                break
        except requests.RequestException:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"the seemly backend did not start:\n{backend.log()[-4000:]}", pytrace=False)
        time.sleep(0.3)
    try:
        yield backend
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


# --- Label Studio helpers --------------------------------------------------------------------------------------


def _json(response: requests.Response) -> Any:
    assert response.status_code < 400, (
        f"{response.request.method} {response.url}: {response.status_code} {response.text[:800]}"
    )
    return response.json()


def _tasks(ls: LabelStudioServer, project_id: int) -> list[dict[str, Any]]:
    data = _json(ls.session.get(ls.api("/tasks"), params={"project": project_id, "page_size": 100}))
    return data["tasks"] if isinstance(data, dict) else data


def _wait_for(what: str, check: Callable[[], Any], timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}", pytrace=False)
        time.sleep(0.3)


@dataclass
class Round:
    name: str
    task: int
    first_on_image: bool
    through_ls_ms: float
    outcome: str  # "mask" | "error"
    backend_ms: float | None = None  # prompt_rounds.latency_ms: the segmenter call (embed included if first)
    request_ms: float | None = None  # the backend's whole /predict, from its log


@dataclass
class Rounds:
    rows: list[Round] = field(default_factory=list)

    def interact(
        self, ls: LabelStudioServer, backend_id: int, task_id: int, results: list[dict[str, Any]], name: str
    ) -> dict[str, Any]:
        first = all(r.task != task_id for r in self.rows)
        started = time.perf_counter()
        answer = _json(
            ls.session.post(
                ls.api(f"/ml/{backend_id}/interactive-annotating"),
                json={"task": task_id, "context": {"result": results}},
                timeout=120,
            )
        )
        elapsed = (time.perf_counter() - started) * 1000.0
        self.rows.append(Round(name, task_id, first, elapsed, "error" if answer.get("errors") else "mask"))
        return answer

    def attach_backend_times(self, latencies: list[float]) -> None:
        """``prompt_rounds.latency_ms`` in write order belong to the rounds that produced a mask."""
        masks = [r for r in self.rows if r.outcome == "mask"]
        assert len(latencies) == len(masks), (latencies, masks)
        for row, ms in zip(masks, latencies, strict=True):
            row.backend_ms = ms

    def attach_request_times(self, backend_log: str) -> None:
        """The backend logs every request's duration (``-v``); the first /predict calls are the rounds."""
        times = [float(m) for m in re.findall(r"POST /predict -> \d+ in ([\d.]+) ms", backend_log)]
        assert len(times) >= len(self.rows), times
        for row, ms in zip(self.rows, times, strict=False):
            row.request_ms = ms


def frontend_keypoint(
    scene: Scene, name: str, *, positive: bool = True, label: str | None = None, region_id: str | None = None
) -> dict[str, Any]:
    """A smart key point as Label Studio's frontend serialises it (``annotation.serializeAnnotation()``)."""
    x, y = scene.pct(name) if name in scene.centers else (2.0, 3.0)
    return {
        "original_width": scene.width,
        "original_height": scene.height,
        "image_rotation": 0,
        "value": {"x": x, "y": y, "width": 0.5, "keypointlabels": [label or name]},
        "id": region_id or hashlib.sha1(f"{name}{positive}{time.monotonic_ns()}".encode()).hexdigest()[:10],
        "from_name": "point" if positive else "point_negative",
        "to_name": "image",
        "type": "keypointlabels",
        "origin": "manual",
        "is_positive": positive,
    }


def frontend_rectangle(scene: Scene, name: str, label: str, margin: float = 4.0) -> dict[str, Any]:
    box = scene.truth[name].bbox
    assert box is not None
    x, y, w, h = box
    return {
        "original_width": scene.width,
        "original_height": scene.height,
        "image_rotation": 0,
        "value": {
            "x": max(x - margin, 0) * 100.0 / scene.width,
            "y": max(y - margin, 0) * 100.0 / scene.height,
            "width": min(w + 2 * margin, scene.width - max(x - margin, 0)) * 100.0 / scene.width,
            "height": min(h + 2 * margin, scene.height - max(y - margin, 0)) * 100.0 / scene.height,
            "rotation": 0,
            "rectanglelabels": [label],
        },
        "id": "rect" + hashlib.sha1(name.encode()).hexdigest()[:6],
        "from_name": "box",
        "to_name": "image",
        "type": "rectanglelabels",
        "origin": "manual",
    }


def frontend_text(text: str) -> dict[str, Any]:
    return {
        "value": {"text": [text]},
        "id": "prompt1",
        "from_name": "prompt",
        "to_name": "image",
        "type": "textarea",
        "origin": "manual",
    }


def _brush(answer: dict[str, Any]) -> dict[str, Any]:
    assert not answer.get("errors"), answer
    data = answer["data"]
    assert data["model_version"] == "classic-1" and isinstance(data["score"], float)
    brushes = [r for r in data["result"] if r["type"] == "brushlabels"]
    assert len(brushes) == 1, data["result"]
    return brushes[0]


def _store_bucket_masks(db: Engine, ls_project_id: int, scene: Scene) -> None:
    """What a bucket pre-segmentation job leaves behind for an image (masks by sha256 + model version)."""
    with db.begin() as conn:
        project_id = conn.execute(
            select(Project.id).where(Project.ls_project_id == ls_project_id)
        ).scalar_one()
        version_id = conn.execute(
            select(ModelVersion.id).where(ModelVersion.name == "classic-1", ModelVersion.project_id.is_(None))
        ).scalar()
        if version_id is None:
            conn.execute(ModelVersion.__table__.insert().values(name="classic-1", engine="classic"))
            version_id = conn.execute(
                select(ModelVersion.id).where(ModelVersion.name == "classic-1")
            ).scalar_one()
        sha = hashlib.sha256(scene.png).hexdigest()
        image_id = upsert_images(
            conn,
            [{"sha256": sha, "width": scene.width, "height": scene.height, "size_bytes": len(scene.png)}],
        )[sha]
        write_masks(
            conn,
            [
                mask_row(
                    scene.truth[name],
                    project_id=project_id,
                    image_id=image_id,
                    source=MaskSource.BUCKET,
                    model_version_id=version_id,
                    label=name,
                    score=0.9,
                )
                for name in ("cat", "dog")
            ],
        )


def _write_benchmarks(rounds: Rounds) -> str:
    lines = [
        SECTION,
        "",
        "Measured by `tests/test_e2e_backend.py` (`SEEMLY_E2E_WRITE_BENCHMARKS=1 make e2e`): Label Studio "
        "1.23.2 and `seemly backend` (gunicorn, 1 worker x 8 threads, `classic` engine on CPU) on the same "
        f"machine ({platform.machine()}, {os.cpu_count()} CPUs shared with the rest of the test run), "
        f"{WIDTH}x{HEIGHT} PNGs uploaded to Label Studio. *Through Label Studio* is one "
        "`POST /api/ml/{id}/interactive-annotating` with the frontend's JSON, from request to answer: "
        "Label Studio's own work, the HTTP hop to the backend, and everything the backend does. *Backend "
        "request* is the backend's whole `/predict` (from its log), *backend segment* the segmenter call "
        "alone (`prompt_rounds.latency_ms`), which on the first round of an image includes `embed`; that "
        "first round also downloads the image from Label Studio.",
        "",
        "| # | prompt | first round on the image | through Label Studio (ms) | backend request (ms) "
        "| backend segment (ms) | answer |",
        "|---:|---|---|---:|---:|---:|---|",
    ]
    for index, row in enumerate(rounds.rows, start=1):
        backend = f"{row.backend_ms:.0f}" if row.backend_ms is not None else "-"
        request = f"{row.request_ms:.0f}" if row.request_ms is not None else "-"
        first = "yes" if row.first_on_image else "no"
        lines.append(
            f"| {index} | {row.name} | {first} | {row.through_ls_ms:.0f} | {request} | {backend} | {row.outcome} |"
        )
    cached = [r.through_ls_ms for r in rounds.rows if not r.first_on_image and r.outcome == "mask"]
    firsts = [r.through_ls_ms for r in rounds.rows if r.first_on_image and r.outcome == "mask"]
    lines += [
        "",
        f"Image already cached (the annotator's 2nd and later rounds): median {statistics.median(cached):.0f} ms, "
        f"max {max(cached):.0f} ms through Label Studio over {len(cached)} rounds. First round on an image "
        f"(download + embed + segment): {', '.join(f'{v:.0f}' for v in firsts)} ms. The refused text-only round "
        "shows the cost of Label Studio plus a 422 from the backend.",
    ]
    text = "\n".join(lines) + "\n"
    if os.environ.get("SEEMLY_E2E_WRITE_BENCHMARKS") == "1":
        current = BENCHMARKS.read_text() if BENCHMARKS.exists() else "# Benchmarks\n"
        if SECTION in current:
            head, rest = current.split(SECTION, 1)
            tail = rest[rest.find("\n## ") + 1 :] if "\n## " in rest else ""
            updated = head + text + ("\n" + tail if tail else "")
        else:
            updated = current.rstrip("\n") + "\n\n" + text
        BENCHMARKS.parent.mkdir(exist_ok=True)
        BENCHMARKS.write_text(updated)
    return text


# --- the test ----------------------------------------------------------------------------------------------------


def test_backend_through_label_studio(
    label_studio: LabelStudioServer, seemly_backend: RunningBackend, postgres_db: Engine
) -> None:
    ls = label_studio
    client = ls.client()
    settings = Settings(backend_basic_auth_user=None, backend_basic_auth_password=None)
    title = f"seemly backend e2e {time.time_ns()}"
    connected = connect_project(
        client, title=title, labels=LABELS, backend_url=seemly_backend.url, settings=settings
    )
    project_id, backend_id = connected.project_id, connected.ml_backend_id
    assert backend_id is not None
    backend_info = _json(ls.session.get(ls.api(f"/ml/{backend_id}")))
    assert backend_info["is_interactive"] is True and backend_info["readable_state"] == "Connected", (
        backend_info
    )

    # /setup stored the project, Label Studio's URL and config in Postgres
    with postgres_db.connect() as conn:
        settings_row = conn.execute(
            select(Project.settings).where(Project.ls_project_id == project_id)
        ).scalar_one()
    assert (
        settings_row["label_studio_url"].startswith("http://")
        and "BrushLabels" in settings_row["label_config"]
    )

    # upload two images with known ground truth
    scenes = {
        "one.png": make_scene(41, WIDTH, HEIGHT, layout="left"),
        "two.png": make_scene(42, WIDTH, HEIGHT, layout="right"),
    }
    # one file per form field: Label Studio imports only the last file of a repeated field name
    files = [(f"file{i}", (name, scene.png, "image/png")) for i, (name, scene) in enumerate(scenes.items())]
    _json(ls.session.post(ls.api(f"/projects/{project_id}/import"), files=files, timeout=60))
    tasks = sorted(_tasks(ls, project_id), key=lambda t: t["id"])
    assert len(tasks) == 2 and all(t["data"]["image"].startswith("/data/upload/") for t in tasks)
    by_name = {next(n for n in scenes if t["data"]["image"].endswith(n)): t for t in tasks}
    task1, task2 = by_name["one.png"], by_name["two.png"]
    scene = scenes["one.png"]

    # --- interactive rounds through Label Studio ----------------------------------------------------------
    rounds = Rounds()
    click = frontend_keypoint(scene, "cat", region_id="Pos1cat")
    a1 = rounds.interact(ls, backend_id, task1["id"], [click], "positive click (cat)")
    b1 = _brush(a1)
    assert b1["value"]["brushlabels"] == ["cat"]
    iou1 = brush_mask(b1).iou(scene.truth["cat"])
    assert iou1 > 0.9, iou1

    # the frontend sends the whole group: every smart key point labelled "cat", old and new
    negative = frontend_keypoint(scene, "background", positive=False, label="cat", region_id="Neg1cat")
    a2 = rounds.interact(ls, backend_id, task1["id"], [click, negative], "negative click")
    assert brush_mask(_brush(a2)).iou(scene.truth["cat"]) > 0.9

    x, y = scene.pct("cat")
    third = {**frontend_keypoint(scene, "cat", region_id="Pos2cat")}
    third["value"] = {**third["value"], "x": x + 3.0, "y": y - 2.0}
    a2b = rounds.interact(ls, backend_id, task1["id"], [click, negative, third], "another positive click")
    cat_final = brush_mask(_brush(a2b))
    assert cat_final.iou(scene.truth["cat"]) > 0.9

    a3 = rounds.interact(
        ls, backend_id, task1["id"], [frontend_rectangle(scene, "dog", "dog")], "smart rectangle (dog)"
    )
    b3 = _brush(a3)
    assert b3["value"]["brushlabels"] == ["dog"]
    assert brush_mask(b3).iou(scene.truth["dog"]) > 0.9

    a4 = rounds.interact(ls, backend_id, task1["id"], [frontend_text("dogs")], "text prompt alone")
    assert a4.get("errors") and "422" in a4["errors"][0], a4  # classic engine: a visual prompt is needed

    a5 = rounds.interact(
        ls,
        backend_id,
        task2["id"],
        [frontend_keypoint(scenes["two.png"], "dog", label="cat")],
        "click + active text",
    )
    b5 = _brush(a5)
    assert b5["value"]["brushlabels"] == ["dog"]  # the text prompt "dogs" named the label
    assert brush_mask(b5).iou(scenes["two.png"].truth["dog"]) > 0.9
    scene2 = scenes["two.png"]
    dog_negative = frontend_keypoint(scene2, "background", positive=False, label="cat", region_id="Neg2")
    a6 = rounds.interact(ls, backend_id, task2["id"], [dog_negative], "negative click (image two)")
    assert brush_mask(_brush(a6)).iou(scene2.truth["dog"]) > 0.9

    # --- batch predictions: bucket masks for image two, segmentation for image one -----------------------
    _store_bucket_masks(postgres_db, project_id, scenes["two.png"])
    action = ls.session.post(
        ls.api("/dm/actions"),
        params={"id": "retrieve_tasks_predictions", "project": project_id},
        json={"selectedItems": {"all": True, "excluded": []}},
        timeout=300,
    )
    _json(action)

    def predictions(task_id: int) -> list[dict[str, Any]]:
        return _json(ls.session.get(ls.api("/predictions"), params={"task": task_id}))

    preds2 = _wait_for("predictions of task two", lambda: predictions(task2["id"]))
    assert preds2[0]["model_version"] == "classic-1" and preds2[0]["score"] == pytest.approx(0.9)
    stored = {r["value"]["brushlabels"][0]: brush_mask(r) for r in preds2[0]["result"]}
    assert stored["cat"] == scenes["two.png"].truth["cat"] and stored["dog"] == scenes["two.png"].truth["dog"]
    preds1 = _wait_for("predictions of task one", lambda: predictions(task1["id"]))
    assert isinstance(preds1[0]["score"], float)
    assert preds1[0]["result"], "segment_everything returned no region for image one"
    best = max(brush_mask(r).iou(scene.truth["cat"]) for r in preds1[0]["result"])
    assert best > 0.8, best

    # --- a submitted annotation becomes a correction (webhook) --------------------------------------------
    submitted = {
        "id": "subm1",
        "from_name": "mask",
        "to_name": "image",
        "type": "brushlabels",
        "original_width": scene.width,
        "original_height": scene.height,
        "image_rotation": 0,
        "value": {"format": "rle", "rle": scene.truth["cat"].to_ls_brush_rle(), "brushlabels": ["cat"]},
    }
    annotation = _json(
        ls.session.post(
            ls.api(f"/tasks/{task1['id']}/annotations"),
            json={"result": [submitted], "was_cancelled": False, "ground_truth": False, "lead_time": 3.0},
            timeout=60,
        )
    )

    def correction() -> Any:
        with postgres_db.connect() as conn:
            return conn.execute(
                select(Correction.__table__).where(Correction.ls_annotation_id == annotation["id"])
            ).first()

    row = _wait_for("the correction row", correction, timeout=60)
    assert row.ls_task_id == task1["id"] and row.ls_region_id == "subm1" and row.label == "cat"
    assert Mask.from_coco_rle(row.submitted_rle) == scene.truth["cat"]
    assert row.iou == pytest.approx(cat_final.iou(scene.truth["cat"]), abs=1e-6)

    # --- Train --------------------------------------------------------------------------------------------
    train = ls.session.post(ls.api(f"/ml/{backend_id}/train"), json={}, timeout=60)
    assert train.status_code == 200, train.text

    def training() -> Any:
        with postgres_db.connect() as conn:
            return conn.execute(
                select(TrainingRequest.reason)
                .join(Project, Project.id == TrainingRequest.project_id)
                .where(Project.ls_project_id == project_id)
            ).first()

    assert _wait_for("the training request", training, timeout=60).reason.value == "button"

    # --- latency, and no secret in the backend's log ------------------------------------------------------
    def latencies() -> list[float]:
        with postgres_db.connect() as conn:
            values = conn.execute(select(PromptRound.latency_ms).order_by(PromptRound.id)).scalars()
            return [float(v) for v in values]

    masks = sum(r.outcome == "mask" for r in rounds.rows)
    rounds.attach_backend_times(
        _wait_for("every round in prompt_rounds", lambda: len(latencies()) == masks and latencies())
    )
    rounds.attach_request_times(seemly_backend.log())
    print("\n" + _write_benchmarks(rounds))
    log_text = seemly_backend.log()
    assert "POST /predict" in log_text
    assert ls.token not in log_text
