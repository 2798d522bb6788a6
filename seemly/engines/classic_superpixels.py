"""Superpixels: the coarse solve's nodes, so that its graph cut is small and fast whatever the image.

One job: SLIC regions on the coarse Lab image, the graph between adjacent regions, and the graph
cut restricted to labellings that are constant on each region. Unaries of a region are the *sum*
of its pixels' unaries and the weight between two regions the *sum* of the pixel edges between
them, so the region cut minimises exactly the pixel energy over those labellings (as Lazy
Snapping's pre-segmentation does); the pixel level then repairs the boundary in a narrow band.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from skimage.segmentation import slic

from seemly.engines import classic_graphcut


@dataclass
class RegionGraph:
    labels: np.ndarray  # h x w int32 region of each coarse pixel, 0..count-1
    count: int
    area: np.ndarray  # count float64 pixels per region
    src: np.ndarray  # E int64 region pairs (src < dst) ...
    dst: np.ndarray
    weight: np.ndarray  # E float64 summed pixel-edge weights between the two regions

    def arrays(self) -> list[np.ndarray]:
        return [self.labels, self.area, self.src, self.dst, self.weight]


def build(
    lab: np.ndarray, edges: dict[tuple[int, int], np.ndarray], regions: int, compactness: float
) -> RegionGraph:
    height, width = lab.shape[:2]
    if height * width <= 4 * regions or min(height, width) < 4:
        labels = np.arange(height * width, dtype=np.int32).reshape(height, width)  # every pixel its own
    else:
        labels = slic(
            lab,
            n_segments=regions,
            compactness=compactness,
            convert2lab=False,
            start_label=0,
            channel_axis=-1,
            enforce_connectivity=True,
        ).astype(np.int32)
        _, labels = np.unique(labels, return_inverse=True)
        labels = labels.reshape(height, width).astype(np.int32)
    count = int(labels.max()) + 1
    srcs, dsts, weights = [], [], []
    for (dr, dc), w in edges.items():
        if dc >= 0:
            a, b, ww = labels[: height - dr, : width - dc], labels[dr:, dc:], w[: height - dr, : width - dc]
        else:
            a, b, ww = labels[: height - dr, -dc:], labels[dr:, : width + dc], w[: height - dr, -dc:]
        cross = a != b
        lo = np.minimum(a[cross], b[cross]).astype(np.int64)
        hi = np.maximum(a[cross], b[cross]).astype(np.int64)
        srcs.append(lo)
        dsts.append(hi)
        weights.append(ww[cross].astype(np.float64))
    src = np.concatenate(srcs) if srcs else np.zeros(0, np.int64)
    dst = np.concatenate(dsts) if dsts else np.zeros(0, np.int64)
    weight = np.concatenate(weights) if weights else np.zeros(0)
    key = src * count + dst
    unique, inverse = np.unique(key, return_inverse=True)
    summed = np.bincount(inverse, weights=weight, minlength=unique.size)
    area = np.bincount(labels.ravel(), minlength=count).astype(np.float64)
    return RegionGraph(labels, count, area, unique // count, unique % count, summed)


def cut(
    graph: RegionGraph, logit: np.ndarray, gamma: float, hard_fg: np.ndarray, hard_bg: np.ndarray
) -> np.ndarray:
    """The pixel energy's minimiser among region-constant labellings, as a pixel mask."""
    flat = graph.labels.ravel()
    unary = np.bincount(flat, weights=logit.ravel().astype(np.float64), minlength=graph.count)
    # A seed wins its region: regions with seeds of one kind only are fixed to it; where both
    # kinds fall in one region the majority decides (the pixel band repairs the rest).
    n_fg = np.bincount(flat, weights=hard_fg.ravel().astype(np.float64), minlength=graph.count)
    n_bg = np.bincount(flat, weights=hard_bg.ravel().astype(np.float64), minlength=graph.count)
    unary = np.where(n_fg > n_bg, classic_graphcut.HARD, np.where(n_bg > n_fg, -classic_graphcut.HARD, unary))
    flow = classic_graphcut.maxflow.Graph[int]()
    flow.add_nodes(graph.count)
    if gamma > 0 and graph.src.size:
        capacity = classic_graphcut.capacity(gamma * graph.weight)
        flow.add_edges(graph.src, graph.dst, capacity, capacity)
    ids = np.arange(graph.count)
    flow.add_grid_tedges(ids, classic_graphcut.capacity(unary), classic_graphcut.capacity(-unary))
    flow.maxflow()
    return (~flow.get_grid_segments(ids))[graph.labels]
