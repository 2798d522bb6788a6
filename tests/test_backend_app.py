"""The ML backend's Flask app through its test client, on a real Postgres database.

Every endpoint, every bad input of the issue, and the interactive protocol as Label Studio's
frontend drives it (one region per request, the backend keeps the session).
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, func, select, text

from backend.app import BackendOptions
from seemly.db.bulk import mask_row, upsert_images, write_masks
from seemly.db.models import (
    Correction,
    Image,
    MaskSource,
    ModelVersion,
    Project,
    PromptRound,
    PromptSession,
    TrainingRequest,
)
from seemly.db.models import Mask as MaskRow
from seemly.masks import Mask
from tests.backend_support import (
    BRUSH_CONFIG,
    NO_BRUSH_CONFIG,
    POLYGON_CONFIG,
    PROJECT,
    PROJECT_ID,
    BackendUnderTest,
    backend_app_for,
    batch_body,
    brush_mask,
    interactive_body,
    keypoint,
    make_backend,
    make_scene,
    only_brush,
    rectangle,
    save,
    task,
    textarea,
)


@pytest.fixture
def backend_app(postgres_db: Engine, postgres_url: str, tmp_path: Path) -> Iterator[BackendUnderTest]:
    yield from backend_app_for(postgres_db, postgres_url, tmp_path)


TABLES = (Project, Image, PromptSession, PromptRound, MaskRow, Correction, TrainingRequest)


def count(db: Engine, model: Any) -> int:
    with db.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(model)).scalar_one())


def counts(db: Engine) -> dict[str, int]:
    return {m.__tablename__: count(db, m) for m in TABLES}


def setup_body(
    hostname: str | None = None, token: str | None = None, schema: str = BRUSH_CONFIG
) -> dict[str, Any]:
    return {
        "project": PROJECT,
        "schema": schema,
        "hostname": hostname,
        "access_token": token,
        "extra_params": None,
    }


# --- /health and /setup ---------------------------------------------------------------------------------


def test_health_answers_fast_without_a_model(backend_app: BackendUnderTest) -> None:
    started = time.perf_counter()
    response = backend_app.client.get("/health")
    assert time.perf_counter() - started < 0.2
    assert response.status_code == 200
    assert response.json["status"] == "UP" and response.json["model_version"] == "classic-1"
    assert backend_app.client.get("/").json["status"] == "UP"
    assert backend_app.backend.segmenter.stats.misses == 0  # nothing embedded


def test_warm_up_loads_codecs_and_engine_without_touching_the_cache(backend_app: BackendUnderTest) -> None:
    backend_app.backend.warm_up()
    stats = backend_app.backend.segmenter.stats
    assert (stats.hits, stats.misses) == (0, 0) and backend_app.backend.segmenter.cached_bytes == 0
    import sys

    assert "label_studio_sdk.converter.brush" in sys.modules


def test_setup_persists_the_project_and_answers_fast(backend_app: BackendUnderTest) -> None:
    started = time.perf_counter()
    response = backend_app.post("/setup", setup_body("http://127.0.0.1:1", "tok-setup-123456"))
    assert time.perf_counter() - started < 1.0
    assert response.status_code == 200, response.json
    assert response.json == {"model_version": "classic-1"}
    with backend_app.db.connect() as conn:
        row = conn.execute(select(Project.ls_project_id, Project.settings, Project.labels)).one()
    assert row.ls_project_id == PROJECT_ID
    assert row.settings["label_studio_url"] == "http://127.0.0.1:1"
    assert row.settings["label_config"] == BRUSH_CONFIG
    assert row.labels == ["cat", "dog"]
    assert backend_app.backend.storage.label_studio_url == "http://127.0.0.1:1"
    # idempotent: a second /setup updates the same row
    assert backend_app.post("/setup", setup_body("http://127.0.0.1:2", "tok")).status_code == 200
    assert count(backend_app.db, Project) == 1


def test_setup_rejects_a_config_without_a_brush_tag(backend_app: BackendUnderTest) -> None:
    response = backend_app.post("/setup", setup_body(schema=NO_BRUSH_CONFIG))
    assert response.status_code == 422
    assert "<BrushLabels> or <PolygonLabels>" in response.json["error"]
    assert count(backend_app.db, Project) == 0
    response = backend_app.post("/setup", {"project": PROJECT})
    assert response.status_code == 422 and "schema" in response.json["error"]


class FakeLabelStudio:
    """Serves ``/data/upload/...`` only with ``Authorization: Token <token>``, like Label Studio."""

    def __init__(self, token: str, files: dict[str, bytes]) -> None:
        self.seen_auth: list[str | None] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                outer.seen_auth.append(self.headers.get("Authorization"))
                if self.headers.get("Authorization") != f"Token {token}":
                    self.send_response(401)
                    self.end_headers()
                    return
                data = files.get(self.path)
                if data is None:
                    self.send_response(404)
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_ls() -> Iterator[FakeLabelStudio]:
    scene = make_scene(1)
    server = FakeLabelStudio("ls-token-abcdef123456", {"/data/upload/1/scene.png": scene.png})
    server.scene = scene  # type: ignore[attr-defined]
    yield server
    server.close()


def test_label_studio_images_use_the_setup_token_and_survive_a_restart(
    backend_app: BackendUnderTest, fake_ls: FakeLabelStudio, postgres_url: str, tmp_path: Path
) -> None:
    scene = fake_ls.scene  # type: ignore[attr-defined]
    assert backend_app.post("/setup", setup_body(fake_ls.url, "ls-token-abcdef123456")).status_code == 200
    x, y = scene.pct("cat")
    body = interactive_body(1, "/data/upload/1/scene.png", [keypoint(scene, x, y)])
    response = backend_app.post("/predict", body)
    assert response.status_code == 200, response.json
    assert fake_ls.seen_auth[-1] == "Token ls-token-abcdef123456"
    # A second process (new app, same database) that never got /setup still reaches Label Studio.
    other = make_backend(backend_app.db, postgres_url, tmp_path)
    assert other.backend.storage.label_studio_url is None
    response = other.post("/predict", body)
    assert response.status_code == 200, response.json
    assert brush_mask(only_brush(response.json["results"][0])).iou(scene.truth["cat"]) > 0.85
    other.backend.history.close()


# --- /predict, interactive --------------------------------------------------------------------------------


def test_interactive_click_negative_click_box_and_text(backend_app: BackendUnderTest) -> None:
    scene = make_scene(2)
    uri = save(scene, backend_app.images, "a.png")
    cx, cy = scene.pct("cat")

    # 1. a positive click inside the cat
    r1 = backend_app.post("/predict", interactive_body(10, uri, [keypoint(scene, cx, cy)]))
    assert r1.status_code == 200, r1.json
    assert r1.json["model_version"] == "classic-1"
    prediction = r1.json["results"][0]
    brush = only_brush(prediction)
    assert brush["value"]["brushlabels"] == ["cat"]
    assert prediction["score"] > 0 and brush["score"] > 0 and prediction["model_version"] == "classic-1"
    assert brush_mask(brush).iou(scene.truth["cat"]) > 0.9

    # 2. a negative click on the background: same session, refined, still the cat
    r2 = backend_app.post("/predict", interactive_body(10, uri, [keypoint(scene, 5.0, 5.0, positive=False)]))
    assert r2.status_code == 200, r2.json
    assert brush_mask(only_brush(r2.json["results"][0])).iou(scene.truth["cat"]) > 0.9

    # 3. a smart rectangle around the dog: a new object
    dx, dy = scene.pct("dog")
    box = rectangle(scene, 58.0, 20.0, 35.0, 60.0, label="dog")
    r3 = backend_app.post("/predict", interactive_body(10, uri, [box]))
    assert r3.status_code == 200, r3.json
    brush3 = only_brush(r3.json["results"][0])
    assert brush3["value"]["brushlabels"] == ["dog"]
    assert brush_mask(brush3).iou(scene.truth["dog"]) > 0.9

    # 4. a text prompt alone: the classic engine cannot, and says so
    r4 = backend_app.post("/predict", interactive_body(10, uri, [textarea("dogs")]))
    assert r4.status_code == 422
    assert "classic engine" in r4.json["error"] and "text" in r4.json["error"]  # the engine's own message

    # 5. the text stays active: a click labelled "cat" on the dog comes back labelled "dog"
    r5 = backend_app.post("/predict", interactive_body(10, uri, [keypoint(scene, dx, dy, label="cat")]))
    assert r5.status_code == 200, r5.json
    brush5 = only_brush(r5.json["results"][0])
    assert brush5["value"]["brushlabels"] == ["dog"]
    assert brush_mask(brush5).iou(scene.truth["dog"]) > 0.85

    # history: rounds 0,1 in one session (click, negative click), then the box, then click+text
    backend_app.flush()
    with backend_app.db.connect() as conn:
        rows = conn.execute(
            select(
                PromptSession.session_key,
                PromptRound.round_index,
                PromptRound.prompts,
                PromptRound.latency_ms,
            )
            .join(PromptRound, PromptRound.session_id == PromptSession.id)
            .order_by(PromptRound.id)
        ).all()
        task_ids = set(conn.execute(select(PromptSession.ls_task_id)).scalars())
        annotators = set(conn.execute(select(PromptSession.annotator)).scalars())
    assert [r.round_index for r in rows] == [0, 1, 0, 1]
    assert rows[0].session_key == rows[1].session_key != rows[2].session_key == rows[3].session_key
    assert [p["kind"] for p in rows[3].prompts["prompts"]] == ["click", "text"]
    assert all(r.latency_ms > 0 for r in rows)
    assert task_ids == {10} and annotators == {"ann@example.com"}


def test_session_memory_is_passed_to_the_engine(backend_app: BackendUnderTest) -> None:
    scene = make_scene(4)
    uri = save(scene, backend_app.images, "m.png")
    segmenter = backend_app.backend.segmenter
    seen: list[int] = []
    original = segmenter.engine.segment

    def spy(state, prompt_round, memory=()):
        seen.append(len(memory))
        return original(state, prompt_round, memory)

    segmenter.engine.segment = spy  # type: ignore[method-assign]
    cx, cy = scene.pct("cat")
    for dx in (0.0, 2.0, -2.0):
        response = backend_app.post("/predict", interactive_body(3, uri, [keypoint(scene, cx + dx, cy)]))
        assert response.status_code == 200
    assert seen == [0, 1, 2]
    assert segmenter.stats.misses == 1 and segmenter.stats.hits == 2  # embedded once
    assert backend_app.backend.fetcher.fetches == 1  # downloaded once


def test_frontend_groups_moves_deletes_and_accepts(backend_app: BackendUnderTest) -> None:
    """Label Studio re-sends the whole group (same type and label) with every request."""
    scene = make_scene(19)
    uri = save(scene, backend_app.images, "g.png")
    segmenter = backend_app.backend.segmenter
    calls: list[tuple[int, int]] = []  # (prompts in the round, rounds of memory)
    original = segmenter.engine.segment

    def spy(state, prompt_round, memory=()):
        calls.append((len(prompt_round.prompts), len(memory)))
        return original(state, prompt_round, memory)

    segmenter.engine.segment = spy  # type: ignore[method-assign]
    cx, cy = scene.pct("cat")

    def point(rid: str, x: float, y: float, positive: bool = True) -> dict[str, Any]:
        return {**keypoint(scene, x, y, positive=positive), "id": rid}

    def send(*results: dict[str, Any]) -> dict[str, Any]:
        response = backend_app.post("/predict", interactive_body(9, uri, list(results)))
        assert response.status_code == 200, response.json
        return response.json["results"][0]

    p1, n1 = point("a", cx, cy), point("b", 3.0, 3.0, positive=False)
    send(p1)  # round 0
    send(p1, n1)  # the group grew: only the new point is a new round
    assert calls == [(1, 0), (1, 1)]
    moved = point("a", cx + 4.0, cy)
    send(moved, n1)  # a point moved: start over with the group as it is now
    assert calls[-1] == (2, 0)
    last = send(moved)  # the negative point was deleted: start over without it
    assert calls[-1] == (1, 0)
    before = len(calls)
    again = send(moved)  # the same group again: the last answer, nothing recomputed
    assert len(calls) == before
    assert brush_mask(only_brush(again)) == brush_mask(only_brush(last))
    # the annotator accepted the suggestion: Label Studio deleted the prompt regions; a new click
    # arrives alone and refines the accepted object
    send(point("c", cx - 3.0, cy + 2.0))
    assert calls[-1] == (1, 1)
    assert brush_mask(only_brush(send(point("c", cx - 3.0, cy + 2.0)))).iou(scene.truth["cat"]) > 0.9
    # the last region of a group deleted: an empty group, answered with no result
    empty = send()
    assert empty["result"] == [] and len(backend_app.backend.sessions) == 0


def test_text_prompt_follows_the_annotator_to_the_next_task_only(backend_app: BackendUnderTest) -> None:
    scene = make_scene(5)
    uri = save(scene, backend_app.images, "t.png")
    dx, dy = scene.pct("dog")
    assert backend_app.post("/predict", interactive_body(1, uri, [textarea("Dog")])).status_code == 422
    mine = backend_app.post("/predict", interactive_body(2, uri, [keypoint(scene, dx, dy, label="cat")]))
    theirs = backend_app.post(
        "/predict", interactive_body(2, uri, [keypoint(scene, dx, dy, label="cat")], user="other@example.com")
    )
    assert only_brush(mine.json["results"][0])["value"]["brushlabels"] == ["dog"]
    assert only_brush(theirs.json["results"][0])["value"]["brushlabels"] == ["cat"]
    # clearing the text (empty textarea) ends it
    cleared = backend_app.post("/predict", interactive_body(2, uri, [textarea("")]))
    assert cleared.status_code == 200 and cleared.json["results"][0]["result"] == []
    again = backend_app.post("/predict", interactive_body(3, uri, [keypoint(scene, dx, dy, label="cat")]))
    assert only_brush(again.json["results"][0])["value"]["brushlabels"] == ["cat"]


def test_text_that_names_no_label_keeps_the_click_label(backend_app: BackendUnderTest) -> None:
    scene = make_scene(6)
    uri = save(scene, backend_app.images, "u.png")
    cx, cy = scene.pct("cat")
    body = interactive_body(4, uri, [textarea("the round red thing"), keypoint(scene, cx, cy, label="cat")])
    response = backend_app.post("/predict", body)
    assert response.status_code == 200, response.json
    assert only_brush(response.json["results"][0])["value"]["brushlabels"] == ["cat"]


def test_polygon_config_answers_polygons(backend_app: BackendUnderTest) -> None:
    scene = make_scene(7)
    uri = save(scene, backend_app.images, "p.png")
    box = rectangle(scene, 58.0, 20.0, 35.0, 60.0, label="dog")
    response = backend_app.post("/predict", interactive_body(5, uri, [box], config=POLYGON_CONFIG))
    assert response.status_code == 200, response.json
    results = response.json["results"][0]["result"]
    assert results and {r["type"] for r in results} == {"polygonlabels"}
    assert results[0]["value"]["polygonlabels"] == ["dog"] and results[0]["from_name"] == "polygon"
    mask = Mask.from_ls_polygons_percent([r["value"]["points"] for r in results], scene.height, scene.width)
    assert mask.iou(scene.truth["dog"]) > 0.9


def test_brush_region_sent_as_prompt(backend_app: BackendUnderTest) -> None:
    scene = make_scene(8)
    uri = save(scene, backend_app.images, "b.png")
    rough = scene.truth["dog"].data.copy()
    rough[: scene.height // 2] = False  # half of the dog, painted roughly
    region = {
        "id": "br",
        "from_name": "mask",
        "to_name": "image",
        "type": "brushlabels",
        "original_width": scene.width,
        "original_height": scene.height,
        "value": {"format": "rle", "rle": Mask(rough).to_ls_brush_rle(), "brushlabels": ["dog"]},
    }
    response = backend_app.post("/predict", interactive_body(6, uri, [region]))
    assert response.status_code == 200, response.json
    assert only_brush(response.json["results"][0])["value"]["brushlabels"] == ["dog"]


# --- /predict, batch --------------------------------------------------------------------------------------


def _store_bucket_masks(db: Engine, uri: str, scene: Any, *, with_uri: bool) -> None:
    from hashlib import sha256

    with db.begin() as conn:
        conn.execute(Project.__table__.insert().values(name="bucket-project", ls_project_id=PROJECT_ID))
        project_id = conn.execute(select(Project.id)).scalar_one()
        conn.execute(ModelVersion.__table__.insert().values(name="classic-1", engine="classic"))
        version_id = conn.execute(select(ModelVersion.id)).scalar_one()
        row = {"sha256": sha256(scene.png).hexdigest(), "width": scene.width, "height": scene.height}
        row["size_bytes"] = len(scene.png)
        if with_uri:
            row["uri"] = uri
        image_id = upsert_images(conn, [row])[row["sha256"]]
        rows = [
            mask_row(
                scene.truth[name],
                project_id=project_id,
                image_id=image_id,
                source=MaskSource.BUCKET,
                model_version_id=version_id,
                label=name,
                score=score,
            )
            for name, score in (("cat", 0.93), ("dog", None))
        ]
        write_masks(conn, rows)


def test_batch_returns_bucket_masks_without_reading_the_image(backend_app: BackendUnderTest) -> None:
    scene = make_scene(9)
    uri = save(scene, backend_app.images, "bucket.png")
    _store_bucket_masks(backend_app.db, uri, scene, with_uri=True)
    (backend_app.images / "bucket.png").unlink()  # answered from the database alone
    response = backend_app.post("/predict", batch_body([task(20, uri)]))
    assert response.status_code == 200, response.json
    prediction = response.json["results"][0]
    labels = [r["value"]["brushlabels"] for r in prediction["result"]]
    assert labels == [["cat"], ["dog"]]
    assert [r["score"] for r in prediction["result"]] == [0.93, 1.0]
    assert prediction["score"] == pytest.approx((0.93 + 1.0) / 2)
    assert brush_mask(prediction["result"][0]) == scene.truth["cat"]
    assert backend_app.backend.fetcher.fetches == 0


def test_batch_finds_bucket_masks_by_sha256(backend_app: BackendUnderTest) -> None:
    scene = make_scene(10)
    uri = save(scene, backend_app.images, "copy.png")
    _store_bucket_masks(backend_app.db, uri, scene, with_uri=False)  # the job saw it under another URI
    response = backend_app.post("/predict", batch_body([task(21, uri)]))
    assert response.status_code == 200, response.json
    assert len(response.json["results"][0]["result"]) == 2
    assert backend_app.backend.segmenter.stats.misses == 0  # not segmented


def test_batch_segments_everything_and_stores_it_for_next_time(backend_app: BackendUnderTest) -> None:
    scene = make_scene(11)
    uris = [
        save(scene, backend_app.images, "e1.png"),
        save(make_scene(12, layout="right"), backend_app.images, "e2.png"),
    ]
    response = backend_app.post("/predict", batch_body([task(30, uris[0]), task(31, uris[1])]))
    assert response.status_code == 200, response.json
    results = response.json["results"]
    assert len(results) == 2
    for prediction in results:
        assert prediction["result"], "segment_everything found nothing"
        assert isinstance(prediction["score"], float) and prediction["model_version"] == "classic-1"
        assert all("score" in r for r in prediction["result"])
    best = max(brush_mask(r).iou(scene.truth["cat"]) for r in results[0]["result"])
    assert best > 0.8
    backend_app.flush()
    assert count(backend_app.db, MaskRow) > 0
    calls = backend_app.backend.segmenter.stats.misses
    again = backend_app.post("/predict", batch_body([task(30, uris[0])]))
    assert again.status_code == 200
    assert backend_app.backend.segmenter.stats.misses == calls  # from the database this time
    assert len(again.json["results"][0]["result"]) == len(results[0]["result"])


def test_batch_with_one_unreadable_image_keeps_the_others(backend_app: BackendUnderTest) -> None:
    scene = make_scene(13)
    good = save(scene, backend_app.images, "good.png")
    bad = save(scene, backend_app.images, "bad.png")
    (backend_app.images / "bad.png").write_bytes(b"not an image at all")
    response = backend_app.post("/predict", batch_body([task(40, bad), task(41, good)]))
    assert response.status_code == 200, response.json
    assert response.json["results"][0]["result"] == []
    assert response.json["results"][1]["result"]


# --- /webhook and training ---------------------------------------------------------------------------------


def _annotation_event(
    action: str, annotation_id: int, task_id: int, uri: str, regions: list[dict[str, Any]]
) -> dict:
    return {
        "action": action,
        "annotation": {
            "id": annotation_id,
            "result": regions,
            "task": task_id,
            "project": PROJECT_ID,
            "completed_by": 3,
            "was_cancelled": False,
        },
        "task": {"id": task_id, "data": {"image": uri}, "project": PROJECT_ID},
        "project": {"id": PROJECT_ID, "label_config": BRUSH_CONFIG, "title": "p"},
    }


def _brush_region(scene: Any, mask: Mask, region_id: str, label: str = "cat") -> dict[str, Any]:
    return {
        "id": region_id,
        "from_name": "mask",
        "to_name": "image",
        "type": "brushlabels",
        "original_width": scene.width,
        "original_height": scene.height,
        "image_rotation": 0,
        "value": {"format": "rle", "rle": mask.to_ls_brush_rle(), "brushlabels": [label]},
    }


def test_webhook_stores_corrections_beside_the_prediction(backend_app: BackendUnderTest) -> None:
    scene = make_scene(14)
    uri = save(scene, backend_app.images, "w.png")
    cx, cy = scene.pct("cat")
    predicted = brush_mask(
        only_brush(
            backend_app.post("/predict", interactive_body(50, uri, [keypoint(scene, cx, cy)])).json[
                "results"
            ][0]
        )
    )
    assert len(backend_app.backend.sessions) == 1
    region = _brush_region(scene, scene.truth["cat"], "reg1")
    started = time.perf_counter()
    response = backend_app.post("/webhook", _annotation_event("ANNOTATION_CREATED", 500, 50, uri, [region]))
    assert time.perf_counter() - started < 0.5
    assert response.status_code == 200, response.json
    assert len(backend_app.backend.sessions) == 0  # the task's session ended
    backend_app.flush()
    with backend_app.db.connect() as conn:
        row = conn.execute(select(Correction.__table__)).one()
    assert (row.ls_task_id, row.ls_annotation_id, row.ls_region_id, row.label) == (50, 500, "reg1", "cat")
    assert Mask.from_coco_rle(row.submitted_rle) == scene.truth["cat"]
    assert Mask.from_coco_rle(row.predicted_rle) == predicted
    assert row.iou == pytest.approx(predicted.iou(scene.truth["cat"]))
    assert row.model_version_id is not None and row.annotator == "3"

    # re-sent: nothing new
    backend_app.post("/webhook", _annotation_event("ANNOTATION_CREATED", 500, 50, uri, [region]))
    backend_app.flush()
    assert count(backend_app.db, Correction) == 1

    # updated: the region changes, and a second one appears
    bigger = Mask(scene.truth["cat"].data | scene.truth["dog"].data)
    regions = [_brush_region(scene, bigger, "reg1"), _brush_region(scene, scene.truth["dog"], "reg2", "dog")]
    backend_app.post("/webhook", _annotation_event("ANNOTATION_UPDATED", 500, 50, uri, regions))
    backend_app.flush()
    with backend_app.db.connect() as conn:
        rows = {
            r.ls_region_id: r for r in conn.execute(select(Correction.ls_region_id, Correction.submitted_rle))
        }
    assert set(rows) == {"reg1", "reg2"}
    assert Mask.from_coco_rle(rows["reg1"].submitted_rle) == bigger

    # updated again without reg2: it goes
    backend_app.post("/webhook", _annotation_event("ANNOTATION_UPDATED", 500, 50, uri, regions[:1]))
    backend_app.flush()
    assert count(backend_app.db, Correction) == 1

    # deleted (Label Studio's action name, and the singular form)
    response = backend_app.post(
        "/webhook",
        {"action": "ANNOTATIONS_DELETED", "annotations": [{"id": 500}], "project": {"id": PROJECT_ID}},
    )
    assert response.status_code == 200, response.json
    backend_app.flush()
    assert count(backend_app.db, Correction) == 0
    response = backend_app.post(
        "/webhook", {"action": "ANNOTATION_DELETED", "annotation": {"id": 1, "project": 7}}
    )
    assert response.status_code == 200, response.json


def test_webhook_for_a_task_never_predicted_has_no_iou(backend_app: BackendUnderTest) -> None:
    scene = make_scene(15)
    uri = save(scene, backend_app.images, "n.png")
    region = _brush_region(scene, scene.truth["dog"], "only", "dog")
    assert (
        backend_app.post(
            "/webhook", _annotation_event("ANNOTATION_CREATED", 600, 60, uri, [region])
        ).status_code
        == 200
    )
    backend_app.flush()
    with backend_app.db.connect() as conn:
        row = conn.execute(select(Correction.iou, Correction.predicted_rle, Correction.image_id)).one()
    assert row.iou is None and row.predicted_rle is None and row.image_id is not None


def test_start_training_and_legacy_train_record_requests(backend_app: BackendUnderTest) -> None:
    response = backend_app.post(
        "/webhook", {"action": "START_TRAINING", "project": {"id": PROJECT_ID, "title": "p"}}
    )
    assert response.status_code == 200, response.json
    assert response.json["training"] == "requested"
    assert "seemly train schedule" in response.json["detail"]
    legacy = backend_app.post("/train", {"annotations": [], "project": PROJECT, "label_config": BRUSH_CONFIG})
    assert legacy.status_code == 200 and "job" not in legacy.json
    backend_app.flush()
    with backend_app.db.connect() as conn:
        reasons = conn.execute(select(TrainingRequest.reason, TrainingRequest.status)).all()
    assert [(r.reason.value, r.status.value) for r in reasons] == [("button", "queued"), ("button", "queued")]


def test_other_webhook_actions_are_acknowledged(backend_app: BackendUnderTest) -> None:
    response = backend_app.post("/webhook", {"action": "PROJECT_UPDATED", "project": {"id": 7}})
    assert response.status_code == 200 and response.json["status"] == "ignored"


def test_versions_and_metrics(backend_app: BackendUnderTest) -> None:
    assert backend_app.client.get("/versions").json["versions"] == ["classic-1"]
    metrics = backend_app.client.get("/metrics").json
    assert metrics["model_version"] == "classic-1" and "embed_cache" in metrics


# --- bad input: 4xx JSON, never a 500, nothing written -------------------------------------------------------


def _bad_requests(images: Path) -> list[tuple[str, Any, int, str]]:
    scene = make_scene(16)
    uri = save(scene, images, "ok.png")
    cx, cy = scene.pct("cat")
    click = keypoint(scene, cx, cy)
    outside = images.parent / "outside.png"
    outside.write_bytes(scene.png)
    (images / "garbage.png").write_bytes(b"GIF89a-but-not-really")
    return [
        ("/predict", b"{not json", 400, "malformed JSON"),
        ("/predict", b"", 400, "empty"),
        ("/predict", b"[1, 2]", 400, "expected a JSON object"),
        ("/predict", b"\xff\xfe\x00", 400, "malformed JSON"),
        ("/predict", b"[" * 100_000 + b"]" * 100_000, 400, "malformed JSON"),
        ("/predict", {"tasks": [], "project": PROJECT}, 422, "tasks"),
        (
            "/predict",
            {"tasks": [{"id": 1, "data": {"text": "hi"}}], "project": PROJECT, "label_config": BRUSH_CONFIG},
            422,
            "the task has no image",
        ),
        ("/predict", interactive_body(1, "/etc/passwd", [click]), 422, "bare paths are not accepted"),
        (
            "/predict",
            interactive_body(1, "http://169.254.169.254/latest/meta-data", [click]),
            403,
            "SEEMLY_HTTP_ALLOWED_HOSTS",
        ),
        ("/predict", interactive_body(1, f"file://{outside}", [click]), 403, "may not fetch"),
        ("/predict", interactive_body(1, f"file://{images}/missing.png", [click]), 404, "does not exist"),
        (
            "/predict",
            interactive_body(1, f"file://{images}/garbage.png", [click]),
            422,
            "cannot use the task's image",
        ),
        ("/predict", interactive_body(1, uri, [keypoint(scene, 120.0, 50.0)]), 422, "over 100 %"),
        (
            "/predict",
            interactive_body(1, uri, [keypoint(scene, cx, cy, label="zebra")]),
            422,
            "unknown label 'zebra'",
        ),
        (
            "/predict",
            interactive_body(1, uri, [click], config=NO_BRUSH_CONFIG),
            422,
            "<BrushLabels> or <PolygonLabels>",
        ),
        ("/predict", interactive_body(1, uri, [click], config="<View><Image"), 422, "not well-formed XML"),
        ("/predict", {**interactive_body(1, uri, [click]), "project": "abc"}, 422, "project"),
        (
            "/predict",
            {**interactive_body(1, uri, [click]), "params": {"context": "x"}},
            422,
            "params.context",
        ),
        ("/predict", interactive_body(1, uri, [{"from_name": "point", "value": {"x": 1}}]), 422, "value.y"),
        ("/webhook", {"no": "action"}, 422, "action"),
        (
            "/webhook",
            {"action": "ANNOTATION_CREATED", "annotation": {"id": "x"}, "project": {"id": 7}},
            422,
            "annotation.id",
        ),
        ("/webhook", {"action": "ANNOTATIONS_DELETED", "project": {"id": 7}}, 422, "annotations"),
        ("/setup", {"project": PROJECT, "schema": BRUSH_CONFIG, "hostname": "ftp://x"}, 422, "http"),
    ]


def test_bad_inputs_answer_4xx_json_and_write_nothing(backend_app: BackendUnderTest) -> None:
    for path, payload, status, words in _bad_requests(backend_app.images):
        if isinstance(payload, bytes):
            response = backend_app.client.post(path, data=payload, content_type="application/json")
        else:
            response = backend_app.post(path, payload)
        assert response.status_code == status, (path, words, response.status_code, response.get_data()[:300])
        assert response.is_json and set(response.json) <= {"error", "field"}, response.get_data()[:300]
        assert words in response.json["error"], (words, response.json)
        assert "Traceback" not in response.json["error"]
    backend_app.flush()
    assert counts(backend_app.db) == dict.fromkeys(counts(backend_app.db), 0)


def test_unknown_route_and_method_are_json(backend_app: BackendUnderTest) -> None:
    assert backend_app.client.get("/nope").status_code == 404
    assert backend_app.client.get("/nope").json["error"].startswith("Not Found")
    assert backend_app.client.get("/predict").status_code == 405


def test_oversized_body_is_413(postgres_db: Engine, postgres_url: str, tmp_path: Path) -> None:
    under_test = make_backend(postgres_db, postgres_url, tmp_path, max_request_bytes=1000)
    big = {"tasks": [{"id": 1, "data": {"image": "x" * 2000}}]}
    response = under_test.post("/predict", big)
    assert response.status_code == 413 and "SEEMLY_MAX_REQUEST_BYTES" in response.json["error"]
    # a body without Content-Length (chunked) is cut off at the limit as well
    response = under_test.client.post(
        "/predict",
        input_stream=__import__("io").BytesIO(json.dumps(big).encode()),
        content_type="application/json",
        environ_overrides={"wsgi.input_terminated": True},
    )
    assert response.status_code == 413
    under_test.backend.history.close()


# --- basic auth and secrets --------------------------------------------------------------------------------


def test_basic_auth(postgres_db: Engine, postgres_url: str, tmp_path: Path) -> None:
    under_test = make_backend(
        postgres_db,
        postgres_url,
        tmp_path,
        backend_basic_auth_user="ls",
        backend_basic_auth_password="s3cret-pass-word",
    )

    def auth(user: str, password: str) -> dict[str, str]:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}

    assert under_test.client.get("/health").status_code == 401
    assert "WWW-Authenticate" in under_test.client.get("/health").headers
    assert under_test.client.get("/health", headers=auth("ls", "wrong")).status_code == 401
    assert under_test.client.get("/health", headers=auth("ls", "s3cret-pass-word")).status_code == 200
    assert under_test.client.post("/setup", json=setup_body(), headers=auth("x", "y")).status_code == 401
    under_test.backend.history.close()


def test_secrets_never_reach_the_logs(
    postgres_db: Engine,
    postgres_url: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    fake_ls: FakeLabelStudio,
) -> None:
    import logging

    token = "ls-token-abcdef123456"
    password = "pw-9f8e7d6c5b4a"
    under_test = make_backend(
        postgres_db,
        postgres_url,
        tmp_path,
        backend_basic_auth_user="ls",
        backend_basic_auth_password=password,
    )
    headers = {"Authorization": "Basic " + base64.b64encode(f"ls:{password}".encode()).decode()}
    caplog.set_level(logging.DEBUG)
    scene = fake_ls.scene  # type: ignore[attr-defined]
    x, y = scene.pct("cat")
    client = under_test.client
    assert client.post("/setup", json=setup_body(fake_ls.url, token), headers=headers).status_code == 200
    good = interactive_body(1, "/data/upload/1/scene.png", [keypoint(scene, x, y)])
    assert client.post("/predict", json=good, headers=headers).status_code == 200
    missing = interactive_body(1, "/data/upload/1/missing.png", [keypoint(scene, x, y)])
    assert client.post("/predict", json=missing, headers=headers).status_code == 404
    assert client.post("/predict", data=b"{" + token.encode(), headers=headers).status_code == 400
    assert (
        client.get(
            "/health", headers={"Authorization": "Basic " + base64.b64encode(f"ls:{token}".encode()).decode()}
        ).status_code
        == 401
    )
    # a wrong token makes Label Studio answer 401: the error names the problem, not the token
    under_test.post("/setup", setup_body(fake_ls.url, "wrong-token-0000000"), headers=headers)
    other = interactive_body(2, "/data/upload/1/scene.png", [keypoint(scene, x, y)])
    under_test.backend.fetcher.forget("/data/upload/1/scene.png")
    refused = client.post("/predict", json=other, headers=headers)
    assert refused.status_code == 403 and "token" in refused.json["error"]
    under_test.flush()
    logging.getLogger("backend.test").debug("Authorization: Token %s", token)  # even if someone tried
    text = caplog.text + "\n".join(r.getMessage() for r in caplog.records)
    assert caplog.records, "nothing was logged at all"
    for secret in (
        token,
        password,
        "wrong-token-0000000",
        base64.b64encode(f"ls:{password}".encode()).decode(),
    ):
        assert secret not in text
    under_test.backend.history.close()


def test_s3_images(
    backend_app: BackendUnderTest, s3_bucket: Any, postgres_db: Engine, postgres_url: str, tmp_path: Path
) -> None:
    scene = make_scene(17)
    uri = s3_bucket.put("photos/scene.png", scene.png)
    under_test = make_backend(postgres_db, postgres_url, tmp_path)
    under_test.backend.storage = s3_bucket.storage
    under_test.backend.fetcher.storage = s3_bucket.storage
    cx, cy = scene.pct("cat")
    response = under_test.post("/predict", interactive_body(70, uri, [keypoint(scene, cx, cy)]))
    assert response.status_code == 200, response.json
    assert brush_mask(only_brush(response.json["results"][0])).iou(scene.truth["cat"]) > 0.9
    under_test.backend.history.close()


def test_database_down_does_not_block_interactive_answers(
    postgres_url: str, tmp_path: Path, postgres_db: Engine
) -> None:
    from seemly.db.session import make_engine

    dead = make_engine("postgresql+psycopg://nobody@127.0.0.1:1/none", connect_args={"connect_timeout": 1})
    images = tmp_path / "img"
    images.mkdir()
    under_test = make_backend(dead, postgres_url, images, options=BackendOptions(history_queue=4))
    under_test.backend.history.retries = 0
    scene = make_scene(18)
    uri = save(scene, images, "d.png")
    cx, cy = scene.pct("cat")
    for _ in range(3):
        response = under_test.post("/predict", interactive_body(80, uri, [keypoint(scene, cx, cy)]))
        assert response.status_code == 200, response.json
    under_test.flush()
    assert under_test.backend.history.stats.failed >= 1
    assert under_test.post("/setup", setup_body()).status_code == 503
    under_test.backend.history.close()
    with postgres_db.connect() as conn:
        conn.execute(text("SELECT 1"))
