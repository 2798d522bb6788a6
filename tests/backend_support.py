"""Shared pieces of the backend tests: synthetic images with ground truth, Label Studio-shaped JSON,
and a ``backend_app`` fixture (the Flask app on a real Postgres database).

A test module defines its fixture as ``yield from backend_app_for(postgres_db, postgres_url, tmp_path)``.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flask import Flask
from flask.testing import FlaskClient
from PIL import Image as PILImage
from sqlalchemy import Engine

from backend.app import Backend, BackendOptions, backend_of, create_app
from plugin.templates import render_config
from seemly.config import Settings
from seemly.masks import Mask
from seemly.storage import path_to_uri

LABELS = ["cat", "dog"]
BRUSH_CONFIG = render_config("brush", LABELS)
POLYGON_CONFIG = render_config("polygon", LABELS)
NO_BRUSH_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <RectangleLabels name="box" toName="image" smart="true"><Label value="cat"/></RectangleLabels>
</View>"""
PROJECT = "7.1700000000"
PROJECT_ID = 7


@dataclass
class Scene:
    """A synthetic photo-like image and the true mask of each object in it."""

    png: bytes
    width: int
    height: int
    truth: dict[str, Mask]
    centers: dict[str, tuple[float, float]]  # pixel (x, y) inside each object

    def pct(self, name: str) -> tuple[float, float]:
        x, y = self.centers[name]
        return x * 100.0 / self.width, y * 100.0 / self.height


def make_scene(seed: int = 0, width: int = 160, height: int = 120, layout: str = "left") -> Scene:
    """Textured background, a red disk ("cat") and a blue rectangle ("dog"); ``layout`` swaps sides."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = 110 + 30 * np.sin(xx / 9.0) * np.cos(yy / 11.0)
    image = np.stack([base, base + 10, base - 10], axis=2) + rng.normal(0, 6, (height, width, 3))
    if layout == "left":
        cx, cy, r = 0.3 * width, 0.5 * height, 0.2 * height
        rx0, rx1, ry0, ry1 = int(0.62 * width), int(0.9 * width), int(0.25 * height), int(0.75 * height)
    else:
        cx, cy, r = 0.7 * width, 0.45 * height, 0.22 * height
        rx0, rx1, ry0, ry1 = int(0.08 * width), int(0.4 * width), int(0.2 * height), int(0.8 * height)
    disk = (xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 <= r * r
    rect = np.zeros((height, width), bool)
    rect[ry0:ry1, rx0:rx1] = True
    image[disk] = np.array([205, 40, 35]) + rng.normal(0, 5, (int(disk.sum()), 3))
    image[rect] = np.array([30, 60, 200]) + rng.normal(0, 5, (int(rect.sum()), 3))
    array = np.clip(image, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    PILImage.fromarray(array).save(buffer, format="PNG")
    return Scene(
        png=buffer.getvalue(),
        width=width,
        height=height,
        truth={"cat": Mask(disk), "dog": Mask(rect)},
        centers={"cat": (cx, cy), "dog": ((rx0 + rx1) / 2, (ry0 + ry1) / 2)},
    )


def save(scene: Scene, directory: Path, name: str) -> str:
    path = directory / name
    path.write_bytes(scene.png)
    return path_to_uri(path)


# --- Label Studio JSON as the frontend sends it ------------------------------------------------------------


def keypoint(
    scene: Scene, x_pct: float, y_pct: float, *, positive: bool = True, label: str = "cat"
) -> dict[str, Any]:
    from_name = "point" if positive else "point_negative"
    return {
        "id": f"kp{int(x_pct * 1000)}{int(y_pct * 1000)}",
        "from_name": from_name,
        "to_name": "image",
        "type": "keypointlabels",
        "origin": "manual",
        "original_width": scene.width,
        "original_height": scene.height,
        "image_rotation": 0,
        "value": {"x": x_pct, "y": y_pct, "width": 0.6, "keypointlabels": [label]},
        "is_positive": positive,
    }


def rectangle(scene: Scene, x: float, y: float, w: float, h: float, label: str = "dog") -> dict[str, Any]:
    return {
        "id": "rect1",
        "from_name": "box",
        "to_name": "image",
        "type": "rectanglelabels",
        "origin": "manual",
        "original_width": scene.width,
        "original_height": scene.height,
        "image_rotation": 0,
        "value": {"x": x, "y": y, "width": w, "height": h, "rotation": 0, "rectanglelabels": [label]},
    }


def textarea(text: str) -> dict[str, Any]:
    return {
        "id": "txt1",
        "from_name": "prompt",
        "to_name": "image",
        "type": "textarea",
        "origin": "manual",
        "value": {"text": [text]},
    }


def task(task_id: int, uri: str, **extra: Any) -> dict[str, Any]:
    return {"id": task_id, "data": {"image": uri}, "annotations": [], "predictions": [], **extra}


def interactive_body(
    task_id: int,
    uri: str,
    results: list[dict[str, Any]],
    *,
    user: str | None = "ann@example.com",
    config: str = BRUSH_CONFIG,
    project: Any = PROJECT,
) -> dict[str, Any]:
    drafts = [{"id": 1, "user": user, "result": []}] if user else []
    return {
        "tasks": [task(task_id, uri, drafts=drafts)],
        "project": project,
        "label_config": config,
        "params": {"login": None, "password": None, "context": {"result": results}},
    }


def batch_body(tasks: list[dict[str, Any]], config: str = BRUSH_CONFIG) -> dict[str, Any]:
    return {"tasks": tasks, "project": PROJECT, "label_config": config, "params": {"context": None}}


def brush_mask(result: dict[str, Any]) -> Mask:
    assert result["type"] == "brushlabels"
    return Mask.from_ls_brush_rle(result["value"]["rle"], result["original_height"], result["original_width"])


def only_brush(prediction: dict[str, Any]) -> dict[str, Any]:
    brushes = [r for r in prediction["result"] if r["type"] == "brushlabels"]
    assert len(brushes) == 1, prediction["result"]
    return brushes[0]


# --- the app on real Postgres -------------------------------------------------------------------------------


@dataclass
class BackendUnderTest:
    app: Flask
    backend: Backend
    client: FlaskClient
    images: Path
    db: Engine

    def post(self, path: str, json: Any = None, **kwargs: Any) -> Any:
        return self.client.post(path, json=json, **kwargs)

    def flush(self) -> None:
        assert self.backend.history.flush(60), "history writer did not drain"


def make_backend(
    db: Engine, url: str, images: Path, *, options: BackendOptions | None = None, **settings: Any
) -> BackendUnderTest:
    config = Settings(database_url=url, file_roots=[str(images)], **settings)
    # No background warm-up in tests: it would race with engine spies (tested on its own).
    app = create_app(config, db=db, options=options or BackendOptions(warm_up=False))
    app.testing = False  # errors must go through our handlers, as in production
    return BackendUnderTest(app, backend_of(app), app.test_client(), images, db)


def backend_app_for(postgres_db: Engine, postgres_url: str, tmp_path: Path) -> Iterator[BackendUnderTest]:
    """Body of a ``backend_app`` fixture: the app on ``postgres_db`` with ``file://`` images under tmp."""
    images = tmp_path / "images"
    images.mkdir()
    under_test = make_backend(postgres_db, postgres_url, images)
    yield under_test
    under_test.backend.history.close()
    logging.getLogger("backend").handlers.clear()
