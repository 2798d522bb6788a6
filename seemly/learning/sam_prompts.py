"""Prompts simulated from a ground-truth mask for training SAM's mask decoder, as SAM itself was trained.

SAM's training (Kirillov et al. 2023, appendix A) starts each mask with either a foreground point or
a noisy box, then adds correction points sampled from the error of the previous prediction. Here:

* **first click**: the benchmark simulator's first click (:func:`seemly.bench.simulator.next_click`
  on an empty prediction: the ground-truth pixel farthest from its boundary), its distance map
  multiplied by uniform noise in ``[1 - jitter, 1]`` so that sessions start at different deep points;
* **box**: the tight ground-truth box (:func:`seemly.bench.simulator.box_prompt`), each coordinate
  moved by Gaussian noise of ``box_noise`` x the box side (at most ``box_noise_max`` pixels), SAM's
  10 % / 20 px;
* **correction clicks**: the simulator's next click on the previous prediction (positive deep in
  the largest false-negative region, negative deep in the largest false-positive one), with the same
  noise on the distance maps. ``jitter=0`` gives exactly the clicks the gate's evaluation makes.

A session that has no error left gets a padding point (label -1, SAM's "not a point"), so that the
sessions batched on one image keep the same number of points.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from seemly.bench.simulator import box_prompt, next_click
from seemly.engines.sam import PointPrompts

PAD_LABEL = -1
"""SAM's label for "not a point" (the prompt encoder's padding)."""


@dataclass
class SimSession:
    """The prompts of one simulated session so far, in continuous pixel coordinates."""

    region: int  # index of the ground-truth mask on its image
    points: list[tuple[float, float, int]] = field(default_factory=list)  # (x, y, label)
    box: tuple[float, float, float, float] | None = None
    not_clicked: np.ndarray | None = None  # 1 where no click was made yet (the simulator's map)

    def prompts(self) -> PointPrompts:
        return PointPrompts(list(self.points), self.box, None, None)


def _noise(shape: tuple[int, ...], jitter: float, rng: np.random.Generator) -> np.ndarray:
    if jitter <= 0:
        return np.ones(shape, dtype=np.float32)
    return rng.uniform(1.0 - jitter, 1.0, shape).astype(np.float32)


def add_click(
    session: SimSession, gt: np.ndarray, pred: np.ndarray, jitter: float, rng: np.random.Generator
) -> bool:
    """Add the next (jittered) simulator click on ``pred``; a padding point when nothing is wrong.

    Returns whether a real click was added."""
    if session.not_clicked is None:
        session.not_clicked = np.ones(gt.shape, dtype=np.float32)
    click = next_click(gt, pred, not_clicked=session.not_clicked * _noise(gt.shape, jitter, rng))
    if click is None:
        session.points.append((0.5, 0.5, PAD_LABEL))
        return False
    session.not_clicked[click.row, click.col] = 0.0
    prompt = click.to_prompt()
    session.points.append((prompt.x, prompt.y, int(prompt.positive)))
    return True


def start_session(
    region: int,
    gt: np.ndarray,
    use_box: bool,
    rng: np.random.Generator,
    *,
    jitter: float = 0.3,
    box_noise: float = 0.1,
    box_noise_max: float = 20.0,
) -> SimSession:
    """A session's first prompt: a jittered box (``use_box``) or a jittered deep positive click."""
    session = SimSession(region)
    if not use_box:
        add_click(session, gt, np.zeros_like(gt, dtype=bool), jitter, rng)
        return session
    box = box_prompt(gt)
    height, width = gt.shape
    sides = np.asarray([box.x1 - box.x0, box.y1 - box.y0] * 2, dtype=np.float64)
    delta = np.clip(rng.normal(0.0, 1.0, 4) * box_noise * sides, -box_noise_max, box_noise_max)
    x0, y0, x1, y1 = np.asarray([box.x0, box.y0, box.x1, box.y1]) + delta
    x0, x1 = float(np.clip(x0, 0, width - 1)), float(np.clip(x1, 1, width))
    y0, y1 = float(np.clip(y0, 0, height - 1)), float(np.clip(y1, 1, height))
    session.box = (x0, y0, max(x1, x0 + 1.0), max(y1, y0 + 1.0))
    return session


def point_batch(
    sessions: list[SimSession], height: int, width: int
) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """``(coords S x N x 2, labels S x N, boxes S x 4)`` in SAM's pixel-index coordinates.

    The sessions of one batch have as many points each and all or none have a box (as they are
    started together and get one point per round)."""
    prompts = [s.prompts() for s in sessions]
    counts = {len(p.points) for p in prompts}
    boxed = {p.box is not None for p in prompts}
    if len(counts) != 1 or len(boxed) != 1:
        raise ValueError("sessions batched together need as many points and all or no boxes")
    coords = labels = boxes = None
    if counts != {0}:
        arrays = [p.point_arrays(height, width) for p in prompts]
        coords = np.stack([a[0] for a in arrays]).astype(np.float32)
        labels = np.stack([a[1] for a in arrays]).astype(np.int64)
    if boxed == {True}:
        boxes = np.stack([p.box_array(height, width) for p in prompts]).astype(np.float32)
    return coords, labels, boxes
