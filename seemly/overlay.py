"""Render masks over their image for humans: demo output, docs, debugging."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from seemly.masks import Mask

# A qualitative palette (tab10) so that neighbouring regions stay distinguishable.
PALETTE = np.array(
    [
        (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
        (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
    ],
    dtype=np.float32,
)  # fmt: skip


def overlay(image: np.ndarray, masks: list[Mask], alpha: float = 0.5) -> np.ndarray:
    """``image`` (H x W x 3 uint8) with each mask tinted in its own colour and outlined."""
    out = image.astype(np.float32).copy()
    for index, mask in enumerate(masks):
        if mask.shape != image.shape[:2]:
            raise ValueError(f"mask {index} is {mask.shape}, image is {image.shape[:2]}")
        colour = PALETTE[index % len(PALETTE)]
        region = mask.data
        out[region] = (1 - alpha) * out[region] + alpha * colour
        edge = region & ~ndimage.binary_erosion(region)
        out[edge] = colour
    return np.clip(out, 0, 255).astype(np.uint8)
