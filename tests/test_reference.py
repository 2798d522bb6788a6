"""Reference-image prompts: the example object found in another image (other place, scale, background)."""

from __future__ import annotations

import hashlib

import cv2
import numpy as np
import pytest

from seemly.engines import reference as ref
from seemly.engines.base import create_engine
from seemly.engines.semantic import NothingFoundError, SemanticEngine
from seemly.masks import Mask
from seemly.prompts import PromptError, PromptRound, parse_round
from tests.semantic_scenes import background, draw, iou


def paste(bg: np.ndarray, obj: np.ndarray, x: int, y: int, scale: float, flip: bool = False):
    """``obj`` resized by ``scale``, cut to an ellipse, pasted at (x, y); returns image and mask."""
    o = cv2.resize(obj, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    if flip:
        o = o[:, ::-1]
    h, w = o.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w]
    ellipse = ((yy - h / 2) / (h / 2)) ** 2 + ((xx - w / 2) / (w / 2)) ** 2 <= 1
    image = bg.copy()
    image[y : y + h, x : x + w][ellipse] = o[ellipse]
    mask = np.zeros(bg.shape[:2], bool)
    mask[y : y + h, x : x + w] = ellipse
    return image, mask


@pytest.fixture(scope="module")
def textured() -> np.ndarray:
    from skimage import data

    return data.astronaut()[30:230, 140:330]


@pytest.fixture(scope="module")
def engine() -> SemanticEngine:
    return SemanticEngine(create_engine("classic"), None, labels=[], embedder=False)


def run(
    engine: SemanticEngine, images: dict[str, np.ndarray], target: np.ndarray, ref_uri: str, ref_mask, *visual
):
    engine.image_loader = images.__getitem__
    state = engine.embed(target, hashlib.sha256(target.tobytes()).hexdigest())
    prompt = {"kind": "reference", "image_uri": ref_uri, "rle": Mask(ref_mask).to_coco_rle()}
    return engine.segment(state, PromptRound(prompts=[*visual, prompt]))


def test_textured_example_at_another_place_and_scale(engine, textured) -> None:
    rng = np.random.default_rng(1)
    ref_image, ref_mask = paste(background(rng, 300, 400), textured, 30, 40, 0.8)
    target, truth = paste(background(rng, 300, 400, (90, 140, 90)), textured, 180, 100, 0.55)
    segments = run(engine, {"mem://ref": ref_image}, target, "mem://ref", ref_mask)
    assert iou(segments[0].mask.data, truth) > 0.9


def test_mirrored_example(engine, textured) -> None:
    rng = np.random.default_rng(2)
    ref_image, ref_mask = paste(background(rng, 300, 400), textured, 150, 60, 0.7)
    target, truth = paste(background(rng, 300, 400, (150, 120, 160)), textured, 40, 80, 0.9, flip=True)
    model = ref.build_reference(ref_image, ref_mask)
    placements = ref.place(model, target)
    assert placements and placements[0].mirrored
    segments = run(engine, {"mem://ref": ref_image}, target, "mem://ref", ref_mask)
    assert iou(segments[0].mask.data, truth) > 0.85


def test_flat_example_by_appearance(engine) -> None:
    """A flat red disc has no keypoints: colour and shape statistics find it among distractors."""
    rng = np.random.default_rng(3)
    ref_image = background(rng, 240, 320)
    ref_mask = draw(ref_image, "apple", 80, 90, 30, rng)
    target = background(rng, 240, 320, (120, 120, 90))
    truth = draw(target, "apple", 220, 150, 20, rng)
    draw(target, "box", 70, 70, 25, rng)
    draw(target, "leaf", 120, 180, 25, rng)
    assert not ref.place(ref.build_reference(ref_image, ref_mask), target)
    segments = run(engine, {"mem://ref": ref_image}, target, "mem://ref", ref_mask)
    assert iou(segments[0].mask.data, truth) > 0.9


def test_several_instances(engine) -> None:
    rng = np.random.default_rng(4)
    ref_image = background(rng, 240, 320)
    ref_mask = draw(ref_image, "box", 160, 120, 28, rng)
    target = background(rng, 240, 320, (150, 150, 110))
    truths = [draw(target, "box", 60, 60, 22, rng), draw(target, "box", 250, 170, 26, rng)]
    draw(target, "apple", 200, 60, 24, rng)
    segments = run(engine, {"mem://ref": ref_image}, target, "mem://ref", ref_mask)
    assert len(segments) >= 2
    for truth in truths:
        assert max(iou(s.mask.data, truth) for s in segments[:2]) > 0.9


def test_reference_and_box(engine) -> None:
    rng = np.random.default_rng(5)
    ref_image = background(rng, 240, 320)
    ref_mask = draw(ref_image, "box", 160, 120, 28, rng)
    target = background(rng, 240, 320, (150, 150, 110))
    first = draw(target, "box", 60, 60, 22, rng)
    second = draw(target, "box", 250, 170, 26, rng)
    box = {"kind": "box", "x0": 200.0, "y0": 120.0, "x1": 300.0, "y1": 220.0}
    segments = run(engine, {"mem://ref": ref_image}, target, "mem://ref", ref_mask, box)
    assert iou(segments[0].mask.data, second) > 0.9 and iou(segments[0].mask.data, first) == 0.0


def test_nothing_like_the_example(engine) -> None:
    rng = np.random.default_rng(6)
    ref_image = background(rng, 240, 320)
    ref_mask = draw(ref_image, "apple", 160, 120, 28, rng)
    target = background(rng, 240, 320, (150, 150, 110))
    draw(target, "box", 60, 60, 22, rng)
    with pytest.raises(NothingFoundError, match="reference example"):
        run(engine, {"mem://ref": ref_image}, target, "mem://ref", ref_mask)


def test_empty_reference_mask_is_a_clear_error() -> None:
    empty = Mask.empty(20, 30).to_coco_rle()
    with pytest.raises(PromptError, match="reference mask is empty"):
        parse_round({"prompts": [{"kind": "reference", "image_uri": "s3://b/a.png", "rle": empty}]})
    with pytest.raises(ref.ReferenceError, match="reference mask is empty"):
        ref.build_reference(np.zeros((20, 30, 3), np.uint8), np.zeros((20, 30), bool))


def test_reference_mask_of_another_size() -> None:
    with pytest.raises(ref.ReferenceError, match="30x20 but the reference image is 40x20"):
        ref.build_reference(np.zeros((20, 40, 3), np.uint8), np.ones((20, 30), bool))


def test_unreadable_reference_image(engine) -> None:
    target = background(np.random.default_rng(7), 120, 160)
    with pytest.raises(ref.ReferenceError, match="cannot read the reference image 'mem://missing'"):
        run(engine, {}, target, "mem://missing", np.ones((10, 10), bool))
