"""Segment everything without a prompt: colour regions merged into non-overlapping proposals.

One job: Felzenszwalb-Huttenlocher over-segmentation of the (smoothed) image, adjacent regions
merged greedily while their mean Lab colours are closer than a threshold, regions smaller than
0.5% of the image dropped. Each region's score favours what looks like an object: a strong
contrast with its surroundings, a boundary along image edges, and not touching the image border
much (background usually does). Best first.
"""

from __future__ import annotations

import cv2
import numpy as np
from skimage.segmentation import felzenszwalb

from seemly.engines.classic_features import Features

MIN_AREA_SHARE = 0.005
MERGE_DISTANCE = 12.0  # Lab units
MAX_SIDE = 320


def propose(image: np.ndarray, features: Features | None = None) -> list[tuple[np.ndarray, float]]:
    height, width = image.shape[:2]
    if height < 4 or width < 4:
        return [(np.ones((height, width), dtype=bool), 0.5)]
    scale = max(1.0, max(height, width) / MAX_SIDE)
    size = (max(4, round(width / scale)), max(4, round(height / scale)))
    small = cv2.resize(image, size, interpolation=cv2.INTER_AREA) if scale > 1.0 else image
    lab = cv2.cvtColor(small.astype(np.float32) / 255.0, cv2.COLOR_RGB2Lab)
    labels = felzenszwalb(
        small, scale=300, sigma=0.8, min_size=max(20, small.shape[0] * small.shape[1] // 2000)
    )
    labels = _merge(labels, lab)
    regions = _score(labels, lab)
    out = []
    for label, score in regions:
        mask = labels == label
        if scale > 1.0:
            mask = cv2.resize(mask.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST) > 0
        out.append((mask, score))
    if not out:
        out.append((np.ones((height, width), dtype=bool), 0.0))
    return out


def _adjacency(labels: np.ndarray) -> np.ndarray:
    pairs = []
    for a, b in ((labels[:, :-1], labels[:, 1:]), (labels[:-1, :], labels[1:, :])):
        diff = a != b
        pairs.append(np.stack([a[diff], b[diff]], axis=1))
    both = np.concatenate(pairs)
    both = np.sort(both, axis=1)
    return np.unique(both, axis=0) if both.size else both.reshape(0, 2)


def _merge(labels: np.ndarray, lab: np.ndarray) -> np.ndarray:
    """Union adjacent regions whose mean colours are close, closest pairs first."""
    count = int(labels.max()) + 1
    flat = labels.ravel()
    area = np.bincount(flat, minlength=count).astype(np.float64)
    sums = np.stack(
        [np.bincount(flat, weights=lab[:, :, c].ravel(), minlength=count) for c in range(3)], axis=1
    )
    parent = np.arange(count)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for _ in range(4):  # a few rounds: merged means change, so new pairs become close
        edges = _adjacency(parent[labels])
        if edges.size == 0:
            break
        means = sums / np.maximum(area, 1)[:, None]
        dist = np.sqrt(((means[edges[:, 0]] - means[edges[:, 1]]) ** 2).sum(axis=1))
        order = np.argsort(dist, kind="stable")
        merged = False
        for e in order:
            if dist[e] > MERGE_DISTANCE:
                break
            a, b = find(int(edges[e, 0])), find(int(edges[e, 1]))
            if a == b:
                continue
            ma, mb = sums[a] / max(area[a], 1), sums[b] / max(area[b], 1)
            if np.sqrt(((ma - mb) ** 2).sum()) > MERGE_DISTANCE:
                continue
            keep, drop = (a, b) if area[a] >= area[b] else (b, a)
            parent[drop] = keep
            area[keep] += area[drop]
            sums[keep] += sums[drop]
            merged = True
        if not merged:
            break
    roots = np.array([find(i) for i in range(count)])
    return roots[labels]


def _score(labels: np.ndarray, lab: np.ndarray) -> list[tuple[int, float]]:
    from scipy import ndimage

    height, width = labels.shape
    total = height * width
    gx = cv2.Sobel(lab, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(lab, cv2.CV_32F, 0, 1, ksize=3)
    gradient = np.sqrt((gx**2 + gy**2).sum(axis=2))
    g_scale = float(np.percentile(gradient, 90)) + 1e-6
    border = np.zeros((height, width), dtype=bool)
    border[0, :] = border[-1, :] = border[:, 0] = border[:, -1] = True
    border_total = float(border.sum())
    kernel = np.ones((3, 3), np.uint8)
    pad = 5
    out = []
    for index, window in enumerate(ndimage.find_objects(labels + 1)):
        label = index  # find_objects(labels + 1) lists label 0 first
        if window is None:
            continue
        rs, cs = window
        rs = slice(max(rs.start - pad, 0), min(rs.stop + pad, height))
        cs = slice(max(cs.start - pad, 0), min(cs.stop + pad, width))
        mask = labels[rs, cs] == label
        area = int(mask.sum())
        if area < MIN_AREA_SHARE * total or area > 0.95 * total:
            continue
        m8 = mask.astype(np.uint8)
        edge = (cv2.dilate(m8, kernel) - cv2.erode(m8, kernel)) > 0
        ring = (cv2.dilate(m8, kernel, iterations=4) > 0) & ~mask
        sub_lab = lab[rs, cs]
        inside_mean = sub_lab[mask].mean(axis=0)
        ring_mean = sub_lab[ring].mean(axis=0) if ring.any() else inside_mean
        contrast = min(1.0, float(np.sqrt(((inside_mean - ring_mean) ** 2).sum())) / 40.0)
        boundary = min(1.0, float(gradient[rs, cs][edge].mean()) / g_scale) if edge.any() else 0.0
        sub_border = border[rs, cs]
        on_border = float((mask & sub_border).sum()) / border_total
        touching = float((edge & sub_border).sum()) / max(1.0, float(edge.sum()))
        score = (
            0.45 * contrast + 0.45 * boundary + 0.1 * min(1.0, 20 * area / total) - 0.5 * touching - on_border
        )
        out.append((int(label), float(np.clip(score, 0.0, 1.0))))
    out.sort(key=lambda item: (-item[1], item[0]))
    return out
