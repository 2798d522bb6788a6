"""The classic engine on synthetic images whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest

from seemly.engines.base import ImageState, UnsupportedPromptError, create_engine
from seemly.engines.classic import ClassicEngine, ClassicState, Params
from seemly.masks import Mask
from seemly.prompts import (
    Box,
    Click,
    MaskPrompt,
    Polygon,
    PromptRound,
    Reference,
    RoundResult,
    Scribble,
    Text,
)

H, W = 120, 160


def noisy(base: np.ndarray, seed: int = 0, sigma: float = 12.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(base + rng.normal(0, sigma, base.shape), 0, 255).astype(np.uint8)


def disc_image(colour: tuple[int, int, int] = (200, 60, 50)) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[:H, :W]
    disc = (yy - 60) ** 2 + (xx - 80) ** 2 <= 30**2
    base = np.full((H, W, 3), 110.0)
    base[disc] = colour
    return noisy(base), disc


def blobs_image() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A red and a blue rectangle that touch, on grey."""
    red = np.zeros((H, W), dtype=bool)
    blue = np.zeros((H, W), dtype=bool)
    red[30:90, 20:80] = True
    blue[30:90, 80:140] = True
    base = np.full((H, W, 3), 120.0)
    base[red] = (210, 40, 40)
    base[blue] = (40, 60, 210)
    return noisy(base, seed=1), red, blue


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def click(x: float, y: float, positive: bool = True) -> Click:
    return Click(x=x, y=y, positive=positive)


def one(*prompts: object) -> PromptRound:
    return PromptRound(prompts=list(prompts))


@pytest.fixture(scope="module")
def engine() -> ClassicEngine:
    return ClassicEngine()


@pytest.fixture(scope="module")
def disc() -> tuple[ClassicState, np.ndarray]:
    image, mask = disc_image()
    return ClassicEngine().embed(image, "disc"), mask


@pytest.fixture(scope="module")
def blobs() -> tuple[ClassicState, np.ndarray, np.ndarray]:
    image, red, blue = blobs_image()
    return ClassicEngine().embed(image, "blobs"), red, blue


def test_registered_and_versioned(engine: ClassicEngine) -> None:
    assert isinstance(create_engine("classic"), ClassicEngine)
    assert engine.model_version == "classic-1"


def test_one_click_on_a_disc(engine: ClassicEngine, disc: tuple[ClassicState, np.ndarray]) -> None:
    state, truth = disc
    segments = engine.segment(state, one(click(80.5, 60.5)))
    assert segments and all(s.model_version == "classic-1" for s in segments)
    assert [s.score for s in segments] == sorted((s.score for s in segments), reverse=True)
    assert iou(segments[0].mask.data, truth) > 0.95


def test_single_click_is_multimask(
    engine: ClassicEngine, blobs: tuple[ClassicState, np.ndarray, np.ndarray]
) -> None:
    state, _red, _blue = blobs
    segments = engine.segment(state, one(click(50.5, 60.5)))
    assert len(segments) >= 2
    assert [s.score for s in segments] == sorted((s.score for s in segments), reverse=True)
    assert len({s.mask for s in segments}) == len(segments)  # distinct candidates


def test_negative_click_removes_a_part(
    engine: ClassicEngine, blobs: tuple[ClassicState, np.ndarray, np.ndarray]
) -> None:
    state, red, blue = blobs
    first = one(click(50.5, 60.5))
    memory = [RoundResult(first, Mask(red | blue))]  # the earlier answer took both blobs
    result = engine.segment(state, one(click(110.5, 60.5, positive=False)), memory)[0].mask.data
    assert iou(result, red) > 0.9
    assert (result & blue).sum() < 0.05 * blue.sum()


def test_positive_click_outside_adds_a_part(
    engine: ClassicEngine, blobs: tuple[ClassicState, np.ndarray, np.ndarray]
) -> None:
    state, red, blue = blobs
    first = one(click(50.5, 60.5))
    memory = [RoundResult(first, Mask(red.copy()))]
    result = engine.segment(state, one(click(110.5, 60.5)), memory)[0].mask.data
    assert iou(result, red | blue) > 0.9


def test_clicks_accumulate_over_rounds(
    engine: ClassicEngine, blobs: tuple[ClassicState, np.ndarray, np.ndarray]
) -> None:
    state, red, _blue = blobs
    rounds = [
        one(click(50.5, 60.5)),
        one(click(110.5, 60.5, positive=False)),
        one(click(30.5, 40.5)),
    ]
    memory: list[RoundResult] = []
    for prompt_round in rounds:
        mask = engine.segment(state, prompt_round, memory)[0].mask
        memory.append(RoundResult(prompt_round, mask))
    # the negative click of round 2 still holds in round 3
    assert iou(memory[-1].mask.data, red) > 0.9
    assert not memory[-1].mask.data[60, 110]


def test_a_later_opposite_click_on_the_same_spot_wins(
    engine: ClassicEngine, blobs: tuple[ClassicState, np.ndarray, np.ndarray]
) -> None:
    state, red, blue = blobs
    rounds = [one(click(50.5, 60.5)), one(click(110.5, 60.5)), one(click(111.5, 60.5, positive=False))]
    memory: list[RoundResult] = []
    for prompt_round in rounds:
        mask = engine.segment(state, prompt_round, memory)[0].mask
        memory.append(RoundResult(prompt_round, mask))
    assert iou(memory[1].mask.data, red | blue) > 0.9
    assert iou(memory[2].mask.data, red) > 0.9


def test_box_picks_the_boxed_object(
    engine: ClassicEngine, blobs: tuple[ClassicState, np.ndarray, np.ndarray]
) -> None:
    state, red, _blue = blobs
    result = engine.segment(state, one(Box(x0=16, y0=26, x1=84, y1=94)))[0].mask.data
    assert iou(result, red) > 0.9


def test_scribbles(engine: ClassicEngine, blobs: tuple[ClassicState, np.ndarray, np.ndarray]) -> None:
    state, red, _blue = blobs
    strokes = one(
        Scribble(points=[(30, 60), (70, 60)], positive=True),
        Scribble(points=[(100, 40), (120, 80)], positive=False),
    )
    assert iou(engine.segment(state, strokes)[0].mask.data, red) > 0.9


def test_polygon_and_mask_prompts(
    engine: ClassicEngine, blobs: tuple[ClassicState, np.ndarray, np.ndarray]
) -> None:
    state, red, _blue = blobs
    polygon = one(Polygon(points=[(17, 27), (83, 27), (83, 93), (17, 93)]))
    assert iou(engine.segment(state, polygon)[0].mask.data, red) > 0.9
    coarse = np.zeros((H, W), dtype=bool)
    coarse[35:95, 15:85] = True  # shifted and too large
    masked = one(MaskPrompt(rle=Mask(coarse).to_coco_rle()))
    assert iou(engine.segment(state, masked)[0].mask.data, red) > 0.9
    negative = one(
        click(50.5, 60.5), Polygon(points=[(80, 30), (140, 30), (140, 90), (80, 90)], positive=False)
    )
    assert iou(engine.segment(state, negative)[0].mask.data, red) > 0.9


def test_combination_in_one_round(
    engine: ClassicEngine, blobs: tuple[ClassicState, np.ndarray, np.ndarray]
) -> None:
    state, red, _blue = blobs
    combined = one(Box(x0=10, y0=20, x1=150, y1=100), click(110.5, 60.5, positive=False), click(50.5, 60.5))
    assert iou(engine.segment(state, combined)[0].mask.data, red) > 0.9


def test_deterministic(blobs: tuple[ClassicState, np.ndarray, np.ndarray]) -> None:
    image, _, _ = blobs_image()
    prompts = one(click(50.5, 60.5), click(110.5, 60.5, positive=False))
    a = ClassicEngine().segment(ClassicEngine().embed(image, "a"), prompts)
    b = ClassicEngine().segment(ClassicEngine().embed(image, "a"), prompts)
    assert [s.mask for s in a] == [s.mask for s in b]
    assert [s.score for s in a] == [s.score for s in b]


def test_text_and_reference_are_not_supported_yet(
    engine: ClassicEngine, disc: tuple[ClassicState, np.ndarray]
) -> None:
    state, _ = disc
    with pytest.raises(UnsupportedPromptError, match="text"):
        engine.segment(state, one(Text(text="a red disc")))
    reference = Reference(image_uri="s3://b/x.png", rle=Mask(np.ones((4, 4), dtype=bool)).to_coco_rle())
    with pytest.raises(UnsupportedPromptError, match="reference"):
        engine.segment(state, one(reference, click(80.5, 60.5)))


def test_foreign_state_is_rejected(engine: ClassicEngine) -> None:
    with pytest.raises(UnsupportedPromptError):
        engine.segment(ImageState("x", "other-1", H, W), one(click(1, 1)))


def test_refiner_seam(disc: tuple[ClassicState, np.ndarray]) -> None:
    state, truth = disc
    seen = {}

    def refiner(image: np.ndarray, maps: object, mask: np.ndarray, probability: np.ndarray) -> np.ndarray:
        seen["shapes"] = (image.shape, mask.shape, probability.shape)
        return np.where(truth, 0.9, 0.1).astype(np.float32)

    result = ClassicEngine(refiner=refiner).segment(state, one(click(80.5, 60.5)))[0].mask.data
    assert seen["shapes"] == ((H, W, 3), (H, W), (H, W))
    assert np.array_equal(result, truth)


@pytest.mark.parametrize(
    "prompts",
    [
        [Click(x=8, y=8)],  # the bottom-right corner of an 8 x 8 image
        [Click(x=0, y=0), Click(x=8, y=0, positive=False)],
        [Box(x0=3, y0=3, x1=4, y1=4)],  # a 1-pixel box
        [Box(x0=0, y0=0, x1=8, y1=8)],  # the whole image
        [Scribble(points=[(4, 4)])],  # a one-point scribble
        [Scribble(points=[(0, 0), (8, 8)], positive=False)],  # only background
        [Polygon(points=[(1, 1), (2, 1), (1.5, 1.2)])],  # a sliver that covers no pixel centre
        [MaskPrompt(rle=Mask(np.zeros((8, 8), dtype=bool)).to_coco_rle())],  # an empty mask
    ],
)
def test_tiny_image_edge_cases(engine: ClassicEngine, prompts: list[object]) -> None:
    rng = np.random.default_rng(3)
    image = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
    state = engine.embed(image, "tiny")
    prompt_round = PromptRound(prompts=prompts).check_bounds(8, 8)
    segments = engine.segment(state, prompt_round)
    assert segments and segments[0].mask.shape == (8, 8)
    memory = [RoundResult(prompt_round, Mask.empty(8, 8))]
    assert engine.segment(state, one(Click(x=8, y=8)), memory)[0].mask.shape == (8, 8)


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (5, 1), (2, 2)])
def test_degenerate_image_sizes(engine: ClassicEngine, shape: tuple[int, int]) -> None:
    image = np.full((*shape, 3), 128, dtype=np.uint8)
    state = engine.embed(image, "x")
    segments = engine.segment(state, one(Click(x=shape[1], y=shape[0])))
    assert segments[0].mask.shape == shape
    assert engine.segment_everything(state)


def test_flat_and_grayscale_images(engine: ClassicEngine) -> None:
    flat = engine.embed(np.zeros((50, 60, 3), dtype=np.uint8), "flat")
    assert engine.segment(flat, one(click(30, 25)))[0].mask.shape == (50, 60)
    image, truth = disc_image(colour=(230, 200, 180))  # brighter than the background in grey too
    gray = image.mean(axis=2).astype(np.uint8)
    state = engine.embed(gray, "gray")  # a 2-D array is accepted as grayscale
    assert iou(engine.segment(state, one(click(80.5, 60.5)))[0].mask.data, truth) > 0.9
    state3 = engine.embed(np.repeat(gray[:, :, None], 3, axis=2), "gray3")
    assert iou(engine.segment(state3, one(click(80.5, 60.5)))[0].mask.data, truth) > 0.9


def test_memory_of_another_size_is_ignored(
    engine: ClassicEngine, disc: tuple[ClassicState, np.ndarray]
) -> None:
    state, truth = disc
    memory = [RoundResult(one(click(1, 1)), Mask.full(10, 10))]
    assert iou(engine.segment(state, one(click(80.5, 60.5)), memory)[0].mask.data, truth) > 0.9


def test_segment_everything(
    engine: ClassicEngine, blobs: tuple[ClassicState, np.ndarray, np.ndarray]
) -> None:
    state, red, blue = blobs
    segments = engine.segment_everything(state)
    assert segments and all(s.model_version == "classic-1" for s in segments)
    assert [s.score for s in segments] == sorted((s.score for s in segments), reverse=True)
    total = np.zeros((H, W), dtype=int)
    for s in segments:
        total += s.mask.data
    assert total.max() <= 1  # non-overlapping
    assert max(iou(s.mask.data, red) for s in segments) > 0.9
    assert max(iou(s.mask.data, blue) for s in segments) > 0.9


def test_large_images_are_worked_on_smaller() -> None:
    """Above ``max_side`` the engine segments a downscaled copy and upscales the answer."""
    image, truth = disc_image()
    engine = ClassicEngine(params=Params(max_side=80))
    state = engine.embed(image, "big")
    assert state.features is not None and state.features.full.shape == (60, 80)
    first = one(click(80.5, 60.5))
    segments = engine.segment(state, first)
    assert segments[0].mask.shape == (H, W)
    assert iou(segments[0].mask.data, truth) > 0.9
    memory = [RoundResult(first, segments[0].mask)]
    second = engine.segment(state, one(click(80.5, 40.5, positive=False)), memory)[0].mask.data
    assert second.shape == (H, W) and not second[40, 80]  # the user's seed holds at full size
