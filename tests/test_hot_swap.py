"""Hot swap: a project's promoted model version is served without a restart, and rollback undoes it.

Annotator threads hammer ``/predict`` on the real backend app (real Postgres) while the project's
promoted version flips in the registry (``versions.promote`` / ``versions.rollback``, what the
training gate and ``seemly train rollback`` do). No request may fail, every answer carries the old or
the new version, and once ``SEEMLY_VERSION_REFRESH_S`` has passed every answer carries the new one.
The registered version is the classic engine under a fine-tune's name (``artifact_uri=None``), so the
test needs no trained artifact.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select

from backend.db import ensure_project
from backend.segmenter import InProcessSegmenter
from backend.versions import ProjectVersions
from seemly.db.models import ModelVersion
from seemly.db.models import PromptRound as RoundRow
from seemly.db.session import make_engine
from seemly.engines.base import create_engine
from seemly.learning import versions
from tests.backend_support import (
    BRUSH_CONFIG,
    PROJECT_ID,
    BackendUnderTest,
    brush_mask,
    interactive_body,
    keypoint,
    make_backend,
    make_scene,
    only_brush,
    save,
)

REFRESH_S = 0.3
SLACK_S = 0.25  # a registry read that began before the change may still be in flight
BASE = "classic-1"
DEAD_DB = "postgresql+psycopg://postgres@127.0.0.1:1/nowhere"


@pytest.fixture
def app(postgres_db: Engine, postgres_url: str, tmp_path: Path) -> Iterator[BackendUnderTest]:
    images = tmp_path / "images"
    images.mkdir()
    under_test = make_backend(postgres_db, postgres_url, images, version_refresh_s=REFRESH_S)
    yield under_test
    under_test.backend.history.close()
    logging.getLogger("backend").handlers.clear()


def _project(db: Engine) -> int:
    with db.begin() as conn:
        return ensure_project(conn, PROJECT_ID)


class Hammer:
    """Annotator threads clicking (each request a new task, so each one really segments)."""

    def __init__(self, app: BackendUnderTest, uri: str, threads: int = 4) -> None:
        self.app, self.uri = app, uri
        self.scene = make_scene(5)
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.answers: list[tuple[float, float, str, str]] = []  # (sent, received, top version, prediction's)
        self.failures: list[str] = []
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def __enter__(self) -> Hammer:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(60)

    def _run(self, index: int) -> None:
        client = self.app.app.test_client()
        x, y = self.scene.pct("cat")
        count = 0
        while not self.stop.is_set():
            count += 1
            point = keypoint(self.scene, x + (count % 3), y)
            body = interactive_body(10_000 * (index + 1) + count, self.uri, [point], user=f"a{index}")
            sent = time.monotonic()
            try:
                response = client.post("/predict", json=body)
                if response.status_code != 200:
                    raise AssertionError(f"{response.status_code}: {response.json}")
                answer = response.json
                assert brush_mask(only_brush(answer["results"][0])).iou(self.scene.truth["cat"]) > 0.8
                row = (sent, time.monotonic(), answer["model_version"], answer["results"][0]["model_version"])
                with self.lock:
                    self.answers.append(row)
            except BaseException as exc:
                with self.lock:
                    self.failures.append(repr(exc)[:300])

    def since(self, moment: float) -> list[str]:
        with self.lock:
            return [top for sent, _got, top, _pred in self.answers if sent >= moment]

    def wait_for(self, count: int, after: float, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.since(after)) < count and time.monotonic() < deadline and not self.failures:
            time.sleep(0.05)


def test_hot_swap_under_concurrent_requests_and_rollback(app: BackendUnderTest) -> None:
    db = app.db
    project_id = _project(db)
    uri = save(make_scene(5), app.images, "swap.png")
    candidate = versions.register_candidate(db, project_id, "classic", parent_id=None, artifact_uri=None)
    assert candidate.name == f"p{project_id}-classic-ft1"

    with Hammer(app, uri) as hammer:
        hammer.wait_for(8, after=0.0)
        flipped = time.monotonic()
        versions.promote(db, candidate.id)
        settled = flipped + REFRESH_S + SLACK_S
        hammer.wait_for(12, after=settled)
        rolled = time.monotonic()
        versions.rollback(db, project_id)  # no parent: back to the base engine
        back = rolled + REFRESH_S + SLACK_S
        hammer.wait_for(12, after=back)

    assert not hammer.failures, hammer.failures[:3]
    answers = hammer.answers
    assert len(answers) >= 32
    # each answer names one version, the same at the top and in its prediction, and only old or new
    assert all(top == pred for _s, _g, top, pred in answers)
    assert {top for _s, _g, top, _p in answers} == {BASE, candidate.name}
    assert set(hammer.since(0.0)[:4]) == {BASE}
    before_rollback = [top for sent, got, top, _p in answers if settled <= sent and got <= rolled]
    assert before_rollback and set(before_rollback) == {candidate.name}
    assert set(hammer.since(back)) == {BASE}

    # the stored rounds carry the version that answered: the registered row, not a new global one
    app.flush()
    with db.connect() as conn:
        stored = conn.execute(
            select(ModelVersion.id, ModelVersion.name, ModelVersion.project_id)
            .join(RoundRow, RoundRow.model_version_id == ModelVersion.id)
            .distinct()
        ).all()
        same_name = conn.execute(select(ModelVersion.id).where(ModelVersion.name == candidate.name)).all()
    assert {(r.name, r.project_id) for r in stored} == {(BASE, None), (candidate.name, project_id)}
    assert len(same_name) == 1
    # /metrics shows the loaded version; /versions lists the project's versions, the served one first
    assert app.client.get(f"/versions?project={PROJECT_ID}").json["versions"] == [BASE, candidate.name]


def test_setup_and_versions_answer_the_projects_version(app: BackendUnderTest) -> None:
    project_id = _project(app.db)
    first = versions.register_candidate(app.db, project_id, "classic", parent_id=None, artifact_uri=None)
    second = versions.register_candidate(app.db, project_id, "classic", parent_id=first.id, artifact_uri=None)
    versions.promote(app.db, first.id)
    versions.promote(app.db, second.id)
    body = {"project": f"{PROJECT_ID}.1700000000", "schema": BRUSH_CONFIG}
    assert app.post("/setup", body).json["model_version"] == second.name
    listed = app.client.get(f"/versions?project={PROJECT_ID}").json
    assert listed["model_version"] == second.name
    assert listed["versions"] == [second.name, first.name, BASE]
    # another project (never promoted) and no project at all: the base engine
    assert app.client.get("/versions?project=99").json["versions"] == [BASE]
    assert app.client.get("/versions").json["versions"] == [BASE]
    response = app.client.get("/versions?project=abc")
    assert response.status_code == 422 and "project" in response.json["error"]

    # rollback is one call and reaches the next request after the refresh interval
    assert versions.rollback(app.db, project_id) == versions.get(app.db, first.id)
    time.sleep(REFRESH_S + 0.05)
    assert app.post("/setup", body).json["model_version"] == first.name


def test_database_down_keeps_serving_the_last_known_version(
    app: BackendUnderTest, caplog: pytest.LogCaptureFixture
) -> None:
    project_id = _project(app.db)
    candidate = versions.register_candidate(app.db, project_id, "classic", parent_id=None, artifact_uri=None)
    versions.promote(app.db, candidate.id)
    scene = make_scene(6)
    uri = save(scene, app.images, "down.png")
    x, y = scene.pct("cat")

    def click(task: int) -> dict[str, Any]:
        response = app.post("/predict", interactive_body(task, uri, [keypoint(scene, x, y)]))
        assert response.status_code == 200, response.json
        return response.json

    assert click(1)["model_version"] == candidate.name
    resolver = app.backend.versions
    dead = make_engine(DEAD_DB, connect_args={"connect_timeout": 2})
    resolver.db, alive = dead, resolver.db
    try:
        time.sleep(REFRESH_S + 0.05)
        with caplog.at_level(logging.WARNING, logger="backend.versions"):
            assert click(2)["model_version"] == candidate.name
            time.sleep(REFRESH_S + 0.05)
            assert click(3)["model_version"] == candidate.name
        warnings = [r for r in caplog.records if "last known version" in r.getMessage()]
        assert len(warnings) == 1 and candidate.name in warnings[0].getMessage()  # once per outage
        assert resolver.failures >= 2

        # a process that never read the registry serves the base engine until it can
        fresh = ProjectVersions(dead, refresh_s=REFRESH_S)
        assert fresh.resolve(PROJECT_ID) is None
    finally:
        resolver.db = alive
        dead.dispose()
    time.sleep(REFRESH_S + 0.05)
    versions.rollback(app.db, project_id)
    time.sleep(REFRESH_S + 0.05)
    assert click(4)["model_version"] == BASE


def test_in_process_versions_are_loaded_once_and_bounded(postgres_db: Engine) -> None:
    project_id = _project(postgres_db)
    infos = [
        versions.register_candidate(postgres_db, project_id, "classic", parent_id=None, artifact_uri=None)
        for _ in range(3)
    ]
    segmenter = InProcessSegmenter(create_engine("classic"), cache_bytes=64 * 1024 * 1024, max_versions=2)
    assert segmenter.for_version(None) is segmenter
    views = [segmenter.for_version(info) for info in infos]
    assert [v.model_version for v in views] == [i.name for i in infos]
    assert segmenter.loaded_versions == [infos[1].name, infos[2].name]  # LRU: the first was unloaded
    assert segmenter.for_version(infos[2]).engine is views[2].engine  # loaded once
    assert views[0].cache is segmenter.cache  # one embedding cache, keyed by (sha256, version)

    # a version that cannot be loaded: the base engine answers (logged), not an error per request
    broken = versions.register_candidate(
        postgres_db, project_id, "no-such-engine", parent_id=None, artifact_uri=None
    )
    assert segmenter.for_version(broken).model_version == BASE
