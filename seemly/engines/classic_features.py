"""Per-image features of the classic engine: the expensive, cacheable half (``embed``).

One job: from an RGB image compute what every round reuses — the Lab image, a colour palette
(k-means in Lab; each pixel's palette index makes colour models a ``bincount``), the contrast-
sensitive edge weights of the 8-connected pixel graph, and a downscaled cost map for geodesic
distances. Everything is deterministic (fixed k-means initialisation, no RNG state shared).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

PALETTE_SIZE = 64
COARSE_MAX_SIDE = 320  # the coarse level (geodesics, first solve) is at most this large


@dataclass
class Level:
    """The image at one resolution: palette indices and graph edge weights."""

    scale: float  # one pixel of this level = ``scale`` pixels of the image
    lab: np.ndarray  # h x w x 3 float32
    index: np.ndarray  # h x w int32 palette index of each pixel
    edges: dict[tuple[int, int], np.ndarray]  # (dr, dc) -> h x w float32 weight of edge p -> p + (dr, dc)

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.index.shape[0]), int(self.index.shape[1]))


@dataclass
class Features:
    palette: np.ndarray  # K x 3 float32 Lab centres
    similarity: np.ndarray  # K x K float32 row-normalised palette smoothing kernel
    full: Level  # the image itself
    coarse: Level  # at most COARSE_MAX_SIDE pixels on its longer side (may be ``full``)
    geo_cost: np.ndarray  # coarse h x w float64 local cost for geodesic distances
    border: np.ndarray  # coarse h x w float32: 1 on a band along the image border

    def arrays(self) -> list[np.ndarray]:
        out = [self.palette, self.similarity, self.geo_cost, self.border]
        for level in (self.full, self.coarse):
            out += [level.lab, level.index, *level.edges.values()]
        return out


def to_lab(image: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(image.astype(np.float32) / 255.0, cv2.COLOR_RGB2Lab)


def kmeans_palette(
    lab: np.ndarray, k: int = PALETTE_SIZE, iterations: int = 8
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic k-means in Lab: farthest-point initialisation on a strided sample."""
    pixels = lab.reshape(-1, 3)
    step = max(1, pixels.shape[0] // 6000)
    sample = pixels[::step].astype(np.float32)
    k = max(1, min(k, sample.shape[0]))
    centres = np.empty((k, 3), dtype=np.float32)
    centres[0] = sample.mean(axis=0)
    nearest = ((sample - centres[0]) ** 2).sum(axis=1)
    for j in range(1, k):
        centres[j] = sample[int(np.argmax(nearest))]
        nearest = np.minimum(nearest, ((sample - centres[j]) ** 2).sum(axis=1))
    for _ in range(iterations):
        d = ((sample[:, None, :] - centres[None, :, :]) ** 2).sum(axis=2)
        assign = d.argmin(axis=1)
        counts = np.bincount(assign, minlength=k).astype(np.float32)
        for c in range(3):
            sums = np.bincount(assign, weights=sample[:, c], minlength=k)
            centres[:, c] = np.where(counts > 0, sums / np.maximum(counts, 1), centres[:, c])
    index = _assign(pixels, centres).reshape(lab.shape[:2])
    return centres, index


def _assign(pixels: np.ndarray, centres: np.ndarray) -> np.ndarray:
    out = np.empty(pixels.shape[0], dtype=np.int32)
    c2 = (centres**2).sum(axis=1)
    chunk = 65536
    for start in range(0, pixels.shape[0], chunk):
        block = pixels[start : start + chunk]
        d = c2[None, :] - 2.0 * block @ centres.T
        out[start : start + chunk] = d.argmin(axis=1)
    return out


def edge_weights(lab: np.ndarray) -> dict[tuple[int, int], np.ndarray]:
    """GrabCut's contrast-sensitive weights ``exp(-beta |dI|^2) / dist`` on the 8-connected grid."""
    height, width = lab.shape[:2]
    diffs: dict[tuple[int, int], np.ndarray] = {}
    for dr, dc in ((0, 1), (1, 0), (1, 1), (1, -1)):
        d = np.zeros((height, width), dtype=np.float32)
        r1 = height - dr
        if dc >= 0:
            a = lab[:r1, : width - dc]
            b = lab[dr:, dc:]
            d[:r1, : width - dc] = ((a - b) ** 2).sum(axis=2)
        else:
            a = lab[:r1, -dc:]
            b = lab[dr:, : width + dc]
            d[:r1, -dc:] = ((a - b) ** 2).sum(axis=2)
        diffs[(dr, dc)] = d
    total = sum(float(d.sum()) for d in diffs.values())
    count = sum(max((height - dr) * (width - abs(dc)), 0) for dr, dc in diffs)
    beta = 1.0 / (2.0 * max(total / max(count, 1), 1e-6))
    weights = {}
    for (dr, dc), d in diffs.items():
        w = np.exp(-beta * d) / np.hypot(dr, dc)
        # Edges leaving the image (last row / column) must not exist.
        if dr:
            w[height - dr :, :] = 0
        if dc > 0:
            w[:, width - dc :] = 0
        elif dc < 0:
            w[:, :-dc] = 0
        weights[(dr, dc)] = w.astype(np.float32)
    return weights


def compute(
    image: np.ndarray,
    geo_sigma: float = 1.0,
    geo_strength: float = 4.0,
    coarse_max_side: int = COARSE_MAX_SIDE,
    palette_size: int = PALETTE_SIZE,
    palette_sigma: float = 6.0,
) -> Features:
    """All per-image features (see the module docstring)."""
    lab = to_lab(image)
    height, width = lab.shape[:2]
    smooth = cv2.GaussianBlur(lab, (0, 0), 0.8) if min(height, width) >= 3 else lab
    palette, index = kmeans_palette(smooth, palette_size)
    d = ((palette[:, None, :] - palette[None, :, :]) ** 2).sum(axis=2)
    similarity = np.exp(-d / (2.0 * palette_sigma**2)).astype(np.float32)
    similarity /= similarity.sum(axis=1, keepdims=True)
    full = Level(1.0, smooth, index, edge_weights(smooth))

    scale = max(1.0, max(height, width) / coarse_max_side)
    if scale > 1.0:
        size = (max(1, round(width / scale)), max(1, round(height / scale)))
        small = cv2.resize(lab, size, interpolation=cv2.INTER_AREA)
        coarse = Level(
            scale, small, _assign(small.reshape(-1, 3), palette).reshape(small.shape[:2]), edge_weights(small)
        )
    else:
        coarse = full
    return Features(
        palette=palette,
        similarity=similarity,
        full=full,
        coarse=coarse,
        geo_cost=geodesic_cost(coarse.lab, geo_sigma, geo_strength),
        border=border_band(*coarse.shape),
    )


def geodesic_cost(lab: np.ndarray, sigma: float = 1.0, strength: float = 4.0) -> np.ndarray:
    """Local path cost ``1 + strength * |grad| / mean |grad|`` of the (smoothed) Lab image."""
    smooth = cv2.GaussianBlur(lab, (0, 0), sigma) if min(lab.shape[:2]) >= 3 else lab
    gx = cv2.Sobel(smooth, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(smooth, cv2.CV_32F, 0, 1, ksize=3)
    gradient = np.sqrt((gx**2 + gy**2).sum(axis=2))
    return (1.0 + strength * gradient / (float(gradient.mean()) + 1e-6)).astype(np.float64)


def border_band(height: int, width: int, share: float = 0.03) -> np.ndarray:
    band = max(1, round(share * min(height, width)))
    out = np.zeros((height, width), dtype=np.float32)
    out[:band, :] = out[-band:, :] = 1.0
    out[:, :band] = out[:, -band:] = 1.0
    return out
