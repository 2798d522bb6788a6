"""Training images for SAM's mask decoder: in SAM's input frame, encoded once.

:func:`prepare_images` (driver side) groups a run's pairs by image and resizes each image with SAM's
own ``ResizeLongestSide`` to the model's input size (and its masks alike), so that what travels to
the Ray Train workers is never larger than what the encoder sees, and prompts need no coordinate
transform. :func:`embed_images` (worker side) encodes each image once, under ``no_grad``, and keeps
its embedding with its masks' targets in the decoder's output frame: every later prompt reuses them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import cv2
import numpy as np
import torch

from seemly.engines.base import as_rgb
from seemly.learning.sam_losses import low_res_target

if TYPE_CHECKING:
    from seemly.engines.sam import SamEngine
    from seemly.learning.data import TrainingPair


@dataclass
class DecoderImage:
    """One training image in SAM's input frame and the masks of its regions (same size)."""

    image: np.ndarray  # H x W x 3 uint8, longest side = the model's img_size
    masks: list[np.ndarray]  # H x W bool, one per region
    source: str


def prepare_images(pairs: Sequence[TrainingPair], img_size: int) -> list[DecoderImage]:
    """Group ``pairs`` by image and bring each into SAM's input frame (regions too small to survive
    the resize are left out; an image left with none is dropped)."""
    from segment_anything.utils.transforms import ResizeLongestSide

    transform = ResizeLongestSide(img_size)
    grouped: dict[str, list[TrainingPair]] = {}
    for pair in pairs:
        grouped.setdefault(pair.sha256, []).append(pair)
    images = []
    for sha, group in grouped.items():
        image = transform.apply_image(as_rgb(group[0].image))
        height, width = image.shape[:2]
        masks = []
        for pair in group:
            gt = pair.gt.astype(np.float32)
            shrink = width < gt.shape[1]
            resized = cv2.resize(
                gt, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
            )
            if (resized >= 0.5).any():
                masks.append(resized >= 0.5)
        if masks:
            images.append(DecoderImage(np.ascontiguousarray(image), masks, sha[:12]))
    return images


@dataclass
class EmbeddedImage:
    """An image's embedding with its masks and their targets in the decoder's output frame."""

    features: torch.Tensor  # 1 x C x h x w, on the model's device
    gts: list[np.ndarray]
    targets: torch.Tensor  # M x 1 x lh x lw
    valid: torch.Tensor  # 1 x 1 x lh x lw


def embed_images(engine: SamEngine, images: Sequence[DecoderImage]) -> list[EmbeddedImage]:
    """Encode every image once with ``engine`` (its encoder, ``no_grad``); targets on its device."""
    model = engine.model
    img_size = int(model.image_encoder.img_size)
    low = tuple(int(v) for v in model.prompt_encoder.mask_input_size)
    embedded = []
    for item in images:
        state = engine.embed(item.image, item.source)  # no_grad inside
        if tuple(state.input_size) != item.image.shape[:2]:
            raise ValueError(
                f"image {item.source} is {item.image.shape[1]}x{item.image.shape[0]}, not in the model's "
                f"input frame ({img_size} px longest side): use prepare_images"
            )
        maps = [low_res_target(m, img_size, low) for m in item.masks]  # type: ignore[arg-type]
        targets = torch.from_numpy(np.stack([t for t, _ in maps]))[:, None].to(engine.device)
        valid = torch.from_numpy(maps[0][1])[None, None].to(engine.device)
        embedded.append(EmbeddedImage(state.features.float(), list(item.masks), targets, valid))
    return embedded
