"""Two annotators at the same time on two images never see each other's state.

Each annotator runs the same three rounds (click, negative click, click) on their own image, in
lock-step with the other (a barrier before every round, so the requests really overlap). The masks
must be exactly those of a sequential run (checksums), must match the annotator's own image, and the
history must record each session on its own image.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, select

from seemly.db.models import Image, PromptSession
from tests.backend_support import (
    BackendUnderTest,
    Scene,
    brush_mask,
    interactive_body,
    keypoint,
    make_backend,
    make_scene,
    only_brush,
    save,
)


def _rounds(scene: Scene, name: str) -> list[list[dict[str, Any]]]:
    x, y = scene.pct(name)
    return [
        [keypoint(scene, x, y, label=name)],
        [keypoint(scene, 2.0, 97.0, positive=False, label=name)],
        [keypoint(scene, x + 3.0, y + 2.0, label=name)],
    ]


def _checksum(response_json: dict[str, Any]) -> str:
    mask = brush_mask(only_brush(response_json["results"][0]))
    return hashlib.sha256(mask.data.tobytes() + repr(mask.shape).encode()).hexdigest()


def _run(
    under_test: BackendUnderTest, plan: dict[str, Any], barrier: threading.Barrier | None
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    errors: list[BaseException] = []

    def annotator(who: str) -> None:
        client = under_test.app.test_client()
        scene, uri, task_id, name = plan[who]
        answers = []
        try:
            for results in _rounds(scene, name):
                if barrier is not None:
                    barrier.wait(timeout=60)
                response = client.post("/predict", json=interactive_body(task_id, uri, results, user=who))
                assert response.status_code == 200, response.json
                answers.append(response.json)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
            if barrier is not None:
                barrier.abort()
        out[who] = answers

    if barrier is None:
        for who in plan:
            annotator(who)
    else:
        threads = [threading.Thread(target=annotator, args=(who,)) for who in plan]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
    assert not errors, errors
    return out


def test_two_annotators_on_two_images_interleaved(
    postgres_db: Engine, postgres_url: str, tmp_path: Path
) -> None:
    images = tmp_path / "images"
    images.mkdir()
    scene_a = make_scene(21, layout="left")
    scene_b = make_scene(22, layout="right", width=150, height=130)
    uri_a, uri_b = save(scene_a, images, "a.png"), save(scene_b, images, "b.png")
    plan = {
        "alice@example.com": (scene_a, uri_a, 101, "cat"),
        "bob@example.com": (scene_b, uri_b, 102, "dog"),
    }

    sequential = make_backend(postgres_db, postgres_url, images)
    expected = _run(sequential, plan, barrier=None)
    sequential.backend.history.close()

    concurrent = make_backend(postgres_db, postgres_url, images)
    got = _run(concurrent, plan, barrier=threading.Barrier(2))
    concurrent.flush()

    for who, (scene, _uri, _task, name) in plan.items():
        other = scene_b if scene is scene_a else scene_a
        assert [_checksum(a) for a in got[who]] == [_checksum(a) for a in expected[who]], who
        for answer in got[who]:
            brush = only_brush(answer["results"][0])
            assert (brush["original_width"], brush["original_height"]) == (scene.width, scene.height)
            mask = brush_mask(brush)
            assert mask.iou(scene.truth[name]) > 0.85, who
            assert mask.shape != other.truth[name].shape  # never a mask of the other image
    with postgres_db.connect() as conn:
        rows = conn.execute(
            select(PromptSession.annotator, PromptSession.ls_task_id, Image.sha256).join(
                Image, Image.id == PromptSession.image_id
            )
        ).all()
    by_annotator = {(r.annotator, r.ls_task_id, r.sha256) for r in rows}
    assert ("alice@example.com", 101, hashlib.sha256(scene_a.png).hexdigest()) in by_annotator
    assert ("bob@example.com", 102, hashlib.sha256(scene_b.png).hexdigest()) in by_annotator
    assert len({r.annotator for r in rows}) == 2
    concurrent.backend.history.close()


def test_two_annotators_on_the_same_image_keep_separate_sessions(
    postgres_db: Engine, postgres_url: str, tmp_path: Path
) -> None:
    scene = make_scene(23)
    uri = save(scene, tmp_path, "same.png")
    under_test = make_backend(postgres_db, postgres_url, tmp_path)
    plan = {"carol": (scene, uri, 201, "cat"), "dave": (scene, uri, 202, "dog")}
    got = _run(under_test, plan, barrier=threading.Barrier(2))
    assert brush_mask(only_brush(got["carol"][-1]["results"][0])).iou(scene.truth["cat"]) > 0.85
    assert brush_mask(only_brush(got["dave"][-1]["results"][0])).iou(scene.truth["dog"]) > 0.85
    assert under_test.backend.segmenter.stats.misses == 1  # one shared embedding, two sessions
    assert len(under_test.backend.sessions) == 2
    under_test.backend.history.close()
