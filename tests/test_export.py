"""``seemly export coco``: the file loads in pycocotools and gives back exactly the stored masks."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from pycocotools.coco import COCO

from seemly import cli
from seemly.config import Settings, get_settings
from seemly.db.bulk import add_job_items, mask_row
from seemly.db.jobs import complete_item, create_job
from seemly.db.models import MaskSource
from seemly.db.registry import ensure_model_version, ensure_project
from seemly.masks import Mask
from workers.export import ExportError, export_coco


def _disc(height: int, width: int, cy: int, cx: int, radius: int) -> Mask:
    yy, xx = np.mgrid[:height, :width]
    return Mask((yy - cy) ** 2 + (xx - cx) ** 2 < radius**2)


def _store(db, project_id: int, version: str, uri: str, masks: list[tuple[str, Mask, float]]) -> None:
    version_id = ensure_model_version(db, version, engine="classic")
    job_id = create_job(db, "presegment", project_id=project_id, params={})
    add_job_items(db, job_id, [uri])
    height, width = masks[0][1].shape
    ordinals: dict[str, int] = {}
    rows = []
    for label, mask, score in masks:
        ordinal = ordinals[label] = ordinals.get(label, -1) + 1
        rows.append(
            mask_row(
                mask,
                project_id=project_id,
                image_id=0,
                source=MaskSource.BUCKET,
                model_version_id=version_id,
                label=label,
                ordinal=ordinal,
                score=score,
            )
        )
    image = {
        "sha256": hashlib.sha256(uri.encode()).hexdigest(),
        "width": width,
        "height": height,
        "size_bytes": 9,
    }
    complete_item(db, job_id, uri, image={**image, "uri": uri}, mask_rows=rows)


@pytest.fixture
def stored(postgres_db):
    project_id = ensure_project(postgres_db, "p-coco", labels=["cat", "dog"])
    a = [
        ("cat", _disc(30, 40, 15, 20, 8), 0.9),
        ("cat", _disc(30, 40, 5, 5, 3), 0.4),
        ("", _disc(30, 40, 25, 35, 4), 0.7),
    ]
    b = [("zebra", _disc(20, 24, 10, 12, 6), 0.8)]
    _store(postgres_db, project_id, "classic-x", "s3://bkt/a.png", a)
    _store(postgres_db, project_id, "classic-x", "s3://bkt/b.png", b)
    _store(postgres_db, project_id, "classic-y", "s3://bkt/a.png", [("dog", _disc(30, 40, 15, 20, 9), 0.5)])
    return {"s3://bkt/a.png": a, "s3://bkt/b.png": b}


def test_coco_export_round_trips_through_pycocotools(stored, postgres_url, tmp_path):
    settings = Settings(database_url=postgres_url)
    out = tmp_path / "out" / "coco.json"
    with pytest.raises(ExportError, match=r"several model versions \(classic-x, classic-y\)"):
        export_coco("p-coco", out, settings=settings)
    assert not out.exists()

    counts = export_coco("p-coco", out, settings=settings, model_version="classic-x")
    assert counts == {"images": 2, "annotations": 4, "categories": 4}
    coco = COCO(str(out))
    names = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
    assert sorted(names.values()) == [
        "cat",
        "dog",
        "object",
        "zebra",
    ]  # project labels, mask labels, unlabeled
    assert [names[i] for i in sorted(names)][:2] == ["cat", "dog"]  # the project's own order first
    for image in coco.loadImgs(coco.getImgIds()):
        expected = stored[image["file_name"]]
        annotations = coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]]))
        assert len(annotations) == len(expected)
        for annotation, (label, mask, score) in zip(
            annotations, sorted(expected, key=lambda e: e[0]), strict=True
        ):
            assert names[annotation["category_id"]] == (label or "object")
            assert np.array_equal(coco.annToMask(annotation).astype(bool), mask.data)
            assert annotation["area"] == mask.area and annotation["score"] == pytest.approx(score)
            x, y, w, h = mask.bbox
            assert annotation["bbox"] == [x, y, w, h]
            assert annotation["seemly_model_version"] == "classic-x"
        assert (image["height"], image["width"]) == expected[0][1].shape
    # the file is a plain COCO result set too (what evaluation scripts load)
    results = coco.loadRes(
        [
            {k: a[k] for k in ("image_id", "category_id", "segmentation", "score")}
            for a in coco.dataset["annotations"]
        ]
    )
    assert len(results.getAnnIds()) == 4


def test_coco_export_cli(stored, postgres_url, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SEEMLY_DATABASE_URL", postgres_url)
    get_settings.cache_clear()
    try:
        out = tmp_path / "y.json"
        code = cli.main(
            ["export", "coco", "--project", "p-coco", "--out", str(out), "--model-version", "classic-y"]
        )
        assert code == 0
        assert "1 images, 1 annotations" in capsys.readouterr().out
        document = json.loads(out.read_text())
        assert [a["seemly_model_version"] for a in document["annotations"]] == ["classic-y"]
        assert cli.main(["export", "coco", "--project", "nope", "--out", str(tmp_path / "n.json")]) == 2
        assert "no project named 'nope'" in capsys.readouterr().err
    finally:
        get_settings.cache_clear()
