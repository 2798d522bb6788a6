"""Bucket masks → Label Studio predictions, against a real Label Studio server (e2e)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from plugin.templates import render_config
from seemly.config import Settings
from seemly.db.bulk import add_job_items, mask_row
from seemly.db.jobs import complete_item, create_job
from seemly.db.models import MaskSource
from seemly.db.registry import ensure_model_version, ensure_project
from seemly.masks import Mask
from workers.ls_predictions import PredictionImportError, import_predictions

pytestmark = pytest.mark.e2e

BUCKET = "s3://photos"


def _disc(height: int, width: int, cy: int, cx: int, radius: int) -> Mask:
    yy, xx = np.mgrid[:height, :width]
    return Mask((yy - cy) ** 2 + (xx - cx) ** 2 < radius**2)


def _store_masks(db, project: str) -> dict[str, list[Mask]]:
    """Two segmented images (one with two labelled masks) as a bucket job would leave them."""
    project_id = ensure_project(db, project)
    version_id = ensure_model_version(db, "classic-test", engine="classic")
    job_id = create_job(db, "presegment", project_id=project_id, params={"prefix": f"{BUCKET}/"})
    stored = {
        f"{BUCKET}/a.png": [_disc(30, 40, 15, 20, 8)],
        f"{BUCKET}/b.png": [_disc(30, 40, 10, 10, 5), _disc(30, 40, 20, 30, 6)],
    }
    add_job_items(db, job_id, list(stored))
    for uri, masks in stored.items():
        rows = [
            mask_row(
                mask,
                project_id=project_id,
                image_id=0,
                source=MaskSource.BUCKET,
                model_version_id=version_id,
                label="disc",
                ordinal=i,
                score=0.5 + 0.1 * i,
            )
            for i, mask in enumerate(masks)
        ]
        image = {
            "sha256": hashlib.sha256(uri.encode()).hexdigest(),
            "width": 40,
            "height": 30,
            "size_bytes": 1,
        }
        complete_item(db, job_id, uri, image={**image, "uri": uri}, mask_rows=rows)
    return stored


def test_import_predictions_is_idempotent_and_lossless(label_studio, postgres_db, postgres_url):
    stored = _store_masks(postgres_db, "p-ls")
    client = label_studio.client()
    ls_project = client.projects.create(title="seemly-import", label_config=render_config("brush", ["disc"]))
    tasks = [
        {"image": f"{BUCKET}/a.png"},
        {"image": f"{BUCKET}/b.png"},
        {"image": f"{BUCKET}/not-segmented.png"},
    ]
    client.projects.import_tasks(id=ls_project.id, request=tasks)
    settings = Settings(database_url=postgres_url)

    report = import_predictions(
        "p-ls",
        ls_url=label_studio.url,
        api_key=label_studio.token,
        ls_project_id=ls_project.id,
        settings=settings,
        batch_size=1,  # several requests
    )
    assert (report.tasks_seen, report.predictions_created, report.regions) == (3, 2, 3)
    assert report.tasks_without_masks == 1 and report.unmatched_examples == [f"{BUCKET}/not-segmented.png"]

    predictions = client.predictions.list(project=ls_project.id)
    assert len(predictions) == 2
    by_task = {t.id: t.data["image"] for t in client.tasks.list(project=ls_project.id)}
    for prediction in predictions:
        uri = by_task[prediction.task]
        assert prediction.model_version == "classic-test"
        masks = stored[uri]
        assert prediction.score == pytest.approx(np.mean([0.5 + 0.1 * i for i in range(len(masks))]))
        assert len(prediction.result) == len(masks)
        for region, mask in zip(prediction.result, masks, strict=True):
            assert region["type"] == "brushlabels" and region["value"]["brushlabels"] == ["disc"]
            assert region["from_name"] and region["to_name"] == "image"
            decoded = Mask.from_ls_brush_rle(
                region["value"]["rle"], region["original_height"], region["original_width"]
            )
            assert decoded == mask

    again = import_predictions(
        "p-ls",
        ls_url=label_studio.url,
        api_key=label_studio.token,
        ls_project_id=ls_project.id,
        settings=settings,
    )
    assert again.predictions_created == 0 and again.tasks_already_predicted == 2
    assert len(client.predictions.list(project=ls_project.id)) == 2

    with pytest.raises(PredictionImportError, match="no bucket masks of model version 'nope'"):
        import_predictions(
            "p-ls",
            ls_url=label_studio.url,
            api_key=label_studio.token,
            ls_project_id=ls_project.id,
            settings=settings,
            model_version="nope",
        )


def test_ranked_images_get_one_minus_uncertainty_as_prediction_score(label_studio, postgres_db, postgres_url):
    """``seemly al rank`` wrote an uncertainty for a.png: its prediction's score (what the Data Manager
    sorts by, lowest first) is ``1 - uncertainty``; b.png, not ranked, keeps its masks' mean score."""
    from sqlalchemy import select

    from seemly.db.models import ImageUri, Uncertainty

    _store_masks(postgres_db, "p-al")
    with postgres_db.begin() as conn:
        project_id = ensure_project(conn, "p-al")
        image_id = conn.execute(
            select(ImageUri.image_id).where(ImageUri.uri == f"{BUCKET}/a.png")
        ).scalar_one()
        conn.execute(
            Uncertainty.__table__.insert().values(project_id=project_id, image_id=image_id, score=0.8)
        )
    client = label_studio.client()
    ls_project = client.projects.create(title="seemly-al", label_config=render_config("brush", ["disc"]))
    client.projects.import_tasks(
        id=ls_project.id, request=[{"image": f"{BUCKET}/a.png"}, {"image": f"{BUCKET}/b.png"}]
    )
    report = import_predictions(
        "p-al",
        ls_url=label_studio.url,
        api_key=label_studio.token,
        ls_project_id=ls_project.id,
        settings=Settings(database_url=postgres_url),
    )
    assert report.predictions_created == 2
    by_task = {t.id: t.data["image"] for t in client.tasks.list(project=ls_project.id)}
    scores = {by_task[p.task]: p.score for p in client.predictions.list(project=ls_project.id)}
    assert scores[f"{BUCKET}/a.png"] == pytest.approx(0.2)
    assert scores[f"{BUCKET}/b.png"] == pytest.approx(0.55)
