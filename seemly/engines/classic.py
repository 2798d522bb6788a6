"""The weight-free default engine: a graph cut driven by clicks, strokes, boxes and masks.

``embed`` computes the per-image features once (``classic_features``): Lab image, a 64-colour
k-means palette, contrast-sensitive edge weights at full resolution and on a coarse level (longer
side at most 320 pixels), and the coarse geodesic cost map. ``segment`` builds one energy per
round and solves it exactly by max-flow, coarse to fine:

* hard labels at click disks and scribble strokes of *all* rounds of the session (a later click
  on the spot of an earlier opposite one replaces it);
* the previous round's mask (and any mask / polygon / box prompt) as a soft prior, relaxed near
  the clicks so that a click always wins in its own neighbourhood;
* a local term per click, ``click_weight * exp(-geodesic distance / reach)``, whose reach is
  1.5 x the click's distance to the previous mask's boundary (the size of the error it corrects;
  0.21 x sqrt(H * W) for a first click): a negative click inside the mask removes its region, a
  positive one outside adds it;
* colour models: palette histograms of object and background, each click's neighbourhood one
  source of equal weight (so a small corrected part's colour counts), the previous mask and its
  complement, the image border as background until the user gives a background seed; refitted
  once on the first cut (two EM rounds);
* GrabCut's contrast-sensitive smoothness: 4-connected on the coarse level, then the full-
  resolution 8-connected cut re-solved in a band of a few pixels around the coarse boundary.

One positive click alone is ambiguous: three candidates (default, the clicked colour region, a
wider reach) are returned, the default first. Every parameter was chosen by ``seemly bench
interactive`` on GrabCut (docs/benchmarks.md). An optional learned ``refiner`` (a per-project
model, plugged in by fine-tuning) receives the image, the prompt maps and the classic mask and
probability, and returns a better probability map.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import cv2
import numpy as np

from seemly.engines import (
    classic_features,
    classic_geodesic,
    classic_graphcut,
    classic_score,
)
from seemly.engines.base import (
    Engine,
    ImageState,
    Segment,
    UnsupportedPromptError,
    as_rgb,
    register_engine,
)
from seemly.engines.classic_prompts import ClickSeed, PromptMaps, rasterize
from seemly.masks import Mask
from seemly.prompts import PromptRound, RoundResult


class Refiner(Protocol):
    """A learned per-project model that improves the classic answer.

    Called with the RGB image, the rasterised prompts, the classic mask and its probability map
    (H x W float32 in [0, 1]); returns a probability map of the same shape.
    """

    def __call__(
        self, image: np.ndarray, maps: PromptMaps, mask: np.ndarray, probability: np.ndarray
    ) -> np.ndarray: ...


@dataclass(frozen=True)
class _ClickTerm:
    """What one click contributes, cached per (click, reach, mask it corrected)."""

    positive: bool
    pull: np.ndarray  # coarse float32 in [0, 1]: how strongly the click claims each pixel
    histogram: np.ndarray  # K float64: palette histogram of the pulled pixels, summing to 1


@dataclass
class ClassicState(ImageState):
    image: np.ndarray | None = None
    features: classic_features.Features | None = None
    geodesic_cache: OrderedDict[tuple[int, int], np.ndarray] = field(default_factory=OrderedDict)
    click_cache: OrderedDict[tuple[object, ...], _ClickTerm] = field(default_factory=OrderedDict)

    def nbytes(self) -> int:
        total = super().nbytes()
        if self.features is not None:
            total += sum(array.nbytes for array in self.features.arrays())
        total += sum(d.nbytes for d in self.geodesic_cache.values())
        total += sum(t.pull.nbytes + t.histogram.nbytes for t in self.click_cache.values())
        return total


@dataclass(frozen=True)
class Params:
    gamma: float = 50.0  # smoothness weight (GrabCut's)
    prior_weight: float = 2.0  # log-odds of the previous mask
    click_weight: float = 8.0  # log-odds a click adds at its own position
    colour_weight: float = 2.0
    colour_clip: float = 4.0
    first_click_scale: float = 0.21  # the first click's reach, as a share of sqrt(H * W)
    background_bias: float = 1.0  # log-odds against the object where nothing else speaks
    min_click_scale: float = 4.0
    click_scale_factor: float = 1.5
    band_margin: int = 2
    em_iterations: int = 2
    coarse_max_side: int = 320  # the coarse level's longer side (pixels)
    coarse_connectivity: int = 4  # 4 is faster; its weights are scaled by four_connected_gain
    four_connected_gain: float = 1.7  # ~ (2 + 2 / sqrt(2)) / 2: the diagonal edges' share
    palette_size: int = 64  # colours of the k-means palette the colour models are histograms over
    palette_sigma: float = 6.0  # Lab distance over which palette colours share evidence
    region_colour_weight: float = 2.0  # colour weight of the previous mask and its complement
    border_colour_weight: float = 1.0  # the image border as background colours, until a negative seed
    geodesic_cache_size: int = 64
    max_side: int = 1024  # larger images are segmented at this size and the answer upscaled
    multimask: bool = True
    # (reach factor, part) per candidate, the default first; "part" learns the background colours
    # from the whole image, so that it keeps to the clicked colour region
    multimask_candidates: tuple[tuple[float, bool], ...] = ((1.0, False), (0.5, True), (2.0, False))
    geo_sigma: float = 1.0  # smoothing before the geodesic cost's gradient (coarse pixels)
    geo_strength: float = 1.0  # how much an edge costs a geodesic path


@register_engine("classic")
class ClassicEngine(Engine):
    """CPU graph-cut engine; no weights. See the module docstring for the energy."""

    name = "classic"
    version = "1"

    def __init__(
        self,
        refiner: Refiner | None = None,
        params: Params | None = None,
        refiner_uri: str | None = None,
        storage: object | None = None,
        **_options: object,
    ) -> None:
        if refiner is None and refiner_uri:
            # a promoted fine-tune (seemly.learning.versions.engine_spec); torch loads only here
            from seemly.learning.refiner import LearnedRefiner

            refiner = LearnedRefiner.load(refiner_uri, storage)  # type: ignore[arg-type]
        self.refiner = refiner
        self.params = params or Params()

    # --- the expensive half -------------------------------------------------------------------
    def embed(self, image: np.ndarray, sha256: str) -> ClassicState:
        image = as_rgb(image)
        height, width = image.shape[:2]
        # Large photos are worked on at most max_side pixels wide (as SAM works at 1024) and the
        # answer is upscaled: the cost of a round stays bounded whatever the camera.
        work = image
        scale = max(height, width) / self.params.max_side
        if scale > 1.0:
            size = (max(1, round(width / scale)), max(1, round(height / scale)))
            work = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        return ClassicState(
            sha256=sha256,
            model_version=self.model_version,
            height=height,
            width=width,
            image=image,
            features=classic_features.compute(
                work,
                self.params.geo_sigma,
                self.params.geo_strength,
                self.params.coarse_max_side,
                self.params.palette_size,
                self.params.palette_sigma,
            ),
        )

    # --- the cheap half -----------------------------------------------------------------------
    def segment(
        self, state: ImageState, prompt_round: PromptRound, memory: Sequence[RoundResult] = ()
    ) -> list[Segment]:
        state = self._check_state(state)
        unsupported = sorted({p.kind for p in prompt_round.prompts if p.kind in ("text", "reference")})
        if unsupported:
            raise UnsupportedPromptError(
                f"the classic engine cannot follow {' or '.join(unsupported)} prompts: that needs a label "
                "model, which is not configured; use clicks, boxes, scribbles, polygons or masks"
            )
        full_maps = rasterize(prompt_round, memory, state.height, state.width)
        maps = full_maps.resized(*state.features.full.shape)
        # one positive click alone is ambiguous (part or whole?): answer several candidates
        candidates = (
            self.params.multimask_candidates
            if self.params.multimask and _ambiguous(maps)
            else ((1.0, False),)
        )
        segments: list[Segment] = []
        seen: set[bytes] = set()
        for index, (reach, part) in enumerate(candidates):
            mask, probability = self._solve(state, maps, reach, part)
            # scored at the working resolution, where the edge weights live
            score = classic_score.score(mask, probability, state.features.full, preferred=index == 0)
            if maps is not full_maps:
                mask, probability = _upscale(mask, probability, full_maps)
            if self.refiner is not None:
                refined = np.asarray(
                    self.refiner(state.image, full_maps, mask, probability), dtype=np.float32
                )
                if refined.shape == mask.shape:
                    mask = refined >= 0.5
            key = np.packbits(mask).tobytes()
            if key in seen:
                continue
            seen.add(key)
            segments.append(Segment(Mask(mask), float(score), self.model_version, prompt_round.label))
        segments.sort(key=lambda s: -s.score)  # stable: ties keep the default reach first
        return segments

    def segment_everything(self, state: ImageState) -> list[Segment]:
        """Non-overlapping proposals from the region hierarchy of :mod:`seemly.engines.everything`."""
        from seemly.engines.everything import propose

        state = self._check_state(state)
        return [
            Segment(Mask(mask), float(score), self.model_version)
            for mask, score in propose(state.image, state.features)
        ]

    # --- internals ----------------------------------------------------------------------------
    def _check_state(self, state: ImageState) -> ClassicState:
        if not isinstance(state, ClassicState) or state.features is None or state.image is None:
            raise UnsupportedPromptError("the classic engine needs an ImageState made by its own embed()")
        return state

    def _geodesic(self, state: ClassicState, row: int, col: int) -> np.ndarray:
        """Geodesic distance (coarse pixels, cost-weighted) from the click's coarse pixel; cached."""
        features = state.features
        assert features is not None
        seed = classic_geodesic.to_small(row, col, features.coarse.scale, features.geo_cost.shape)
        cache = state.geodesic_cache
        if seed in cache:
            cache.move_to_end(seed)
            return cache[seed]
        distance = classic_geodesic.distance_small(features.geo_cost, [seed])
        cache[seed] = distance
        while len(cache) > self.params.geodesic_cache_size:
            cache.popitem(last=False)
        return distance

    def _click_scale(self, state: ClassicState, click: ClickSeed) -> float:
        """How far (image pixels) a click reaches: about the size of the error it corrects."""
        p = self.params
        height, width = state.features.full.shape  # the working resolution
        default = p.first_click_scale * float(np.sqrt(height * width))
        previous = click.previous
        if previous is None or not previous.any():
            return default
        if previous.shape != (height, width):  # a mask at the original size of a large image
            small = cv2.resize(previous.astype(np.float32), (width, height), interpolation=cv2.INTER_AREA)
            previous = small >= 0.5
        same = previous == previous[click.row, click.col]
        if same.all():
            return default
        # The error this click corrects is about as wide as its distance to the previous boundary.
        distance = cv2.distanceTransform(same.astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
        return max(p.min_click_scale, p.click_scale_factor * float(distance[click.row, click.col]))

    def _click_term(self, state: ClassicState, click: ClickSeed, reach_factor: float) -> _ClickTerm:
        features = state.features
        assert features is not None
        key = (click.row, click.col, click.positive, reach_factor, click.previous_key)
        cache = state.click_cache
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
        distance = self._geodesic(state, click.row, click.col)
        reach = reach_factor * self._click_scale(state, click) / features.coarse.scale
        pull = np.exp(-distance / np.float32(reach)).astype(np.float32)
        k = features.palette.shape[0]
        histogram = np.bincount(features.coarse.index.ravel(), weights=pull.ravel(), minlength=k)
        histogram /= max(float(histogram.sum()), 1e-12)
        term = _ClickTerm(click.positive, pull, histogram)
        cache[key] = term
        while len(cache) > self.params.geodesic_cache_size:
            cache.popitem(last=False)
        return term

    def _solve(
        self, state: ClassicState, maps: PromptMaps, reach_factor: float = 1.0, part: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        p = self.params
        features = state.features
        assert features is not None
        coarse, full = features.coarse, features.full
        shape_c = coarse.shape
        scale = coarse.scale

        # --- spatial evidence (prior and clicks) at the coarse level ------------------------------
        prior_full = maps.prior.copy()
        if maps.previous is not None:
            prior_full += np.where(maps.previous, p.prior_weight, -p.prior_weight).astype(np.float32)
        has_prior = maps.has_prior or maps.previous is not None
        prior_c = _resize(prior_full, shape_c)
        pos_c = _shrink(maps.positive, shape_c)
        neg_c = _shrink(maps.negative, shape_c)

        pull_pos = np.zeros(shape_c, dtype=np.float32)
        pull_neg = np.zeros(shape_c, dtype=np.float32)
        terms = [self._click_term(state, click, reach_factor) for click in maps.clicks]
        for term in terms:
            target = pull_pos if term.positive else pull_neg
            np.maximum(target, term.pull, out=target)
        pull_any = np.maximum(pull_pos, pull_neg)
        spatial_c = prior_c * (1.0 - pull_any) + p.click_weight * (pull_pos - pull_neg)
        if not has_prior:
            spatial_c -= p.background_bias

        # --- colour models and the coarse solve ---------------------------------------------------
        gamma_c = p.gamma / scale
        previous_c = (
            None if maps.previous is None else _resize(maps.previous.astype(np.float32), shape_c) > 0.5
        )
        region_c = previous_c
        if region_c is None and maps.has_prior:
            region_c = prior_c > 0
            if maps.box is not None:
                region_c = region_c | _box_inside(maps, shape_c, scale)
        coarse_edges = coarse.edges
        if p.coarse_connectivity == 4:
            coarse_edges = {offset: w for offset, w in coarse.edges.items() if offset in ((0, 1), (1, 0))}
            gamma_c *= p.four_connected_gain

        def coarse_cut(llr: np.ndarray) -> np.ndarray:
            logit = spatial_c + p.colour_weight * llr[coarse.index]
            return classic_graphcut.cut(logit, coarse_edges, gamma_c, pos_c, neg_c)

        llr = self._colour_llr(features, coarse, terms, pos_c, neg_c, region_c, maps.has_negative, part)
        mask_c = coarse_cut(llr)
        for _ in range(0 if part else max(0, p.em_iterations - 1)):
            llr = self._colour_llr(features, coarse, terms, pos_c, neg_c, mask_c, maps.has_negative)
            mask_c = coarse_cut(llr)

        # --- full-resolution refinement in a band around the coarse boundary ----------------------
        height, width = full.shape
        colour_full = p.colour_weight * llr[full.index]
        if coarse is full:
            total = spatial_c + colour_full
        else:
            pull_any_full = _resize(pull_any, (height, width))
            clicks_full = _resize(p.click_weight * (pull_pos - pull_neg), (height, width))
            total = prior_full * (1.0 - pull_any_full) + clicks_full + colour_full
            if not has_prior:
                total -= p.background_bias
        total[maps.positive] = classic_graphcut.HARD
        total[maps.negative] = -classic_graphcut.HARD
        if coarse is full:
            mask = mask_c  # the coarse solve was the pixel solve
        else:
            coarse_up = _resize(mask_c.astype(np.float32), (height, width)) >= 0.5
            radius = int(np.ceil(scale)) + p.band_margin
            kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
            up8 = coarse_up.astype(np.uint8)
            band = cv2.dilate(up8, kernel) != cv2.erode(up8, kernel)
            # seeds the coarse answer got wrong (a stroke thinner than a coarse pixel) are re-solved too
            wrong = (maps.positive & ~coarse_up) | (maps.negative & coarse_up)
            if wrong.any():
                band |= cv2.dilate(wrong.astype(np.uint8), kernel) > 0
            mask = classic_graphcut.cut_band(total, full.edges, p.gamma, band, coarse_up)
        mask = _keep_seeded(mask, maps)
        probability = 1.0 / (1.0 + np.exp(-np.clip(total, -30, 30)))
        return mask, probability.astype(np.float32)

    def _colour_llr(
        self,
        features: classic_features.Features,
        level: classic_features.Level,
        terms: list[_ClickTerm],
        positive: np.ndarray,
        negative: np.ndarray,
        region: np.ndarray | None,
        user_negative: bool,
        part: bool = False,
    ) -> np.ndarray:
        """Per-palette-colour log-likelihood ratio of object vs background.

        Each click contributes its own neighbourhood with the same total weight, however small
        the region, so that the colour of a corrected part outweighs its share of the pixels.
        """
        p = self.params
        k = features.palette.shape[0]
        h_fg = np.zeros(k, dtype=np.float64)
        h_bg = np.zeros(k, dtype=np.float64)
        for term in terms:
            if term.positive:
                h_fg += term.histogram
            else:
                h_bg += term.histogram
        fg: list[tuple[float, np.ndarray]] = []
        bg: list[tuple[float, np.ndarray]] = []
        if positive.any():
            fg.append((1.0, positive.astype(np.float32)))
        if negative.any():
            bg.append((1.0, negative.astype(np.float32)))
        if region is not None:
            if region.any():
                fg.append((p.region_colour_weight, region.astype(np.float32)))
            if (~region).any():
                bg.append((p.region_colour_weight, (~region).astype(np.float32)))
        if not user_negative:
            bg.append((p.border_colour_weight, features.border))
        if part:
            bg.append((2.0, np.ones(level.shape, dtype=np.float32)))
        if not (fg or h_fg.any()) or not (bg or h_bg.any()):
            return np.zeros(k, dtype=np.float32)
        llr = np.log(_histogram(features, level, fg, h_fg)) - np.log(_histogram(features, level, bg, h_bg))
        return np.clip(llr, -p.colour_clip, p.colour_clip).astype(np.float32)


def _histogram(
    features: classic_features.Features,
    level: classic_features.Level,
    sources: list[tuple[float, np.ndarray]],
    start: np.ndarray,
) -> np.ndarray:
    """The smoothed palette histogram of a weighted mixture of pixel sets (each normalised)."""
    index = level.index.ravel()
    total = start.copy()
    for weight, pixels in sources:
        h = np.bincount(index, weights=pixels.ravel(), minlength=total.size)
        mass = h.sum()
        if mass > 0:
            total += weight * h / mass
    total = features.similarity @ total
    return total / max(total.sum(), 1e-12) + 1e-3 / total.size


def _resize(array: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Float map at another size (area average down, bilinear up)."""
    if array.shape == shape:
        return array.astype(np.float32, copy=True)
    down = shape[0] * shape[1] < array.shape[0] * array.shape[1]
    method = cv2.INTER_AREA if down else cv2.INTER_LINEAR
    return cv2.resize(array.astype(np.float32), (shape[1], shape[0]), interpolation=method)


def _shrink(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A seed mask at the coarse level: a coarse pixel is a seed if seeds cover much of it."""
    if mask.shape == shape:
        return mask.copy()
    if not mask.any():
        return np.zeros(shape, dtype=bool)
    small = _resize(mask.astype(np.float32), shape)
    out = small >= 0.5
    if not out.any():  # a thin stroke: keep its strongest coarse pixels
        out = small >= 0.5 * float(small.max())
    return out


def _box_inside(maps: PromptMaps, shape: tuple[int, int], scale: float) -> np.ndarray:
    assert maps.box is not None
    r0, c0, r1, c1 = maps.box
    inside = np.zeros(shape, dtype=bool)
    inside[
        int(r0 / scale) : int(np.ceil((r1 + 1) / scale)), int(c0 / scale) : int(np.ceil((c1 + 1) / scale))
    ] = True
    return inside


def _upscale(mask: np.ndarray, probability: np.ndarray, maps: PromptMaps) -> tuple[np.ndarray, np.ndarray]:
    """A working-resolution answer at the image's own size; the user's seeds hold exactly."""
    size = (maps.width, maps.height)
    big = cv2.resize(mask.astype(np.float32), size, interpolation=cv2.INTER_LINEAR) >= 0.5
    big[maps.positive] = True
    big[maps.negative] = False
    return big, cv2.resize(probability, size, interpolation=cv2.INTER_LINEAR)


def _ambiguous(maps: PromptMaps) -> bool:
    """One positive click and nothing else: part or whole? (SAM answers several masks here.)"""
    return (
        len(maps.clicks) == 1
        and maps.clicks[0].positive
        and maps.previous is None
        and not maps.has_prior
        and int(maps.positive.sum()) == int(_click_disk_area(maps))
        and not maps.has_negative
    )


def _click_disk_area(maps: PromptMaps) -> int:
    from seemly.engines.classic_prompts import CLICK_RADIUS, disk

    click = maps.clicks[0]
    return int(disk(maps.height, maps.width, click.row, click.col, CLICK_RADIUS)[2].sum())


def _keep_seeded(mask: np.ndarray, maps: PromptMaps) -> np.ndarray:
    """Drop object components no positive seed touches (when there are positive seeds)."""
    if not maps.has_positive or maps.region_prompts or not mask.any():
        return mask
    count, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    if count <= 2:
        return mask
    keep = np.zeros(count, dtype=bool)
    keep[np.unique(labels[maps.positive & mask])] = True
    keep[0] = False
    return keep[labels]
