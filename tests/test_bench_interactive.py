"""The interactive benchmark: dataset loading, the RITM click simulator, metrics and the CLI.

The click positions and metrics are checked against values worked out by hand, with a fake engine
that answers known masks, so a change in the protocol cannot go unnoticed.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import pytest

from seemly.bench import metrics, simulator
from seemly.bench.datasets import Dataset, DatasetError
from seemly.bench.interactive import configure, run
from seemly.engines.base import Engine, ImageState, Segment, register_engine
from seemly.masks import Mask
from seemly.prompts import Click, PromptRound, RoundResult

SIZE = 20


def square(r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    """Rows r0..r1 and columns c0..c1 inclusive, on a SIZE x SIZE canvas."""
    out = np.zeros((SIZE, SIZE), dtype=bool)
    out[r0 : r1 + 1, c0 : c1 + 1] = True
    return out


GT = square(4, 13, 4, 13)  # a 10 x 10 object
FP_BLOB = square(15, 17, 15, 17)  # 3 x 3 of background

# Image "a": the fake engine answers the left half, then the object plus a false-positive blob,
# then the object exactly. Image "b": it always answers nothing.
ANSWERS = {
    1: [square(4, 13, 4, 8), GT | FP_BLOB, GT],
    2: [np.zeros_like(GT)] * 3,
}


@register_engine("fake-test")
class FakeEngine(Engine):
    name = "fake"
    version = "test"

    def __init__(self, **_options: object) -> None:
        self.rounds_seen: list[list[tuple[float, float, bool]]] = []

    def embed(self, image: np.ndarray, sha256: str) -> ImageState:
        return ImageState(
            sha256, self.model_version, image.shape[0], image.shape[1], {"key": int(image[0, 0, 0])}
        )

    def segment(
        self, state: ImageState, prompt_round: PromptRound, memory: Sequence[RoundResult] = ()
    ) -> list[Segment]:
        self.rounds_seen.append([(c.x, c.y, c.positive) for c in prompt_round.clicks])
        answers = ANSWERS[state.extras["key"]]
        mask = answers[min(len(memory), len(answers) - 1)]
        return [Segment(Mask(mask), 1.0, self.model_version)]

    def segment_everything(self, state: ImageState) -> list[Segment]:
        return []


def write_dataset(root: Path) -> None:
    for sub in ("images", "masks", "ignore"):
        (root / sub).mkdir(parents=True)
    for key, stem in ((1, "a"), (2, "b")):
        image = np.full((SIZE, SIZE, 3), key, dtype=np.uint8)
        cv2.imwrite(str(root / "images" / f"{stem}.png"), image)
        cv2.imwrite(str(root / "masks" / f"{stem}.png"), GT.astype(np.uint8) * 255)
    # an ignore band that touches nothing the simulator looks at (image "b" has none)
    band = np.zeros((SIZE, SIZE), dtype=np.uint8)
    band[0, 0] = 255
    cv2.imwrite(str(root / "ignore" / "a.png"), band)
    (root / "images" / "notes.txt").write_text("not an image")


# --- the simulator --------------------------------------------------------------------------------
def test_first_click_is_the_interior_point_farthest_from_the_boundary() -> None:
    # Four pixels of the 10 x 10 square are 5 from its boundary; the first in row-major order wins.
    assert simulator.next_click(GT, np.zeros_like(GT)) == simulator.SimClick(8, 8, True)


def test_image_border_counts_as_boundary() -> None:
    gt = np.zeros((SIZE, SIZE), dtype=bool)
    gt[:, :6] = True  # touches the left, top and bottom borders
    # Padding makes the border a boundary: the most interior distance is 3 (column 2 or 3, and
    # at least 3 rows from the top); without it, column 0 would be 6 from the nearest boundary.
    assert simulator.next_click(gt, np.zeros_like(gt)) == simulator.SimClick(2, 2, True)


def test_next_click_goes_to_the_largest_error() -> None:
    # Left half predicted: the false-negative strip (columns 9..13) is 3 from its edges on
    # rows 6..11; the first such pixel in row-major order is (6, 11).
    assert simulator.next_click(GT, square(4, 13, 4, 8)) == simulator.SimClick(6, 11, True)
    # Object plus a 3 x 3 blob: a negative click in the blob's centre.
    assert simulator.next_click(GT, GT | FP_BLOB) == simulator.SimClick(16, 16, False)
    assert simulator.next_click(GT, GT) is None


def test_ignore_band_is_not_an_error_and_clicked_pixels_are_skipped() -> None:
    ignore = np.zeros_like(GT)
    ignore[:, 9:] = True
    assert simulator.next_click(GT, square(4, 13, 4, 8), ignore) is None
    not_clicked = np.ones(GT.shape, dtype=np.float32)
    not_clicked[8, 8] = 0
    assert simulator.next_click(GT, np.zeros_like(GT), None, not_clicked) == simulator.SimClick(8, 9, True)


def test_box_and_scribbles_follow_the_ground_truth() -> None:
    box = simulator.box_prompt(GT)
    assert (box.x0, box.y0, box.x1, box.y1) == (4, 4, 14, 14)
    gt = np.zeros((60, 80), dtype=bool)
    gt[20:40, 10:70] = True
    strokes = simulator.scribble_prompts(gt)
    positive = [s for s in strokes if s.positive]
    negative = [s for s in strokes if not s.positive]
    assert len(positive) == 1 and len(negative) == 4
    for x, y in positive[0].points_xy:
        assert gt[int(y), int(x)]
    xs = [x for x, _ in positive[0].points_xy]
    assert max(xs) - min(xs) > 30  # the medial axis runs along the long side
    for stroke in negative:
        for x, y in stroke.points_xy:
            assert 0 <= x <= 80 and 0 <= y <= 60
            assert not gt[min(int(y), 59), min(int(x), 79)]
    # an object touching the left border gets no stroke on that side
    gt[20:40, :5] = True
    assert len([s for s in simulator.scribble_prompts(gt) if not s.positive]) == 3


# --- metrics ----------------------------------------------------------------------------------
def test_noc_and_iou_after() -> None:
    assert metrics.noc([0.5, 0.86, 0.91], 0.85, 20) == 2
    assert metrics.noc([0.5, 0.86, 0.91], 0.90, 20) == 3
    assert metrics.noc([0.5, 0.6], 0.90, 20) == 20
    assert metrics.iou_after([0.5, 0.7], 5) == 0.7
    assert metrics.iou_after([], 1) == 0.0


# --- the whole benchmark on a synthetic dataset ---------------------------------------------------
def test_dataset_layout(tmp_path: Path) -> None:
    write_dataset(tmp_path)
    dataset = Dataset(tmp_path)
    assert dataset.stems == ["a", "b"]
    sample = dataset[0]
    assert sample.image.shape == (SIZE, SIZE, 3) and sample.image.dtype == np.uint8
    assert sample.gt.sum() == 100 and sample.ignore is not None and sample.ignore.sum() == 1
    assert dataset[1].ignore is None
    assert len(Dataset(tmp_path, limit=1)) == 1
    with pytest.raises(DatasetError):
        Dataset(tmp_path / "missing")


def test_benchmark_end_to_end_with_hand_checked_numbers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import argparse

    write_dataset(tmp_path / "data")
    parser = argparse.ArgumentParser()
    configure(parser, ("bench", "interactive"))
    out = tmp_path / "out.json"
    md = tmp_path / "table.md"
    args = parser.parse_args(
        [
            "--dataset",
            str(tmp_path / "data"),
            "--engine",
            "fake-test",
            "--max-clicks",
            "3",
            "--json",
            str(out),
            "--markdown",
            str(md),
            "--quiet",
        ]
    )
    assert run(args, ("bench", "interactive")) == 0
    payload = json.loads(out.read_text())
    a, b = payload["results"]
    assert [tuple(c) for c in a["clicks"]] == [(8, 8, True), (6, 11, True), (16, 16, False)]
    assert a["ious"] == pytest.approx([0.5, 100 / 109, 1.0])
    # "b" never gets an answer: the clicks walk over the four most interior pixels
    assert [tuple(c) for c in b["clicks"]] == [(8, 8, True), (8, 9, True), (9, 8, True)]
    assert b["ious"] == [0.0, 0.0, 0.0]
    assert a["box_iou"] == 0.5 and a["scribble_iou"] == 0.5  # a one-round session: the first answer
    (summary,) = payload["summaries"]
    assert summary["noc85"] == pytest.approx((2 + 3) / 2)
    assert summary["noc90"] == pytest.approx((2 + 3) / 2)
    assert summary["failures90"] == 1
    assert summary["miou"]["1"] == pytest.approx(0.25)
    assert summary["miou"]["3"] == pytest.approx(0.5)
    assert summary["miou"]["5"] == pytest.approx(0.5)
    assert summary["clicks_total"] == 6
    assert "| fake-test | 2.50 | 2.50 | 1/2 |" in md.read_text()
    assert "fake-test" in capsys.readouterr().out


def test_simulator_drives_the_engine_with_pixel_centres(tmp_path: Path) -> None:
    write_dataset(tmp_path)
    sample = Dataset(tmp_path)[0]
    engine = FakeEngine()
    state = engine.embed(sample.image, "x")
    trace = simulator.simulate_clicks(
        engine, state, sample.gt, sample.ignore, max_clicks=20, stop_iou=0.9, min_clicks=1
    )
    assert len(trace.clicks) == 2  # stops once IoU >= 0.90
    assert engine.rounds_seen == [[(8.5, 8.5, True)], [(11.5, 6.5, True)]]


@pytest.mark.parametrize("name", ["grabcut", "randomwalker"])
def test_baselines_are_deterministic_engines(name: str) -> None:
    import seemly.bench.baselines  # noqa: F401  (registers the baselines)
    from seemly.engines.base import create_engine

    rng = np.random.default_rng(0)
    image = np.clip(rng.normal(110, 12, (80, 100, 3)), 0, 255).astype(np.uint8)
    truth = np.zeros((80, 100), dtype=bool)
    truth[20:60, 25:75] = True
    image[truth] = (210, 40, 40)
    engine = create_engine(name)
    state = engine.embed(image, "x")
    prompts = PromptRound(prompts=[Click(x=50.5, y=40.5)])
    first = engine.segment(state, prompts)[0].mask
    engine.segment(state, PromptRound(prompts=[Click(x=10.5, y=10.5)]))  # disturbs any global state
    assert engine.segment(state, prompts)[0].mask == first
    assert Mask(truth).iou(first) > 0.8
    box = engine.segment(state, PromptRound(prompts=[simulator.box_prompt(truth)]))[0].mask
    assert Mask(truth).iou(box) > 0.8
