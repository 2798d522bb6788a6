"""Synthetic scenes with known answers for the semantic-prompt tests: red discs ("apple"), blue squares
("box") and green triangles ("leaf") on a textured background."""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np


@dataclass
class Scene:
    image: np.ndarray
    objects: list[tuple[str, np.ndarray]] = field(default_factory=list)  # (label, mask)

    def masks(self, label: str) -> list[np.ndarray]:
        return [m for name, m in self.objects if name == label]

    def union(self, label: str) -> np.ndarray:
        out = np.zeros(self.image.shape[:2], bool)
        for m in self.masks(label):
            out |= m
        return out


def background(
    rng: np.random.Generator, height: int, width: int, tone: tuple[int, int, int] | None = None
) -> np.ndarray:
    tone = tone or tuple(int(v) for v in rng.integers(110, 170, size=3))
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    ramp = 20.0 * (xx / width - 0.5) + 10.0 * (yy / height - 0.5)
    noise = cv2.GaussianBlur(rng.normal(0, 14, (height, width)).astype(np.float32), (0, 0), 1.5)
    image = np.stack([tone[c] + ramp + noise for c in range(3)], axis=2)
    return np.clip(image, 0, 255).astype(np.uint8)


def _shade(
    image: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int], rng: np.random.Generator
) -> None:
    noise = rng.normal(0, 6, mask.sum()).astype(np.float32)
    for c in range(3):
        channel = image[:, :, c].astype(np.float32)
        channel[mask] = np.clip(colour[c] + noise, 0, 255)
        image[:, :, c] = channel.astype(np.uint8)


def draw(image: np.ndarray, label: str, cx: int, cy: int, size: int, rng: np.random.Generator) -> np.ndarray:
    height, width = image.shape[:2]
    canvas = np.zeros((height, width), np.uint8)
    if label == "apple":
        cv2.circle(canvas, (cx, cy), size, 1, -1)
        colour = (200, 30, 35)
    elif label == "box":
        cv2.rectangle(canvas, (cx - size, cy - size), (cx + size, cy + size), 1, -1)
        colour = (35, 60, 200)
    elif label == "leaf":
        points = np.array([[cx, cy - size], [cx - size, cy + size], [cx + size, cy + size]], np.int32)
        cv2.fillPoly(canvas, [points], 1)
        colour = (40, 170, 40)
    else:
        raise ValueError(label)
    mask = canvas.astype(bool)
    _shade(image, mask, colour, rng)
    return mask


def make_scene(
    seed: int,
    labels: list[str],
    height: int = 240,
    width: int = 320,
    sizes: tuple[int, int] = (18, 34),
) -> Scene:
    """Objects placed without overlap (each label in ``labels`` once, in order)."""
    rng = np.random.default_rng(seed)
    image = background(rng, height, width)
    scene = Scene(image)
    taken = np.zeros((height, width), bool)
    for label in labels:
        for _ in range(200):
            size = int(rng.integers(*sizes))
            cx = int(rng.integers(size + 4, width - size - 4))
            cy = int(rng.integers(size + 4, height - size - 4))
            region = np.zeros((height, width), bool)
            region[max(0, cy - size - 6) : cy + size + 6, max(0, cx - size - 6) : cx + size + 6] = True
            if not (region & taken).any():
                break
        taken |= region
        scene.objects.append((label, draw(image, label, cx, cy, size, rng)))
    return scene


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return float(np.count_nonzero(a & b) / union) if union else 1.0
