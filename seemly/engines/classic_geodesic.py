"""Geodesic distances on the image: how far a pixel is from a seed when crossing edges is expensive.

One job: minimal-path distances (skimage's ``MCP_Geometric``) on the downscaled cost map from
``classic_features``, returned at full resolution in image-pixel units. A pixel across a strong
edge is geodesically far even when it is close in the plane, which is what lets one click claim
its whole region and stop at the object's boundary.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
from skimage.graph import MCP_Geometric


def to_small(row: int, col: int, scale: float, shape: tuple[int, int]) -> tuple[int, int]:
    return (min(int((row + 0.5) / scale), shape[0] - 1), min(int((col + 0.5) / scale), shape[1] - 1))


def distance_small(cost: np.ndarray, seeds: Sequence[tuple[int, int]]) -> np.ndarray:
    """Geodesic distance (cost-weighted path length) from the nearest seed, at the cost map's scale."""
    if not seeds:
        return np.full(cost.shape, np.inf, dtype=np.float32)
    distances, _ = MCP_Geometric(cost, fully_connected=True).find_costs(list(seeds))
    return distances.astype(np.float32)


def upsample(small: np.ndarray, scale: float, shape: tuple[int, int]) -> np.ndarray:
    """A small distance map at full resolution, in image-pixel units."""
    if small.shape == shape:
        return small
    big = cv2.resize(small, (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)
    return big * np.float32(scale)
