"""Active learning: ``seemly al rank`` on Ray (shared ``ray_local``), ``seemly al next``, and the
prediction score Label Studio sorts by.

A project knows six images through a bucket job and an interactive session: one with a single clear
object, one ambiguous (blocky noise: no object a centre box or click would pick consistently), one
labelled by a human (excluded), one whose bytes are not an image and one whose file was deleted
(both counted failures with their message), and one more clear image seen only interactively.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage
from sqlalchemy import Engine, select

from seemly import cli
from seemly.config import Settings, get_settings
from seemly.db.bulk import mask_row, upsert_images, write_masks
from seemly.db.jobs import create_job
from seemly.db.models import JobItem, MaskSource, ModelVersion, PromptSession, Uncertainty
from seemly.db.registry import ensure_project
from seemly.learning import versions
from seemly.masks import Mask
from seemly.storage import path_to_uri
from workers.active_learning import next_tasks, rank
from workers.ls_predictions import prediction_score, uncertainty_by_uri

PROJECT = "al-test"
SIZE = 64


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    PILImage.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def clear_image(shift: int = 0) -> bytes:
    yy, xx = np.mgrid[:SIZE, :SIZE]
    image = np.full((SIZE, SIZE, 3), 200, np.uint8)
    image[(yy - SIZE / 2 - shift) ** 2 + (xx - SIZE / 2) ** 2 < (0.3 * SIZE) ** 2] = (30, 40, 180)
    return _png(image)


def ambiguous_image() -> bytes:
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (SIZE // 8, SIZE // 8, 3)).astype(np.uint8)
    return _png(np.kron(blocks, np.ones((8, 8, 1), np.uint8)))


@dataclass
class Scene:
    project_id: int
    images: Path
    uris: dict[str, str]
    ids: dict[str, int]
    settings: Settings


@pytest.fixture
def scene(postgres_db: Engine, postgres_url: str, tmp_path: Path) -> Scene:
    images = tmp_path / "images"
    images.mkdir()
    files = {
        "clear": clear_image(),
        "ambiguous": ambiguous_image(),
        "labelled": clear_image(shift=3),
        "broken": b"these bytes are not an image",
        "missing": clear_image(shift=-3),
        "session-only": clear_image(shift=5),
    }
    project_id = ensure_project(postgres_db, PROJECT)
    uris, rows = {}, []
    for name, data in files.items():
        path = images / f"{name}.png"
        path.write_bytes(data)
        uris[name] = path_to_uri(path)
        sha = hashlib.sha256(data).hexdigest()
        rows.append(
            {"sha256": sha, "width": SIZE, "height": SIZE, "size_bytes": len(data), "uri": uris[name]}
        )
    (images / "missing.png").unlink()
    ids = {
        name: upsert_images(postgres_db, [row])[row["sha256"]] for name, row in zip(files, rows, strict=True)
    }
    job_id = create_job(postgres_db, "presegment", project_id=project_id, params={"prefix": "file:///x/"})
    with postgres_db.begin() as conn:
        conn.execute(
            JobItem.__table__.insert(),
            [
                {"job_id": job_id, "item_key": uris[name], "image_id": ids[name], "status": "done"}
                for name in files
                if name != "session-only"
            ],
        )
        conn.execute(
            PromptSession.__table__.insert(),
            [
                {
                    "session_key": "s1",
                    "project_id": project_id,
                    "image_id": ids["ambiguous"],
                    "ls_task_id": 42,
                },
                {
                    "session_key": "s2",
                    "project_id": project_id,
                    "image_id": ids["session-only"],
                    "ls_task_id": 43,
                },
            ],
        )
    _annotate(postgres_db, project_id, ids["labelled"], annotation_id=1)
    settings = Settings(database_url=postgres_url, file_roots=[str(images)], ray_num_cpus_per_actor=0.5)
    return Scene(project_id, images, uris, ids, settings)


def _annotate(db: Engine, project_id: int, image_id: int, annotation_id: int) -> None:
    """A human annotation of the image, as the backend stores a submitted one."""
    mask = Mask(np.pad(np.ones((10, 10), bool), ((5, SIZE - 15), (5, SIZE - 15))))
    row = mask_row(
        mask,
        project_id=project_id,
        image_id=image_id,
        source=MaskSource.ANNOTATION,
        label="thing",
        ls_annotation_id=annotation_id,
        ls_task_id=100 + annotation_id,
    )
    with db.begin() as conn:
        write_masks(conn, [row])


def _rows(db: Engine) -> dict[int, tuple[int, float, int | None, int | None, dict[str, float]]]:
    table = Uncertainty.__table__
    with db.connect() as conn:
        rows = conn.execute(
            select(
                table.c.image_id,
                table.c.id,
                table.c.score,
                table.c.model_version_id,
                table.c.ls_task_id,
                table.c.components,
            )
        ).all()
    return {r[0]: (r[1], r[2], r[3], r[4], r[5]) for r in rows}


def test_rank_orders_by_uncertainty_skips_labelled_and_counts_failures(
    scene: Scene, postgres_db: Engine, ray_local: str
) -> None:
    report = rank(PROJECT, settings=scene.settings, actors=2, batch_size=2)
    assert (report.candidates, report.ranked, report.failed) == (5, 3, 2), report
    assert report.model_version == "classic-1" and report.compared_with is None
    broken, missing = sorted(report.errors)  # each failure names its image and what is wrong
    assert broken.startswith(scene.uris["broken"]) and "not an image" in broken
    assert missing.startswith(scene.uris["missing"]) and "no such file" in missing
    assert missing.count(scene.uris["missing"]) == 1

    rows = _rows(postgres_db)
    ids = scene.ids
    assert set(rows) == {ids["clear"], ids["ambiguous"], ids["session-only"]}  # labelled and failed: none
    assert rows[ids["ambiguous"]][1] > rows[ids["clear"]][1] + 0.2
    assert rows[ids["ambiguous"]][3] == 42 and rows[ids["clear"]][3] is None
    assert set(rows[ids["ambiguous"]][4]) == {"score", "instability"}
    with postgres_db.connect() as conn:
        base_id = conn.execute(select(ModelVersion.id).where(ModelVersion.name == "classic-1")).scalar_one()
    assert {r[2] for r in rows.values()} == {base_id}

    # idempotent: the same rows, the same scores
    again = rank(PROJECT, settings=scene.settings, actors=1, batch_size=4)
    assert (again.ranked, again.failed) == (3, 2)
    assert {k: (v[0], v[1]) for k, v in _rows(postgres_db).items()} == {
        k: (v[0], v[1]) for k, v in rows.items()
    }

    # next: most uncertain first, labelled images never listed
    listed = next_tasks(postgres_db, scene.project_id, 10)
    assert listed[0].uri == scene.uris["ambiguous"] and listed[0].ls_task_id == 42
    assert len(listed) == 3 and scene.uris["labelled"] not in {t.uri for t in listed}

    # a promoted fine-tune is compared with the version it replaced; rows are rewritten in place
    candidate = versions.register_candidate(
        postgres_db, scene.project_id, "classic", parent_id=None, artifact_uri=None
    )
    versions.promote(postgres_db, candidate.id)
    _annotate(postgres_db, scene.project_id, ids["ambiguous"], annotation_id=2)  # labelled meanwhile
    third = rank(PROJECT, settings=scene.settings, actors=2, batch_size=2)
    assert third.model_version == candidate.name and third.compared_with == "base engine"
    assert (third.candidates, third.ranked, third.labelled_dropped) == (4, 2, 1)
    rows3 = _rows(postgres_db)
    assert set(rows3) == {ids["clear"], ids["session-only"]}
    assert rows3[ids["clear"]][0] == rows[ids["clear"]][0]  # the same row, upserted
    assert rows3[ids["clear"]][2] == candidate.id
    assert rows3[ids["clear"]][4]["disagreement"] == pytest.approx(0.0, abs=1e-6)  # same engine


def test_al_next_command_and_prediction_score(
    scene: Scene, postgres_db: Engine, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    table = Uncertainty.__table__
    with postgres_db.begin() as conn:
        conn.execute(
            table.insert(),
            [
                {
                    "project_id": scene.project_id,
                    "image_id": scene.ids["clear"],
                    "score": 0.1,
                    "ls_task_id": None,
                    "components": {},
                },
                {
                    "project_id": scene.project_id,
                    "image_id": scene.ids["ambiguous"],
                    "score": 0.7,
                    "ls_task_id": 42,
                    "components": {"instability": 0.9},
                },
                # a labelled image's stale row is never listed
                {
                    "project_id": scene.project_id,
                    "image_id": scene.ids["labelled"],
                    "score": 0.9,
                    "ls_task_id": 101,
                    "components": {},
                },
            ],
        )
    monkeypatch.setenv("SEEMLY_DATABASE_URL", scene.settings.database_url)
    get_settings.cache_clear()
    try:
        assert cli.main(["al", "next", "--project", PROJECT, "-n", "5", "--json"]) == 0
        listed = json.loads(capsys.readouterr().out)
        assert [(t["rank"], t["ls_task_id"], t["uri"], t["uncertainty"]) for t in listed] == [
            (1, 42, scene.uris["ambiguous"], 0.7),
            (2, None, scene.uris["clear"], 0.1),
        ]
        assert listed[0]["components"] == {"instability": 0.9}

        assert cli.main(["al", "next", "--project", str(scene.project_id), "-n", "1"]) == 0
        out = capsys.readouterr().out.splitlines()
        assert out[0].split() == ["rank", "task", "uncertainty", "image"]
        assert out[1].split() == ["1", "42", "0.700", scene.uris["ambiguous"]] and len(out) == 2

        assert cli.main(["al", "next", "--project", "nope"]) == 2
        assert "no seemly project named 'nope'" in capsys.readouterr().err
        assert cli.main(["al", "next", "--project", PROJECT, "-n", "0"]) == 2
        assert "at least 1" in capsys.readouterr().err
    finally:
        get_settings.cache_clear()

    # the prediction Label Studio sorts by: 1 - uncertainty for ranked images, the mask mean otherwise
    found = uncertainty_by_uri(postgres_db, scene.project_id, [scene.uris["ambiguous"], scene.uris["broken"]])
    assert found == {scene.uris["ambiguous"]: 0.7}
    assert prediction_score([0.9, 0.5], found.get(scene.uris["ambiguous"])) == pytest.approx(0.3)
    assert prediction_score([0.9, 0.5], None) == pytest.approx(0.7)
    assert prediction_score([], None) is None
