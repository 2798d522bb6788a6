"""Training examples for the refiner, from (image, ground-truth mask) pairs and simulated sessions.

Why simulated: in production a correction gives the mask the annotator finally submitted, not
every intermediate prompt in a form the refiner can replay, and the refiner must learn from the
states the *current* engine produces. So a session is replayed: the benchmark's click simulator
(``seemly.bench.simulator.next_click``, RITM's clicker) clicks on the largest error of the current
engine's answer, round after round, and every candidate mask the engine hands to its refiner is
captured with the refiner's input planes and the ground truth at the same crop. The first session
follows the simulator exactly (the benchmark's own sessions); the others pick each click at random
among the pixels at least half as deep inside the error as the deepest one, which covers the
many ways a person clicks and the states those clicks lead to.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from seemly.bench.simulator import SimClick, _padded_distance, next_click
from seemly.engines.base import Engine
from seemly.learning.refiner import RefinerConfig, crop_box, input_planes, target_plane
from seemly.masks import Mask
from seemly.prompts import PromptRound, RoundResult


@dataclass(frozen=True)
class RefineExample:
    """One refiner call with its answer: ``planes`` 8 x S x S uint8, ``target`` S x S uint8."""

    planes: np.ndarray
    target: np.ndarray
    iou: float  # IoU of the classic mask with the ground truth (all pixels), before refinement
    round_index: int  # 0 = the first click of the session
    source: str = ""  # which image (a stem or a sha256 prefix), for splits and reports

    @property
    def size(self) -> int:
        return int(self.target.shape[-1])


class _Recorder:
    """Wraps the engine's refiner: records each call's inputs, then answers as the refiner would."""

    def __init__(self, inner: Any, config: RefinerConfig) -> None:
        self.inner = inner
        self.config = config
        self.calls: list[tuple[np.ndarray, Any, np.ndarray]] = []  # (planes, box, mask)

    def __call__(self, image: np.ndarray, maps: Any, mask: np.ndarray, probability: np.ndarray) -> np.ndarray:
        mask = np.asarray(mask, dtype=bool)
        box = crop_box(self.config, mask, maps)
        if box is not None:
            self.calls.append((input_planes(self.config, image, maps, mask, probability, box), box, mask))
        if self.inner is None:
            return mask.astype(np.float32)
        return self.inner(image, maps, mask, probability)


def _random_click(
    gt: np.ndarray, pred: np.ndarray, not_clicked: np.ndarray, rng: np.random.Generator
) -> SimClick | None:
    """A click on the larger error, anywhere at least half as deep inside it as its deepest pixel."""
    fn = _padded_distance(gt & ~pred) * not_clicked
    fp = _padded_distance(~gt & pred) * not_clicked
    fn_max, fp_max = float(fn.max()), float(fp.max())
    if fn_max <= 0 and fp_max <= 0:
        return None
    positive = fn_max > fp_max
    dt, best = (fn, fn_max) if positive else (fp, fp_max)
    rows, cols = np.nonzero(dt >= 0.5 * best)
    pick = int(rng.integers(rows.size))
    return SimClick(int(rows[pick]), int(cols[pick]), positive)


def _config_of(engine: Engine, config: RefinerConfig | None) -> RefinerConfig:
    if config is not None:
        return config
    refiner = getattr(engine, "refiner", None)
    found = getattr(refiner, "config", None)
    return found if isinstance(found, RefinerConfig) else RefinerConfig()


def simulate_examples(
    engine: Engine,
    image: np.ndarray,
    gt: np.ndarray,
    *,
    rng: np.random.Generator,
    max_clicks: int = 8,
    sessions: int = 2,
    stop_iou: float = 0.95,
    config: RefinerConfig | None = None,
    source: str = "",
) -> list[RefineExample]:
    """Examples from ``sessions`` simulated click sessions of ``engine`` on ``image``.

    ``engine`` must have a ``refiner`` attribute (the classic engine): its current refiner (or none)
    stays in the loop, so the sessions see what annotators would see; it is restored afterwards. A
    session ends after ``max_clicks`` clicks or once the IoU reaches ``stop_iou``.
    """
    gt = np.asarray(gt, dtype=bool)
    if gt.shape != np.asarray(image).shape[:2]:
        raise ValueError(
            f"ground truth is {gt.shape[::-1]} but the image is {np.asarray(image).shape[1::-1]}"
        )
    if not gt.any():
        raise ValueError("the ground truth is empty: nothing to learn from")
    if not hasattr(engine, "refiner"):
        raise TypeError(f"engine {engine.model_version} has no refiner seam (use the classic engine)")
    config = _config_of(engine, config)
    sha = hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()
    source = source or sha[:12]
    state = engine.embed(image, sha)
    gt_mask = Mask(gt.copy())
    original = engine.refiner  # type: ignore[attr-defined]
    recorder = _Recorder(original, config)
    examples: list[RefineExample] = []
    height, width = gt.shape
    try:
        engine.refiner = recorder  # type: ignore[attr-defined]
        for session in range(sessions):
            pred = np.zeros_like(gt)
            not_clicked = np.ones(gt.shape, dtype=np.float32)
            memory: list[RoundResult] = []
            for round_index in range(max_clicks):
                if session == 0:
                    click = next_click(gt, pred, None, not_clicked)
                else:
                    click = _random_click(gt, pred, not_clicked, rng)
                if click is None:
                    break
                not_clicked[click.row, click.col] = 0
                prompt_round = PromptRound(prompts=[click.to_prompt()]).check_bounds(width, height)
                recorder.calls.clear()
                segments = engine.segment(state, prompt_round, tuple(memory))
                for planes, box, mask in recorder.calls:
                    iou = gt_mask.iou(Mask(mask))
                    examples.append(
                        RefineExample(planes, target_plane(config, gt, box), iou, round_index, source)
                    )
                top = segments[0]
                pred = top.mask.data
                memory.append(RoundResult(prompt_round, top.mask, top.score))
                if gt_mask.iou(top.mask) >= stop_iou:
                    break
    finally:
        engine.refiner = original  # type: ignore[attr-defined]
    return examples
