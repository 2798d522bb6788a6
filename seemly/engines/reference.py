"""Reference-image prompts without weights: find "the same thing" as an example in another image.

An annotator points at an example: an image (by URI) and the mask of the object in it. A
:class:`ReferenceModel` is built from that pair once (and cached by the caller):

* a **colour model**: a smoothed joint Lab histogram of the object and one of the rest of the
  reference image; their ratio gives, for every colour, how likely a pixel of that colour belongs to
  the object (colours never seen score 0, so an unseen background is not taken for the object);
* the object's **region descriptor** (:mod:`seemly.engines.region_features`: colour, texture,
  shape statistics), to rank whole candidate regions;
* **local features**: ORB keypoints on the object, also on its mirror image, so that a flipped
  copy still matches. Matched to the target image (ratio test) and verified with a RANSAC
  similarity transform (rotation, uniform scale, translation), they place the reference mask in the
  target, warped; up to ``max_instances`` such placements (the inliers of one are removed before
  looking for the next).

:func:`proposal_scores` turns these into one score in [0, 1] per region proposal of the target
(the share of its pixels with object colours, raised where a warped reference covers it);
:mod:`seemly.engines.semantic` groups the high-scoring proposals into instances and ranks them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np

from seemly.engines import region_features as rf
from seemly.engines.base import UnsupportedPromptError

COLOUR_BINS = (6, 10, 10)  # L, a, b
KEYPOINT_SIDE = 640  # keypoints are found on images at most this many pixels on the long side
MIN_INLIERS = 10
RATIO = 0.8  # Lowe's ratio test


class ReferenceError(UnsupportedPromptError):
    """A reference that cannot be used (empty mask, mask of another size, unreadable image)."""


@dataclass
class Placement:
    """The reference object located in the target by local features: a warped mask (working size)."""

    mask: np.ndarray  # bool, target image size (full resolution)
    inliers: int
    mirrored: bool
    scale: float

    @property
    def confidence(self) -> float:
        """In [0, 1]: 40 RANSAC inliers or more is certain."""
        return min(1.0, self.inliers / 40.0)


@dataclass
class ReferenceModel:
    descriptor: rf.RegionDescriptor
    colour_ratio: np.ndarray  # flattened COLOUR_BINS: P(object | colour)
    area_share: float  # the object's share of the reference image
    keypoints: list[tuple[np.ndarray, np.ndarray, bool]] = field(default_factory=list)
    # (points N x 2 in keypoint-image pixels, ORB descriptors N x 32, mirrored)
    mask_kp: np.ndarray | None = None  # the reference mask at keypoint resolution
    mirrored_mask_kp: np.ndarray | None = None


def _colour_index(lab: np.ndarray) -> np.ndarray:
    nl, na, nb = COLOUR_BINS
    li = np.clip((lab[..., 0] / 100.0 * nl).astype(np.int32), 0, nl - 1)
    ai = np.clip(((lab[..., 1] + 80.0) / 160.0 * na).astype(np.int32), 0, na - 1)
    bi = np.clip(((lab[..., 2] + 80.0) / 160.0 * nb).astype(np.int32), 0, nb - 1)
    return (li * na + ai) * nb + bi


def _smoothed_hist(index: np.ndarray) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    total = int(np.prod(COLOUR_BINS))
    h = np.bincount(index.ravel(), minlength=total).astype(np.float64).reshape(COLOUR_BINS)
    h = gaussian_filter(h, sigma=0.8, mode="constant")
    return (h / max(h.sum(), 1e-12)).ravel()


def _resize_to(image: np.ndarray, side: int) -> tuple[np.ndarray, float]:
    height, width = image.shape[:2]
    scale = min(1.0, side / max(height, width))
    if scale >= 1.0:
        return image, 1.0
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA), scale


def _gray(image: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(np.ascontiguousarray(image[:, :, :3]), cv2.COLOR_RGB2GRAY)


def _orb(gray: np.ndarray, mask: np.ndarray | None, count: int) -> tuple[np.ndarray, np.ndarray | None]:
    orb = cv2.ORB_create(nfeatures=count, scaleFactor=1.2, nlevels=8, edgeThreshold=15, patchSize=21)
    keypoints, descriptors = orb.detectAndCompute(gray, None if mask is None else mask.astype(np.uint8) * 255)
    points = np.array([k.pt for k in keypoints], np.float32).reshape(-1, 2)
    return points, descriptors


def build_reference(image: np.ndarray, mask: np.ndarray, *, keypoints: bool = True) -> ReferenceModel:
    """The model of the object ``mask`` marks in ``image`` (H x W x 3 uint8 RGB)."""
    image = np.asarray(image)
    mask = np.asarray(mask, dtype=bool)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if mask.shape != image.shape[:2]:
        raise ReferenceError(
            f"the reference mask is {mask.shape[1]}x{mask.shape[0]} but the reference image is "
            f"{image.shape[1]}x{image.shape[0]}"
        )
    if not mask.any():
        raise ReferenceError("the reference mask is empty: mark the example object in the reference image")
    ctx = rf.context(image)
    small = ctx.to_working(mask)
    index = _colour_index(ctx.lab)
    h_obj = _smoothed_hist(index[small])
    rest = ~small
    # the rest of the image: without it (an object filling the frame) every seen colour is object
    h_bg = _smoothed_hist(index[rest]) if rest.sum() > 0.02 * rest.size else np.zeros_like(h_obj)
    share = float(small.mean())
    # Bayes with the object's share as prior; unseen colours (both ~0) score 0 thanks to the floor
    p_obj = share * h_obj
    ratio = p_obj / (p_obj + (1 - share) * h_bg + 1e-4 / h_obj.size)
    model = ReferenceModel(
        descriptor=rf.describe(ctx, small), colour_ratio=ratio.astype(np.float32), area_share=share
    )
    if keypoints:
        kp_image, _ = _resize_to(image, KEYPOINT_SIDE)
        kp_mask = cv2.resize(
            mask.astype(np.uint8), (kp_image.shape[1], kp_image.shape[0]), interpolation=cv2.INTER_NEAREST
        ).astype(bool)
        if not kp_mask.any():
            kp_mask = (
                cv2.resize(
                    mask.astype(np.float32),
                    (kp_image.shape[1], kp_image.shape[0]),
                    interpolation=cv2.INTER_AREA,
                )
                > 0
            )
        gray = _gray(kp_image)
        detect = cv2.dilate(kp_mask.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
        for mirrored in (False, True):
            g = gray[:, ::-1].copy() if mirrored else gray
            d = detect[:, ::-1].copy() if mirrored else detect
            points, descriptors = _orb(g, d, 1000)
            if descriptors is not None and len(points) >= 4:
                model.keypoints.append((points, descriptors, mirrored))
        model.mask_kp = kp_mask
        model.mirrored_mask_kp = kp_mask[:, ::-1].copy()
    return model


def colour_probability(model: ReferenceModel, ctx: rf.RegionContext) -> np.ndarray:
    """P(object | colour) for every working pixel of a target image."""
    return model.colour_ratio[_colour_index(ctx.lab)]


def place(
    model: ReferenceModel,
    target: np.ndarray,
    max_instances: int = 3,
    out_shape: tuple[int, int] | None = None,
) -> list[Placement]:
    """Locate the reference in ``target`` by local features (ORB + RANSAC); may be empty.

    The placed masks have ``out_shape`` (default: the target's size; pass the full image size when
    ``target`` is a downscaled copy).
    """
    if not model.keypoints or model.mask_kp is None:
        return []
    height, width = out_shape or target.shape[:2]
    kp_image, _scale = _resize_to(np.asarray(target), KEYPOINT_SIDE)
    points_t, descriptors_t = _orb(_gray(kp_image), None, 3000)
    if descriptors_t is None or len(points_t) < MIN_INLIERS:
        return []
    matcher = cv2.BFMatcher(cv2.NORM_HAMMING)
    candidates: list[tuple[np.ndarray, np.ndarray, bool]] = []
    for points_r, descriptors_r, mirrored in model.keypoints:
        pairs = matcher.knnMatch(descriptors_r, descriptors_t, k=2)
        good = [m[0] for m in pairs if len(m) == 2 and m[0].distance < RATIO * m[1].distance]
        if len(good) < MIN_INLIERS:
            continue
        src = np.array([points_r[m.queryIdx] for m in good], np.float32)
        dst = np.array([points_t[m.trainIdx] for m in good], np.float32)
        candidates.append((src, dst, mirrored))
    placements: list[Placement] = []
    for src, dst, mirrored in candidates:
        keep = np.ones(len(src), bool)
        for _ in range(max_instances):
            if keep.sum() < MIN_INLIERS:
                break
            matrix, inliers = cv2.estimateAffinePartial2D(
                src[keep], dst[keep], method=cv2.RANSAC, ransacReprojThreshold=4.0, maxIters=2000
            )
            if matrix is None or inliers is None:
                break
            inliers = inliers.ravel().astype(bool)
            count = int(inliers.sum())
            if count < MIN_INLIERS or count < 0.15 * keep.sum():
                break
            s = float(np.sqrt(abs(np.linalg.det(matrix[:, :2]))))
            if not 0.1 <= s <= 10.0:
                break
            ref_mask = model.mirrored_mask_kp if mirrored else model.mask_kp
            warped = cv2.warpAffine(
                ref_mask.astype(np.uint8),
                matrix,
                (kp_image.shape[1], kp_image.shape[0]),
                flags=cv2.INTER_NEAREST,
            )
            if warped.shape != (height, width):
                warped = cv2.resize(warped, (width, height), interpolation=cv2.INTER_NEAREST)
            if warped.any():
                placements.append(Placement(warped.astype(bool), count, mirrored, s))
            idx = np.flatnonzero(keep)
            keep[idx[inliers]] = False
    placements.sort(key=lambda p: -p.inliers)
    # the mirrored model often re-finds the same instance (drop repeats of a better placement), and
    # a handful of chance inliers is not an instance when another placement has hundreds
    unique: list[Placement] = []
    for p in placements:
        if unique and p.inliers < 0.2 * unique[0].inliers:
            break
        if all(_iou(p.mask, q.mask) < 0.5 for q in unique):
            unique.append(p)
    return unique[:max_instances]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return float(np.count_nonzero(a & b) / union) if union else 1.0


def proposal_scores(
    model: ReferenceModel,
    ctx: rf.RegionContext,
    proposals_small: Sequence[np.ndarray],
    placements: Sequence[Placement] = (),
) -> np.ndarray:
    """One score in [0, 1] per proposal (working-resolution masks): how much it looks like the object."""
    prob = colour_probability(model, ctx)
    warped = [ctx.to_working(p.mask) for p in placements]
    out = np.zeros(len(proposals_small), np.float32)
    for i, proposal in enumerate(proposals_small):
        area = int(proposal.sum())
        if area == 0:
            continue
        colour = float(prob[proposal].mean())
        cover = max((float((proposal & w).sum()) / area for w in warped), default=0.0)
        out[i] = max(colour, cover) if warped else colour
    return out
