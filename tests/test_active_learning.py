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
from seemly.learning.selection import FEATURE_SIZE, image_features, select_batch
from seemly.masks import Mask
from seemly.storage import path_to_uri
from workers.active_learning import ActiveLearningError, next_tasks, rank
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
    assert set(rows[ids["ambiguous"]][4]) == {"score", "instability", "ambiguity", "features"}
    assert len(rows[ids["ambiguous"]][4]["features"]) == FEATURE_SIZE  # for next --strategy diverse
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
        # no promoted version and rows without features: the default (auto -> diverse) says what to do
        assert cli.main(["al", "next", "--project", PROJECT, "-n", "5"]) == 2
        assert "run `seemly al rank` again" in capsys.readouterr().err
        assert cli.main(["al", "next", "--project", PROJECT, "-n", "5", "--strategy", "top", "--json"]) == 0
        listed = json.loads(capsys.readouterr().out)
        assert [(t["rank"], t["ls_task_id"], t["uri"], t["uncertainty"]) for t in listed] == [
            (1, 42, scene.uris["ambiguous"], 0.7),
            (2, None, scene.uris["clear"], 0.1),
        ]
        assert listed[0]["components"] == {"instability": 0.9}

        assert (
            cli.main(["al", "next", "--project", str(scene.project_id), "-n", "1", "--strategy", "top"]) == 0
        )
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


# --------------------------------------------------------------------------------------------
# the diverse strategy (pure: no database, no Ray)
# --------------------------------------------------------------------------------------------
def _two_clusters(per: int = 6) -> np.ndarray:
    """Two tight clusters of ``per`` feature rows each, far apart."""
    rng = np.random.default_rng(0)
    near = rng.normal(0.0, 0.01, (per, 3))
    return np.vstack([near, near + np.array([5.0, -3.0, 2.0])])


def test_diverse_batch_takes_from_both_clusters() -> None:
    features = _two_clusters()
    scores = [0.9] * 6 + [0.2] * 6  # the first cluster is the more uncertain one
    for seed in range(50):
        picked = select_batch(scores, 2, np.random.default_rng(seed), "diverse", features=features)
        assert {i // 6 for i in picked} == {0, 1}, (seed, picked)
    # top-k would take both from the first cluster
    assert {i // 6 for i in select_batch(scores, 2, np.random.default_rng(0), "top")} == {0}


def test_diverse_avoids_what_is_labelled_already() -> None:
    features = _two_clusters()
    labelled = features[:1] + 0.001  # an image like those of the first cluster is labelled
    for seed in range(30):
        picked = select_batch(
            [0.5] * 12, 1, np.random.default_rng(seed), "diverse", features=features, labelled=labelled
        )
        assert picked[0] >= 6


def test_diverse_is_seeded_sized_and_handles_ties_and_zero_scores() -> None:
    features = np.random.default_rng(1).random((9, 4))
    scores = [0.3, 0.3, 0.3, 0.7, 0.0, 0.1, 0.3, 0.5, 0.3]  # ties and a zero
    for k in (0, 1, 5, 9, 20):  # k above the pool size: the whole pool, once each
        picked = select_batch(scores, k, np.random.default_rng(7), "diverse", features=features)
        assert len(picked) == len(set(picked)) == min(k, 9)
        assert picked == select_batch(scores, k, np.random.default_rng(7), "diverse", features=features)
    # all scores zero: plain k-means++ seeding over the features, still distinct and seeded
    zero = select_batch([0.0] * 9, 4, np.random.default_rng(3), "diverse", features=features)
    assert len(set(zero)) == 4
    assert zero == select_batch([0.0] * 9, 4, np.random.default_rng(3), "diverse", features=features)
    # identical features everywhere: nothing to spread over, the batch is still k distinct images
    same = select_batch(scores, 5, np.random.default_rng(3), "diverse", features=np.ones((9, 4)))
    assert len(set(same)) == 5
    # different seeds give different batches
    batches = {
        tuple(sorted(select_batch(scores, 3, np.random.default_rng(s), "diverse", features=features)))
        for s in range(20)
    }
    assert len(batches) > 1


def test_diverse_refuses_missing_or_misshapen_features() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="needs features"):
        select_batch([0.1, 0.2], 1, rng, "diverse")
    with pytest.raises(ValueError, match="one row per candidate"):
        select_batch([0.1, 0.2], 1, rng, "diverse", features=np.ones((3, 2)))
    with pytest.raises(ValueError, match="columns"):
        select_batch([0.1, 0.2], 1, rng, "diverse", features=np.ones((2, 2)), labelled=np.ones((1, 3)))
    with pytest.raises(ValueError, match="finite"):
        select_batch([0.1, 0.2], 1, rng, "diverse", features=[[0.0, float("nan")], [1.0, 1.0]])


def test_image_features_are_cheap_deterministic_and_tell_images_apart() -> None:
    def decode(data: bytes) -> np.ndarray:
        return np.asarray(PILImage.open(io.BytesIO(data)).convert("RGB"))

    clear, shifted, noise = decode(clear_image()), decode(clear_image(shift=3)), decode(ambiguous_image())
    a = image_features(clear)
    assert a.shape == (FEATURE_SIZE,) and np.all(np.isfinite(a))
    assert np.array_equal(a, image_features(clear.copy()))
    assert np.linalg.norm(a - image_features(shifted)) < np.linalg.norm(a - image_features(noise))
    assert image_features(np.zeros((300, 500), np.uint8)).shape == (FEATURE_SIZE,)  # grey, large
    with pytest.raises(ValueError, match="expected an H x W"):
        image_features(np.zeros((1, 5, 3), np.uint8))


# --------------------------------------------------------------------------------------------
# al next --strategy
# --------------------------------------------------------------------------------------------
def _ranked_rows(scene: Scene, db: Engine, with_features: bool = True) -> None:
    """Uncertainty rows as `al rank` writes them: two look-alike uncertain images and a different one."""
    features = {
        "clear": image_features(np.asarray(PILImage.open(scene.images / "clear.png").convert("RGB"))),
        "session-only": image_features(
            np.asarray(PILImage.open(scene.images / "session-only.png").convert("RGB"))
        ),
        "ambiguous": image_features(np.asarray(PILImage.open(scene.images / "ambiguous.png").convert("RGB"))),
    }
    scores = {"clear": 0.6, "session-only": 0.55, "ambiguous": 0.2}
    with db.begin() as conn:
        conn.execute(
            Uncertainty.__table__.insert(),
            [
                {
                    "project_id": scene.project_id,
                    "image_id": scene.ids[name],
                    "score": score,
                    "ls_task_id": 43 if name == "session-only" else None,
                    "components": {"instability": score}
                    | ({"features": [float(v) for v in features[name]]} if with_features else {}),
                }
                for name, score in scores.items()
            ],
        )


def test_al_next_strategies(
    scene: Scene, postgres_db: Engine, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _ranked_rows(scene, postgres_db)
    top = next_tasks(postgres_db, scene.project_id, 2)
    assert [t.uri for t in top] == [scene.uris["clear"], scene.uris["session-only"]]  # the two look-alikes
    assert top[0].components == {"instability": 0.6}  # features are not a component
    # diverse: never both look-alikes (the clear disc, and the same disc shifted by 5 px)
    for seed in range(10):
        picked = next_tasks(postgres_db, scene.project_id, 2, strategy="diverse", seed=seed)
        assert scene.uris["ambiguous"] in {t.uri for t in picked}
        assert [t.rank for t in picked] == [1, 2] and picked[0].uncertainty >= picked[1].uncertainty
    weighted = next_tasks(postgres_db, scene.project_id, 5, strategy="weighted", seed=1)
    assert sorted(t.uri for t in weighted) == sorted(
        scene.uris[n] for n in ("clear", "session-only", "ambiguous")
    )
    with pytest.raises(ActiveLearningError, match="unknown strategy"):
        next_tasks(postgres_db, scene.project_id, 2, strategy="random")

    monkeypatch.setenv("SEEMLY_DATABASE_URL", scene.settings.database_url)
    get_settings.cache_clear()
    try:
        assert (
            cli.main(
                [
                    "al",
                    "next",
                    "--project",
                    PROJECT,
                    "-n",
                    "2",
                    "--strategy",
                    "diverse",
                    "--seed",
                    "3",
                    "--json",
                ]
            )
            == 0
        )
        listed = json.loads(capsys.readouterr().out)
        assert len(listed) == 2 and scene.uris["ambiguous"] in {t["uri"] for t in listed}
        with pytest.raises(SystemExit):  # argparse: the choices are listed on stderr
            cli.main(["al", "next", "--project", PROJECT, "--strategy", "best"])
        assert "invalid choice" in capsys.readouterr().err
    finally:
        get_settings.cache_clear()


def test_al_next_auto_is_diverse_until_a_version_is_promoted_then_top(
    scene: Scene, postgres_db: Engine
) -> None:
    _ranked_rows(scene, postgres_db)

    def uris(strategy: str, seed: int) -> list[str | None]:
        return [t.uri for t in next_tasks(postgres_db, scene.project_id, 2, strategy=strategy, seed=seed)]

    # cold start (nothing promoted): a spread batch, exactly diverse's draw
    for seed in range(5):
        assert uris("auto", seed) == uris("diverse", seed)
        assert scene.uris["ambiguous"] in uris("auto", seed)
    candidate = versions.register_candidate(
        postgres_db, scene.project_id, "classic", parent_id=None, artifact_uri=None
    )
    versions.promote(postgres_db, candidate.id)
    # a trained version serves the project: the most uncertain, the look-alikes included
    assert uris("auto", 0) == uris("top", 0) == [scene.uris["clear"], scene.uris["session-only"]]


def test_al_next_diverse_needs_features_from_a_recent_rank(scene: Scene, postgres_db: Engine) -> None:
    _ranked_rows(scene, postgres_db, with_features=False)
    assert len(next_tasks(postgres_db, scene.project_id, 2, strategy="weighted")) == 2  # needs no features
    with pytest.raises(ActiveLearningError, match="run `seemly al rank` again"):
        next_tasks(postgres_db, scene.project_id, 2, strategy="diverse")


def test_uncertainty_probes_the_guessed_objects_and_survives_engines_without_proposals() -> None:
    from seemly.engines.classic import ClassicEngine
    from seemly.learning.uncertainty import image_uncertainty

    image = np.asarray(PILImage.open(io.BytesIO(clear_image())).convert("RGB"))
    engine = ClassicEngine()
    found = image_uncertainty([engine], image, "clear")
    assert set(found.components) == {"score", "instability", "ambiguity"}
    assert found == image_uncertainty([engine], image, "clear")  # seeded: reproducible
    centre_only = image_uncertainty([engine], image, "clear", proposals=None)
    assert set(centre_only.components) == {"score", "instability"}

    class NoProposals(ClassicEngine):
        def segment_everything(self, state: object) -> list:  # type: ignore[override]
            raise NotImplementedError

    assert "ambiguity" in image_uncertainty([NoProposals()], image, "clear").components
    with pytest.raises(ValueError, match="proposals must be between 0 and 16"):
        image_uncertainty([engine], image, "clear", proposals=17)
