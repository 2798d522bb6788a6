"""The per-project label model: fitting, scoring, persistence, and training from stored masks."""

from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
import pytest
from sqlalchemy import create_engine, select

from seemly.db import models as db
from seemly.engines import region_features as rf
from seemly.engines.base import create_engine as create_seg_engine
from seemly.engines.label_model import (
    LabelledImage,
    LabelModel,
    LabelModelError,
    fit_label_model,
    labelled_masks,
    project_label_model_uri,
    record_label_model,
    train_label_model,
)
from seemly.masks import Mask
from seemly.storage import Storage, path_to_uri
from tests.semantic_scenes import make_scene


@pytest.fixture(scope="module")
def classic():
    return create_seg_engine("classic")


@pytest.fixture(scope="module")
def model(classic) -> LabelModel:
    scenes = [make_scene(seed, ["apple", "box", "apple"]) for seed in range(3)]
    return fit_label_model([LabelledImage(s.image, s.objects) for s in scenes], classic)


def test_region_features_have_a_fixed_length() -> None:
    scene = make_scene(0, ["apple"])
    ctx = rf.context(scene.image)
    vector = rf.describe(ctx, scene.objects[0][1]).vector()
    assert vector.shape == (rf.FEATURE_DIM,) and np.isfinite(vector).all()
    with pytest.raises(ValueError, match="empty"):
        rf.describe(ctx, np.zeros(scene.image.shape[:2], bool))


def test_similarity_separates_colours() -> None:
    scene = make_scene(1, ["apple", "box", "apple"])
    ctx = rf.context(scene.image)
    a1, b, a2 = (rf.describe(ctx, m) for _, m in scene.objects)
    assert rf.similarity(a1, a2).total > 0.7 > rf.similarity(a1, b).total


def test_model_separates_the_labels(model, classic) -> None:
    assert model.labels == ["apple", "box"] and model.examples == {"apple": 6, "box": 3}
    assert model.meta["background_samples"] >= 1
    scene = make_scene(40, ["box", "apple"])
    ctx = rf.context(scene.image)
    features = np.stack([rf.describe(ctx, m).vector() for _, m in scene.objects])
    proba = model.predict_proba(features)
    assert np.allclose(proba.sum(axis=1), 1.0)
    assert model.score(features, "box")[0] > 0.8 and model.score(features, "apple")[1] > 0.8
    assert model.knows("apple") and not model.knows("cat")


def test_save_and_load_through_storage(model, tmp_path: Path) -> None:
    storage = Storage(file_roots=[tmp_path])
    uri = path_to_uri(tmp_path / "models" / "labels.npz")
    model.save(uri, storage)
    loaded = LabelModel.load(uri, storage)
    assert loaded.labels == model.labels and loaded.version == model.version
    x = np.random.default_rng(0).normal(size=(4, rf.FEATURE_DIM)).astype(np.float32)
    assert np.allclose(loaded.predict_proba(x), model.predict_proba(x), atol=1e-6)
    # not a pickle: a malicious artifact is refused, not executed
    with pytest.raises(LabelModelError):
        LabelModel.from_bytes(b"not a model")
    buffer = io.BytesIO()
    np.savez(buffer, header=np.frombuffer(b'{"kind": "x"}', np.uint8))
    with pytest.raises(LabelModelError, match="wrong kind"):
        LabelModel.from_bytes(buffer.getvalue())


def test_no_examples_is_a_clear_error(classic) -> None:
    with pytest.raises(LabelModelError, match="label a few"):
        fit_label_model([], classic)


def _png(image: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", image[:, :, ::-1])
    assert ok
    return data.tobytes()


def test_train_from_stored_masks(tmp_path: Path, classic) -> None:
    from seemly.images import sha256_hex

    engine_db = create_engine(f"sqlite:///{tmp_path / 'seemly.db'}")
    db.Base.metadata.create_all(engine_db)
    storage = Storage(file_roots=[tmp_path])
    with engine_db.begin() as conn:
        project_id = conn.execute(
            db.Project.__table__.insert().values(
                name="p", ls_project_id=7, labels=["apple", "box"], settings={}
            )
        ).inserted_primary_key[0]
        for seed in range(3):
            scene = make_scene(seed, ["apple", "box", "apple"])
            data = _png(scene.image)
            path = tmp_path / f"img{seed}.png"
            path.write_bytes(data)
            image_id = conn.execute(
                db.Image.__table__.insert().values(
                    sha256=sha256_hex(data), width=320, height=240, size_bytes=len(data)
                )
            ).inserted_primary_key[0]
            conn.execute(db.ImageUri.__table__.insert().values(image_id=image_id, uri=path_to_uri(path)))
            for ordinal, (label, mask) in enumerate(scene.objects):
                m = Mask(mask)
                source = db.MaskSource.ANNOTATION if ordinal < 2 else db.MaskSource.CORRECTION
                conn.execute(
                    db.Mask.__table__.insert().values(
                        project_id=project_id,
                        image_id=image_id,
                        source=source,
                        label=label,
                        ordinal=ordinal,
                        rle=m.to_coco_rle(),
                        bbox=list(m.bbox),
                        area=m.area,
                        ls_annotation_id=100 + seed,
                    )
                )
            # the same region again as a corrections row: counted once
            label, mask = scene.objects[0]
            conn.execute(
                db.Correction.__table__.insert().values(
                    project_id=project_id,
                    image_id=image_id,
                    ls_task_id=seed,
                    ls_annotation_id=100 + seed,
                    ls_region_id="r0",
                    label=label,
                    submitted_rle=Mask(mask).to_coco_rle(),
                )
            )
        # an unlabelled proposal and a bucket mask are not training data
        conn.execute(
            db.Mask.__table__.insert().values(
                project_id=project_id,
                image_id=image_id,
                source=db.MaskSource.ANNOTATION,
                label="",
                ordinal=9,
                rle=Mask(mask).to_coco_rle(),
                area=1,
                ls_annotation_id=999,
            )
        )
    by_image = labelled_masks(engine_db, project_id)
    assert sum(len(v) for v in by_image.values()) == 9

    model = train_label_model(engine_db, project_id, storage=storage, engine=classic)
    assert model.examples == {"apple": 6, "box": 3} and model.meta["project_id"] == project_id

    uri = path_to_uri(tmp_path / "artifacts" / "project-7.npz")
    model.save(uri, storage)
    record_label_model(engine_db, project_id, uri, model)
    with engine_db.connect() as conn:
        settings = conn.execute(select(db.Project.settings).where(db.Project.id == project_id)).scalar()
    assert project_label_model_uri(settings) == uri
    assert settings["label_model"]["labels"] == {"apple": 6, "box": 3}
    assert project_label_model_uri({}) is None


def test_train_without_masks_is_a_clear_error(tmp_path: Path, classic) -> None:
    engine_db = create_engine(f"sqlite:///{tmp_path / 'empty.db'}")
    db.Base.metadata.create_all(engine_db)
    with pytest.raises(LabelModelError, match="no labelled masks"):
        train_label_model(engine_db, 1, storage=Storage(file_roots=[tmp_path]), engine=classic)
