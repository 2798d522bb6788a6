"""The click simulator of the interactive-segmentation literature, and simulated box / scribble prompts.

Clicks follow RITM's evaluation clicker (``isegm/inference/clicker.py``, ``_get_next_click``), which
SimpleClick and most later work reuse:

* false negatives ``FN = gt & ~pred`` and false positives ``FP = ~gt & pred``, both without the
  ignore band;
* each is padded by one pixel of zeros, so the image border counts as boundary, and its exact L2
  distance transform is taken (``cv2.distanceTransform(..., DIST_L2, 0)``), then cropped back;
* pixels clicked before are zeroed out of both maps;
* if the largest FN distance is strictly greater than the largest FP distance the click is positive
  at the first (row-major) FN pixel with that distance, otherwise negative at the first FP pixel
  with the largest FP distance. The first click (empty prediction) is therefore positive at the
  interior point of the object farthest from its boundary.

A click on pixel ``(r, c)`` is sent to engines as ``Click(x=c + 0.5, y=r + 0.5)``, the pixel centre.
Each click is one round; the earlier rounds (prompts and the engine's top mask) are the memory.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import cv2
import numpy as np
from scipy import sparse
from scipy.sparse import csgraph
from skimage.morphology import skeletonize

from seemly.engines.base import Engine, ImageState
from seemly.masks import Mask
from seemly.prompts import Box, Click, PromptRound, RoundResult, Scribble


@dataclass(frozen=True)
class SimClick:
    """A simulated click on pixel ``(row, col)``."""

    row: int
    col: int
    positive: bool

    def to_prompt(self) -> Click:
        return Click(x=self.col + 0.5, y=self.row + 0.5, positive=self.positive)


def _padded_distance(mask: np.ndarray) -> np.ndarray:
    padded = np.pad(mask.astype(np.uint8), 1, mode="constant")
    return cv2.distanceTransform(padded, cv2.DIST_L2, 0)[1:-1, 1:-1]


def next_click(
    gt: np.ndarray,
    pred: np.ndarray,
    ignore: np.ndarray | None = None,
    not_clicked: np.ndarray | None = None,
) -> SimClick | None:
    """RITM's next click for prediction ``pred``; ``None`` when there is no error left to click on."""
    gt = np.asarray(gt, dtype=bool)
    pred = np.asarray(pred, dtype=bool)
    keep = np.ones_like(gt) if ignore is None else ~np.asarray(ignore, dtype=bool)
    fn_dt = _padded_distance(gt & ~pred & keep)
    fp_dt = _padded_distance(~gt & pred & keep)
    if not_clicked is not None:
        fn_dt = fn_dt * not_clicked
        fp_dt = fp_dt * not_clicked
    fn_max, fp_max = float(fn_dt.max()), float(fp_dt.max())
    if fn_max <= 0 and fp_max <= 0:
        return None
    positive = fn_max > fp_max
    dt, best = (fn_dt, fn_max) if positive else (fp_dt, fp_max)
    rows, cols = np.nonzero(dt == best)
    return SimClick(int(rows[0]), int(cols[0]), positive)


@dataclass
class SessionTrace:
    """One simulated session on one image: the clicks and the IoU after each."""

    clicks: list[SimClick] = field(default_factory=list)
    ious: list[float] = field(default_factory=list)  # ignore band left out (the standard protocol)
    ious_all: list[float] = field(default_factory=list)  # every pixel counted
    seconds: list[float] = field(default_factory=list)  # segment() wall time per click

    def iou_after(self, n_clicks: int, with_ignore: bool = True) -> float:
        """IoU after ``n_clicks`` clicks; a session stopped early keeps its last IoU."""
        values = self.ious if with_ignore else self.ious_all
        if not values:
            return 0.0
        return values[min(n_clicks, len(values)) - 1]


def simulate_clicks(
    engine: Engine,
    state: ImageState,
    gt: np.ndarray,
    ignore: np.ndarray | None = None,
    max_clicks: int = 20,
    stop_iou: float | None = 0.90,
    min_clicks: int = 5,
) -> SessionTrace:
    """Click until ``max_clicks``; stop early once ``min_clicks`` are done and the IoU is at least
    ``stop_iou`` both without the ignore band and over all pixels.

    Stopping early changes none of the reported metrics (NoC@85 <= NoC@90 for either IoU, mean IoU
    after 1/3/5 clicks) as long as ``min_clicks`` covers the largest "IoU after k" reported; the
    clicks themselves never depend on it. ``stop_iou=None`` always runs all clicks.
    """
    height, width = gt.shape
    gt_mask = Mask(np.array(gt, dtype=bool))
    pred = np.zeros_like(gt, dtype=bool)
    not_clicked = np.ones(gt.shape, dtype=np.float32)
    memory: list[RoundResult] = []
    trace = SessionTrace()
    for _ in range(max_clicks):
        click = next_click(gt, pred, ignore, not_clicked)
        if click is None:
            break
        not_clicked[click.row, click.col] = 0
        prompt_round = PromptRound(prompts=[click.to_prompt()]).check_bounds(width, height)
        start = time.perf_counter()
        segments = engine.segment(state, prompt_round, tuple(memory))
        trace.seconds.append(time.perf_counter() - start)
        top = segments[0]
        pred = top.mask.data
        memory.append(RoundResult(prompt_round, top.mask, top.score))
        trace.clicks.append(click)
        trace.ious.append(gt_mask.iou(top.mask, ignore))
        trace.ious_all.append(gt_mask.iou(top.mask))
        if (
            stop_iou is not None
            and len(trace.clicks) >= min_clicks
            and min(trace.ious[-1], trace.ious_all[-1]) >= stop_iou
        ):
            break
    return trace


# --- simulated box and scribble prompts --------------------------------------------------------
def box_prompt(gt: np.ndarray) -> Box:
    """The tight box around the ground truth, in continuous coordinates (covers whole pixels)."""
    bbox = Mask(np.array(gt, dtype=bool)).bbox  # a copy: Mask freezes its array
    if bbox is None:
        raise ValueError("the ground truth is empty")
    x, y, w, h = bbox
    return Box(x0=x, y0=y, x1=x + w, y1=y + h)


def _longest_skeleton_path(skeleton: np.ndarray) -> np.ndarray:
    """Pixels ``(row, col)`` of the longest shortest path in an 8-connected skeleton (its diameter)."""
    rows, cols = np.nonzero(skeleton)
    count = rows.size
    if count <= 1:
        return np.stack([rows, cols], axis=1)
    index = -np.ones(skeleton.shape, dtype=np.int64)
    index[rows, cols] = np.arange(count)
    padded = np.pad(index, 1, constant_values=-1)
    src, dst, weight = [], [], []
    for dr, dc in ((0, 1), (1, -1), (1, 0), (1, 1)):
        neighbour = padded[1 + rows + dr, 1 + cols + dc]
        ok = neighbour >= 0
        src.append(np.arange(count)[ok])
        dst.append(neighbour[ok])
        weight.append(np.full(int(ok.sum()), np.hypot(dr, dc)))
    graph = sparse.coo_matrix(
        (np.concatenate(weight), (np.concatenate(src), np.concatenate(dst))), shape=(count, count)
    ).tocsr()
    # Two sweeps find the diameter of a tree (and a long path in a skeleton with small loops).
    dist = csgraph.dijkstra(graph, directed=False, indices=0)
    far = int(np.argmax(np.where(np.isfinite(dist), dist, -1)))
    dist, pred = csgraph.dijkstra(graph, directed=False, indices=far, return_predecessors=True)
    end = int(np.argmax(np.where(np.isfinite(dist), dist, -1)))
    path = [end]
    while path[-1] != far and pred[path[-1]] >= 0:
        path.append(int(pred[path[-1]]))
    ids = np.asarray(path[::-1])
    return np.stack([rows[ids], cols[ids]], axis=1)


def scribble_prompts(gt: np.ndarray, width: float = 3.0) -> list[Scribble]:
    """A simulated annotator's scribbles: one stroke inside the object and strokes around it.

    * positive: the longest path along the skeleton (medial axis) of the largest ground-truth
      component, after eroding it by the stroke width so that the stroke stays inside; simplified
      with Douglas-Peucker (1 px) into a polyline through pixel centres;
    * negative: the sides of the ground truth's bounding box pushed out by a margin of
      ``max(5, 5% of the longer image side)`` pixels; a side that would fall outside the image is
      left out (the object touches that border), so no negative stroke ever crosses the object.
    """
    gt = np.asarray(gt, dtype=bool)
    height, width_px = gt.shape
    count, labels, stats, _ = cv2.connectedComponentsWithStats(gt.astype(np.uint8), connectivity=8)
    if count <= 1:
        raise ValueError("the ground truth is empty")
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    component = labels == largest
    radius = max(1, int(np.ceil(width / 2)))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    eroded = cv2.erode(component.astype(np.uint8), kernel, borderType=cv2.BORDER_CONSTANT, borderValue=0) > 0
    core = eroded if eroded.any() else component
    path = _longest_skeleton_path(skeletonize(core))
    if path.shape[0] == 0:  # cannot happen for a non-empty core, but keep the stroke valid
        path = np.argwhere(core)[:1]
    points = path[:, ::-1].astype(np.int32).reshape(-1, 1, 2)
    if points.shape[0] > 2:
        points = cv2.approxPolyDP(points, 1.0, closed=False)
    positive_points = [(float(c) + 0.5, float(r) + 0.5) for c, r in points.reshape(-1, 2)]
    scribbles = [Scribble(points=positive_points, positive=True, width=width)]

    bbox = Mask(np.array(gt, dtype=bool)).bbox  # a copy: Mask freezes its array
    assert bbox is not None
    x, y, w, h = bbox
    margin = max(5.0, 0.05 * max(height, width_px))
    left, top, right, bottom = x - margin, y - margin, x + w + margin, y + h + margin
    xs = (max(left, 0.5), min(right, width_px - 0.5))
    ys = (max(top, 0.5), min(bottom, height - 0.5))
    sides = [
        (left >= 0.5, [(left, ys[0]), (left, ys[1])]),
        (right <= width_px - 0.5, [(right, ys[0]), (right, ys[1])]),
        (top >= 0.5, [(xs[0], top), (xs[1], top)]),
        (bottom <= height - 0.5, [(xs[0], bottom), (xs[1], bottom)]),
    ]
    for inside, points_xy in sides:
        if inside:
            scribbles.append(Scribble(points=points_xy, positive=False, width=width))
    return scribbles
