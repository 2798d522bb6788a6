"""Region descriptors shared by the label model, reference matching and the text scorers.

A region (a boolean mask over an image) is described by three families of statistics, all computed
on one downscaled copy of the image (``max_side`` pixels) so that the cost per region is a few
``bincount`` calls over its pixels:

* **colour** in CIE Lab: marginal histograms of L, a and b, a coarse joint histogram, and the mean
  and spread of each channel;
* **texture**: a histogram of uniform local binary patterns (LBP, 8 neighbours at radius 1) and a
  magnitude-weighted histogram of gradient orientations, plus the mean gradient magnitude;
* **shape**: solidity, extent, circularity, aspect ratio, eccentricity, how much of the image
  border the region touches, and its (log) share of the image.

:func:`context` precomputes the per-image maps once (cache it: :func:`context_of` keeps it in an
:class:`~seemly.engines.base.ImageState`'s ``extras``); :func:`describe` reads them for one mask.
:meth:`RegionDescriptor.vector` is the fixed-length, roughly unit-scaled vector a classifier uses
(histograms enter as their square roots, the Hellinger embedding, so that a dot product compares
distributions); :func:`similarity` compares two descriptors block by block (for reference
matching, where there is one example and no training).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

FEATURE_VERSION = "rf1"
MAX_SIDE = 256

L_BINS, A_BINS, B_BINS = 8, 8, 8
JOINT_BINS = (3, 4, 4)  # L, a, b
LBP_BINS = 10  # uniform LBP with 8 neighbours: 0..9
ORIENT_BINS = 8
SHAPE_NAMES = ("solidity", "extent", "circularity", "aspect", "eccentricity", "border", "log_area")

# Lab value ranges (OpenCV float Lab: L 0..100, a and b about -127..127; real images stay well inside)
_A_RANGE = (-80.0, 80.0)
_B_RANGE = (-80.0, 80.0)


@dataclass
class RegionContext:
    """Per-image maps at working resolution; computed once per image by :func:`context`."""

    height: int  # original image size
    width: int
    lab: np.ndarray  # h x w x 3 float32 Lab
    l_bin: np.ndarray  # h x w int16 marginal bins
    a_bin: np.ndarray
    b_bin: np.ndarray
    joint_bin: np.ndarray  # h x w int16 joint (coarse) colour bin
    lbp: np.ndarray  # h x w int16 uniform LBP code
    orient_bin: np.ndarray  # h x w int16 gradient orientation bin
    grad: np.ndarray  # h x w float32 gradient magnitude (Lab units per working pixel)
    grad_scale: float  # 90th percentile of grad (normalises magnitudes across images)

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.lab.shape[0]), int(self.lab.shape[1]))

    def nbytes(self) -> int:
        return sum(
            a.nbytes
            for a in (
                self.lab,
                self.l_bin,
                self.a_bin,
                self.b_bin,
                self.joint_bin,
                self.lbp,
                self.orient_bin,
                self.grad,
            )
        )

    def to_working(self, mask: np.ndarray) -> np.ndarray:
        """A full-resolution (or already working-size) mask at working resolution, never emptied."""
        mask = np.asarray(mask, dtype=bool)
        h, w = self.shape
        if mask.shape == (h, w):
            return mask
        small = cv2.resize(mask.astype(np.float32), (w, h), interpolation=cv2.INTER_AREA)
        out = small >= 0.5
        if not out.any() and mask.any():  # a thin or tiny region: keep its strongest pixels
            out = small >= 0.5 * float(small.max())
        return out


@dataclass(frozen=True)
class RegionDescriptor:
    """The statistics of one region (see the module docstring)."""

    colour_l: np.ndarray
    colour_a: np.ndarray
    colour_b: np.ndarray
    colour_joint: np.ndarray
    lab_mean: np.ndarray  # 3
    lab_std: np.ndarray  # 3
    lbp: np.ndarray
    orient: np.ndarray
    grad_mean: float
    shape: np.ndarray  # SHAPE_NAMES
    area: int  # pixels at working resolution

    def vector(self) -> np.ndarray:
        """Fixed-length feature vector (``FEATURE_DIM``) for classifiers."""
        return np.concatenate(
            [
                np.sqrt(self.colour_l),
                np.sqrt(self.colour_a),
                np.sqrt(self.colour_b),
                np.sqrt(self.colour_joint),
                self.lab_mean / np.array([50.0, 40.0, 40.0], np.float32),
                self.lab_std / 20.0,
                np.sqrt(self.lbp),
                np.sqrt(self.orient),
                np.array([self.grad_mean], np.float32),
                self.shape,
            ]
        ).astype(np.float32)


FEATURE_DIM = (
    L_BINS
    + A_BINS
    + B_BINS
    + int(np.prod(JOINT_BINS))
    + 3
    + 3
    + LBP_BINS
    + ORIENT_BINS
    + 1
    + len(SHAPE_NAMES)
)


def _bins(values: np.ndarray, low: float, high: float, count: int) -> np.ndarray:
    scaled = (values - low) * (count / (high - low))
    return np.clip(scaled, 0, count - 1).astype(np.int16)


def context(image: np.ndarray, max_side: int = MAX_SIDE) -> RegionContext:
    """Precompute the maps :func:`describe` reads (``image`` is H x W x 3 uint8 RGB)."""
    from skimage.feature import local_binary_pattern

    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    image = np.ascontiguousarray(image[:, :, :3]).astype(np.uint8, copy=False)
    height, width = image.shape[:2]
    scale = min(1.0, max_side / max(height, width))
    if scale < 1.0:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        small = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    else:
        small = image
    lab = cv2.cvtColor(small.astype(np.float32) / 255.0, cv2.COLOR_RGB2Lab)
    l_bin = _bins(lab[:, :, 0], 0.0, 100.0, L_BINS)
    a_bin = _bins(lab[:, :, 1], *_A_RANGE, A_BINS)
    b_bin = _bins(lab[:, :, 2], *_B_RANGE, B_BINS)
    jl = _bins(lab[:, :, 0], 0.0, 100.0, JOINT_BINS[0])
    ja = _bins(lab[:, :, 1], *_A_RANGE, JOINT_BINS[1])
    jb = _bins(lab[:, :, 2], *_B_RANGE, JOINT_BINS[2])
    joint = ((jl * JOINT_BINS[1] + ja) * JOINT_BINS[2] + jb).astype(np.int16)
    gray = lab[:, :, 0]
    lbp = local_binary_pattern((gray * 2.55).astype(np.uint8), 8, 1, method="uniform").astype(np.int16)
    smooth = cv2.GaussianBlur(lab, (0, 0), 1.0)
    gx = cv2.Sobel(smooth, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(smooth, cv2.CV_32F, 0, 1, ksize=3)
    energy = gx**2 + gy**2  # per channel
    strongest = np.argmax(energy, axis=2)[:, :, None]
    gx1 = np.take_along_axis(gx, strongest, axis=2)[:, :, 0]
    gy1 = np.take_along_axis(gy, strongest, axis=2)[:, :, 0]
    grad = np.sqrt(energy.sum(axis=2)).astype(np.float32)
    angle = np.mod(np.arctan2(gy1, gx1), np.pi)  # orientation, not direction: a flip keeps it
    orient = np.clip((angle / np.pi * ORIENT_BINS).astype(np.int16), 0, ORIENT_BINS - 1)
    grad_scale = float(np.percentile(grad, 90)) + 1e-3
    return RegionContext(
        height=height,
        width=width,
        lab=lab,
        l_bin=l_bin,
        a_bin=a_bin,
        b_bin=b_bin,
        joint_bin=joint,
        lbp=lbp,
        orient_bin=orient,
        grad=grad,
        grad_scale=grad_scale,
    )


def context_of(state: object, image: np.ndarray | None = None, key: str = "region_context") -> RegionContext:
    """The :class:`RegionContext` cached in an ImageState's ``extras`` (computed on first use).

    ``image`` is needed the first time unless the state carries ``image`` itself (the classic engine's
    does).
    """
    extras = getattr(state, "extras", None)
    if isinstance(extras, dict) and isinstance(extras.get(key), RegionContext):
        return extras[key]
    if image is None:
        image = getattr(state, "image", None)
    if image is None:
        raise ValueError("region features need the image's pixels, and this image state does not keep them")
    found = context(image)
    if isinstance(extras, dict):
        extras[key] = found
    return found


def _hist(bins: np.ndarray, count: int, weights: np.ndarray | None = None) -> np.ndarray:
    h = np.bincount(bins, weights=weights, minlength=count)[:count].astype(np.float32)
    total = float(h.sum())
    return h / total if total > 0 else np.full(count, 1.0 / count, np.float32)


def _shape_stats(mask: np.ndarray) -> np.ndarray:
    h, w = mask.shape
    area = float(mask.sum())
    out = np.zeros(len(SHAPE_NAMES), np.float32)
    if area == 0:
        return out
    m8 = mask.astype(np.uint8)
    contours, _ = cv2.findContours(m8, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    perimeter = float(sum(cv2.arcLength(c, True) for c in contours)) or 1.0
    points = np.concatenate([c.reshape(-1, 2) for c in contours]) if contours else np.zeros((0, 2), np.int32)
    hull_area = float(cv2.contourArea(cv2.convexHull(points))) if len(points) >= 3 else area
    ys, xs = np.nonzero(mask)
    bw, bh = float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)
    moments = cv2.moments(m8, binaryImage=True)
    mu20, mu02, mu11 = moments["mu20"] / area, moments["mu02"] / area, moments["mu11"] / area
    common = np.sqrt(max(0.0, ((mu20 - mu02) / 2) ** 2 + mu11**2))
    lam1, lam2 = (mu20 + mu02) / 2 + common, (mu20 + mu02) / 2 - common
    eccentricity = float(np.sqrt(max(0.0, 1.0 - lam2 / lam1))) if lam1 > 0 else 0.0
    border = np.concatenate([mask[0, :], mask[-1, :], mask[:, 0], mask[:, -1]])
    out[0] = min(1.0, area / max(hull_area, 1.0))  # solidity
    out[1] = area / (bw * bh)  # extent
    out[2] = min(1.0, 4.0 * np.pi * area / perimeter**2)  # circularity
    out[3] = min(bw, bh) / max(bw, bh)  # aspect ratio (orientation-free)
    out[4] = eccentricity
    out[5] = float(border.mean())  # share of the image border the region covers
    out[6] = float(np.log(area / (h * w))) / 5.0  # about -1.4 for 0.1 % of the image, 0 for all of it
    return out


def describe(ctx: RegionContext, mask: np.ndarray) -> RegionDescriptor:
    """The descriptor of ``mask`` (full resolution or working resolution) in the image of ``ctx``."""
    small = ctx.to_working(mask)
    pixels = np.flatnonzero(small)
    if pixels.size == 0:
        raise ValueError("cannot describe an empty region")
    lab = ctx.lab.reshape(-1, 3)[pixels]
    grad = ctx.grad.ravel()[pixels]
    return RegionDescriptor(
        colour_l=_hist(ctx.l_bin.ravel()[pixels], L_BINS),
        colour_a=_hist(ctx.a_bin.ravel()[pixels], A_BINS),
        colour_b=_hist(ctx.b_bin.ravel()[pixels], B_BINS),
        colour_joint=_hist(ctx.joint_bin.ravel()[pixels], int(np.prod(JOINT_BINS))),
        lab_mean=lab.mean(axis=0).astype(np.float32),
        lab_std=lab.std(axis=0).astype(np.float32),
        lbp=_hist(ctx.lbp.ravel()[pixels], LBP_BINS),
        orient=_hist(ctx.orient_bin.ravel()[pixels], ORIENT_BINS, weights=grad),
        grad_mean=float(min(3.0, grad.mean() / ctx.grad_scale)),
        shape=_shape_stats(small),
        area=int(pixels.size),
    )


def describe_many(ctx: RegionContext, masks: Sequence[np.ndarray]) -> np.ndarray:
    """``len(masks) x FEATURE_DIM`` feature vectors (an empty region gets a zero row)."""
    out = np.zeros((len(masks), FEATURE_DIM), np.float32)
    for i, mask in enumerate(masks):
        small = ctx.to_working(mask)
        if small.any():
            out[i] = describe(ctx, small).vector()
    return out


# --- comparing two regions without training ---------------------------------------------------------


def bhattacharyya(p: np.ndarray, q: np.ndarray) -> float:
    """Histogram similarity in [0, 1] (1 = same distribution)."""
    return float(np.clip(np.sum(np.sqrt(np.asarray(p) * np.asarray(q))), 0.0, 1.0))


@dataclass(frozen=True)
class Similarity:
    colour: float
    texture: float
    shape: float

    @property
    def total(self) -> float:
        return 0.6 * self.colour + 0.25 * self.texture + 0.15 * self.shape


def similarity(a: RegionDescriptor, b: RegionDescriptor) -> Similarity:
    """Block-wise similarity of two regions, each in [0, 1]: colour, texture and shape."""
    colour = (
        bhattacharyya(a.colour_joint, b.colour_joint) * 0.5
        + (
            bhattacharyya(a.colour_l, b.colour_l)
            + bhattacharyya(a.colour_a, b.colour_a)
            + bhattacharyya(a.colour_b, b.colour_b)
        )
        / 6.0
    )
    # a mean-colour check keeps two flat regions of different hue apart even when bins coincide
    delta = float(np.linalg.norm(a.lab_mean - b.lab_mean))
    colour *= float(np.exp(-((delta / 30.0) ** 2)))
    texture = 0.5 * bhattacharyya(a.lbp, b.lbp) + 0.5 * bhattacharyya(a.orient, b.orient)
    texture *= float(np.exp(-abs(a.grad_mean - b.grad_mean)))
    shape_a, shape_b = a.shape[:5], b.shape[:5]  # scale- and position-free statistics
    shape = float(np.exp(-2.0 * np.abs(shape_a - shape_b).mean()))
    return Similarity(float(colour), float(texture), shape)
