"""A synthetic *project* dataset: one object class, labelled over and over, where per-project learning should pay.

Why: a Label Studio project labels one kind of thing; GrabCut's 50 unrelated objects are not that.
Each image holds one "beetle": a body (an ellipse, orange to red, varying within a range) with a
darker head (a disc of another colour) and thin legs, on a cluttered background whose blobs and
stripes reuse the body's and the head's colours. A weight-free colour graph cut seeded inside
the body misses the head and the legs and leaks into touching clutter of the body's colour; a
model that sees the image can learn the class (the head and the legs belong to the body). Sizes,
positions, orientations, colours, noise and blur vary; everything is drawn from the seed, so a
dataset is identical on every machine. The images are synthetic: results on them say what the
loop can learn from a consistent project, not how a real photo behaves.

Nothing here is read from disk: :func:`domain_samples` returns :class:`~seemly.bench.datasets.Sample`
objects with ``ignore=None`` and a pseudo ``image_path`` (``domain/<stem>.png``).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from seemly.bench.datasets import Sample

WIDTH, HEIGHT = 320, 240


def _colour(
    rng: np.random.Generator, hue: tuple[int, int], sat: tuple[int, int], val: tuple[int, int]
) -> np.ndarray:
    """An RGB colour drawn from an HSV range (OpenCV hue, 0-179)."""
    hsv = np.array([[[rng.integers(*hue), rng.integers(*sat), rng.integers(*val)]]], dtype=np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)


def _body_colour(rng: np.random.Generator) -> np.ndarray:
    return _colour(rng, (5, 20), (150, 230), (170, 240))  # orange to red


def _head_colour(rng: np.random.Generator) -> np.ndarray:
    return _colour(rng, (100, 130), (80, 200), (50, 110))  # dark blue


def _paint(
    image: np.ndarray, mask: np.ndarray, colour: np.ndarray, rng: np.random.Generator, noise: float
) -> None:
    count = int(mask.sum())
    if count:
        image[mask] = colour + rng.normal(0.0, noise, (count, 3)).astype(np.float32)


def _background(rng: np.random.Generator) -> np.ndarray:
    """A smooth tone with clutter: blobs and stripes, some in the object's colours."""
    tone = _colour(rng, (0, 180), (20, 120), (90, 200))
    image = np.empty((HEIGHT, WIDTH, 3), np.float32)
    image[:] = tone
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    image += (25.0 * (xx / WIDTH - 0.5) + 15.0 * (yy / HEIGHT - 0.5))[:, :, None]
    for _ in range(int(rng.integers(5, 10))):
        kind = rng.random()
        if kind < 0.35:
            colour = _body_colour(rng)
        elif kind < 0.55:
            colour = _head_colour(rng)
        else:
            colour = _colour(rng, (0, 180), (30, 220), (60, 230))
        canvas = np.zeros((HEIGHT, WIDTH), np.uint8)
        cx, cy = int(rng.integers(0, WIDTH)), int(rng.integers(0, HEIGHT))
        if rng.random() < 0.5:
            axes = (int(rng.integers(8, 40)), int(rng.integers(6, 30)))
            cv2.ellipse(canvas, (cx, cy), axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
        else:
            angle = rng.uniform(0, np.pi)
            length = rng.integers(40, 160)
            dx, dy = int(np.cos(angle) * length), int(np.sin(angle) * length)
            cv2.line(canvas, (cx - dx, cy - dy), (cx + dx, cy + dy), 1, int(rng.integers(4, 14)))
        _paint(image, canvas.astype(bool), colour, rng, 8.0)
    return image


def _beetle(rng: np.random.Generator) -> tuple[list[np.ndarray], np.ndarray]:
    """(part masks: body, head, legs), and the union = the object's ground truth."""
    scale = rng.uniform(0.9, 1.5)
    a, b = int(34 * scale * rng.uniform(0.9, 1.2)), int(22 * scale * rng.uniform(0.8, 1.1))
    margin = a + 30
    cx = int(rng.integers(margin, WIDTH - margin))
    cy = int(rng.integers(min(margin, HEIGHT // 2 - 1), max(HEIGHT - margin, HEIGHT // 2)))
    theta = float(rng.uniform(0, 360))
    t = np.deg2rad(theta)
    ux, uy = np.cos(t), np.sin(t)  # body axis
    vx, vy = -uy, ux
    body = np.zeros((HEIGHT, WIDTH), np.uint8)
    cv2.ellipse(body, (cx, cy), (a, b), theta, 0, 360, 1, -1)
    head = np.zeros_like(body)
    radius = int(b * rng.uniform(0.55, 0.8))
    hx, hy = cx + ux * (a + radius * 0.6), cy + uy * (a + radius * 0.6)
    cv2.circle(head, (int(hx), int(hy)), radius, 1, -1)
    legs = np.zeros_like(body)
    thick = max(4, round(5 * scale))
    for offset in (-0.35, 0.35):
        for side in (-1, 1):
            sx, sy = cx + ux * a * offset + vx * side * b * 0.8, cy + uy * a * offset + vy * side * b * 0.8
            reach = b * rng.uniform(0.8, 1.2)
            bend = rng.uniform(-0.5, 0.5)
            ex, ey = sx + (vx * side + ux * bend) * reach, sy + (vy * side + uy * bend) * reach
            cv2.line(legs, (int(sx), int(sy)), (int(ex), int(ey)), 1, thick)
    parts = [body.astype(bool), head.astype(bool) & ~body.astype(bool), legs.astype(bool)]
    parts[2] &= ~(parts[0] | parts[1])
    return parts, parts[0] | parts[1] | parts[2]


def domain_sample(seed: int) -> Sample:
    """One image of the project (deterministic per ``seed``)."""
    rng = np.random.default_rng([20261125, seed])
    image = _background(rng)
    parts, gt = _beetle(rng)
    body_colour, head_colour = _body_colour(rng), _head_colour(rng)
    _paint(image, parts[0], body_colour, rng, 10.0)
    _paint(image, parts[1], head_colour, rng, 8.0)
    _paint(image, parts[2], head_colour * rng.uniform(0.7, 1.0), rng, 8.0)
    # clutter of the body's colour touching the object: where a colour graph cut leaks
    for _ in range(int(rng.integers(0, 2))):
        rows, cols = np.nonzero(gt)
        pick = int(rng.integers(rows.size))
        canvas = np.zeros((HEIGHT, WIDTH), np.uint8)
        angle = rng.uniform(0, np.pi)
        length = rng.integers(50, 120)
        dx, dy = int(np.cos(angle) * length), int(np.sin(angle) * length)
        cv2.line(
            canvas,
            (int(cols[pick]) - dx, int(rows[pick]) - dy),
            (int(cols[pick]) + dx, int(rows[pick]) + dy),
            1,
            int(rng.integers(6, 14)),
        )
        touching = canvas.astype(bool) & ~gt
        _paint(image, touching, _body_colour(rng), rng, 10.0)
    sigma = rng.uniform(0.4, 1.2)
    image = cv2.GaussianBlur(image, (0, 0), sigma)
    image += rng.normal(0.0, rng.uniform(3.0, 8.0), image.shape).astype(np.float32)
    stem = f"beetle{seed:04d}"
    return Sample(
        stem=stem,
        image=np.clip(image, 0, 255).astype(np.uint8),
        gt=gt,
        ignore=None,
        image_path=Path("domain") / f"{stem}.png",
    )


def domain_samples(count: int, *, start: int = 0) -> list[Sample]:
    """``count`` images, seeds ``start`` .. ``start + count - 1``."""
    if count < 0 or start < 0:
        raise ValueError("count and start must not be negative")
    return [domain_sample(seed) for seed in range(start, start + count)]
