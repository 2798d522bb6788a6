"""Prompt rasterisation: a round plus its memory turned into pixel maps that an energy can use.

One job: every visual prompt kind becomes seeds (hard labels), a prior (soft log-odds) or a box,
in pixel coordinates (pixel ``(r, c)`` covers ``[c, c+1) x [r, r+1)``, so a prompt point
``(x, y)`` lies in pixel ``(floor(y), floor(x))``, clamped so that ``x == width`` is the last
column). Clicks and scribbles of *all* rounds of the session accumulate; the last round's mask is
the prior that later rounds refine. The classic engine and the benchmark baselines share it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import cv2
import numpy as np

from seemly.masks import Mask
from seemly.prompts import Box, Click, MaskPrompt, Polygon, PromptRound, RoundResult, Scribble

CLICK_RADIUS = 3  # pixels forced to the click's label around each click (a disk)
PRIOR_MASK = 3.0  # log-odds of a mask prompt / polygon: strong but not hard
PRIOR_OUTSIDE_BOX = 6.0  # log-odds against the object outside a box (GrabCut makes it hard)


@dataclass(frozen=True)
class ClickSeed:
    """A click in pixel indices, the round it came from, and the mask it was meant to correct."""

    row: int
    col: int
    positive: bool
    round_index: int  # 0-based round of the session; the current round is len(memory)
    previous: np.ndarray | None = field(default=None, compare=False, repr=False)  # mask before it
    previous_key: bytes = b""  # a digest of ``previous`` (cache key of what depends on it)


@dataclass
class PromptMaps:
    """Everything the prompts say about each pixel."""

    height: int
    width: int
    clicks: list[ClickSeed]
    positive: np.ndarray  # bool: hard object pixels (click disks, positive scribbles)
    negative: np.ndarray  # bool: hard background pixels (click disks, negative scribbles)
    prior: np.ndarray  # float32 log-odds of "object" from masks, polygons, boxes; 0 = no opinion
    has_prior: bool  # a mask-like prompt (previous mask, mask prompt, polygon, box) was given
    previous: np.ndarray | None  # the last round's mask (bool) if any
    box: tuple[int, int, int, int] | None  # the latest box as pixel (row0, col0, row1, col1), inclusive
    current_round: int
    region_prompts: bool = False  # some round of the session had a box, polygon or mask prompt

    @property
    def has_positive(self) -> bool:
        return bool(self.positive.any())

    @property
    def has_negative(self) -> bool:
        return bool(self.negative.any())

    def resized(self, height: int, width: int) -> PromptMaps:
        """The same prompts on a ``height x width`` image (the engine's working resolution).

        Seeds keep every pixel they touch (a thin stroke survives downscaling), the prior and the
        previous mask are area-averaged, clicks and the box are scaled. A click's ``previous`` mask
        stays at the original size (it is only read when the click is first seen).
        """
        if (height, width) == (self.height, self.width):
            return self
        sy, sx = height / self.height, width / self.width

        def scale_rc(row: int, col: int) -> tuple[int, int]:
            return min(int((row + 0.5) * sy), height - 1), min(int((col + 0.5) * sx), width - 1)

        clicks = [
            replace(c, row=scale_rc(c.row, c.col)[0], col=scale_rc(c.row, c.col)[1]) for c in self.clicks
        ]
        box = None
        if self.box is not None:
            r0, c0 = scale_rc(self.box[0], self.box[1])
            r1, c1 = scale_rc(self.box[2], self.box[3])
            box = (r0, c0, r1, c1)
        size = (width, height)
        previous = None
        if self.previous is not None:
            small = cv2.resize(self.previous.astype(np.float32), size, interpolation=cv2.INTER_AREA)
            previous = small >= 0.5
        positive = cv2.resize(self.positive.astype(np.uint8), size, interpolation=cv2.INTER_AREA) > 0
        negative = cv2.resize(self.negative.astype(np.uint8), size, interpolation=cv2.INTER_AREA) > 0
        both = positive & negative  # seeds of both kinds in one small pixel: neither is hard there
        positive &= ~both
        negative &= ~both
        for click in clicks:  # ... except a click's own pixel, the later click winning
            positive[click.row, click.col] = click.positive
            negative[click.row, click.col] = not click.positive
        return PromptMaps(
            height=height,
            width=width,
            clicks=clicks,
            positive=positive,
            negative=negative,
            prior=cv2.resize(self.prior, size, interpolation=cv2.INTER_AREA),
            has_prior=self.has_prior,
            previous=previous,
            box=box,
            current_round=self.current_round,
            region_prompts=self.region_prompts,
        )


def mask_digest(mask: np.ndarray) -> bytes:
    return hashlib.blake2b(np.packbits(mask).tobytes() + repr(mask.shape).encode(), digest_size=16).digest()


def pixel_of(x: float, y: float, height: int, width: int) -> tuple[int, int]:
    """The pixel (row, col) that contains the continuous point (x, y), clamped into the image."""
    row = min(max(int(np.floor(y)), 0), height - 1)
    col = min(max(int(np.floor(x)), 0), width - 1)
    return row, col


def polygon_mask(points: Sequence[tuple[float, float]], height: int, width: int) -> np.ndarray:
    """Pixels whose centre lies inside the polygon (even-odd rule)."""
    from_polygons = getattr(Mask, "from_polygons", None)
    if from_polygons is not None:
        return np.array(from_polygons([list(points)], height, width).data, dtype=bool)  # writable copy
    from skimage.draw import polygon as draw_polygon  # until Mask.from_polygons lands

    xs = np.array([p[0] for p in points], dtype=float) - 0.5
    ys = np.array([p[1] for p in points], dtype=float) - 0.5
    out = np.zeros((height, width), dtype=bool)
    rr, cc = draw_polygon(ys, xs, shape=(height, width))
    out[rr, cc] = True
    return out


def stroke_mask(
    points: Sequence[tuple[float, float]], stroke_width: float, height: int, width: int
) -> np.ndarray:
    """Pixels covered by a polyline of the given width (a single point draws a dot)."""
    canvas = np.zeros((height, width), dtype=np.uint8)
    shift = 4
    scale = 1 << shift
    pts = np.array([[(x - 0.5) * scale, (y - 0.5) * scale] for x, y in points], dtype=np.float64)
    pts = np.round(pts).astype(np.int32)
    thickness = max(1, round(stroke_width))
    if len(pts) == 1:
        cv2.circle(
            canvas, tuple(int(v) for v in pts[0]), max(1, thickness // 2) * scale, 1, -1, cv2.LINE_8, shift
        )
    else:
        cv2.polylines(canvas, [pts.reshape(-1, 1, 2)], False, 1, thickness, cv2.LINE_8, shift)
    for x, y in (points[0], points[-1]):  # the end points always count, even on a 1-pixel image
        r, c = pixel_of(x, y, height, width)
        canvas[r, c] = 1
    return canvas.astype(bool)


def disk(height: int, width: int, row: int, col: int, radius: int) -> tuple[slice, slice, np.ndarray]:
    """A disk of ``radius`` around (row, col), clipped to the image: (row slice, col slice, mask)."""
    r0, r1 = max(row - radius, 0), min(row + radius + 1, height)
    c0, c1 = max(col - radius, 0), min(col + radius + 1, width)
    yy, xx = np.ogrid[r0:r1, c0:c1]
    return slice(r0, r1), slice(c0, c1), (yy - row) ** 2 + (xx - col) ** 2 <= radius * radius


def _mark(
    positive: np.ndarray,
    negative: np.ndarray,
    is_positive: bool,
    window: tuple[slice, slice],
    inside: np.ndarray,
) -> None:
    # The latest prompt wins where seeds overlap, so every correction takes effect.
    mine, other = (positive, negative) if is_positive else (negative, positive)
    mine[window] |= inside
    other[window] &= ~inside


def rasterize(
    prompt_round: PromptRound,
    memory: Sequence[RoundResult],
    height: int,
    width: int,
    click_radius: int = CLICK_RADIUS,
) -> PromptMaps:
    """Seeds and priors for this round, with the clicks and scribbles of the earlier rounds."""
    positive = np.zeros((height, width), dtype=bool)
    negative = np.zeros((height, width), dtype=bool)
    prior = np.zeros((height, width), dtype=np.float32)
    clicks: list[ClickSeed] = []
    has_prior = False
    box: tuple[int, int, int, int] | None = None

    previous = None
    for result in memory:
        if result.mask.shape != (height, width):
            continue  # a mask of another size cannot be a prior here; its prompts still count
        previous = result.mask.data
    rounds = [result.round for result in memory] + [prompt_round]
    masks_before: list[np.ndarray | None] = [None]
    keys_before: list[bytes] = [b""]
    for result in memory:
        if result.mask.shape == (height, width):
            masks_before.append(result.mask.data)
            keys_before.append(mask_digest(result.mask.data))
        else:
            masks_before.append(masks_before[-1])
            keys_before.append(keys_before[-1])

    region_prompts = False
    for index, a_round in enumerate(rounds):
        current = index == len(rounds) - 1
        for prompt in a_round.prompts:
            region_prompts |= isinstance(prompt, Box | Polygon | MaskPrompt)
            if isinstance(prompt, Click):
                row, col = pixel_of(prompt.x, prompt.y, height, width)
                # A click on (nearly) the spot of an earlier opposite click replaces it: undo.
                near = 2 * click_radius
                clicks = [
                    c
                    for c in clicks
                    if c.positive == prompt.positive or (c.row - row) ** 2 + (c.col - col) ** 2 > near * near
                ]
                clicks.append(
                    ClickSeed(row, col, prompt.positive, index, masks_before[index], keys_before[index])
                )
                rs, cs, inside = disk(height, width, row, col, click_radius)
                _mark(positive, negative, prompt.positive, (rs, cs), inside)
            elif isinstance(prompt, Scribble):
                stroke = stroke_mask(prompt.points_xy, prompt.width, height, width)
                _mark(positive, negative, prompt.positive, (slice(None), slice(None)), stroke)
            elif isinstance(prompt, Box) and current:
                row0, col0 = pixel_of(prompt.x0, prompt.y0, height, width)
                # x1/y1 are exclusive continuous edges: the last covered pixel is ceil(x1) - 1.
                row1 = min(max(int(np.ceil(prompt.y1)) - 1, row0), height - 1)
                col1 = min(max(int(np.ceil(prompt.x1)) - 1, col0), width - 1)
                box = (row0, col0, row1, col1)
            elif isinstance(prompt, Polygon) and current:
                inside = polygon_mask(prompt.points_xy, height, width)
                if not inside.any():  # a sliver polygon: at least its first vertex
                    r, c = pixel_of(*prompt.points_xy[0], height, width)
                    inside[r, c] = True
                prior[inside] = PRIOR_MASK if prompt.positive else -PRIOR_MASK
                has_prior = True
            elif isinstance(prompt, MaskPrompt) and current:
                data = prompt.mask().data
                if data.shape != (height, width):
                    continue
                if prompt.positive:
                    prior[data] = PRIOR_MASK
                    prior[~data & (prior == 0)] = -PRIOR_MASK / 3
                else:
                    prior[data] = -PRIOR_MASK
                has_prior = True

    if box is not None:
        row0, col0, row1, col1 = box
        outside = np.ones((height, width), dtype=bool)
        outside[row0 : row1 + 1, col0 : col1 + 1] = False
        prior[outside] = np.minimum(prior[outside], -PRIOR_OUTSIDE_BOX)
        has_prior = True
    return PromptMaps(
        height=height,
        width=width,
        clicks=clicks,
        positive=positive,
        negative=negative,
        prior=prior,
        has_prior=has_prior,
        previous=previous,
        box=box,
        current_round=len(rounds) - 1,
        region_prompts=region_prompts,
    )
