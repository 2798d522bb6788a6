"""Which unlabelled images to label next: a batch from per-image uncertainty (and features).

Used by the learning-curve benchmark (one batch per round) and by ``seemly al next --strategy``.
The uncertainty comes from :func:`seemly.learning.uncertainty.image_uncertainty`; the features of
``diverse`` from :func:`image_features`, computed once per image from its pixels alone, so they do
not change when a new version is promoted.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

STRATEGIES = ("top", "weighted", "hybrid", "diverse")
HUE_BINS = 12
VALUE_BINS = 4
FEATURE_SIZE = HUE_BINS + VALUE_BINS + 6 + 1  # + Lab mean and std, edge density
FEATURE_SIDE = 128  # features are computed on a thumbnail at most this many pixels wide


def image_features(image: np.ndarray) -> np.ndarray:
    """A cheap, deterministic description of an image's appearance (``FEATURE_SIZE`` floats).

    Why these: images that look alike (same palette, same amount of clutter) teach a per-project
    model the same thing, so a batch should not be made of them. Hue histogram weighted by
    saturation, value histogram, Lab mean and standard deviation (scaled to about [0, 1]) and the
    share of edge pixels, on a thumbnail of at most ``FEATURE_SIDE`` pixels (about 1 ms).
    """
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] < 3 or array.shape[0] < 2 or array.shape[1] < 2:
        raise ValueError(f"expected an H x W (x 3) image, got shape {array.shape}")
    rgb = np.ascontiguousarray(array[:, :, :3]).astype(np.uint8, copy=False)
    scale = max(rgb.shape[:2]) / FEATURE_SIDE
    if scale > 1.0:
        size = (max(2, round(rgb.shape[1] / scale)), max(2, round(rgb.shape[0] / scale)))
        rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV).reshape(-1, 3).astype(np.float64)
    saturation = hsv[:, 1] / 255.0
    hue = np.bincount(
        np.minimum((hsv[:, 0] / 180.0 * HUE_BINS).astype(int), HUE_BINS - 1),
        weights=saturation,
        minlength=HUE_BINS,
    )
    hue /= max(float(saturation.sum()), 1e-9)
    value = np.bincount(
        np.minimum((hsv[:, 2] / 256.0 * VALUE_BINS).astype(int), VALUE_BINS - 1), minlength=VALUE_BINS
    ) / len(hsv)
    lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB).reshape(-1, 3).astype(np.float64) / 255.0
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    edges = float((cv2.Canny(gray, 50, 150) > 0).mean())
    return np.concatenate([hue, value, lab.mean(axis=0), lab.std(axis=0), [edges]]).astype(np.float64)


def _standardised(features: np.ndarray, labelled: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Columns scaled to unit variance over candidates and labelled images (constant ones dropped),
    so no feature dominates the distance because of its unit."""
    both = np.vstack([features, labelled]) if len(labelled) else features
    mean, std = both.mean(axis=0), both.std(axis=0)
    keep = std > 1e-12
    return (features[:, keep] - mean[keep]) / std[keep], (labelled[:, keep] - mean[keep]) / std[keep]


def _diverse(
    values: np.ndarray, k: int, rng: np.random.Generator, features: np.ndarray, labelled: np.ndarray
) -> list[int]:
    """Uncertainty-weighted k-means++ seeding: each pick is drawn with probability proportional to
    ``uncertainty x squared distance to the nearest image already labelled or picked``."""
    if k == 0:
        return []
    points, known = _standardised(features, labelled)
    weights = np.maximum(values, 1e-9)  # all-zero scores: plain k-means++ seeding
    nearest = np.full(len(values), np.inf)
    if len(known):
        nearest = ((points[:, None, :] - known[None, :, :]) ** 2).sum(axis=2).min(axis=1)
    picked: list[int] = []
    free = np.ones(len(values), bool)
    for _ in range(k):
        if np.isinf(nearest).any():  # nothing labelled or picked yet: weighted by uncertainty alone
            chance = np.where(free, weights, 0.0)
        else:
            chance = np.where(free, weights * nearest, 0.0)
            if chance.sum() <= 0:  # the rest are duplicates of what is taken: uncertainty alone
                chance = np.where(free, weights, 0.0)
        index = int(rng.choice(len(values), p=chance / chance.sum()))
        picked.append(index)
        free[index] = False
        nearest = np.minimum(nearest, ((points - points[index]) ** 2).sum(axis=1))
    return picked


def select_batch(
    scores: Sequence[float],
    k: int,
    rng: np.random.Generator,
    strategy: str = "weighted",
    *,
    features: np.ndarray | Sequence[Sequence[float]] | None = None,
    labelled: np.ndarray | Sequence[Sequence[float]] | None = None,
) -> list[int]:
    """Indices of the ``k`` images to label next, given each candidate's uncertainty.

    * ``top``: the ``k`` most uncertain, most uncertain first. Greedy: it takes the outliers first
      and a batch of near-duplicates of one hard case.
    * ``weighted``: ``k`` drawn without replacement with probability proportional to the uncertainty
      (Efraimidis-Spirakis keys ``u ** (1 / w)``), so hard images are likelier but the batch still
      spreads over the pool.
    * ``hybrid``: the ``ceil(k / 2)`` most uncertain plus the rest uniformly from the others.
    * ``diverse``: uncertainty-weighted k-means++ over ``features`` (one row per candidate, e.g.
      :func:`image_features`): a pick is likely where the model is unsure *and* far from every image
      already labelled (``labelled``: their feature rows) or picked, so a batch is not made of
      near-duplicates and a first batch (nothing labelled, no model) spreads over the pool.

    ``weighted``, ``hybrid`` and ``diverse`` return the batch in random order, so that any position
    of it (the benchmark's gate image is the last) is a uniform draw from the batch, as in random
    order. Deterministic given ``rng``.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}: use one of {', '.join(STRATEGIES)}")
    values = np.asarray(scores, dtype=float)
    if values.ndim != 1 or not np.all(np.isfinite(values)) or np.any(values < 0):
        raise ValueError("scores must be finite, non-negative numbers")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    k = min(k, len(values))
    top = sorted(range(len(values)), key=lambda i: (-values[i], i))
    if strategy == "top":
        return top[:k]
    if strategy == "weighted":
        weights = np.maximum(values, 1e-9)  # all-zero scores degrade to a uniform draw
        keys = np.log(rng.random(len(values)) + 1e-300) / weights  # log of u ** (1 / w): no underflow
        picked = [int(i) for i in np.argsort(-keys, kind="stable")[:k]]
    elif strategy == "hybrid":
        head = top[: (k + 1) // 2]
        rest = top[(k + 1) // 2 :]
        picked = head + [rest[int(i)] for i in rng.choice(len(rest), size=k - len(head), replace=False)]
    else:
        points, known = _feature_rows(features, labelled, len(values))
        picked = _diverse(values, k, rng, points, known)
    return [picked[int(i)] for i in rng.permutation(len(picked))]


def _feature_rows(
    features: np.ndarray | Sequence[Sequence[float]] | None,
    labelled: np.ndarray | Sequence[Sequence[float]] | None,
    count: int,
) -> tuple[np.ndarray, np.ndarray]:
    if features is None:
        raise ValueError("the diverse strategy needs features: one row per candidate image")
    points = np.asarray(features, dtype=float)
    if points.ndim != 2 or len(points) != count:
        raise ValueError(f"features must be one row per candidate ({count} rows), got shape {points.shape}")
    known = np.empty((0, points.shape[1])) if labelled is None else np.asarray(labelled, dtype=float)
    if len(known) == 0:
        known = np.empty((0, points.shape[1]))
    if known.ndim != 2 or known.shape[1] != points.shape[1]:
        raise ValueError(
            f"labelled features must have {points.shape[1]} columns like the candidates', got shape {known.shape}"
        )
    if not (np.all(np.isfinite(points)) and np.all(np.isfinite(known))):
        raise ValueError("features must be finite numbers")
    return points, known
